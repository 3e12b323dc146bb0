"""`make loadtest`: locust headless against HOST, or against a local stack started for the run.

Reports (CSV + HTML) go to loadtest/results/. The exit code is locust's: non-zero when the
failure ratio or p95 threshold was exceeded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def locust_argv(host: str, users: int, spawn_rate: float, duration: str, out: Path, extra: list[str]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
        "--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", duration,
        "--csv", str(out / "predict"), "--html", str(out / "report.html"), "--only-summary", *extra,
    ]


def main() -> int:
    users = int(os.environ.get("USERS", "16"))
    rate = float(os.environ.get("SPAWN_RATE", "4"))
    duration = os.environ.get("DURATION", "60s")
    out = Path(os.environ.get("RESULTS", ROOT / "loadtest" / "results"))
    extra = sys.argv[1:]
    host = os.environ.get("HOST")
    if host:
        return subprocess.call(locust_argv(host, users, rate, duration, out, extra))

    from tools.devstack import LocalStack, weights_fallback_env

    env = weights_fallback_env("loadtest")
    with LocalStack(env=env, log_dir=str(out / "stack-logs")) as stack:
        stack.start(workers=int(os.environ.get("WORKERS", "1")))
        print(f"loadtest: local stack ready at {stack.url}; {users} users for {duration}", file=sys.stderr)
        code = subprocess.call(locust_argv(stack.url, users, rate, duration, out, extra))
    print(f"loadtest: reports in {out}/ (report.html, predict_stats.csv); exit {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
