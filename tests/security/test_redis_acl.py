"""A real redis-server on exactly the ACL file and arguments the operator's builders produce.

The builders are pure: a generated ``RedisAuth`` in, the Secret and the StatefulSet out. Their
``users.acl`` is written to a temp dir and redis-server starts with the container's arguments
(only the port, data dir and ACL path point at this machine). Then each user is held to its
role, and the whole data plane (web + worker + HTTP) runs through the users it is given.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pytest
import redis
import requests

from inferstack.config import Settings
from inferstack.contract.acl import HEALTH, rules
from inferstack.contract.http import REDIS_PORT
from inferstack.contract.queue import FN_HEARTBEAT, FN_TRIM_ANSWERED, FUNCTION_LIBRARY
from inferstack.protocol import HEARTBEAT_TTL_S, Keys, Poison, Request, WebQueue, WorkerQueue
from inferstack_operator import builders, spec
from inferstack_operator.builders import ACL_DIR
from inferstack_operator.config import OperatorSettings
from inferstack_operator.credentials import FUNCTIONS_KEY, RedisAuth
from inferstack_operator.names import QUEUE_PREFIX
from tests.helpers import DIGIT_SIZE, digits_env, png_bytes, stack_log, wait_for
from tools.devstack import LocalStack, free_port


def built(auth: RedisAuth) -> dict[str, dict[str, Any]]:
    r = dataclasses.replace(spec.resolve("demo", "ml", {"worker": {"gpu": 0}}), redis_auth=auth)
    return {m["kind"]: m for _, m in builders.build_children(r, OperatorSettings())}


def secret_text(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in manifests["Secret"]["data"].items()}


def local_args(container: dict[str, Any], acl_path: Path, data_dir: Path) -> list[str]:
    """The container's redis-server arguments after --port, with this machine's paths."""
    args = list(container["args"])
    assert container["command"] == ["redis-server"] and args[:2] == ["--port", "6379"]
    args = args[2:]
    for flag, value in (("--aclfile", str(acl_path)), ("--dir", str(data_dir))):
        args[args.index(flag) + 1] = value
    return args


def local_url(url: str, port: int, host: str = "127.0.0.1") -> str:
    """A URL from the Secret, pointed at the local server (same user and password)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@{host}:{port}"))


@dataclasses.dataclass
class Secured:
    stack: LocalStack
    secret: dict[str, str]
    redis_container: dict[str, Any]
    auth: RedisAuth

    def url(self, key: str, host: str = "127.0.0.1") -> str:
        return local_url(self.secret[key], self.stack.redis_port, host)

    def client(self, key: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(key))

    def as_user(self, username: str, password: str) -> redis.Redis:
        return redis.Redis(port=self.stack.redis_port, username=username, password=password)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, digits_model: dict[str, object]) -> Iterator[Secured]:
    auth = RedisAuth.generate()
    manifests = built(auth)
    secret = secret_text(manifests)
    (redis_container,) = manifests["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    folder = tmp_path_factory.mktemp("secured-redis")
    acl = folder / "users.acl"
    acl.write_text(secret["users.acl"])
    (folder / "data").mkdir()
    port = free_port()
    web_env = {"INFERSTACK_REDIS_URL": local_url(secret["web-url"], port)}
    worker_env = {"INFERSTACK_REDIS_URL": local_url(secret["worker-url"], port)}
    stack = LocalStack(redis_port=port, env=digits_env(digits_model), log_dir=str(folder / "logs"),
                       redis_args=local_args(redis_container, acl, folder / "data"), web_env=web_env)
    try:
        stack.start_redis()
        stack.start_worker(worker_env)
        stack.start_web()
        stack.wait_ready(workers=1)
    except RuntimeError:
        stack.stop()
        raise
    yield Secured(stack, secret, redis_container, auth)
    stack.stop()


def test_operator_queue_prefix_is_the_data_planes() -> None:
    assert QUEUE_PREFIX == Settings().queue_prefix


def _raw(port: int, command: bytes, host: str = "127.0.0.1") -> bytes:
    """One inline command over a bare socket (no client library logging in first)."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(command + b"\r\n")
        return s.recv(4096)


def test_no_password_gets_noauth(secured: Secured) -> None:
    for command in (b"PING", b"XRANGE inferstack:requests - +", b"FLUSHALL"):
        assert _raw(secured.stack.redis_port, command).startswith(b"-NOAUTH"), command
    with pytest.raises(redis.AuthenticationError):
        secured.as_user("default", "").ping()
    with pytest.raises(redis.AuthenticationError):
        secured.as_user("web", secured.auth.worker).ping()  # another user's password


def test_pods_reach_it_over_the_network_with_protected_mode_on(secured: Secured) -> None:
    # Protected mode refuses non-loopback clients only while the default user needs no password.
    assert secured.redis_container["args"][secured.redis_container["args"].index("--protected-mode") + 1] == "yes"
    host = _non_loopback_address()
    assert redis.Redis.from_url(secured.url("web-url", host)).ping()
    assert _raw(secured.stack.redis_port, b"PING", host).startswith(b"-NOAUTH")


def test_web_user_enqueues_and_reads_its_reply(secured: Secured) -> None:
    queue = WebQueue(secured.url("web-url"), QUEUE_PREFIX, max_queue=100, timeout_s=30)
    request_id = queue.submit(np.zeros((DIGIT_SIZE, DIGIT_SIZE, 3), np.uint8), top_k=2)
    reply = queue.wait(request_id)  # answered by the stack's worker, as the worker user
    assert reply["ok"] and len(reply["predictions"]) == 2
    assert queue.live_workers() and queue.model_info() is not None and queue.depth() >= 0
    # Memory admission reads INFO (server statistics only, no keys).
    assert int(queue.fast.info("memory")["maxmemory"]) > 0


@pytest.mark.parametrize("key", ["web-url", "worker-url"])
def test_admin_and_foreign_commands_are_refused(secured: Secured, key: str) -> None:
    client = secured.client(key)
    for command in (("FLUSHALL",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("SCRIPT", "FLUSH"), ("MODULE", "LIST"),
                    ("ACL", "LIST"), ("XRANGE", f"{QUEUE_PREFIX}:requests", "-", "+"),  # every upload
                    ("GET", "other:key"), ("SCAN", "0"), ("SHUTDOWN",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    # Keys outside the prefix are refused even for commands the role has.
    verb = ("GET", "elsewhere") if key == "web-url" else ("RPUSH", "elsewhere", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*verb)


def test_web_user_cannot_forge_a_reply_or_a_worker(secured: Secured) -> None:
    web = secured.client("web-url")
    keys = Keys(QUEUE_PREFIX)
    for command in (("RPUSH", keys.reply("someone-else"), '{"ok": true}'),
                    ("ZADD", keys.workers, "9999999999", "fake-worker"),
                    ("SET", keys.model, "{}"), ("DEL", keys.stream)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            web.execute_command(*command)


def test_keda_user_reads_the_stream_only(secured: Secured) -> None:
    keda = secured.as_user(secured.secret["keda-username"], secured.secret["keda-password"])
    stream = Keys(QUEUE_PREFIX).stream
    assert keda.xlen(stream) >= 0
    assert [g["name"] for g in keda.xinfo_groups(stream)] == [b"workers"]
    assert keda.xpending(stream, "workers")["pending"] >= 0
    for command in (("XADD", stream, "*", "k", "v"), ("XLEN", f"{QUEUE_PREFIX}:workers"),
                    ("XREADGROUP", "GROUP", "workers", "keda", "STREAMS", stream, ">"), ("FLUSHALL",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            keda.execute_command(*command)


def test_readiness_probe_logs_in_as_the_ping_only_user(secured: Secured) -> None:
    probe = secured.redis_container["readinessProbe"]["exec"]["command"]
    command = [part.replace("-p 6379", f"-p {secured.stack.redis_port}") for part in probe]
    (auth_env,) = [e for e in secured.redis_container["env"] if e["name"] == "REDISCLI_AUTH"]
    password = secured.secret[auth_env["valueFrom"]["secretKeyRef"]["key"]]
    assert subprocess.run(command, env={**os.environ, "REDISCLI_AUTH": password}, timeout=10).returncode == 0
    assert subprocess.run(command, env={**os.environ, "REDISCLI_AUTH": "wrong"}, timeout=10).returncode != 0
    health = secured.as_user("health", password)
    with pytest.raises(redis.exceptions.NoPermissionError):
        health.get(f"{QUEUE_PREFIX}:model")


def test_http_prediction_through_the_acl_users(secured: Secured, digits_model: dict[str, object]) -> None:
    x_test = digits_model["x_test"]
    assert isinstance(x_test, np.ndarray)
    for index in range(5):
        rsp = requests.post(secured.stack.url + "/predict", files={"image": ("d.png", png_bytes(x_test[index]))},
                            timeout=60)
        assert rsp.status_code == 200, rsp.text + stack_log(secured.stack)
        assert rsp.json()["success"] is True
    ready = requests.get(secured.stack.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True


def _non_loopback_address() -> str:
    """This machine's address on its default route (what a pod's traffic looks like to Redis)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # no packet is sent: UDP connect only picks a route
        address: str = s.getsockname()[0]
    assert not address.startswith("127."), "no non-loopback IPv4 address on this machine"
    return address


@pytest.fixture(scope="module")
def quiet_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """The same configuration with no stack around it: the test plays every part itself."""
    auth = RedisAuth.generate()
    manifests = built(auth)
    secret = secret_text(manifests)
    (redis_container,) = manifests["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    folder = tmp_path_factory.mktemp("quiet-redis")
    (folder / "users.acl").write_text(secret["users.acl"])
    (folder / "data").mkdir()
    stack = LocalStack(log_dir=str(folder / "logs"),
                       redis_args=local_args(redis_container, folder / "users.acl", folder / "data"))
    stack.start_redis()
    yield Secured(stack, secret, redis_container, auth)
    stack.stop()


def test_worker_user_does_its_whole_job(quiet_redis: Secured) -> None:
    """Every WorkerQueue step, including taking over a dead worker's requests, as the worker user."""
    web = WebQueue(quiet_redis.url("web-url"), QUEUE_PREFIX, max_queue=100, timeout_s=30)
    ghost = WorkerQueue(quiet_redis.url("worker-url"), QUEUE_PREFIX, "ghost", block_ms=100)
    worker = WorkerQueue(quiet_redis.url("worker-url"), QUEUE_PREFIX, "live", block_ms=100)
    ghost.ensure_group()
    worker.ensure_group()  # BUSYGROUP is fine
    worker.heartbeat({"name": "m", "input_shape": [4, 4, 3], "classes": 2})
    pixels = np.zeros((4, 4, 3), np.uint8)
    first, second = web.submit(pixels, top_k=1), web.submit(pixels, top_k=1)
    # The ghost takes one request and dies without a heartbeat: the live worker claims it.
    assert [r.request_id for r in ghost.take_batch(1, 0)] == [first]
    taken = worker.take_batch(8, 0)
    assert [r.request_id for r in taken] == [second]
    time.sleep(HEARTBEAT_TTL_S / 2 + 0.5)  # XCLAIM takes entries idle for at least half a heartbeat
    claimed = worker.reclaim_from_dead()
    assert isinstance(claimed, Request) and claimed.request_id == first and claimed.deliveries == 2
    batch = [claimed, *taken]
    assert {r.request_id for r in batch} == {first, second}
    worker.complete([(r, {"ok": True, "predictions": [], "model": "m"}) for r in batch], worker.now_ms())
    assert web.wait(first)["ok"] and web.wait(second)["ok"]
    assert web.depth() == 0 and web.live_workers() == ["live"] and web.model_info()["name"] == "m"
    # An entry no worker can serve goes to the dead-letter stream; its client gets an error.
    third = web.submit(pixels, top_k=1)
    (entry,) = worker.take_batch(8, 0)
    assert isinstance(entry, Request) and entry.request_id == third
    worker.complete([], worker.now_ms(), dead=[Poison(entry.entry_id, "test", third, {b"id": third.encode()})])
    assert web.wait(third)["ok"] is False
    worker.leave()
    assert web.live_workers() == []


def test_web_user_can_neither_create_keys_nor_run_scripts(secured: Secured) -> None:
    """Only the named functions enqueue: no Lua of its own, no key but the request stream."""
    web = secured.client("web-url")
    keys = Keys(QUEUE_PREFIX)
    reply = keys.reply("not-yet-queued")
    for command in (("EVAL", "while true do end", "0"), ("EVALSHA", "0" * 40, "0"), ("SCRIPT", "LOAD", "return 1"),
                    ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('x', function() return 1 end)"),
                    ("FUNCTION", "FLUSH"), ("FUNCTION", "DELETE", FUNCTION_LIBRARY), ("FUNCTION", "KILL"),
                    # A reply key made into a stream before its request is queued used to wedge the workers.
                    ("XADD", reply, "*", "k", "v"), ("XGROUP", "CREATE", reply, "g", "0", "MKSTREAM"),
                    ("XADD", f"{QUEUE_PREFIX}:other", "*", "k", "v"), ("SET", reply, "x"), ("LPUSH", reply, "x"),
                    # The workers' functions call commands the web user lacks.
                    ("FCALL", FN_HEARTBEAT, "2", keys.workers, keys.model, "fake-worker", "60", "")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            web.execute_command(*command)
    with pytest.raises(redis.ResponseError, match="can't run this command"):
        web.execute_command("FCALL", FN_TRIM_ANSWERED, "1", keys.stream, "workers")
    worker = secured.client("worker-url")
    assert worker.xlen(reply) == 0 and worker.xlen(f"{QUEUE_PREFIX}:other") == 0  # nothing was created


def test_a_poisoned_reply_key_is_dead_lettered_not_retried(tmp_path: Path) -> None:
    """Someone made a request's reply key a stream (no data-plane user may now; a plain Redis here):
    the answer cannot be written, and the worker neither retries it forever nor loses the others."""
    stack = LocalStack(log_dir=str(tmp_path))
    stack.start_redis()
    try:
        url = stack.env["INFERSTACK_REDIS_URL"]
        web = WebQueue(url, QUEUE_PREFIX, max_queue=100, timeout_s=30)
        worker = WorkerQueue(url, QUEUE_PREFIX, "poisoned", block_ms=100)
        worker.ensure_group()
        keys, rogue = Keys(QUEUE_PREFIX), redis.Redis.from_url(url)
        pixels = np.zeros((4, 4, 3), np.uint8)
        victim, bystander = web.submit(pixels, top_k=1), web.submit(pixels, top_k=1)
        rogue.xadd(keys.reply(victim), {"k": "v"})
        batch = worker.take_batch(8, 0)
        assert {r.request_id for r in batch} == {victim, bystander}
        worker.complete([(r, {"ok": True, "predictions": [], "model": "m"}) for r in batch], worker.now_ms())
        assert web.wait(bystander, 5)["ok"] is True
        assert rogue.xpending(keys.stream, "workers")["pending"] == 0 and web.depth() == 0
        (record,) = [fields for _id, fields in rogue.xrange(keys.dead)]
        assert record[b"id"].decode() == victim and b"reply key" in record[b"reason"]
        assert rogue.type(keys.reply(victim)) == b"stream"  # left as found, for whoever investigates
    finally:
        stack.stop_redis()


def _pod_script(secured: Secured, script: str, folder: Path) -> list[str]:
    """A Redis container's probe or hook script, pointed at the local server and files."""
    local = script.replace(f"-p {REDIS_PORT}", f"-p {secured.stack.redis_port}").replace(ACL_DIR, str(folder))
    return ["sh", "-c", local]


def _health_env(secured: Secured) -> dict[str, str]:
    return {**os.environ, "REDISCLI_AUTH": secured.secret["health-password"]}


def test_start_hook_loads_the_functions_before_any_worker(busy_redis: Secured) -> None:
    hook = busy_redis.redis_container["lifecycle"]["postStart"]["exec"]["command"]
    folder = Path(busy_redis.stack.log_dir)
    (folder / FUNCTIONS_KEY).write_text(busy_redis.secret[FUNCTIONS_KEY])
    web = WebQueue(busy_redis.url("web-url"), QUEUE_PREFIX, max_queue=100, timeout_s=30)
    with pytest.raises(redis.ResponseError, match="(?i)function not found"):
        web.submit(np.zeros((4, 4, 3), np.uint8), top_k=1)
    assert subprocess.run(_pod_script(busy_redis, hook[2], folder), env=_health_env(busy_redis),
                          timeout=30).returncode == 0
    web.ensure_group()
    assert web.submit(np.zeros((4, 4, 3), np.uint8), top_k=1) and web.depth() == 1


SPIN = "#!lua name=spin\nredis.register_function('spin', function() while true do end end)"


def _liveness_fails_once_busy(secured: Secured, spin: Callable[[], object]) -> float:
    """Start ``spin`` (a script that never returns) and return how long until the liveness probe fails."""
    probe = secured.redis_container["livenessProbe"]
    command = _pod_script(secured, probe["exec"]["command"][2], Path(secured.stack.log_dir))

    def alive() -> bool:
        return subprocess.run(command, env=_health_env(secured), capture_output=True,
                              timeout=probe["timeoutSeconds"] + 5).returncode == 0

    def run() -> None:
        try:
            spin()
        except redis.RedisError:
            pass  # Redis was killed under it

    assert alive()
    threading.Thread(target=run, daemon=True).start()
    started = time.monotonic()
    wait_for(lambda: not alive(), timeout=60, interval=0.2, what="the liveness probe to fail on a BUSY Redis")
    return time.monotonic() - started


def test_liveness_probe_fails_while_a_function_runs_forever(busy_redis: Secured) -> None:
    worker = busy_redis.client("worker-url")
    worker.function_load(SPIN, replace=True)
    spinner = redis.Redis.from_url(busy_redis.url("worker-url"), socket_timeout=120)
    detected = _liveness_fails_once_busy(busy_redis, lambda: spinner.fcall("spin", 0))
    probe = busy_redis.redis_container["livenessProbe"]
    restart = detected + probe["periodSeconds"] * probe["failureThreshold"]
    print(f"BUSY seen by the liveness probe {detected:.1f} s after the function started; restart within ~{restart:.0f} s")


def test_liveness_probe_fails_while_eval_runs_forever(tmp_path: Path) -> None:
    """EVAL by anyone who may (no data-plane user may; a plain Redis here): same probe, same verdict."""
    auth = RedisAuth.generate()
    manifests = built(auth)
    (container,) = manifests["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    stack = LocalStack(log_dir=str(tmp_path))
    stack.start_redis()
    try:
        admin = redis.Redis(port=stack.redis_port, socket_timeout=120)
        admin.execute_command("ACL", "SETUSER", "health", "on", f">{auth.health}", *rules(HEALTH, QUEUE_PREFIX).split())
        plain = Secured(stack, secret_text(manifests), container, auth)
        detected = _liveness_fails_once_busy(plain, lambda: admin.eval("while true do end", 0))
        print(f"EVAL loop: BUSY seen by the liveness probe after {detected:.1f} s")
    finally:
        stack.redis.kill()  # what the kubelet does once the probe has failed (SCRIPT KILL would need admin)
        stack.redis.wait(10)
        stack.redis = None


@pytest.fixture()
def busy_redis(tmp_path: Path) -> Iterator[Secured]:
    """The real configuration, fresh for a test that leaves it stuck in a script."""
    auth = RedisAuth.generate()
    manifests = built(auth)
    secret = secret_text(manifests)
    (redis_container,) = manifests["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    (tmp_path / "users.acl").write_text(secret["users.acl"])
    (tmp_path / "data").mkdir()
    stack = LocalStack(log_dir=str(tmp_path), redis_args=local_args(redis_container, tmp_path / "users.acl",
                                                                    tmp_path / "data"))
    stack.start_redis()
    yield Secured(stack, secret, redis_container, auth)
    assert stack.redis is not None
    stack.redis.kill()  # a Redis stuck in a script ignores SIGTERM's save; the kubelet kills it too
    stack.redis.wait(10)
    stack.redis = None
