"""Scale-out end to end: a real two-node Ray cluster on loopback and a real PostgreSQL server.

Both are started by the fixtures below and stopped by process-group id (never ``ray stop``, which
would stop every Ray on the machine). The PostgreSQL cluster is a throwaway ``initdb`` on a free
loopback port, removed afterwards. Needs Debian's ``postgresql`` package (binaries under
``/usr/lib/postgresql/*/bin``); the test is skipped, saying so, where it is missing.

Trials wait at a gate (:mod:`tests.fixtures.gate`) until the test opens it, so the test knows which
launcher holds which node when the second launcher joins, however fast the machine is.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import skip_unless_ci
from tests.fixtures.gate import Gate, wait_until

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on a free loopback port with an empty database; yields its URL."""
    bindir = _pg_bin()
    if bindir is None:
        skip_unless_ci("PostgreSQL binaries not installed (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="automl-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    # initdb refuses to run as root: run the server as the package's postgres user.
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "automl", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
        "-o", f"-p {port} -h 127.0.0.1 -k {sock}", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "automl", "studies")
        yield f"postgresql://automl@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _group_alive(pgid: int) -> list[int]:
    """Processes of group ``pgid`` still running (zombies, already dead, do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while listed
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop a ``ray start`` and every process it started (its own session), and wait until they are gone."""
    for sig, grace in ((signal.SIGTERM, 60.0), (signal.SIGKILL, 600.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            wait_until(f"process group {proc.pid} ends after {sig.name}", lambda: not _group_alive(proc.pid), safety_s=grace, poll_s=0.2)
            break
        except AssertionError:
            if sig == signal.SIGKILL:
                raise
    proc.wait()


@pytest.fixture(scope="module")
def cluster_gate(tmp_path_factory) -> Gate:
    """The gate of the cluster's trials: its folder is in the environment of both Ray nodes."""
    return Gate(tmp_path_factory.mktemp("gate"))


@pytest.fixture(scope="module")
def ray_cluster(cluster_gate):
    """Head node + a second node with its own resources and temp dir, on loopback; yields the address."""
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="automl-ray-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **cluster_gate.env()}
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         f"--temp-dir={tmp / 'head'}", "--resources={\"head_node\": 1}", *common],
        env=env, stdout=(tmp / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    worker = None
    try:
        _wait_nodes(address, 1, env, tmp / "head.log")
        worker = subprocess.Popen(
            [RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={tmp / 'worker'}", "--resources={\"worker_node\": 1}", *common],
            env=env, stdout=(tmp / "worker.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait_nodes(address, 2, env, tmp / "worker.log")
        yield address
    finally:
        if worker is not None:
            _stop_group(worker)
        _stop_group(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_nodes(address: str, n: int, env: dict, log: Path, timeout: float = 600) -> None:
    """Wait until the cluster has ``n`` live nodes; ``timeout`` is a safety net against a hang."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR');"
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    end = time.monotonic() + timeout
    last = ""
    while time.monotonic() < end:
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=120)
        last = out.stdout.strip() + out.stderr[-500:]
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not reach {n} nodes within the {timeout:.0f}s safety net: {last}; log: {log.read_text()[-2000:]}")


def _config(path: Path, *, trials: int, output_dir: Path, checkpoint: Path | None = None) -> Path:
    cfg = {
        "name": "shared",
        "plugins": ["tests.fixtures.gated"],
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 2, **({"checkpoint": str(checkpoint)} if checkpoint else {})},
        "methods": {"gated": {}},
        "budget": {"trials": trials, "epochs": 1},
        "resources": {"cpus": 1},
        "latency": {"warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1},
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launcher(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-c", "from automl._cli import main; main()", *args],
        cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _exit_code(proc: subprocess.Popen, name: str, log: Path, safety_s: float = 900) -> int:
    """Wait for a launcher to end; ``safety_s`` only stops a hang (it fails saying so)."""
    try:
        return proc.wait(timeout=safety_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"launcher {name} did not end within the {safety_s:.0f}s safety net; log:\n{log.read_text()[-3000:]}") from None


@pytest.mark.slow
def test_two_launchers_on_a_two_node_cluster_and_postgresql(tmp_path, postgres, ray_cluster, cluster_gate):
    """Launcher A (budget 4) and launcher B (another study folder, as on another machine; budget 7)
    share one PostgreSQL study and one two-node Ray cluster; together they leave exactly 7 COMPLETE
    trials, each with exactly one checkpoint in the folder of the launcher that ran it.

    A's first two trials are held at the gate until B has joined: each holds the one CPU of a node,
    so both launchers and both nodes run trials whatever the speed of the machine.
    """
    gate = cluster_gate
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    cfg_a = _config(tmp_path / "a.yaml", trials=4, output_dir=dir_a)
    a = _launcher(["launch", str(cfg_a), "--address", ray_cluster, "--storage", postgres], tmp_path, log_a)
    b = None
    try:
        held_a = wait_until("launcher A holds two trials at the gate, one per node", lambda: h if len(h := gate.held()) == 2 else None, proc=a, log=log_a)
        # B reuses A's trained base (written before A's search began), as a second machine joining the study would.
        cfg_b = _config(tmp_path / "b.yaml", trials=7, output_dir=dir_b, checkpoint=dir_a / "shared" / "base" / "weights.pt")
        b = _launcher(["launch", str(cfg_b), "--address", ray_cluster, "--storage", postgres], tmp_path, log_b)
        wait_until("launcher B starts its search", lambda: "search:" in log_b.read_text(), proc=b, log=log_b)
        gate.open()
        rc_a = _exit_code(a, "A", log_a)
        rc_b = _exit_code(b, "B", log_b)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert rc_a == 0, f"launcher A exited {rc_a}:\n{log_a.read_text()[-3000:]}"
    assert rc_b == 0, f"launcher B exited {rc_b}:\n{log_b.read_text()[-3000:]}"

    study = optuna.load_study(study_name="shared", storage=postgres)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    others = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials if t.state != TrialState.COMPLETE]
    assert len(complete) == 7 and not others, f"want 7 COMPLETE and nothing else, got {len(complete)} COMPLETE and {others}"
    numbers = [t.number for t in complete]
    assert len(set(numbers)) == len(numbers), f"duplicate trial numbers {numbers}"
    launchers = {t.user_attrs["launcher"]["pid"] for t in complete}
    assert launchers == {a.pid, b.pid}, f"both launchers should have run trials, owners {launchers}, launchers A {a.pid} and B {b.pid}"
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in complete}
    held = [by_ray_id.get(r) for r in held_a]
    assert all(t is not None and t.user_attrs["launcher"]["pid"] == a.pid for t in held), (
        f"A's held trials {held_a} should be COMPLETE and A's: {[(t.number, t.user_attrs['launcher']) if t else None for t in held]}"
    )
    held_nodes = {t.user_attrs.get("node") for t in held}
    assert len(held_nodes) == 2 and None not in held_nodes, f"A's two held trials each held a node's one CPU, so ran on both nodes, got {held_nodes}"

    # Each checkpoint lives once, in the study folder of the launcher that ran the trial.
    ck_a = {p.name for p in (dir_a / "shared" / "checkpoints").iterdir()} if (dir_a / "shared" / "checkpoints").is_dir() else set()
    ck_b = {p.name for p in (dir_b / "shared" / "checkpoints").iterdir()} if (dir_b / "shared" / "checkpoints").is_dir() else set()
    assert not ck_a & ck_b, f"checkpoints written twice: {sorted(ck_a & ck_b)}"
    assert ck_a | ck_b == {f"trial_{n:05d}" for n in numbers}, f"checkpoints {sorted(ck_a | ck_b)} vs complete {sorted(numbers)}"
    for t in complete:
        folder = (dir_a if f"trial_{t.number:05d}" in ck_a else dir_b) / "shared" / "checkpoints" / f"trial_{t.number:05d}"
        record = json.loads((folder / "trial.json").read_text())
        assert abs(record["metrics"]["accuracy"] - t.values[0]) < 1e-9, f"trial {t.number}: checkpoint {record['metrics']['accuracy']} != {t.values[0]}"
