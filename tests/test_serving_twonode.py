"""Serving across two Ray nodes on this one machine, and losing one of them under load.

The test starts its own Ray cluster (a head node and a second node, each `ray start --block` with
one logical CPU, its own ports and its own temp dir), so neither the session's `ray_serve` cluster
in this process nor any other Ray on the machine is touched: a process joins one Ray cluster only,
so the deploying driver is a subprocess, and no process is ever stopped by name (`ray stop` would
stop every Ray on the machine), only the test's own, by PID.

Two model replicas of one CPU each fill the two nodes, one each; the front and the proxy are on
the head. Part way through 24 greedy completions from 4 client threads the second node is killed
(SIGKILL to `ray start`, every process below it, e.g. the model replica, and its process group).
Every answer is either exactly the text generate() gives for the prompt alone, or an error status (a
request running on the lost replica may get a 5xx; the front sends it again to the other replica,
so it usually succeeds); every request sent after the kill, and every one that finished before
it, gets its text. Afterwards no process the test started is alive. ~40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import serving_fixtures as sf

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")]

pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")

from dlp_lora.serving.loading import load_engine  # noqa: E402

START_TIMEOUT_S = 60
REQUESTS, CLIENTS, MAX_TOKENS = 24, 4, 48
KILL_AFTER = 8  # answers received before the second node is killed

# Runs in its own process: connects to the test's cluster, deploys, reports where the CPUs went, exits
# (the Serve application outlives it). The front is pinned to the head node, so that losing the second
# node loses a model replica only.
DRIVER = r"""
import json, sys, time
import ray
from ray import serve
from dlp_lora.serving.app import APP_NAME, build_app

args = json.loads(sys.argv[1])
ray.init(address=args["address"], log_to_driver=False)
deadline = time.monotonic() + args["timeout"]
while sum(node["Alive"] for node in ray.nodes()) < 2:
    if time.monotonic() > deadline:
        sys.exit("the second node never joined")
    time.sleep(0.2)
serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": args["http_port"]})
app = build_app(model=args["model"], adapters=args["adapters"], router=args["router"], replicas=2,
                cpus_per_replica=1, max_batch_size=8)
front = app._bound_deployment.options(
    ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}})
serve.run(front.bind(*front.init_args, **front.init_kwargs), name=APP_NAME, route_prefix="/")
print("DEPLOYED " + json.dumps({
    "alive_nodes": sum(node["Alive"] for node in ray.nodes()),
    "cluster_cpus": ray.cluster_resources().get("CPU", 0.0),
    "free_cpus": ray.available_resources().get("CPU", 0.0),
}), flush=True)
"""


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    # Ray turns token auth on by itself when ~/.ray/auth_token exists (left by any other Ray user) and
    # RAY_AUTH_MODE is unset; the nodes and the driver must agree, so say it for all of them.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    return env


def _start_node(temp_dir: Path, extra: list[str]) -> subprocess.Popen:
    """`ray start --block` in a new session (its own process group), its output in temp_dir.log."""
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics, low = _free_ports(7)
    temp_dir.mkdir(parents=True)
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--num-cpus", "1",
        "--temp-dir", str(temp_dir), "--node-ip-address", "127.0.0.1",
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats", *extra,
    ]
    log = open(f"{temp_dir}.log", "wb")  # noqa: SIM115 - the node writes to it until it is killed
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def _alive(entry: str) -> bool:
    """Whether /proc/<entry> is a running process (not a zombie, not gone)."""
    try:
        return Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of the live processes whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid() or not _alive(entry):
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def _process_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(entry):
            try:
                if os.getpgid(int(entry)) == pgid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _descendants(pid: int) -> set[int]:
    """The live processes below ``pid`` (Ray's workers rename themselves "ray::...", so their command
    lines no longer name the temp dir; they are the raylet's children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _alive(entry):
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_node(node: subprocess.Popen, temp_dir: Path) -> set[int]:
    """SIGKILL the node: `ray start`, everything below it, its process group and any process left that
    names its temp dir; waits until all are gone. Returns the PIDs it killed."""
    mine = _descendants(node.pid) | {node.pid}  # before any dies: orphans leave the tree
    try:
        os.killpg(node.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    killed = set(mine)
    deadline = time.monotonic() + 20
    while True:
        node.poll()  # reaps `ray start` itself
        left = ({pid for pid in mine if _alive(str(pid))} | set(_process_group(node.pid))
                | set(_processes_mentioning(str(temp_dir))))
        killed |= left
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of {temp_dir} survive SIGKILL: {sorted(left)}")
        time.sleep(0.1)
    node.wait(timeout=10)
    return killed


def _wait_for_port(port: int, node: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise AssertionError(f"ray start exited with {node.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} never opened:\n{log.read_text()[-3000:]}")


def test_losing_a_node_under_load_loses_no_request_silently(tmp_path):
    art = sf.build(tmp_path / "art")
    oracle = load_engine(sf.config(art))
    prompts = [sf.PROMPTS[i % len(sf.PROMPTS)] for i in range(REQUESTS)]
    expected = {p: sf.generate_alone(oracle.model, oracle.tokenizer, p, MAX_TOKENS)["text"]
                for p in set(prompts)}

    # Short, own temp dirs: Ray's Unix socket paths under tmp_path would pass the 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="dlp2n-", dir="/tmp"))
    head_dir, second_dir = root / "head", root / "second"
    gcs_port, client_port, http_port, dashboard_port = _free_ports(4)
    nodes: list[tuple[subprocess.Popen, Path]] = []
    started = time.monotonic()
    try:
        head = _start_node(head_dir, ["--head", "--port", str(gcs_port), "--include-dashboard", "false",
                                      "--dashboard-port", str(dashboard_port),
                                      "--ray-client-server-port", str(client_port)])
        nodes.append((head, head_dir))
        _wait_for_port(gcs_port, head, Path(f"{head_dir}.log"))
        second = _start_node(second_dir, ["--address", f"127.0.0.1:{gcs_port}"])
        nodes.append((second, second_dir))

        args = {"address": f"127.0.0.1:{gcs_port}", "http_port": http_port, "timeout": START_TIMEOUT_S,
                "model": str(art["model"]), "router": str(art["router"]),
                "adapters": {k: str(v) for k, v in art["adapters"].items()}}
        driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], capture_output=True,
                                text=True, env=_env(), timeout=2 * START_TIMEOUT_S)
        report = [line for line in driver.stdout.splitlines() if line.startswith("DEPLOYED ")]
        assert driver.returncode == 0 and report, (driver.stdout[-3000:] + driver.stderr[-3000:]
                                                   + Path(f"{head_dir}.log").read_text()[-2000:])
        placed = json.loads(report[0].removeprefix("DEPLOYED "))
        # two nodes of one CPU each, two replicas of one CPU each: one replica on each node
        assert placed == {"alive_nodes": 2, "cluster_cpus": 2.0, "free_cpus": 0.0}, placed
        deployed = time.monotonic()

        url = f"http://127.0.0.1:{http_port}/v1/completions"
        results: list[dict] = [{} for _ in range(REQUESTS)]
        lock, enough_done, killed = threading.Lock(), threading.Event(), {}
        next_index = iter(range(REQUESTS))

        def client():
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                sent = time.monotonic()
                try:
                    body = {"model": "model", "prompt": prompts[i], "max_tokens": MAX_TOKENS,
                            "temperature": 0}
                    status, body = sf.http_request(url, body, timeout=90)
                except Exception as error:  # noqa: BLE001 - no status at all: a lost request, checked below
                    status, body = None, repr(error)
                with lock:
                    results[i] = {"sent": sent, "done": time.monotonic(), "status": status, "body": body}
                    if sum(bool(r) for r in results) >= KILL_AFTER:
                        enough_done.set()

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        assert enough_done.wait(90), "no answers before the kill"
        replicas_there = [pid for pid in _descendants(second.pid)
                          if _command(pid).startswith("ray::ServeReplica:dlp-lora:DLPLoRAModel")]
        killed["start"] = time.monotonic()
        _kill_node(second, second_dir)
        killed["end"] = time.monotonic()
        assert len(replicas_there) == 1, "the second node held no model replica"
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)

        before = [r for r in results if r["done"] < killed["start"]]
        after = [r for r in results if r["sent"] > killed["end"]]
        ok = [r for r in results if r["status"] == 200]
        for i, r in enumerate(results):  # each request: its exact text, or an error status, never else
            if r["status"] == 200:
                assert r["body"]["choices"][0]["text"] == expected[prompts[i]], (i, r)
            else:
                assert isinstance(r["status"], int) and r["status"] >= 500 and "error" in r["body"], (i, r)
        assert all(r["status"] == 200 for r in before + after), results
        assert len(ok) >= len(before) + len(after) and after, (len(ok), len(before), len(after))
        status, health = sf.http_request(f"http://127.0.0.1:{http_port}/health", timeout=10)
        assert status == 200, health
        print(f"\n[two nodes] started+deployed {deployed - started:.1f} s, {len(ok)}/{REQUESTS} answered "
              f"({len(before)} before the kill, {len(after)} sent after it, "
              f"{health['front_retries']} retried by the front), traffic {time.monotonic() - deployed:.1f} s")
    finally:
        pids = set()
        for node, temp_dir in reversed(nodes):  # each one, even if killing another failed
            try:
                pids |= _kill_node(node, temp_dir)
            except AssertionError as error:
                print(error)
        left = [pid for pid in pids if _alive(str(pid))] + _processes_mentioning(str(root))
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test's cluster remain: {left}"
