"""Run folders of images through a deployed service: `inferstack classify PATH... --url URL`.

Also a library:

    from inferstack.client import Client, classify_paths
    Client("http://127.0.0.1:5000").classify_file("cat.jpg")   # [{"label", "probability"}, ...]

Each image is one `POST /predict` (so one bad file fails alone), sent over N keep-alive
connections; a 503 is retried after its Retry-After. Results are JSON Lines, one per image, in
walk order: {"path", "predictions"} or {"path", "error", "status"} (plus "skipped": true for a file
never sent: not a regular file, or over --max-bytes). A re-run with the same --out skips images
already answered there (an interrupted run resumes where it stopped) and retries those that failed
for a reason that may pass (5xx, connection errors, skipped files); lines of it that are not such
records are reported and dropped.

The walk streams: one directory's sorted names at a time (depth-first, directories in name order),
never the whole tree; at most 2 x --concurrency images are in flight, and their results are written
oldest first, so the output order is the walk order whatever the response times.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from inferstack.contract.http import IMAGE_FIELD, LOCAL_WEB_PORT, PREDICT_PATH
from inferstack.contract.media import IMAGE_SUFFIXES
from inferstack.contract.settings import default as setting_default

DEFAULT_RETRIES = 8
# The client's own setting (not a server one): where `inferstack classify` sends images.
URL_ENV = "INFERSTACK_URL"
LOCAL_URL = f"http://127.0.0.1:{LOCAL_WEB_PORT}"
MAX_BACKOFF_S = 30.0
# The server's default upload limit: a larger file would only earn a 413.
DEFAULT_MAX_BYTES: int = setting_default("max_image_bytes")
# open() flags for an image: never wait for a FIFO's writer, never adopt a terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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


class SkippedFile(ClassifyError):
    """A path that is not a regular file of at most the size cap: never sent (nor read)."""


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_regular(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SkippedFile(f"skipped: {_file_kind(st.st_mode)}, not a regular file")
    if st.st_size > max_bytes:
        raise SkippedFile(f"skipped: {st.st_size} bytes, over the {max_bytes}-byte limit (--max-bytes)")


def read_image_file(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a symlink to one is fine).

    Anything else raises SkippedFile without being read: stat first (so a device is never opened),
    then open non-blocking (a FIFO swapped in since cannot block us) and check the open file again.
    """
    try:
        _check_regular(os.stat(path), max_bytes)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ClassifyError(f"cannot read the file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        _check_regular(st, max_bytes)
        # read(n) allocates n bytes up front: ask for the file's size, and the cap only if it grows.
        data = fh.read(st.st_size + 1)
        if len(data) > st.st_size:
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:  # it grew since fstat
        raise SkippedFile(f"skipped: over the {max_bytes}-byte limit (--max-bytes)")
    return data


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

    def __init__(self, url: str, top_k: int = 5, timeout_s: float = 120.0, retries: int = DEFAULT_RETRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith(PREDICT_PATH) else PREDICT_PATH)
        self.top_k = top_k
        self.max_bytes = max_bytes
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
                    self.url, files={IMAGE_FIELD: (filename, data)}, params={"top_k": self.top_k}, timeout=self.timeout_s
                )
            except requests.RequestException as exc:
                if last:
                    raise ClassifyError(f"request failed: {exc}") from None
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if resp.status_code == 200:
                return _predictions(resp)
            if resp.status_code in (503, 504) and not last:
                # The service is busy: wait as long as it asks (503), or back off (504).
                time.sleep(min(_retry_after(resp.headers.get("Retry-After"), backoff), MAX_BACKOFF_S))
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            raise ClassifyError(_error_text(resp), resp.status_code)
        raise AssertionError("unreachable")

    def classify_file(self, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
        return self.classify(read_image_file(path, self.max_bytes), os.path.basename(path))


def _predictions(resp: requests.Response) -> list[dict[str, Any]]:
    """A 200's predictions; a 200 without them (a proxy's page, a truncated body) is this image's error."""
    try:
        predictions = resp.json()["predictions"]
    except (ValueError, KeyError, TypeError):
        predictions = None
    if not isinstance(predictions, list):
        raise ClassifyError(f"HTTP 200 without a predictions list: {resp.text[:200]!r}")
    return predictions


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
    not_sent: int = 0  # of the failed: files skipped (not regular, or over the size cap)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.earlier_failures == 0


@dataclass
class Resume:
    """What an earlier run's --out says: the paths answered, how many failed for good, bad lines."""

    done: set[str] = field(default_factory=set)
    failures: int = 0
    ignored: list[str] = field(default_factory=list)  # "line N: why", for the user


def _record_problem(record: Any) -> str | None:
    """Why a resume line is not a record this client writes, or None when it is one."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if not isinstance(record.get("path"), str):
        return "path is not a string"
    if "error" in record:
        status = record.get("status")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            return f"status {status!r} is not an HTTP status"
        return None
    if not isinstance(record.get("predictions"), list):
        return "neither predictions (a list) nor error"
    return None


def load_done(out: Path) -> Resume:
    """Paths answered in an earlier run's output, how many of them failed for good, lines ignored.

    Rewrites the file without its retryable failures (they are tried again), without a line torn by
    a kill and without lines that are not records, so each path ends up in it exactly once.
    """
    resume = Resume()
    if not out.exists():
        return resume
    kept: list[str] = []
    with out.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            problem = "not JSON" if record is None else _record_problem(record)
            if problem is None and not line.endswith("\n"):
                problem = "torn (no newline at the end)"
            if problem is not None:
                resume.ignored.append(f"line {number}: {problem}")
                continue
            path = record["path"]
            if path in resume.done:
                continue
            if "error" in record:
                if ClassifyError("", record.get("status")).retryable:
                    continue
                resume.failures += 1
            resume.done.add(path)
            kept.append(line)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, out)
    return resume


def classify_paths(
    paths: Iterable[str | os.PathLike[str]],
    client: Client,
    sink: IO[str],
    concurrency: int = 4,
    skip: set[str] | None = None,
    progress: bool | None = None,
) -> Summary:
    """Classify every image under `paths`, writing one JSON line per image to `sink`, in walk order."""
    summary = Summary()
    skip = skip or set()
    # The walk streams, so the total is unknown: the bar counts and shows the rate.
    bar = tqdm(unit="img", disable=None if progress is None else not progress, file=sys.stderr, dynamic_ncols=True)

    def one(path: str) -> dict[str, Any]:
        try:
            return {"path": path, "predictions": client.classify_file(path)}
        except SkippedFile as exc:
            return {"path": path, "error": exc.message, "status": None, "skipped": True}
        except ClassifyError as exc:
            return {"path": path, "error": exc.message, "status": exc.status}

    # Oldest first: the window holds the requests in flight (and a few queued) in walk order.
    window: deque[Future[dict[str, Any]]] = deque()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="classify") as pool:
        try:
            for path in iter_images(paths):
                if path in skip:
                    summary.skipped += 1
                    continue
                window.append(pool.submit(one, path))
                if len(window) >= concurrency * 2:
                    _record(window.popleft().result(), sink, summary, bar)
            while window:
                _record(window.popleft().result(), sink, summary, bar)
        except KeyboardInterrupt:
            for f in window:
                f.cancel()
            raise
        finally:
            bar.close()
    return summary


def _record(record: dict[str, Any], sink: IO[str], summary: Summary, bar: tqdm) -> None:
    sink.write(json.dumps(record) + "\n")
    sink.flush()  # a killed run keeps every line it reported
    if "error" in record:
        summary.failed += 1
        summary.not_sent += bool(record.get("skipped"))
        summary.failures.append(f"{record['path']}: {record['error']}")
    else:
        summary.done += 1
    bar.update(1)


def _report_ignored(out: Path, ignored: list[str]) -> None:
    if ignored:
        print(f"inferstack: ignored {len(ignored)} line(s) of {out} that are not results (dropped from it):",
              file=sys.stderr)
        for line in ignored[:10]:
            print(f"  {line}", file=sys.stderr)


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
    c.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"skip files larger than this (default {DEFAULT_MAX_BYTES}, the server's default limit)")
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
    if args.max_bytes < 1:
        parser.error("--max-bytes must be >= 1")
    client = Client(args.url, top_k=args.top_k, timeout_s=args.timeout, retries=args.retries, max_bytes=args.max_bytes)
    progress = False if args.no_progress else None
    t0 = time.monotonic()
    try:
        if args.out:
            out = Path(args.out)
            resume = load_done(out)
            _report_ignored(out, resume.ignored)
            with out.open("a", encoding="utf-8") as sink:
                summary = classify_paths(args.paths, client, sink, args.concurrency, resume.done, progress)
            summary.earlier_failures = resume.failures
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
    if summary.not_sent:
        print(f"inferstack: {summary.not_sent} of the failed were skipped unread: not regular files, or over "
              f"--max-bytes ({args.max_bytes})", file=sys.stderr)
    for line in summary.failures[:10]:
        print(f"  failed: {line}", file=sys.stderr)
    sys.exit(0 if summary.ok else 1)


if __name__ == "__main__":
    main()
