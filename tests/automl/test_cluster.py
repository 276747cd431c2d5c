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


class PgServer:
    """A throwaway PostgreSQL server the tests may stop and start again (a restart, an outage)."""

    def __init__(self, bindir: Path, data: Path, log: Path, sock: Path, port: int, as_user: list[str]) -> None:
        self.bindir, self.data, self.log, self.sock, self.port, self.as_user = bindir, data, log, sock, port, as_user
        self.url = f"postgresql://automl@127.0.0.1:{port}/studies"

    def ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args], check=check, capture_output=True, timeout=120)

    def start(self) -> None:
        self.ctl("-l", str(self.log), "-w", "-t", "60", "-o", f"-p {self.port} -h 127.0.0.1 -k {self.sock}", "start")

    def stop(self) -> None:
        """Stop at once (``-m fast``: open connections are cut, as in a failover)."""
        self.ctl("-m", "fast", "-w", "stop")


@pytest.fixture(scope="module")
def pg_server():
    """A PostgreSQL server on a free loopback port with an empty database ``studies``."""
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
    server = PgServer(bindir, data, root / "server.log", sock, _free_port(), as_user)
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "automl", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    server.start()
    try:
        subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "automl", "studies"], check=True, capture_output=True, timeout=120)
        yield server
    finally:
        server.ctl("-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres(pg_server):
    """The URL of the module's PostgreSQL database."""
    return pg_server.url


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


def _stop_group(proc: subprocess.Popen, *, graceful: bool = True) -> None:
    """Stop a ``ray start`` and every process it started (its own session), and wait until they are gone.

    ``graceful``: SIGTERM first, so the node tells the cluster it leaves (its raylet takes about 30 s
    to shut down); otherwise SIGKILL at once, for a cluster the tests are done with.
    """
    steps = ((signal.SIGTERM, 60.0), (signal.SIGKILL, 600.0)) if graceful else ((signal.SIGKILL, 600.0),)
    for sig, grace in steps:
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


class RayNodes:
    """The loopback cluster: its address and the second node, which a test may stop (a lost node)."""

    def __init__(self, address: str, env: dict, tmp: Path, common: list[str]) -> None:
        self.address, self.env, self.tmp, self.common = address, env, tmp, common
        self.worker: subprocess.Popen | None = None

    def start_worker(self) -> None:
        self.worker = subprocess.Popen(
            [RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1",
             f"--temp-dir={self.tmp / 'worker'}", "--resources={\"worker_node\": 1}", *self.common],
            env=self.env, stdout=(self.tmp / "worker.log").open("a"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait_nodes(self.address, 2, self.env, self.tmp / "worker.log")

    def stop_worker(self, *, graceful: bool = True) -> None:
        """Stop the second node and every process it started (its raylet and its trials' workers)."""
        if self.worker is not None:
            _stop_group(self.worker, graceful=graceful)
            self.worker = None

    def on_worker(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to the second node: it or an ancestor (its raylet) is in
        the process group of that node's ``ray start`` (Ray puts its workers in groups of their own)."""
        while self.worker is not None and pid > 1:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return False
            if int(fields[2]) == self.worker.pid:
                return True
            pid = int(fields[1])
        return False


@pytest.fixture(scope="module")
def ray_nodes(cluster_gate):
    """Head node + a second node with its own resources and temp dir, on loopback."""
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="automl-ray-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **cluster_gate.env()}
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         f"--temp-dir={tmp / 'head'}", "--resources={\"head_node\": 1}", *common],
        env=env, stdout=(tmp / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    nodes = RayNodes(f"127.0.0.1:{port}", env, tmp, common)
    try:
        _wait_nodes(nodes.address, 1, env, tmp / "head.log")
        nodes.start_worker()
        yield nodes
    finally:
        nodes.stop_worker(graceful=False)
        _stop_group(head, graceful=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(ray_nodes):
    """The loopback two-node cluster's address."""
    return ray_nodes.address


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


def _config(path: Path, *, trials: int, output_dir: Path, checkpoint: Path | None = None, name: str = "shared", **extra: object) -> Path:
    cfg = {
        "name": name,
        "plugins": ["tests.fixtures.gated"],
        "dataset": {"name": "digits"},
        "base": {"model": "digits_cnn", "epochs": 2, **({"checkpoint": str(checkpoint)} if checkpoint else {})},
        "methods": {"gated": {}},
        "budget": {"trials": trials, "epochs": 1},
        "resources": {"cpus": 1},
        "latency": {"warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1},
        "output_dir": str(output_dir),
        **extra,
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


#: The fault tests check records, not latencies: no re-timing of the front at the end.
NO_DRIFT = {"latency": {"warmup": 2, "repeats": 5, "min_attempts": 1, "max_attempts": 1, "drift_check": False}}


def _held_two(gate: Gate, proc: subprocess.Popen, log: Path) -> list[str]:
    return wait_until("the launcher holds two trials at the gate, one per node", lambda: h if len(h := gate.held()) == 2 else None, proc=proc, log=log)


def _complete_once(url: str, name: str, want: int) -> list[optuna.trial.FrozenTrial]:
    """The study's COMPLETE trials, after checking there are ``want`` of them, each run recorded once."""
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    runs = [t.user_attrs.get("ray_trial_id") for t in complete]
    assert len(complete) == want, f"want {want} COMPLETE, got {len(complete)}: {[(t.number, t.state.name, t.user_attrs.get('fail_reason')) for t in trials]}"
    assert len(set(runs)) == len(runs), f"a finished run was recorded twice: ray trial ids {runs}"
    return complete


@pytest.mark.slow
def test_database_outages_lose_no_finished_trial(tmp_path, pg_server, ray_cluster, cluster_gate):
    """PostgreSQL stops while two trials finish and starts again seconds later: the launcher waits
    for it (says so) and ends with every finished trial recorded exactly once. Then the same study,
    with a 2 s ``storage_retry_s``, meets an outage longer than that: the finished trial goes to the
    study folder's journal and the launcher stops with one line; ``resume`` after the database is
    back records it from the journal (not re-queued, not twice) and completes the budget."""
    gate, url = cluster_gate, pg_server.url
    (gate.folder / "open").unlink(missing_ok=True)
    out = tmp_path / "runs"
    study_dir = out / "outage"
    log1 = tmp_path / "1.log"
    cfg1 = _config(tmp_path / "1.yaml", trials=2, output_dir=out, name="outage", **NO_DRIFT)
    first = _launcher(["launch", str(cfg1), "--address", ray_cluster, "--storage", url], tmp_path, log1)
    procs = [first]
    try:
        _held_two(gate, first, log1)
        pg_server.stop()
        gate.open()
        wait_until("a trial's checkpoint is written while the database is down", lambda: list((study_dir / "checkpoints").glob("trial_*")), proc=first, log=log1)
        wait_until("the launcher says it waits for the database", lambda: "waiting for the database" in log1.read_text(), proc=first, log=log1)
        time.sleep(2.0)  # the outage goes on a little while the finished trials wait to be recorded
        pg_server.start()
        rc = _exit_code(first, "first", log1)
        assert rc == 0, f"the launcher exited {rc} after a database restart:\n{log1.read_text()[-3000:]}"
        assert "the database answers again" in log1.read_text(), log1.read_text()[-2000:]
        complete = _complete_once(url, "outage", 2)
        failed = [t.number for t in optuna.load_study(study_name="outage", storage=url).trials if t.state != TrialState.COMPLETE]
        assert not failed, f"no trial may fail or be interrupted by a restart that ends within storage_retry_s, got {failed}"
        assert {p.name for p in (study_dir / "checkpoints").iterdir()} == {f"trial_{t.number:05d}" for t in complete}

        # An outage longer than the window: the finished record goes to the journal.
        (gate.folder / "open").unlink()
        log2 = tmp_path / "2.log"
        cfg2 = _config(tmp_path / "2.yaml", trials=4, output_dir=out, name="outage", storage_retry_s=2, **NO_DRIFT)
        second = _launcher(["launch", str(cfg2), "--address", ray_cluster, "--storage", url], tmp_path, log2)
        procs.append(second)
        _held_two(gate, second, log2)
        pg_server.stop()
        gate.open()
        rc = _exit_code(second, "second", log2)
        text = log2.read_text()
        journal = study_dir / "journal.jsonl"
        assert rc == 1, f"an outage longer than storage_retry_s stops the launcher with exit 1, got {rc}:\n{text[-3000:]}"
        assert "did not answer for 2s" in text and "automl resume" in text and str(journal) in text, text[-2000:]
        entries = [json.loads(line) for line in journal.read_text().splitlines()]
        journaled = [e["number"] for e in entries]
        assert journaled and all(e["state"] == "COMPLETE" for e in entries), f"journal {entries}"
        pg_server.start()
        running = {t.number for t in optuna.load_study(study_name="outage", storage=url).get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        assert set(journaled) <= running, f"journaled trials {journaled} should still be RUNNING in the database, running {running}"
        log3 = tmp_path / "3.log"
        third = _launcher(["resume", str(study_dir)], tmp_path, log3)
        procs.append(third)
        rc = _exit_code(third, "resume", log3)
        assert rc == 0, f"resume exited {rc}:\n{log3.read_text()[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        if not _pg_up(pg_server):
            pg_server.start()
    complete = _complete_once(url, "outage", 4)
    by_number = {t.number: t for t in complete}
    assert all(n in by_number for n in journaled), f"journaled trials {journaled} must be COMPLETE, complete {sorted(by_number)}"
    requeued = [t.user_attrs.get("requeue_of") for t in optuna.load_study(study_name="outage", storage=url).trials]
    assert not set(journaled) & set(requeued), f"a journaled trial was re-queued: journal {journaled}, re-queues of {requeued}"
    assert not journal.exists(), "the journal is removed once replayed"
    for n in journaled:
        record = json.loads((study_dir / "checkpoints" / f"trial_{n:05d}" / "trial.json").read_text())
        assert abs(record["metrics"]["accuracy"] - by_number[n].values[0]) < 1e-9, f"trial {n}: checkpoint and record differ"


def _pg_up(server: PgServer) -> bool:
    out = subprocess.run([*server.as_user, str(server.bindir / "pg_ctl"), "-D", str(server.data), "status"], capture_output=True, timeout=60)
    return out.returncode == 0


@pytest.fixture
def full_folder(tmp_path):
    """A folder on a 64 KiB tmpfs (a disk that fills at the first checkpoint); unmounted afterwards."""
    folder = tmp_path / "full"
    folder.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        skip_unless_ci(f"cannot mount a small tmpfs here (needs root): {out.stderr.strip()[:200]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=60)


@pytest.mark.slow
def test_a_full_disk_stops_the_study_and_resume_completes_it(tmp_path, pg_server, ray_cluster, cluster_gate, full_folder):
    """The study's checkpoints folder is a tmpfs too small for one checkpoint: the first trial that
    writes there fails with the reason (interrupted, re-queued), the launcher stops with one line
    naming the full folder, and no folder is left that could pass for a finished trial's. With room
    again, ``resume`` completes the budget, the re-queued plan included."""
    cluster_gate.open()
    out = tmp_path / "runs"
    checkpoints = out / "full" / "checkpoints"
    checkpoints.parent.mkdir(parents=True)
    checkpoints.symlink_to(full_folder, target_is_directory=True)
    log1 = tmp_path / "1.log"
    cfg = _config(tmp_path / "1.yaml", trials=1, output_dir=out, name="full", **NO_DRIFT)
    first = _launcher(["launch", str(cfg), "--address", ray_cluster, "--storage", pg_server.url], tmp_path, log1)
    rc = _exit_code(first, "first", log1)
    text = log1.read_text()
    assert rc == 1, f"a full disk stops the launcher with exit 1, got {rc}:\n{text[-3000:]}"
    assert "disk full" in text and str(checkpoints) in text and "automl resume" in text, text[-2000:]
    assert not list(full_folder.iterdir()), f"nothing may be left in the full folder, found {[p.name for p in full_folder.iterdir()]}"
    study = optuna.load_study(study_name="full", storage=pg_server.url)
    failed = [t for t in study.trials if t.state == TrialState.FAIL and "no space left on device" in (t.user_attrs.get("fail_reason") or "")]
    assert failed and all(t.user_attrs.get("interrupted") for t in failed), f"the trial that met the full disk: {[(t.number, t.state.name, t.user_attrs) for t in study.trials]}"
    assert not [t for t in study.trials if t.state == TrialState.COMPLETE], "no trial may be COMPLETE without its checkpoint"

    checkpoints.unlink()  # room again: the study's own folder on the test's disk
    log2 = tmp_path / "2.log"
    second = _launcher(["resume", str(out / "full")], tmp_path, log2)
    rc = _exit_code(second, "resume", log2)
    assert rc == 0, f"resume exited {rc}:\n{log2.read_text()[-3000:]}"
    complete = _complete_once(pg_server.url, "full", 1)
    params = {json.dumps(t.params, sort_keys=True) for t in complete}
    assert json.dumps(failed[0].params, sort_keys=True) in params, "the plan the full disk stopped is run again by resume"
    for t in complete:
        assert (checkpoints / f"trial_{t.number:05d}" / "trial.json").is_file(), f"trial {t.number} has no checkpoint"


@pytest.mark.slow
def test_a_lost_node_requeues_its_trial_once_and_the_study_ends_at_its_budget(tmp_path, pg_server, ray_nodes, cluster_gate):
    """Two trials are held at the gate, one per node; the second node is stopped (its raylet and the
    trial's worker with it). The trial it ran is recorded FAIL ``interrupted`` (not the user's
    failure), its parameters re-queued once, and the study still ends with its 3 COMPLETE trials,
    the re-queued plan among them. Runs last in this module: the second node stays down."""
    gate = cluster_gate
    (gate.folder / "open").unlink(missing_ok=True)
    log = tmp_path / "launch.log"
    cfg = _config(tmp_path / "c.yaml", trials=3, output_dir=tmp_path / "runs", name="nodeloss", **NO_DRIFT)
    proc = _launcher(["launch", str(cfg), "--address", ray_nodes.address, "--storage", pg_server.url], tmp_path, log)
    try:
        _held_two(gate, proc, log)
        markers = {m.name.rpartition(".")[0]: int(m.name.rpartition(".")[2]) for m in (gate.folder / "held").iterdir()}
        on_worker = [t for t, pid in markers.items() if ray_nodes.on_worker(pid)]
        assert len(on_worker) == 1, f"one held trial runs on the second node, got {on_worker} of {markers}"
        ray_nodes.stop_worker()
        gate.open()
        rc = _exit_code(proc, "launcher", log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, f"the launcher exited {rc}:\n{log.read_text()[-3000:]}"
    trials = optuna.load_study(study_name="nodeloss", storage=pg_server.url).get_trials(deepcopy=False)
    lost = [t for t in trials if t.user_attrs.get("ray_trial_id") == on_worker[0]]
    assert len(lost) == 1 and lost[0].state == TrialState.FAIL and lost[0].user_attrs.get("interrupted") is True, (
        f"the lost node's trial should be FAIL interrupted: {[(t.number, t.state.name, t.user_attrs.get('fail_reason')) for t in lost]}"
    )
    requeued = [t for t in trials if t.user_attrs.get("requeue_of") == lost[0].number]
    assert len(requeued) == 1 and requeued[0].state == TrialState.COMPLETE and requeued[0].params == lost[0].params, (
        f"re-queued once, same plan, then COMPLETE: {[(t.number, t.state.name, t.params) for t in requeued]} vs {lost[0].params}"
    )
    _complete_once(pg_server.url, "nodeloss", 3)
    others = [(t.number, t.state.name) for t in trials if t.state != TrialState.COMPLETE and t.number != lost[0].number]
    assert not others, f"nothing else may fail: {others}"
