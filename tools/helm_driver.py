"""Lint, install, upgrade and uninstall the chart with helm-sdkpy (embedded Helm v4).

Runs under .venv-helm (Python 3.12), not the project venv: the tests call it as a
subprocess with a JSON job on stdin and read a JSON report on stdout.

Every install is a real `helm install` into the Kubernetes API server the job's kubeconfig
names (the tests' local control plane, tools/cluster.py): CRDs from crds/ go first, values
are checked against values.schema.json, and the API server itself admits or refuses every
object (schema, RBAC escalation checks, the CRD's own validation for the sample).

Modes: `helm_driver.py` (JSON job on stdin, JSON report on stdout, for the tests),
`helm_driver.py lint CHART` and `helm_driver.py package CHART DEST` (for make; exit 1 on failure).

Job:    {"kubeconfig": "<path>", "lint": ["<chart dir>", ...],
         "steps": [{"action": "install"|"upgrade"|"uninstall", "release": "r", "namespace": "ns",
                    "chart": "<dir>", "values": {...}, "wait": false}, ...]}
Report: {"version": "...", "lint": [{"chart", "result"|"error"}],
         "steps": [{"manifest", "notes", "error"}]}
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import helm_sdkpy


async def run_step(step: dict, kubeconfig: str | None) -> dict:
    config = helm_sdkpy.Configuration(namespace=step.get("namespace", "default"), kubeconfig=kubeconfig)
    action, release, wait = step.get("action", "install"), step.get("release", "inferstack"), step.get("wait", False)
    out: dict = {"manifest": "", "notes": "", "error": None}
    try:
        if action == "uninstall":
            await helm_sdkpy.Uninstall(config).run(release, wait=wait, timeout=120)
            return out
        if action == "install":
            result = await helm_sdkpy.Install(config).run(
                release, step["chart"], values=step.get("values") or None, create_namespace=True,
                wait=wait, timeout=120)
        else:
            result = await helm_sdkpy.Upgrade(config).run(
                release, step["chart"], values=step.get("values") or None, wait=wait, timeout=120)
        out["manifest"] = result.get("manifest", "")
        out["notes"] = (result.get("info") or {}).get("notes", "")
    except helm_sdkpy.HelmError as exc:
        out["error"] = str(exc)
    return out


async def main() -> dict:
    job = json.load(sys.stdin)
    report: dict = {"version": helm_sdkpy.__version__, "lint": [], "steps": []}
    kubeconfig = job.get("kubeconfig")
    for chart in job.get("lint", []):
        try:
            report["lint"].append({"chart": chart, "result": await helm_sdkpy.Lint(
                helm_sdkpy.Configuration(kubeconfig=kubeconfig)).run(chart)})
        except helm_sdkpy.HelmError as exc:
            report["lint"].append({"chart": chart, "error": str(exc)})
    for step in job.get("steps", []):
        report["steps"].append(await run_step(step, kubeconfig))
    return report


SEVERITIES = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


async def lint_cli(chart: str) -> int:
    """`helm lint` for make: warnings count as failures, like `helm lint --strict`."""
    result = await helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart)
    worst = 0
    for msg in result.get("Messages") or []:
        worst = max(worst, msg["Severity"])
        print(f"[{SEVERITIES.get(msg['Severity'], msg['Severity'])}] {msg['Path']}: {msg.get('Err')}")
    for err in result.get("Errors") or []:
        worst = 3
        print(f"[ERROR] {err}")
    print(f"{chart}: {'failed' if worst >= 2 else 'ok'} ({result.get('TotalChartsLinted')} chart linted)")
    return 1 if worst >= 2 else 0


async def package_cli(chart: str, dest: str) -> int:
    os.makedirs(dest, exist_ok=True)
    print(await helm_sdkpy.Package(helm_sdkpy.Configuration()).run(chart, dest_dir=dest))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["lint"]:
        sys.exit(asyncio.run(lint_cli(sys.argv[2])))
    if sys.argv[1:2] == ["package"]:
        sys.exit(asyncio.run(package_cli(sys.argv[2], sys.argv[3])))
    json.dump(asyncio.run(main()), sys.stdout)
