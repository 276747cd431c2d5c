"""Faults of a real deployment during one study: is anything finished lost or recorded twice?

Starts a throwaway PostgreSQL server and a two-node Ray cluster on loopback (as the cluster tests
do), then runs the default digits study (``studies/digits.yaml``, ``--trials`` trials) from a
launcher process while injecting, each at a number of finished trials (read from the database):

1. the second Ray node is stopped (its raylet and its trials' workers), and later started again;
2. PostgreSQL is restarted twice (``pg_ctl stop -m fast``, ``--outage-s`` seconds down, start);
3. the launcher is SIGKILLed once, and ``automl resume`` continues the study.

It then reports, from the database and the study folder: trials COMPLETE, lost (the budget not
reached, or a COMPLETE trial without its checkpoint), duplicated (one Ray run recorded on more than
one trial), interrupted and re-queued, and the wall time. A launcher that exits on its own with an
error (not one of the faults: say Ray's out-of-memory killer on a crowded machine) is resumed, as a
user would, and listed among the events. ``--baseline`` then runs the same study
without faults (another study name) for the wall-time cost of the faults.

    PYTHONPATH=. python benchmarks/fault_injection.py --trials 20 --baseline

Needs Debian's ``postgresql`` package and this project's environment; runs as root or as a user
that may start PostgreSQL. Writes its folders under ``--work`` (default: a new temp folder).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

# The cluster and PostgreSQL helpers are the fault tests' own (tests/automl/test_cluster.py): the
# checkout's root is put on the path so the script runs from any folder, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.automl.test_cluster import RAY, PgServer, RayNodes, _free_port, _pg_bin, _stop_group, _wait_nodes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Resumes after a launcher exit the benchmark did not cause, before it gives up.
MAX_RESUMES = 3


def start_postgres(root: Path) -> PgServer:
    bindir = _pg_bin()
    if bindir is None:
        sys.exit("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin (apt-get install -y postgresql)")
    data, sock = root / "data", root / "sock"
    sock.mkdir(parents=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        import shutil

        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PgServer(bindir, data, root / "server.log", sock, _free_port(), as_user)
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "automl", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    server.start()
    subprocess.run([*as_user, str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "automl", "studies"], check=True, capture_output=True)
    return server


def start_cluster(tmp: Path) -> tuple[RayNodes, subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={tmp / 'head'}", *common],
        env=env, stdout=(tmp / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    nodes = RayNodes(f"127.0.0.1:{port}", env, tmp, common)
    _wait_nodes(nodes.address, 1, env, tmp / "head.log")
    nodes.start_worker()
    return nodes, head


def launcher(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "automl", *args], cwd=ROOT, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def finished(url: str, name: str) -> int:
    """Trials counted toward the budget now (-1 while the database does not answer)."""
    from automl._recovery import finished_count

    try:
        return finished_count(optuna.load_study(study_name=name, storage=url))
    except Exception:  # noqa: BLE001 - the database is down on purpose
        return -1


def run(name: str, cfg_path: Path, url: str, nodes: RayNodes, pg: PgServer, work: Path, trials: int, faults: bool, outage_s: float) -> dict:
    log = work / f"{name}.log"
    study_dir = work / "runs" / name
    schedule = collections.deque(
        [(round(trials * 0.15), "stop node"), (round(trials * 0.3), "start node"), (round(trials * 0.4), "restart database"),
         (round(trials * 0.6), "restart database"), (round(trials * 0.75), "kill launcher")] if faults else []
    )
    events: list[str] = []
    resumes = 0
    start = time.monotonic()
    proc = launcher(["launch", str(cfg_path), "--address", nodes.address, "--storage", url, "--output-dir", str(work / "runs")], log)
    while True:
        done = finished(url, name)
        while schedule and done >= schedule[0][0]:
            at, what = schedule.popleft()
            events.append(f"{what} at {done} finished ({time.monotonic() - start:.0f}s)")
            if what == "stop node":
                nodes.stop_worker()
            elif what == "start node":
                nodes.start_worker()
            elif what == "restart database":
                pg.stop()
                time.sleep(outage_s)
                pg.start()
            elif what == "kill launcher":
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                proc = launcher(["resume", str(study_dir)], log)
        rc = proc.poll()
        if rc is not None and rc != 0 and resumes < MAX_RESUMES:
            # Not one of ours (e.g. Ray's out-of-memory killer on a crowded machine, which Ray Tune
            # does not survive): the user's answer is `automl resume`, and so is ours; it is reported.
            resumes += 1
            events.append(f"launcher exited {rc} on its own at {done} finished, resumed ({time.monotonic() - start:.0f}s)")
            proc = launcher(["resume", str(study_dir)], log)
            continue
        if rc is not None:
            break
        time.sleep(1.0)
    wall = time.monotonic() - start
    if nodes.worker is None:
        nodes.start_worker()
    study = optuna.load_study(study_name=name, storage=url)
    ts = [t for t in study.get_trials(deepcopy=False) if "derived_from" not in t.user_attrs]
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    runs = collections.Counter(t.user_attrs.get("ray_trial_id") for t in ts if t.state.is_finished() and t.user_attrs.get("ray_trial_id"))
    no_ckpt = [t.number for t in complete if "duplicate_of" not in t.user_attrs and not (study_dir / str(t.user_attrs.get("checkpoint"))).is_dir()]
    from automl._recovery import finished_count

    counted = finished_count(study)
    return {
        "name": name, "rc": rc, "wall_s": wall, "events": events, "complete": len(complete), "counted": counted,
        "lost": max(0, trials - counted) + len(no_ckpt), "duplicated": sum(n - 1 for n in runs.values() if n > 1),
        "interrupted": sum(1 for t in ts if t.user_attrs.get("interrupted")), "requeued": sum(1 for t in ts if "requeue_of" in t.user_attrs),
        "failed": sum(1 for t in ts if t.state == TrialState.FAIL and not t.user_attrs.get("interrupted")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--config", type=Path, default=ROOT / "studies" / "digits.yaml", help="study config (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=20, help="the study's budget (default: %(default)s)")
    ap.add_argument("--outage-s", type=float, default=5.0, help="seconds PostgreSQL stays down at each restart (default: %(default)s)")
    ap.add_argument("--baseline", action="store_true", help="first run the same study without faults, for the wall-time cost")
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a new temp folder)")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="fault-injection-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pg = start_postgres(Path(tempfile.mkdtemp(prefix="fault-pg-")))
    nodes, head = start_cluster(Path(tempfile.mkdtemp(prefix="fault-ray-")))
    results = []
    try:
        base = yaml.safe_load(args.config.read_text())
        base["budget"]["trials"] = args.trials
        for name, faults in [("faults", True)] + ([("baseline", False)] if args.baseline else []):
            cfg = {**base, "name": name}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            results.append(run(name, path, pg.url, nodes, pg, work, args.trials, faults, args.outage_s))
            print(f"{name}: {results[-1]}", flush=True)
    finally:
        nodes.stop_worker()
        _stop_group(head)
        pg.ctl("-m", "fast", "-w", "stop", check=False)
    print()
    print("| run | faults | exit | complete | counted | lost | duplicated | interrupted | re-queued | user failures | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {'; '.join(r['events']) or 'none'} | {r['rc']} | {r['complete']} | {r['counted']}/{args.trials} | {r['lost']} | {r['duplicated']} | {r['interrupted']} | {r['requeued']} | {r['failed']} | {r['wall_s']:.0f} |")
    if len(results) == 2:
        faulted, baseline = results
        print(f"\nwall-time cost of the faults: {faulted['wall_s'] - baseline['wall_s']:+.0f}s ({faulted['wall_s'] / baseline['wall_s'] - 1:+.0%})")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
