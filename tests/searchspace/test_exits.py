"""Early exits: the MSDNet threshold procedure, real early termination, batching, scripting, training."""

from __future__ import annotations

import math

import pytest
import torch

from searchspace import ApplyContext, get_method
from searchspace.methods.exits import NEVER, VARIANTS, EarlyExitNet, budget_thresholds, exit_fractions, geometric_fractions
from tests.conftest import make_base, ort_kernel_counts

PARAMS = dict(points="blocks", count=2, head="avgpool", pool=2, training="joint", weighting="uniform", thresholds="direct", threshold_0=0.5, threshold_1=0.5)


def _exit_net(**overrides) -> EarlyExitNet:
    base = make_base("mnist1d_cnn", (40,))
    params = {**PARAMS, **overrides}
    net = get_method("exits")().apply(base, params, context=ApplyContext(example_input=torch.randn(1, 40)))
    return net.eval()


def test_geometric_fractions():
    assert geometric_fractions(1.0, 4) == [0.25] * 4
    f = geometric_fractions(0.5, 2)
    assert math.isclose(f[0], 2 / 3) and math.isclose(f[1], 1 / 3), f"q=0.5, K=2 must plan [2/3, 1/3], got {f}"


def test_budget_thresholds_known_answer():
    # 12 samples, 3 exits, q = 1: plan 4 / 4 / 4.
    c0 = torch.tensor([0.99, 0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50, 0.45])
    # At exit 1 the 4 samples that already left (0-3) are the most confident: they must be ignored.
    c1 = torch.tensor([1.00, 1.00, 1.00, 1.00, 0.30, 0.96, 0.40, 0.94, 0.92, 0.35, 0.91, 0.20])
    conf = torch.stack([c0, c1, torch.zeros(12)], dim=1)
    t = budget_thresholds(conf, 1.0)
    assert t[:2] == [pytest.approx(0.85), pytest.approx(0.91)] and t[2] == -math.inf, f"thresholds {t} != [0.85, 0.91, -inf]"
    taken, fractions = exit_fractions(conf, t)
    assert taken.tolist() == [0, 0, 0, 0, 2, 1, 2, 1, 1, 2, 1, 2], f"exit per sample {taken.tolist()}"
    assert fractions == [pytest.approx(1 / 3)] * 3, f"fractions {fractions} != 1/3 each"
    # q = 0.5 with 2 exits plans 2/3 then 1/3: floor(12 * 2/3) = 8 leave at exit 0.
    t = budget_thresholds(conf[:, [0, 2]], 0.5)
    assert t[0] == pytest.approx(0.65), f"q=0.5 threshold {t[0]} != 8th highest confidence 0.65"
    # A planned count of 0 lets nobody out early (the reference code's +inf threshold).
    t = budget_thresholds(conf[:2], 100.0)
    assert t[0] == NEVER and t[1] == NEVER, f"floor(2 * q_k) = 0 must give NEVER, got {t}"


def test_batch1_really_skips_later_stages():
    net = _exit_net()
    ran: list[str] = []
    for i, block in enumerate(net.exits):
        block.segment.register_forward_hook(lambda *_a, i=i: ran.append(f"segment{i}"))
        block.head.register_forward_hook(lambda *_a, i=i: ran.append(f"head{i}"))
    x = torch.randn(1, 40)
    net.use_setting({"state": {"thresholds": [0.0, 0.0]}})
    with torch.no_grad():
        net(x)
    assert ran == ["segment0", "head0"], f"a confident first exit must stop there; ran {ran}"
    ran.clear()
    net.use_setting({"state": {"thresholds": [NEVER, 0.0]}})
    with torch.no_grad():
        net(x)
    assert ran == ["segment0", "head0", "segment1", "head1"], f"second exit should stop; ran {ran}"
    ran.clear()
    net.use_setting({"state": {"thresholds": [NEVER, NEVER]}})
    with torch.no_grad():
        net(x)
    assert ran == ["segment0", "head0", "segment1", "head1", "segment2", "head2"], f"nobody confident: all must run; ran {ran}"


def test_batch_drops_exited_samples_and_matches_batch1():
    net = _exit_net()
    x = torch.randn(64, 40) * 3
    conf = net.confidences(x)
    # Thresholds at the median confidence: about half the batch leaves at each intermediate exit.
    t = [float(conf[:, 0].median()), float(conf[:, 1].median())]
    net.use_setting({"state": {"thresholds": t}})
    sizes: list[int] = []
    net.exits[1].segment.register_forward_hook(lambda _m, a, _o: sizes.append(a[0].shape[0]))
    with torch.no_grad():
        batched = net(x)
        taken = net.exit_indices(x)
    expected, _ = exit_fractions(conf, [*t, -math.inf])
    assert torch.equal(taken, expected), f"exit indices {taken.tolist()} != from confidences {expected.tolist()}"
    assert sizes[0] == int((taken > 0).sum()), f"segment 1 saw {sizes} samples, {int((taken > 0).sum())} had not exited"
    with torch.no_grad():
        single = torch.cat([net(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(batched, single, atol=1e-5), f"batched and batch-1 logits differ by {float((batched - single).abs().max()):.2e}"



def test_onnx_at_batch1_runs_the_segments_up_to_the_exit_taken_and_no_further(tmp_path):
    """In the ONNX file a sample confident at exit k runs the convolutions of segments 0..k only
    (counted in ONNX Runtime's profile, not timed), with the module's logits; the thresholds are
    edited in the file, as a user would."""
    import onnx
    from onnx import numpy_helper

    from automl._onnx import ATOL, to_onnx

    net = _exit_net()  # average-pooling heads: the backbone's are the only convolutions
    per_exit = [sum(isinstance(m, torch.nn.Conv1d) for m in block.segment.modules()) for block in net.exits]
    x = torch.randn(1, 40)
    to_onnx(net, x, tmp_path / "m.onnx")
    for k, thresholds in enumerate(([0.0, 0.0], [NEVER, 0.0], [NEVER, NEVER])):
        m = onnx.load(str(tmp_path / "m.onnx"))
        (init,) = [i for i in m.graph.initializer if i.name.split(".")[-1] == "thresholds"]
        init.CopyFrom(numpy_helper.from_array(torch.tensor([*thresholds, -math.inf]).numpy(), init.name))
        path = tmp_path / f"exit{k}.onnx"
        onnx.save(m, str(path))
        counts = ort_kernel_counts(path, x)
        ran = sum(n for op, n in counts.items() if "Conv" in op)
        assert ran == sum(per_exit[: k + 1]), f"thresholds {thresholds}: {ran} convolutions ran, segments 0..{k} hold {sum(per_exit[: k + 1])} ({dict(counts)})"
        net.use_setting({"state": {"thresholds": thresholds}})
        import onnxruntime as ort

        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        assert abs(got - want).max() <= ATOL, f"thresholds {thresholds}: ONNX differs from the module by {abs(got - want).max()}"


def test_torchscript_keeps_control_flow():
    net = _exit_net(head="isqrtcov", cov_dim=8, iterations=3)
    scripted = torch.jit.script(net)
    x = torch.randn(16, 40)
    for t in ([0.0, 0.0], [NEVER, 0.0], [NEVER, NEVER]):
        net.use_setting({"state": {"thresholds": t}})
        scripted.thresholds.copy_(net.thresholds)
        with torch.no_grad():
            assert torch.equal(scripted.exit_indices(x), net.exit_indices(x)), f"scripted exits differ at thresholds {t}"
            one = x[:1]
            assert torch.allclose(scripted(one), net(one), atol=1e-6), f"scripted batch-1 logits differ at thresholds {t}"


def test_frozen_training_trains_heads_only():
    net = _exit_net(training="frozen")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("exits.0.head", "exits.1.head")) for n in trainable), f"frozen mode trains {sorted(trainable)}"
    net.train()
    assert not net.exits[0].segment.training and not net.exits[-1].head.training, "frozen backbone must stay in eval mode"
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    calls: list[int] = []

    def criterion(logits, target):
        calls.append(logits.shape[0])
        return torch.nn.functional.cross_entropy(logits, target)

    net.training_loss(x, y, criterion).backward()
    assert len(calls) == 2, f"frozen mode computes {len(calls)} exit losses, expected the 2 intermediate exits"
    missing = [n for n in trainable if dict(net.named_parameters())[n].grad is None]
    assert not missing, f"no gradient reaches {missing}"


def test_joint_weighting_linear():
    net = _exit_net(training="joint", weighting="linear")
    assert net.loss_weights == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0], f"linear weights {net.loss_weights}"


def test_calibrate_budget_and_variants():
    net = _exit_net(thresholds="budget", q=0.5)
    assert net.thresholds[:-1].tolist() == [NEVER, NEVER], "before calibration nobody may exit early"
    x = torch.randn(300, 40) * 3
    settings = net.calibrate(x, torch.zeros(300, dtype=torch.long))
    own = settings[0]
    assert own["params"] == {} and net.thresholds[:-1].tolist() == pytest.approx(own["state"]["thresholds"]), "calibrate must apply the trial's own setting"
    plan = geometric_fractions(0.5, 3)
    got = own["state"]["val_exit_fractions"]
    assert got[0] == pytest.approx(plan[0], abs=0.01), f"validation exit fractions {got} do not follow the plan {plan}"
    assert len(settings) in (VARIANTS, VARIANTS + 1), f"{len(settings)} settings, expected the own one + {VARIANTS} q values (one may coincide)"
    qs = [s["params"]["exits.q"] for s in settings[1:]]
    assert qs == sorted(qs) and all(0.05 <= q <= 2.0 for q in qs), f"variant q values {qs} must lie in the searched range"


def test_apply_rejects_a_model_whose_forward_is_not_its_stages():
    base = make_base("mnist1d_cnn", (40,))

    class Odd(type(base)):
        def forward(self, x):
            return super().forward(x) * 2

    odd = Odd()
    odd.load_state_dict(base.state_dict())
    with pytest.raises(ValueError, match="does more than run its stages"):
        get_method("exits")().apply(odd.eval(), PARAMS, context=ApplyContext(example_input=torch.randn(1, 40)))


@pytest.mark.parametrize("size,pool", [((19,), 4), ((10,), 2), ((5,), 4), ((4, 4), 2), ((3, 5), 4), ((8, 8), 1)])
def test_pool_matrix_equals_adaptive_average_pooling(size, pool):
    """PoolHead's matrix product is PyTorch's adaptive average pooling, windows included (also when
    the map is smaller than the pooled size or does not divide by it)."""
    from searchspace.methods.exits import adaptive_pool_matrix

    x = torch.randn(3, 5, *size)
    ref = (torch.nn.AdaptiveAvgPool1d(pool) if len(size) == 1 else torch.nn.AdaptiveAvgPool2d(pool))(x).flatten(2)
    got = torch.matmul(x.flatten(2), adaptive_pool_matrix(size, pool))
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.allclose(got, ref, atol=1e-6), f"max diff {(got - ref).abs().max()}"
