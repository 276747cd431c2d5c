"""Registry-driven checks: every registered method on every base model.

A new method file in searchspace/methods/ is tested here the moment it exists. The README's example
method (``tests.fixtures.fold_bn``) runs through the same checks, registered only while its own test
runs (``searchspace.registered``), so it never appears in another test's registry.
"""

from __future__ import annotations

import contextlib

import optuna
import pytest
import torch

import searchspace
from searchspace import SearchSpace, Stage
from tests.conftest import BASE_MODELS, make_base, random_context, sample_params
from tests.fixtures.fold_bn import FoldBatchNorm

#: Example methods, by name: checked here like the built-in ones, registered per test.
EXAMPLES = {FoldBatchNorm.name: FoldBatchNorm}
METHODS = [*searchspace.list_methods(), *EXAMPLES]


@contextlib.contextmanager
def examples_registered():
    with contextlib.ExitStack() as stack:
        for cls in EXAMPLES.values():
            stack.enter_context(searchspace.registered(cls))
        yield


@pytest.fixture
def name(request):
    """The method under test (indirect parameter); an example method is registered for this test only."""
    if request.param in EXAMPLES:
        with searchspace.registered(EXAMPLES[request.param]):
            yield request.param
    else:
        yield request.param


@pytest.mark.parametrize("name", METHODS, indirect=True)
def test_space_replays_on_fixed_trial(name):
    method = searchspace.get_method(name)()
    params, raw = sample_params(method, seed=1)
    replay = method.space(optuna.trial.FixedTrial(raw))
    assert replay == params, f"{name}: FixedTrial replay {replay} != sampled {params}"
    assert all(k.startswith(f"{name}.") for k in raw), f"{name}: parameter names must be prefixed: {sorted(raw)}"


@pytest.mark.parametrize("model_name,shape", BASE_MODELS, ids=[m for m, _ in BASE_MODELS])
@pytest.mark.parametrize("name", METHODS, indirect=True)
def test_method_on_base_model(name, model_name, shape):
    method = searchspace.get_method(name)()
    base = make_base(model_name, shape)
    reason = method.supports(base)
    if reason is not None:
        pytest.skip(f"{name} does not apply to {model_name}: {reason}")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    params, _ = sample_params(method, seed=3)
    ctx = random_context(shape, base)
    out = method.apply(base, params, context=ctx)
    assert out is not base, f"{name}: apply must return a new module"
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), f"{name}: apply modified the base model's {k}"
    x = torch.randn(4, *shape)
    out.eval()
    with torch.no_grad():
        y = out(x)
    assert y.shape == (4, 10), f"{name} on {model_name}: output shape {tuple(y.shape)} != (4, 10)"
    assert torch.isfinite(y).all(), f"{name} on {model_name}: non-finite outputs"
    if method.finetune:
        out.train()
        # Train the way automl._train.fit does: through the model's own training_loss when it has one
        # (several outputs, e.g. early exits), else on the forward's output.
        hook = getattr(out, "training_loss", None)
        y_true = torch.randint(0, 10, (4,))
        loss = hook(x, y_true, lambda logits, t: logits.square().mean()) if callable(hook) else out(x).square().mean()
        loss.backward()
        missing = [n for n, p in out.named_parameters() if p.requires_grad and (p.grad is None)]
        assert not missing, f"{name} on {model_name}: no gradient reaches {missing[:5]}"


def test_space_samples_valid_chains():
    with examples_registered():
        methods = {n: searchspace.get_method(n)() for n in METHODS}
        space = SearchSpace(methods)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(60):
            trial = study.ask()
            plan = space.sample(trial)
            stages = [methods[n].stage for n, _ in plan.chain]
            assert stages == sorted(stages), f"chain out of stage order: {plan.label}"
            assert stages and stages[0] == Stage.STRUCTURE, f"chain must start with a structure method: {plan.label}"
            for i, (n, _) in enumerate(plan.chain):
                assert methods[n].accepts(tuple(m for m, _ in plan.chain[:i])), f"{n} may not follow {plan.label}"
            assert space.sample(optuna.trial.FixedTrial(trial.params)) == plan
            seen.add(plan.chain[0][0])
            study.tell(trial, 0.0)
        structure = {n for n in METHODS if methods[n].stage == Stage.STRUCTURE}
        assert seen == structure, f"60 random trials never picked {structure - seen}"


def test_registry_rejects_duplicates_and_lists_allowed():
    cls = searchspace.get_method("none")
    with pytest.raises(ValueError, match="registered twice"):
        searchspace.register_method(type("Other", (cls,), {"name": "none"}))
    with pytest.raises(KeyError, match="allowed: .*none"):
        searchspace.get_method("nope")


@pytest.mark.parametrize("name", METHODS, indirect=True)
def test_method_cites_its_paper(name):
    assert searchspace.get_method(name).reference, f"{name}: cite the paper the method follows in `reference`"


@pytest.mark.parametrize("model_name,shape", [("digits_cnn", (1, 8, 8)), ("mnist1d_cnn", (40,))], ids=["digits_cnn", "mnist1d_cnn"])
@pytest.mark.parametrize("name", METHODS, indirect=True)
def test_structure_follows_from_the_parameters(name, model_name, shape):
    """The contract ``automl.load_model`` and the dry run rely on: the same parameters on the same
    base give the same state-dict layout, whatever the calibration data and with ``dry_run`` on."""
    method = searchspace.get_method(name)()
    base = make_base(model_name, shape)
    if method.supports(base) is not None:
        pytest.skip(f"{name} does not apply to {model_name}")
    params, _ = sample_params(method, seed=5)
    layouts = []
    for seed, dry in ((0, False), (1, True)):
        ctx = random_context(shape, base, seed=seed)
        ctx.dry_run = dry
        out = method.apply(base, params, context=ctx)
        layouts.append({k: tuple(v.shape) for k, v in out.state_dict().items() if isinstance(v, torch.Tensor)})
    assert layouts[0] == layouts[1], f"{name} on {model_name}: the layout depends on the data or dry_run: {set(layouts[0].items()) ^ set(layouts[1].items())}"
