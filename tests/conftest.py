"""Shared fixtures: tiny real datasets and the base models every method is checked on."""

from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from automl import build_model, load_dataset

# The suite runs two workers on two cores (README's test command), beside the Ray workers and
# launchers its tests start. At PyTorch's default (one thread per core) every worker's operations
# wait for a core another process holds: the resnet18 cases of tests/searchspace/test_methods.py
# took 6-8 minutes instead of 1 on a busy machine. Each test process computes on one thread, as
# the thread plan has a study's processes do (automl/_threads.py); tests of the plan set their own.
torch.set_num_threads(1)

#: (model name, one sample's input shape). Every registered method is applied to each of these.
BASE_MODELS = [
    ("digits_cnn", (1, 8, 8)),
    ("mnist1d_cnn", (40,)),
    ("resnet18", (3, 32, 32)),
    ("mobilenet_v2", (3, 32, 32)),
]


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def mnist1d():
    return load_dataset("mnist1d", seed=0)


def make_base(name: str, shape: tuple[int, ...], num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, input_shape=shape, num_classes=num_classes).eval()


def sample_params(method, seed: int) -> tuple[dict, dict]:
    """(method params, raw Optuna params) of one random draw from ``method.space``."""
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    return method.space(trial), trial.params


def random_context(shape, base, seed: int = 0):
    """An ApplyContext with 64 seeded random samples of ``shape`` as two calibration batches."""
    from searchspace import ApplyContext

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *shape, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return ApplyContext(
        example_input=x[:1],
        calibration=lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])]),
        fit=lambda module, **kw: module,
        base=base,
    )


def ort_kernel_counts(path: Path, x: torch.Tensor) -> collections.Counter:
    """ONNX Runtime's profile of one run of the file at ``path`` on ``x`` (one thread): how many
    times each op type executed (If branches included). Counted, not timed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.parent / "profile")
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    session.run(None, {session.get_inputs()[0].name: x.numpy()})
    events = json.loads(open(session.end_profiling()).read())
    return collections.Counter(e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def skip_unless_ci(reason: str) -> None:
    """A service a test needs (PostgreSQL, Chromium) is missing: skip here, fail in CI, where
    ``.ci/run`` installs it and sets ``AUTOML_CI`` (a skip there would pass a check never made)."""
    if os.environ.get("AUTOML_CI"):
        pytest.fail(f"{reason}; CI installs it (.ci/run), so it must be there", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray for the session; workers import this checkout (and tests.fixtures plugins)."""
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


# --- Running the suite on several workers (pytest-xdist, ``-n 2 --dist loadgroup``) ---------------

#: Session fixtures that run a whole study: every test that uses one goes to the worker that built it
#: (other session fixtures are cheap, e.g. the datasets, and each worker builds its own).
SHARED_STUDIES = ("small_study",)


def pytest_configure(config):
    """Each xdist worker gets its own Ray temp folder (its own local Ray, never the other's)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # Short: Ray's socket paths live under it and a Unix socket path has at most 107 bytes.
        folder = os.path.join(tempfile.gettempdir(), f"ray-{worker}-{os.getpid()}")
        os.makedirs(folder, exist_ok=True)
        os.environ["RAY_TMPDIR"] = folder


def pytest_unconfigure(config):
    """The worker's Ray temp folder goes with the worker."""
    folder = os.environ.get("RAY_TMPDIR", "")
    if os.environ.get("PYTEST_XDIST_WORKER") and os.path.basename(folder).startswith("ray-gw"):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Group tests so that no expensive fixture is built twice: the tests that share a
    module-scoped fixture, or a shared study, go to one worker (with every test they are linked to
    through another such fixture); every other test is free to run on either worker."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    keys_of = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        keys = []
        for name, defs in (info.name2fixturedefs.items() if info else ()):
            if name in SHARED_STUDIES:
                keys.append(name)
            elif defs and defs[-1].scope == "module":
                keys.append(f"{item.nodeid.split('::', 1)[0]}::{name}")
        for key in keys[1:]:
            parent[find(key)] = find(keys[0])
        keys_of[item.nodeid] = keys
    for item in items:
        keys = keys_of[item.nodeid]
        if keys:
            item.add_marker(pytest.mark.xdist_group(find(keys[0])))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # xdist hands out the groups largest first, then single tests in this order: the slow ones
        # first, so that no long test starts last on one worker while the other has nothing left.
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
