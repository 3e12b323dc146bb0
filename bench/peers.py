"""Ours against Ray Serve, LitServe and mosec, serving the same OpenVINO IR, side by side in one run.

Every server gets the same model file (the IR our worker converts and caches, fp32 and NNCF int8),
compiled with our worker's settings, the same decode (`inferstack.imaging`), the same multipart
upload of a 451x300 JPEG and the same batch limits (32 images, 5 ms window); each batches its own
idiomatic way (bench/peer_servers/). Measured per server: throughput at `--clients` closed-loop
clients (with the whole machine's CPU per image) and p50 at one client, in `--rounds` rounds whose
server order rotates; medians, and the medians of each round's ours-to-theirs ratios (this VM's
speed drifts within minutes: a ratio within one round is steadier than a median across rounds).

The peers live in their own environment (`make bench-peers` creates bench/peer_servers/.venv from
bench/peer_servers/requirements.txt); they are not product dependencies.
Usage: python bench/peers.py [--precisions fp32,int8] [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from batch import random_weights  # noqa: E402
from bench import calibration_folder, load, machine, multipart, photo_jpeg, write_result  # noqa: E402

from inferstack.contract.settings import env_name as E  # noqa: E402
from tools.devstack import LocalStack, free_port  # noqa: E402

PEERS_DIR = ROOT / "bench" / "peer_servers"
PEER_PYTHON = PEERS_DIR / ".venv" / "bin" / "python"
PEERS = {"ray-serve": "ray_app.py", "litserve": "litserve_app.py", "mosec": "mosec_app.py"}
HINTS = {"fp32": "f32", "int8": ""}  # int8 IRs keep the CPU's default for their float parts, as ours


def build_ir(env: dict[str, str]) -> str:
    """Our worker's own conversion (and quantization), which caches the IR; returns its path.

    In a child process, then a wait for the machine to go quiet: with TensorFlow and NNCF left in
    this process (the load generator's), the first server measured after them ran at about 0.6x
    its later rounds, whichever it was."""
    cache = Path(env[E("cache_dir")]) / "openvino"
    before = set(cache.glob("*.xml")) if cache.exists() else set()
    code = ("from inferstack.config import Settings; from inferstack_worker.model import load_classifier; "
            "load_classifier(Settings.from_env())")
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True)
    made = sorted(set(cache.glob("*.xml")) - before, key=lambda p: p.stat().st_mtime)
    if not made:
        raise RuntimeError(f"the worker cached no converted model under {cache}")
    wait_quiet()
    return str(made[-1])


def wait_quiet(idle: float = 0.9, longest_s: float = 60.0) -> None:
    """Until the machine is at least `idle` idle over 2 s (or longest_s has passed)."""
    deadline = time.monotonic() + longest_s
    while time.monotonic() < deadline:
        total0, busy0 = time.monotonic(), busy_cpu_s()
        time.sleep(2.0)
        busy = (busy_cpu_s() - busy0) / ((time.monotonic() - total0) * (os.cpu_count() or 1))
        if busy <= 1 - idle:
            return


def wait_answering(url: str, body: bytes, ctype: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if load(url, 1, 0.5, body, ctype)["requests"] > 0:
            return
        time.sleep(1)
    raise RuntimeError(f"{proc.args} did not answer within {timeout_s} s")


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (every process: the server's and the clients').
    user + nice + system + irq + softirq: not idle, iowait, or steal (the hypervisor running others)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measure(url: str, body: bytes, ctype: str, clients: int, seconds: float) -> dict[str, float]:
    load(url, 4, 2.0, body, ctype)  # warm: connections, first batches
    cpu0 = busy_cpu_s()
    busy = load(url, clients, seconds, body, ctype)
    cpu = busy_cpu_s() - cpu0
    one = load(url, 1, seconds, body, ctype)
    return {"img_s": busy["throughput_img_s"], "p50_ms_1_client": one["p50_ms"],
            "cpu_ms_per_img": 1000 * cpu / max(1, busy["requests"]),
            "failures": busy["failures"] + one["failures"]}


def run_ours(env: dict[str, str], body: bytes, ctype: str, clients: int, seconds: float, logs: Path) -> dict:
    with LocalStack(env=env, log_dir=str(logs)) as stack:
        stack.start(workers=1)
        return measure(stack.url, body, ctype, clients, seconds)


def run_peer(name: str, ir: str, precision: str, body: bytes, ctype: str, clients: int, seconds: float,
             logs: Path) -> dict:
    port = free_port()
    env = {**os.environ, "PEER_IR": ir, "PEER_LABELS": str(logs.parent / "labels.txt"), "PEER_PORT": str(port),
           "PEER_BATCH": "32", "PEER_DELAY_MS": "5", "PEER_PRECISION_HINT": HINTS[precision],
           "PYTHONPATH": str(PEERS_DIR)}
    with open(logs / f"{name}-{precision}-{port}.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([str(PEER_PYTHON), str(PEERS_DIR / PEERS[name])], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=PEERS_DIR)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_answering(url, body, ctype, proc)
        return measure(url, body, ctype, clients, seconds)
    finally:
        stop_group(proc)
        if name == "ray-serve":  # Ray's daemons outlive the driver's process group
            subprocess.run([str(PEER_PYTHON), "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                           check=False)


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Medians per server; and, since this VM's speed drifts within minutes, each round's ratio of
    ours to the server measured minutes apart in the same round (img/s: ours / theirs; p50: theirs /
    ours; above 1 is ours ahead), with their medians."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for precision, servers in runs.items():
        out[precision] = {}
        ours = servers["inferstack"]
        for server, rows in servers.items():
            row = {
                "img_s": float(np.median([r["img_s"] for r in rows])),
                "p50_ms_1_client": float(np.median([r["p50_ms_1_client"] for r in rows])),
                "cpu_ms_per_img": float(np.median([r["cpu_ms_per_img"] for r in rows])),
                "failures": int(sum(r["failures"] for r in rows)),
                "rounds": [{k: round(v, 1) for k, v in r.items()} for r in rows],
            }
            if server != "inferstack":
                img = [o["img_s"] / r["img_s"] for o, r in zip(ours, rows)]
                p50 = [r["p50_ms_1_client"] / o["p50_ms_1_client"] for o, r in zip(ours, rows)]
                row["ours_over_theirs"] = {"img_s": round(float(np.median(img)), 3),
                                           "p50_1_client": round(float(np.median(p50)), 3),
                                           "img_s_rounds": [round(x, 3) for x in img],
                                           "p50_rounds": [round(x, 3) for x in p50]}
            out[precision][server] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ResNet50")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not PEER_PYTHON.exists():
        raise SystemExit(f"no peers environment at {PEER_PYTHON.parent.parent}: run `make bench-peers`")
    work = Path(tempfile.mkdtemp(prefix="inferstack-bench-peers-"))
    logs = work / "logs"
    logs.mkdir()
    from inferstack_worker.labels import imagenet_labels

    (work / "labels.txt").write_text("\n".join(imagenet_labels()) + "\n")
    base = {E("model"): args.model, E("weights"): random_weights(args.model, work / "random.weights.h5"),
            E("runtime"): "openvino", E("batch_size"): "32", E("max_batch_delay_ms"): "5",
            E("cache_dir"): str(work / "cache"), E("calibration_dir"): calibration_folder(work / "calibration")}
    body, ctype = multipart(photo_jpeg())
    servers = ["inferstack", *args.peers.split(",")]
    runs: dict[str, dict[str, list[dict]]] = {}
    for precision in args.precisions.split(","):
        env = {**base, E("precision"): precision}
        ir = build_ir(env)
        runs[precision] = {s: [] for s in servers}
        for r in range(args.rounds):
            for server in servers[r % len(servers):] + servers[:r % len(servers)]:
                print(f"[{precision} round {r + 1}] {server} ...", flush=True)
                row = (run_ours(env, body, ctype, args.clients, args.duration, logs) if server == "inferstack"
                       else run_peer(server, ir, precision, body, ctype, args.clients, args.duration, logs))
                print(f"  {row['img_s']:.1f} img/s at {args.clients} clients, p50 {row['p50_ms_1_client']:.1f} ms "
                      f"at 1, {row['failures']} failures", flush=True)
                runs[precision][server].append(row)
    table = summarize(runs)
    print(f"\nprecision server       img/s@{args.clients}  p50 ms@1  CPU ms/img  failures  ours/theirs (img/s, p50)")
    for precision, rows in table.items():
        for server, row in rows.items():
            ratio = row.get("ours_over_theirs", {})
            print(f"{precision:9s} {server:12s} {row['img_s']:9.1f} {row['p50_ms_1_client']:9.1f} "
                  f"{row['cpu_ms_per_img']:10.1f} {row['failures']:9d}  {ratio.get('img_s', '')} {ratio.get('p50_1_client', '')}")
    write_result(args.out, "peers.json", {"model": args.model, "clients": args.clients, "duration_s": args.duration,
                                          "rounds": args.rounds, "machine": machine(), "results": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
