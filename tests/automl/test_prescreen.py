"""Costs before training (automl._prescreen): the dry run and the screen.

- the dry run of a plan (the chain without training) has exactly the trained model's params, size
  and MACs, for every registered method on the built-in CNNs (exits: MACs are an upper bound,
  fitted thresholds only make samples leave earlier); latency is compared through the artifact
  itself, the same ONNX graph (same ops, same tensor shapes), not through timings on a shared machine;
- the study's screen runs its dry runs in a Ray worker with the launcher's costs.

What the searcher does with the screen's verdict is tested in ``test_searcher.py``.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import searchspace
from automl._constraints import Constraints
from automl._latency import LatencySettings
from automl._measure import param_count
from automl._prescreen import Screen, dry_run, plan_key
from automl._trial import TrialSettings, run_trial
from searchspace import Plan
from tests.conftest import make_base, sample_params

FAST = LatencySettings(warmup=1, repeats=3, max_attempts=1, isolate=False, max_samples=20)
SETTINGS = TrialSettings(epochs=1, lr=1e-3, batch_size=100, latency=FAST)
CNNS = [("digits_cnn", "digits"), ("mnist1d_cnn", "mnist1d")]


def onnx_graph(folder: Path) -> list[tuple[str, list]]:
    """Per ONNX file in ``folder``: its node op types and its initializer shapes, in order."""
    out = []
    for f in sorted(folder.glob("*.onnx")):
        g = onnx.load(str(f)).graph
        out.append((f.name, [n.op_type for n in g.node], sorted((i.name, list(i.dims)) for i in g.initializer)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_name,dataset", CNNS, ids=[m for m, _ in CNNS])
@pytest.mark.parametrize("name", searchspace.list_methods())
def test_dry_run_costs_equal_the_trained_model(name, model_name, dataset, request, tmp_path):
    data = request.getfixturevalue(dataset)
    method = searchspace.get_method(name)()
    base = make_base(model_name, data.input_shape)
    if method.supports(base) is not None:
        pytest.skip(f"{name} does not apply to {model_name}: {method.supports(base)}")
    params, _ = sample_params(method, seed=5)
    plan = Plan(chain=((name, params),), finetune={"distill": False})
    screened = dry_run(plan, base, data, SETTINGS, folder=tmp_path / "dry")
    costs = screened.metrics
    trained = run_trial(plan, base, data, SETTINGS, folder=tmp_path / "trained").metrics
    if method.costs_after_training:
        # The artifact holds the fitted thresholds: only the stored weights are final before training.
        assert (costs.params, costs.state_dict_bytes) == (trained.params, trained.state_dict_bytes), f"{name}: dry run {(costs.params, costs.state_dict_bytes)} != trained {(trained.params, trained.state_dict_bytes)}"
        assert not screened.final and screened.known == ("params", "state_dict_bytes"), f"{name}: costs depend on training, known {screened.known}"
        assert costs.macs >= trained.macs, f"{name}: dry-run MACs {costs.macs} (nobody exits early) < trained expected MACs {trained.macs}"
        return
    assert (costs.params, costs.size_bytes, costs.state_dict_bytes) == (trained.params, trained.size_bytes, trained.state_dict_bytes), (
        f"{name} {params} on {model_name}: dry run (params, size, state dict) {(costs.params, costs.size_bytes, costs.state_dict_bytes)} "
        f"!= trained {(trained.params, trained.size_bytes, trained.state_dict_bytes)}"
    )
    assert screened.final and costs.macs == trained.macs, f"{name} {params} on {model_name}: dry-run MACs {costs.macs} != trained {trained.macs}"
    # Latency is timed on the artifact: the same graph (ops and shapes) is the same work.
    dry, real = onnx_graph(tmp_path / "dry"), onnx_graph(tmp_path / "trained")
    assert dry and dry == real, f"{name} on {model_name}: the dry run's ONNX graph differs from the trained model's"


def test_node_screen_dry_runs_in_a_ray_worker_with_the_launchers_costs(digits, ray_session):
    """The study's screen (NodeScreen) runs each dry run in a Ray worker, as trials run, not in the
    launcher beside Tune's loop; its exact costs are those of the same dry run in the launcher."""
    import os
    import tempfile

    import ray

    from automl._search import NodeScreen

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # tests.fixtures.whereami's LOG; not imported here, so its method is registered only in the worker.
    log = Path(tempfile.gettempdir()) / "automl-test-whereami.pids"
    log.unlink(missing_ok=True)
    base = make_base("digits_cnn", digits.input_shape)
    methods = {n: searchspace.get_method(n)() for n in ("none", "tucker")}
    local = Screen(base=base, data=digits, settings=SETTINGS, methods=methods, constraints=Constraints(max_params=param_count(base) - 1))
    node = NodeScreen(local, plugins=("tests.fixtures.whereami",), threads=1)
    tucker = Plan(chain=(("tucker", {"rank_out": 0.3, "rank_in": 0.3}),), finetune={"distill": False})
    here, there = local.check(tucker, {}), node.check(tucker, {})
    assert there.error is None and there.costs is not None, f"the node screen failed: {there.error}"
    exact = ("params", "size_bytes", "state_dict_bytes", "macs")
    assert {k: getattr(there.costs.metrics, k) for k in exact} == {k: getattr(here.costs.metrics, k) for k in exact}, "the worker's dry run measured other costs"
    assert there.costs.metrics.latency_ms > 0 and there.broken == here.broken == "", (there.broken, here.broken)
    base_plan = Plan(chain=(("none", {}),), finetune={"distill": False})
    assert node.check(base_plan, {}).broken.startswith("params "), "the base breaks max_params in the worker too"
    assert node.check(base_plan, {plan_key(base_plan): 7}).duplicate_of == 7, "a finished plan is recognised in the worker"
    verdict = node.check(Plan(chain=(("whereami", {"point": 0.5}),), finetune={"distill": False}), {})
    assert verdict.error is None, f"the plugin method's dry run failed in the worker: {verdict.error}"
    pids = [int(line) for line in log.read_text().split()]
    assert pids and os.getpid() not in pids, f"dry runs ran in processes {pids}; the launcher is {os.getpid()}"
