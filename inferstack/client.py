"""Run folders of images through a deployed service: `inferstack classify PATH... --url URL`.

Also a library:

    from inferstack.client import Client, classify_paths
    Client("http://127.0.0.1:5000").classify_file("cat.jpg")   # [{"label", "probability"}, ...]

Each image is one `POST /predict` (so one bad file fails alone), sent over N keep-alive
connections; a 503 is retried after its Retry-After. Results are JSON Lines, one per image, in
completion order: {"path", "predictions"} or {"path", "error", "status"}. A re-run with the same
--out skips images already answered there (an interrupted run resumes where it stopped) and
retries those that failed for a reason that may pass (5xx, connection errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from inferstack.contract.http import LOCAL_WEB_PORT, PREDICT_PATH
from inferstack.contract.media import IMAGE_SUFFIXES

DEFAULT_RETRIES = 8
# The client's own setting (not a server one): where `inferstack classify` sends images.
URL_ENV = "INFERSTACK_URL"
LOCAL_URL = f"http://127.0.0.1:{LOCAL_WEB_PORT}"
MAX_BACKOFF_S = 30.0


class ClassifyError(Exception):
    """The service (or the network) did not classify this image."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def retryable(self) -> bool:
        """Could a later run succeed? Not for a bad image (4xx)."""
        return self.status is None or self.status >= 500


def iter_images(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Files as given, and image files (by suffix) under folders, recursively, in sorted order."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        yield os.path.join(root, name)
        else:
            yield str(path)


def _retry_after(value: str | None, default: float) -> float:
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return default


class Client:
    """A /predict client; thread-safe, with one keep-alive connection per thread."""

    def __init__(self, url: str, top_k: int = 5, timeout_s: float = 120.0, retries: int = DEFAULT_RETRIES) -> None:
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith(PREDICT_PATH) else PREDICT_PATH)
        self.top_k = top_k
        self.timeout_s = timeout_s
        self.retries = retries
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=1))
            session.mount("https://", HTTPAdapter(pool_connections=1, pool_maxsize=1))
            self._local.session = session
        return session

    def classify(self, data: bytes, filename: str = "image") -> list[dict[str, Any]]:
        """Top-k predictions for one encoded image; raises ClassifyError."""
        backoff = 0.5
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self._session().post(
                    self.url, files={"image": (filename, data)}, params={"top_k": self.top_k}, timeout=self.timeout_s
                )
            except requests.RequestException as exc:
                if last:
                    raise ClassifyError(f"request failed: {exc}") from None
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if resp.status_code == 200:
                return resp.json()["predictions"]
            if resp.status_code in (503, 504) and not last:
                # The service is busy: wait as long as it asks (503), or back off (504).
                time.sleep(min(_retry_after(resp.headers.get("Retry-After"), backoff), MAX_BACKOFF_S))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            raise ClassifyError(_error_text(resp), resp.status_code)
        raise AssertionError("unreachable")

    def classify_file(self, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ClassifyError(f"cannot read the file: {exc.strerror}") from None
        return self.classify(data, os.path.basename(path))


def _error_text(resp: requests.Response) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}: {resp.text[:200]}"


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0  # already answered in --out
    earlier_failures: int = 0  # final failures recorded by an earlier run
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.earlier_failures == 0


def load_done(out: Path) -> tuple[set[str], int]:
    """Paths answered in an earlier run's output, and how many of them failed for good.

    Rewrites the file without its retryable failures (they are tried again) and without a line
    torn by a kill, so each path ends up in it exactly once.
    """
    if not out.exists():
        return set(), 0
    done: set[str] = set()
    failures = 0
    kept: list[str] = []
    with out.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
                path = record["path"]
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill
            if not line.endswith("\n") or path in done:
                continue
            if "error" in record:
                if ClassifyError("", record.get("status")).retryable:
                    continue
                failures += 1
            done.add(path)
            kept.append(line)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, out)
    return done, failures


def classify_paths(
    paths: Iterable[str | os.PathLike[str]],
    client: Client,
    sink: IO[str],
    concurrency: int = 4,
    skip: set[str] | None = None,
    progress: bool | None = None,
) -> Summary:
    """Classify every image under `paths`, writing one JSON line per image to `sink`."""
    summary = Summary()
    skip = skip or set()
    todo = []
    for p in iter_images(paths):
        if p in skip:
            summary.skipped += 1
        else:
            todo.append(p)
    bar = tqdm(total=len(todo), unit="img", disable=None if progress is None else not progress, file=sys.stderr,
               dynamic_ncols=True)

    def one(path: str) -> dict[str, Any]:
        try:
            return {"path": path, "predictions": client.classify_file(path)}
        except ClassifyError as exc:
            return {"path": path, "error": exc.message, "status": exc.status}

    pending: set[Future[dict[str, Any]]] = set()
    queue = iter(todo)
    with ThreadPoolExecutor(concurrency, thread_name_prefix="classify") as pool:
        try:
            # Keep a bounded number in flight so a huge listing is not read into futures at once.
            for path in queue:
                pending.add(pool.submit(one, path))
                if len(pending) >= concurrency * 2:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    _record(finished, sink, summary, bar)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                _record(finished, sink, summary, bar)
        except KeyboardInterrupt:
            for f in pending:
                f.cancel()
            raise
        finally:
            bar.close()
    return summary


def _record(finished: set[Future[dict[str, Any]]], sink: IO[str], summary: Summary, bar: tqdm) -> None:
    for f in finished:
        record = f.result()
        sink.write(json.dumps(record) + "\n")
        sink.flush()  # a killed run keeps every line it reported
        if "error" in record:
            summary.failed += 1
            summary.failures.append(f"{record['path']}: {record['error']}")
        else:
            summary.done += 1
        bar.update(1)


def _batch(argv: list[str]) -> None:
    """`inferstack batch`: Spark lives in inferstack_offline, imported only when asked for."""
    try:
        from inferstack_offline.batch import main as batch_main
    except ImportError as exc:
        sys.exit(f"inferstack batch needs PySpark and the worker ({exc}): pip install 'inferstack[spark]'")
    batch_main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["batch"]:
        return _batch(argv[1:])
    parser = argparse.ArgumentParser(prog="inferstack", description="Clients for an inferstack service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("batch", add_help=False, help="classify a whole data set on Spark into Parquet or JSON Lines "
                   "(see inferstack batch --help)")
    c = sub.add_parser("classify", help="classify image files and folders through /predict, as JSON Lines")
    c.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders to walk for images")
    c.add_argument("--url", default=os.environ.get(URL_ENV, LOCAL_URL),
                   help=f"the service's base URL (default: ${URL_ENV} or {LOCAL_URL})")
    c.add_argument("--top-k", type=int, default=5, help="predictions per image (1..1000, default 5)")
    c.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    c.add_argument("--out", help="JSON Lines file; a re-run skips images already answered in it")
    c.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="retries on 503/504/network errors")
    c.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Only argparse and NumPy load here: TensorFlow and Spark wait until `finetune` runs.
    from inferstack_offline.finetune import cli as finetune_cli

    f = sub.add_parser("finetune", help="train a classifier for your own labelled photos (transfer learning)",
                       description=finetune_cli.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune_cli.add_arguments(f)
    args = parser.parse_args(argv)
    if args.command == "finetune":
        finetune_cli.run(args, f)
        return
    if not 1 <= args.top_k <= 1000:
        parser.error("--top-k must be between 1 and 1000")
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    client = Client(args.url, top_k=args.top_k, timeout_s=args.timeout, retries=args.retries)
    progress = False if args.no_progress else None
    t0 = time.monotonic()
    try:
        if args.out:
            out = Path(args.out)
            skip, earlier = load_done(out)
            with out.open("a", encoding="utf-8") as sink:
                summary = classify_paths(args.paths, client, sink, args.concurrency, skip, progress)
            summary.earlier_failures = earlier
        else:
            summary = classify_paths(args.paths, client, sys.stdout, args.concurrency, None, progress)
    except KeyboardInterrupt:
        print("inferstack: interrupted; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    elapsed = time.monotonic() - t0
    rate = (summary.done + summary.failed) / elapsed if elapsed > 0 else 0.0
    print(
        f"inferstack: {summary.done} classified, {summary.failed} failed, {summary.skipped} already done "
        f"({summary.earlier_failures} of them failed earlier) in {elapsed:.1f} s ({rate:.1f} images/s)",
        file=sys.stderr,
    )
    for line in summary.failures[:10]:
        print(f"  failed: {line}", file=sys.stderr)
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    main()
