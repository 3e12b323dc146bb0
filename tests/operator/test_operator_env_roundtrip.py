"""The env names the operator writes into web and worker pods are exactly the ones the data plane reads.

Every built container's environment (the ConfigMap it loads with envFrom, then its own env,
with fieldRefs, secretKeyRefs into the operator's Secret and $(VAR) references resolved as
the kubelet does) goes through
``Settings.from_env`` and the web CLI's gunicorn argv; each value must arrive.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from typing import Any

import pytest

from inferstack.config import Settings
from inferstack_operator import builders, spec
from inferstack_operator.config import OperatorSettings
from inferstack_operator.credentials import RedisAuth
from inferstack_web.cli import gunicorn_argv

POD = "demo-worker-7d9f-abcde"
AUTH = RedisAuth.generate()
# Every value differs from the data plane's default, so a value that "arrives" cannot be a default.
SPEC: dict[str, Any] = {
    "model": {"uri": "pvc://models/flowers/Flowers.keras", "labels": "pvc://models/flowers/labels.txt",
              "weights": "pvc://weights/w.weights.h5", "topK": 7, "runtime": "openvino", "precision": "int8"},
    "web": {"requestTimeoutSeconds": 12, "maxImageBytes": 2048,
            "env": [{"name": "EXTRA", "value": "1"}]},
    "worker": {"gpu": 2, "batchSize": 8, "maxBatchDelayMs": 9},
    "redis": {"maxQueue": 50},
}


def pod_env(config: dict[str, str], container: dict[str, Any], secret: dict[str, Any]) -> dict[str, str]:
    """What the process sees: envFrom first, env entries over it, fieldRef/secretKeyRef/$(VAR) resolved."""
    env = dict(config)
    for item in container["env"]:
        if "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], item
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif "valueFrom" in item:
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, item
            env[item["name"]] = POD
        else:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], item["value"])
    return env


def containers() -> list[tuple[str, dict[str, str]]]:
    r = dataclasses.replace(spec.resolve("demo", "ml", SPEC), redis_auth=AUTH)
    objs = {f'{m["kind"]}/{m["metadata"]["name"]}': m for _, m in builders.build_children(r, OperatorSettings())}
    config = objs["ConfigMap/demo-config"]["data"]
    secret = objs["Secret/demo-redis-auth"]
    result = []
    for deployment in ("demo-web", "demo-worker"):
        for c in objs[f"Deployment/{deployment}"]["spec"]["template"]["spec"]["containers"]:
            result.append((c["name"], pod_env(config, c, secret)))
    return result


def expected(field: dataclasses.Field[Any], raw: str) -> Any:
    kind = type(field.default) if field.default is not None else str
    return kind(raw)


@pytest.mark.parametrize("name, env", containers(), ids=[name for name, _ in containers()])
def test_every_inferstack_variable_arrives_in_settings(name: str, env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    ours = {k: v for k, v in env.items() if k.startswith("INFERSTACK_")}
    assert len(ours) >= 7
    for var, raw in ours.items():
        field = var.removeprefix("INFERSTACK_").lower()
        assert field in fields, f"{name}: the operator writes {var}, which Settings does not read"
        value = getattr(settings, field)
        assert value == expected(fields[field], raw), f"{name}: {var}={raw!r} arrived as {value!r}"
        assert value != fields[field].default, f"{name}: {var} is indistinguishable from the default"


def test_the_web_cli_serves_on_the_port_the_pod_exposes() -> None:
    (web,) = [env for name, env in containers() if name == "web"]
    argv = gunicorn_argv(Settings.from_env(web), Settings.from_env(web).host)
    assert argv[argv.index("--bind") + 1] == "0.0.0.0:8080"
    assert argv[argv.index("--timeout") + 1] == str(12 + 30)


def test_each_gpu_worker_is_its_own_consumer() -> None:
    workers = [env for name, env in containers() if name.startswith("worker")]
    assert len(workers) == 2
    assert [Settings.from_env(e).worker_name for e in workers] == [POD, f"{POD}-gpu1"]
    assert len({Settings.from_env(e).ready_file for e in workers}) == 2
    assert {Settings.from_env(e).model_name for e in workers} == {"flowers"}


def test_web_and_worker_log_in_as_their_own_redis_users() -> None:
    urls = {name: Settings.from_env(env).redis_url for name, env in containers()}
    host = "demo-redis.ml.svc.cluster.local:6379/0"
    assert urls["web"] == f"redis://web:{AUTH.web}@{host}"
    assert urls["worker"] == urls["worker-gpu1"] == f"redis://worker:{AUTH.worker}@{host}"


def test_auto_int8_reaches_the_worker_and_is_refused_where_it_cannot_run() -> None:
    def worker_settings(model: dict[str, Any]) -> Settings:
        r = dataclasses.replace(spec.resolve("demo", "ml", {"model": model}), redis_auth=AUTH)
        env = {e["name"]: e.get("value", "") for e in builders.worker_env(r)}
        return Settings.from_env(env)

    assert worker_settings({"autoInt8": True}).auto_int8 == 1
    assert worker_settings({"autoInt8": True, "precision": "auto", "runtime": "openvino"}).auto_int8 == 1
    assert worker_settings({}).auto_int8 == 0
    with pytest.raises(spec.SpecError, match="autoInt8 needs spec.model.precision auto"):
        spec.resolve("demo", "ml", {"model": {"autoInt8": True, "precision": "fp32"}})
    with pytest.raises(spec.SpecError, match="runtime keras cannot run int8"):
        spec.resolve("demo", "ml", {"model": {"autoInt8": True, "runtime": "keras"}})
