"""`inferstack classify` as a user runs it: a real folder, the installed console script, a real stack."""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from inferstack.client import Client, ClassifyError, classify_paths, iter_images
from tests.helpers import DIGIT_LABELS, digits_env, encode, stack_log, wait_for

CLI = str(Path(sys.executable).with_name("inferstack"))
FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("gif", "GIF"), ("bmp", "BMP"), ("tiff", "TIFF"), ("webp", "WEBP")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits_model) -> dict[str, object]:
    """200 image files in nested folders, six formats, five of them corrupt; plus a non-image."""
    root = tmp_path_factory.mktemp("images")
    truth: dict[str, str] = {}
    for i in range(195):
        ext, fmt = FORMATS[i % len(FORMATS)]
        sub = root / f"batch{i % 3}" / ("deep" if i % 7 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"digit{i:03d}.{ext}"
        path.write_bytes(encode(digits_model["x_test"][i], fmt))
        truth[str(path)] = DIGIT_LABELS[digits_model["y_test"][i]]
    good_jpeg = encode(digits_model["x_test"][0], "JPEG")
    corrupt = {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 3],
        "text.png": b"this is not an image\n",
        "empty.gif": b"",
        "noise.webp": os.urandom(2000),
        "header-only.png": encode(digits_model["x_test"][1], "PNG")[:40],
    }
    for name, data in corrupt.items():
        (root / "batch1" / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image: the walk skips it\n")
    return {"root": root, "truth": truth, "corrupt": {str(root / "batch1" / n) for n in corrupt}}


@pytest.fixture(scope="module")
def stack(make_stack, digits_model):
    return make_stack(workers=1, env=digits_env(digits_model))


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_walk_finds_every_image_in_sorted_order(folder):
    found = list(iter_images([folder["root"]]))
    assert len(found) == 200 and set(found) == set(folder["truth"]) | folder["corrupt"]
    assert not any(p.endswith(".txt") for p in found)


def test_killed_half_way_then_resumed_classifies_each_image_exactly_once(stack, folder, tmp_path):
    out = tmp_path / "out.jsonl"
    argv = [CLI, "classify", str(folder["root"]), "--url", stack.url, "--out", str(out), "--concurrency", "4"]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    worker = stack.workers[0]
    try:
        wait_for(lambda: run.poll() is not None or (out.exists() and out.read_text().count("\n") >= 50),
                 timeout=120, what="50 results written", interval=0.005)
        # Freeze the worker so the run cannot finish on its own, then kill the run half-way.
        worker.send_signal(signal.SIGSTOP)
        run.kill()
        run.wait(30)
    finally:
        worker.send_signal(signal.SIGCONT)
    first = read_lines(out)
    assert 50 <= len(first) < 200, run.stderr.read().decode()[-2000:]
    with out.open("a") as fh:
        fh.write('{"path": "' + str(folder["root"]))  # a line torn by the kill

    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 1, resumed.stderr  # the corrupt files failed
    skipped = int(re.search(r"(\d+) already done", resumed.stderr).group(1))
    assert skipped == len(first), resumed.stderr  # the first run's answers were not asked again

    records = read_lines(out)
    paths = [r["path"] for r in records]
    assert len(paths) == len(set(paths)) == 200, "every image exactly once"
    assert set(paths) == set(folder["truth"]) | folder["corrupt"]
    by_path = {r["path"]: r for r in records}
    for path in folder["corrupt"]:
        assert by_path[path]["status"] == 400 and by_path[path]["error"], by_path[path]
    correct = 0
    for path, label in folder["truth"].items():
        preds = by_path[path]["predictions"]
        assert len(preds) == 5 and preds[0]["label"] in DIGIT_LABELS
        correct += preds[0]["label"] == label
    assert correct / len(folder["truth"]) > 0.8, stack_log(stack)

    # Nothing left to do: a third run sends nothing and still reports the failures.
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "0 classified" in again.stderr and "200 already done" in again.stderr
    assert read_lines(out) == records


def test_all_good_images_exit_zero_and_stdout_is_json_lines(stack, folder):
    files = sorted(folder["truth"])[:6]
    done = subprocess.run([CLI, "classify", *files, "--url", stack.url, "--top-k", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["path"] for r in lines) == files
    assert all(len(r["predictions"]) == 2 for r in lines)


def test_503_is_retried_after_retry_after(make_stack, digits_model, folder, tmp_path):
    # A queue of one: concurrent requests meet "queue full" and must come back later.
    busy = make_stack(workers=1, env=digits_env(digits_model, INFERSTACK_MAX_QUEUE="1"))
    files = sorted(folder["truth"])[:40]
    out = tmp_path / "busy.jsonl"
    t0 = time.monotonic()
    done = subprocess.run([CLI, "classify", *files, "--url", busy.url, "--out", str(out), "--concurrency", "8",
                           "--retries", "100"], capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    # The server says Retry-After: 1; a client that honours it spends at least that long waiting.
    assert elapsed >= 1.0
    assert sorted(r["path"] for r in read_lines(out)) == files
    assert all("predictions" in r for r in read_lines(out))
    metrics = requests.get(busy.url + "/metrics", timeout=10).text
    rejected = re.search(r'inferstack_requests_total\{code="503"\} (\d+)', metrics)
    assert rejected and float(rejected.group(1)) > 0, "the test needs the server to have answered 503"


def test_library_raises_with_the_services_error(stack, folder):
    client = Client(stack.url, top_k=3)
    preds = client.classify_file(sorted(folder["truth"])[0])
    assert len(preds) == 3
    with pytest.raises(ClassifyError) as info:
        client.classify(b"nope", "x.png")
    assert info.value.status == 400 and not info.value.retryable and "image" in info.value.message


def limited_memory() -> None:
    """The CLI's address space capped at 4 GiB: reading /dev/zero unbounded ends in MemoryError, not a swapped host."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_only_regular_files_under_the_size_cap_are_read(stack, folder, tmp_path):
    good = sorted(folder["truth"])[0]
    root = tmp_path / "odd"
    root.mkdir()
    (root / "a-good.png").symlink_to(good)  # a symlink to a regular file is fine
    (root / "fifo.jpg").parent.mkdir(exist_ok=True)
    os.mkfifo(root / "fifo.jpg")  # nobody writes to it: a plain open() would wait forever
    (root / "zero.jpg").symlink_to("/dev/zero")  # endless
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.png"))
    (root / "huge.png").write_bytes(Path(good).read_bytes() + b"\0" * 5000)
    cap = Path(good).stat().st_size + 100
    try:
        done = subprocess.run([CLI, "classify", str(root), "--url", stack.url, "--no-progress",
                               "--max-bytes", str(cap)], capture_output=True, text=True, timeout=60,
                              preexec_fn=limited_memory)
    finally:
        listener.close()
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr
    by_name = {Path(r["path"]).name: r for r in map(json.loads, done.stdout.splitlines())}
    assert len(by_name["a-good.png"]["predictions"]) == 5
    expected = {"fifo.jpg": "a FIFO", "zero.jpg": "a character device", "sock.png": "a socket",
                "huge.png": f"over the {cap}-byte limit"}
    for name, why in expected.items():
        record = by_name[name]
        assert record["skipped"] is True and why in record["error"] and "predictions" not in record, record
    assert "4 of the failed were skipped unread" in done.stderr, done.stderr


class CountingWalk:
    """The paths of a folder, counting how many the client has taken so far."""

    def __init__(self, root: Path) -> None:
        self.paths = list(iter_images([root]))
        self.taken = 0

    def __iter__(self):
        for path in self.paths:
            self.taken += 1
            yield path


def test_walk_streams_and_results_come_in_walk_order(stack, folder):
    walk = CountingWalk(folder["root"])
    ahead: list[int] = []

    class Sink(io.StringIO):
        def write(self, text: str) -> int:
            ahead.append(walk.taken - len(ahead))  # paths taken from the walk but not yet written
            return super().write(text)

    sink, concurrency = Sink(), 4
    # classify_paths takes any iterable of paths: here the folder's walk, counted as it is consumed.
    summary = classify_paths(walk, Client(stack.url, top_k=1), sink, concurrency, progress=False)
    written = [json.loads(line)["path"] for line in sink.getvalue().splitlines()]
    assert written == walk.paths, "results in walk order"
    assert summary.done + summary.failed == len(walk.paths) == 200
    assert max(ahead) <= 2 * concurrency, f"the client took {max(ahead)} paths ahead of its output"


def test_resume_file_lines_that_are_not_results_are_reported_and_ignored(stack, folder, tmp_path):
    files = sorted(folder["truth"])[:3]
    out = tmp_path / "resume.jsonl"
    good = json.dumps({"path": files[0], "predictions": [{"label": "x", "probability": 1.0}]})
    bad = ['{"path": ["x"]}', json.dumps({"path": files[1], "error": "busy", "status": "503"}), "[1, 2]",
           json.dumps({"path": files[2]}), "not json", json.dumps({"path": files[1], "error": "x", "status": True})]
    out.write_text("\n".join([good, *bad]) + "\n")
    done = subprocess.run([CLI, "classify", *files, "--url", stack.url, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert f"ignored {len(bad)} line(s) of {out}" in done.stderr and "line 3: status '503'" in done.stderr
    assert "2 classified" in done.stderr and "1 already done" in done.stderr, done.stderr
    records = read_lines(out)
    assert [r["path"] for r in records] == files and all("predictions" in r for r in records)


class NoPredictions(BaseHTTPRequestHandler):
    """A front that answers 200 without predictions (a proxy's page, a truncated body): no real stack does."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = {"/predict": b'{"model": "x"}'}.get(self.path.split("?")[0], b"<html>ok</html>")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_200_without_predictions_is_that_images_error(folder, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoPredictions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    files = sorted(folder["truth"])[:2]
    try:
        done = subprocess.run([CLI, "classify", *files, "--url", f"http://127.0.0.1:{server.server_port}",
                               "--no-progress"], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1 and "2 failed" in done.stderr, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in records] == files
    assert all(r["error"].startswith("HTTP 200 without a predictions list") and r["status"] is None for r in records)
