"""Early exits with confidence thresholds, set directly or by the MSDNet budget procedure.

Huang, Chen, Li, Wu, van der Maaten, Weinberger, "Multi-Scale Dense Networks for Resource Efficient
Image Classification", ICLR 2018 (arXiv 1703.09844), Sec. 4 "budgeted batch classification":
classifiers at several depths; a sample leaves at the first exit whose top softmax probability
reaches that exit's threshold. Thresholds for a budget follow a geometric distribution of exit
fractions q_k ~ q^k (k = 1..K, normalised): on the validation split, exit by exit, the
floor(N q_k)-th most confident not-yet-exited sample sets T_k, and the last exit takes the rest.
Thresholds need no retraining, so one trained model yields one operating point per q
(:meth:`EarlyExitNet.calibrate` returns them; the study records each as its own trial).

What the search chooses:

- ``points``: exits after whole stages of the :class:`~automl.StagedNet` (``stages``), or also
  between the blocks inside a stage (``blocks``: after each child of an ``nn.Sequential`` stage
  that is not followed by an activation, normalisation, pooling or dropout layer);
- ``count``: how many intermediate exits (spread evenly over the available points);
- ``head``: the exit classifier, average pooling to ``pool`` positions per spatial axis + linear
  (``pool = 1`` is global average pooling) or an iSQRT-COV head (Li et al., CVPR 2018, see
  ``isqrtcov``) with its own ``cov_dim`` and Newton-Schulz ``iterations``;
- ``training``: ``frozen`` trains only the exit heads on a frozen backbone (the final exit stays
  exactly the base); ``joint`` trains everything on the weighted sum of the exit losses, weights
  ``uniform`` (MSDNet: all 1) or ``linear`` (k / K, deeper exits weigh more, as SDN, Kaya et al.,
  ICML 2019). Distillation from the base (searched for every method) applies to every exit;
- ``thresholds``: ``direct`` (``threshold_k`` per exit) or ``budget`` with the geometric ``q``.

Changes from the paper, and why (one place): MSDNet's multi-scale dense architecture is not built;
exits are attached to the given base (after stages or blocks), because the search compresses a
user's trained model. The exit classifiers are lighter than MSDNet's (two strided 3x3 convs, then
pooling and a linear layer): average pooling + linear or an iSQRT-COV head, so that an early exit
actually saves compute on these small nets. ``frozen`` training (only heads learn), ``linear``
loss weights (SDN) and ``direct`` thresholds are search options the paper does not have; the
``budget`` thresholds follow its procedure as written.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Float, Int
from searchspace._registry import register_method
from searchspace._surgery import clone
from searchspace.methods.isqrtcov import ISqrtCovHead

__all__ = ["EarlyExitNet", "Exits", "PoolHead", "adaptive_pool_matrix", "budget_thresholds", "exit_fractions"]

#: Most intermediate exits the search may ask for.
MAX_EXITS = 4
#: Operating points (values of q) each trained exit model is also measured at.
VARIANTS = 8


def budget_q_grid(ranges: Mapping[str, Any]) -> list[float]:
    """The :data:`VARIANTS` values of MSDNet's budget ``q`` a calibrated model is also measured at,
    within the (narrowed) ``q`` range; none when the ``thresholds`` choice excludes ``budget``.
    Geometric spacing: the exit fractions 1 / (1 + q + ...) move fastest for small q."""
    if "budget" not in getattr(ranges["thresholds"], "choices", ["budget"]):
        return []
    dom = ranges["q"]
    lo, hi = float(dom.low), float(dom.high)
    if lo == hi:
        return [lo]
    return [lo * (hi / lo) ** (i / (VARIANTS - 1)) for i in range(VARIANTS)]
#: Placeholder threshold before calibration: above any softmax probability, so nobody exits early.
NEVER = 2.0
#: Layers that belong to the block before them: no exit between them and what they follow.
_APPENDAGES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.Sigmoid, nn.Tanh,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Dropout,
)


def geometric_fractions(q: float, k: int) -> list[float]:
    """Planned exit fractions q^i / sum_j q^j for i = 1..k (MSDNet, Sec. 4)."""
    if not q > 0 or k < 1:
        raise ValueError(f"q > 0 and k >= 1 must hold, but got q={q}, k={k}")
    w = [q**i for i in range(1, k + 1)]
    return [v / sum(w) for v in w]


def budget_thresholds(confidence: torch.Tensor, q: float) -> list[float]:
    """MSDNet thresholds for exit fractions geometric in ``q``.

    Args:
        confidence: (N, K) top softmax probability of each validation sample at each exit.
        q: parameter of the geometric distribution of exit fractions.

    Returns:
        K thresholds; the last is ``-inf`` (the last exit takes every remaining sample). An exit
        whose planned count is 0, or that has fewer remaining samples than planned, gets
        :data:`NEVER`, as in the reference code (its threshold stays at +1e8).
    """
    n, k = confidence.shape
    planned = geometric_fractions(q, k)
    exited = torch.zeros(n, dtype=torch.bool)
    thresholds: list[float] = []
    for i in range(k - 1):
        count = math.floor(n * planned[i])
        t = NEVER
        remaining = confidence[~exited, i]
        if 0 < count <= len(remaining):
            t = float(remaining.sort(descending=True).values[count - 1])
        thresholds.append(t)
        exited |= confidence[:, i] >= t
    thresholds.append(-math.inf)
    return thresholds


def exit_fractions(confidence: torch.Tensor, thresholds: list[float]) -> tuple[torch.Tensor, list[float]]:
    """Exit taken by each sample (first k with confidence >= T_k) and the fraction per exit."""
    n, k = confidence.shape
    t = torch.tensor(thresholds, dtype=confidence.dtype)
    passed = confidence >= t
    passed[:, -1] = True
    taken = passed.float().argmax(dim=1)
    counts = torch.bincount(taken, minlength=k)
    return taken, [float(c) / max(n, 1) for c in counts]


def adaptive_pool_matrix(size: tuple[int, ...], pool: int) -> torch.Tensor:
    """(prod(size), pool**len(size)) matrix ``P`` with ``x.flatten(2) @ P`` equal to adaptive average
    pooling of ``x`` (batch, channels, *size) to ``pool`` positions per axis, flattened.

    Windows are PyTorch's: output ``i`` of an axis of length ``n`` averages inputs
    ``floor(i n / pool)`` to ``ceil((i + 1) n / pool) - 1``.
    """
    full = torch.ones(1, 1)
    for n in size:
        axis = torch.zeros(n, pool)
        for i in range(pool):
            lo, hi = (i * n) // pool, -((-(i + 1) * n) // pool)
            axis[lo:hi, i] = 1.0 / (hi - lo)
        full = torch.kron(full, axis)
    return full


class PoolHead(nn.Module):
    """Average pooling to ``pool`` positions per spatial axis, then a linear classifier.

    ``pool = 1`` is global average pooling; larger values keep coarse position, which matters for
    sequence data such as MNIST-1D where the base itself classifies flattened features.

    The pooling is adaptive average pooling written as one matrix product over the flattened
    positions (:func:`adaptive_pool_matrix`, built for the feature map's ``size``): the same numbers
    as ``nn.AdaptiveAvgPool*d``, but exportable to ONNX inside the early-exit routing, where the
    exporter no longer knows the spatial size and refuses adaptive pooling to more than one position.
    """

    def __init__(self, *, in_channels: int, size: tuple[int, ...], pool: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("pool_matrix", adaptive_pool_matrix(tuple(size), pool))
        self.fc = nn.Linear(in_channels * pool ** len(size), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.matmul(x.flatten(2), self.pool_matrix).flatten(1))


class Exit(nn.Module):
    """A segment of the backbone and the classifier that reads its output."""

    def __init__(self, segment: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.segment = segment
        self.head = head


class _Prefix(nn.Module):
    """Everything a sample leaving at exit ``k`` runs: segments 0..k and heads 0..k (for MAC counts)."""

    def __init__(self, net: EarlyExitNet, k: int) -> None:
        super().__init__()
        self.input_shape = net.input_shape
        self.exits = nn.ModuleList(list(net.exits)[: k + 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape([x.shape[0]] + self.input_shape)
        logits = x
        for block in self.exits:
            x = block.segment(x)
            logits = block.head(x)
        return logits


class EarlyExitNet(nn.Module):
    """A backbone cut into segments, a classifier after each, and a threshold per exit.

    ``forward`` in eval mode is real early termination: with one sample it returns at the first
    confident exit and never runs the later segments; with a batch, samples that exited are dropped
    from the rest of the computation. It is TorchScript-scriptable (the control flow is kept).
    In training mode ``forward`` returns the final exit's logits; the trainer calls
    :meth:`training_loss` (sum of weighted per-exit losses) instead when it is present.

    Args:
        exits: the segments with their classifiers, in order; the last is the base's own head.
        input_shape: one sample's shape at the first segment (the base's ``forward`` may reshape).
        thresholds: one per intermediate exit (the last exit takes every remaining sample).
        loss_weights: weight of each exit's loss during training (0 = not trained).
        frozen: keep the backbone and the final head in eval mode while training.
        budget_q: q of the MSDNet procedure, or None when thresholds are set directly.
        q_grid: values of q measured as extra operating points (none if budget mode is not allowed).
    """

    #: Stay named initializers in the ONNX file, so thresholds can be edited there after export.
    onnx_initializers = ("thresholds",)

    def __init__(
        self,
        *,
        exits: list[Exit],
        input_shape: list[int],
        thresholds: list[float],
        loss_weights: list[float],
        frozen: bool,
        budget_q: Optional[float] = None,
        q_grid: Optional[list[float]] = None,
    ) -> None:
        super().__init__()
        if len(thresholds) != len(exits) - 1 or len(loss_weights) != len(exits):
            raise ValueError(
                f"one threshold per intermediate exit and one weight per exit must be given, but got "
                f"{len(exits)} exits, {len(thresholds)} thresholds, {len(loss_weights)} weights"
            )
        self.exits = nn.ModuleList(exits)
        self.input_shape: list[int] = [int(s) for s in input_shape]
        self.register_buffer("thresholds", torch.tensor([*thresholds, -math.inf], dtype=torch.float32))
        self.loss_weights: list[float] = [float(w) for w in loss_weights]
        self.frozen = frozen
        self.budget_q = budget_q
        self.q_grid: list[float] = list(q_grid or [])

    # --- inference ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape([x.shape[0]] + self.input_shape)
        if self.training:
            for block in self.exits:
                x = block.segment(x)
            return self.exits[-1].head(x)
        if not torch.jit.is_scripting():
            if torch.compiler.is_exporting():
                return self._exported(x)
        if x.shape[0] == 1:
            return self._single(x)
        return self._route(x)[0]

    @torch.jit.unused
    def _exported(self, x: torch.Tensor) -> torch.Tensor:
        """The routing as ``torch.export`` (and the ONNX exporter, as ONNX ``If``) can hold it.

        ``torch.cond`` per exit: when every sample of the batch is confident at exit ``k``, the
        later segments are not run (real early termination at batch 1, the case that is timed);
        otherwise the rest runs on the whole batch and each sample keeps the logits of its first
        confident exit, which are the numbers :meth:`_route` gives (it drops exited samples instead,
        a data-dependent shape that ``torch.cond`` branches cannot return).
        """
        return self._from(0, x)

    @torch.jit.unused
    def _from(self, k: int, x: torch.Tensor) -> torch.Tensor:
        block = self.exits[k]
        h = block.segment(x)
        logits = block.head(h)
        if k + 1 == len(self.exits):
            return logits
        done = torch.softmax(logits, dim=1).amax(dim=1) >= self.thresholds[k]

        def stop(logits: torch.Tensor, h: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            return logits.clone()

        def go_on(logits: torch.Tensor, h: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            return torch.where(done.unsqueeze(1), logits, self._from(k + 1, h))

        return torch.cond(done.all(), stop, go_on, (logits, h, done))

    def _single(self, x: torch.Tensor) -> torch.Tensor:
        logits = x
        for k, block in enumerate(self.exits):
            x = block.segment(x)
            logits = block.head(x)
            if bool(torch.softmax(logits, dim=1).amax() >= self.thresholds[k]):
                return logits
        return logits

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and exit index of every sample, dropping exited samples from later segments."""
        n = x.shape[0]
        index = torch.arange(n, device=x.device)
        taken = torch.full((n,), len(self.exits) - 1, dtype=torch.long, device=x.device)
        result: Optional[torch.Tensor] = None
        for k, block in enumerate(self.exits):
            if index.numel() > 0:
                x = block.segment(x)
                logits = block.head(x)
                if result is None:
                    result = torch.zeros((n, logits.shape[1]), dtype=logits.dtype, device=logits.device)
                done = torch.softmax(logits, dim=1).amax(dim=1) >= self.thresholds[k]
                result[index[done]] = logits[done]
                taken[index[done]] = k
                keep = ~done
                index = index[keep]
                x = x[keep]
        assert result is not None
        return result, taken

    @torch.jit.export
    def exit_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the exit each sample of ``x`` leaves at, under the current thresholds."""
        return self._route(x.reshape([x.shape[0]] + self.input_shape))[1]

    @torch.jit.ignore
    def exit_paths(self) -> list[nn.Module]:
        """For each exit, a module running what a sample leaving there runs (MAC counting)."""
        return [_Prefix(self, k) for k in range(len(self.exits))]

    @torch.jit.ignore
    def export_parts(self) -> list[str]:
        """Every segment and every exit's classifier (what the ``torch.cond`` branches run)."""
        return [f"exits.{k}.{part}" for k in range(len(self.exits)) for part in ("segment", "head")]

    # --- training -------------------------------------------------------------------------

    def train(self, mode: bool = True) -> EarlyExitNet:
        super().train(mode)
        if self.frozen:
            # The base keeps its BatchNorm statistics and dropout off: only exit heads learn.
            for block in self.exits:
                block.segment.eval()
            self.exits[-1].head.eval()
        return self

    @torch.jit.ignore
    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Sum over exits of ``weight_k * criterion(logits_k, y)`` (MSDNet's training objective)."""
        x = x.reshape([x.shape[0]] + self.input_shape)
        total = x.new_zeros(())
        for weight, block in zip(self.loss_weights, self.exits):
            x = block.segment(x)
            if weight > 0:
                total = total + weight * criterion(block.head(x), y)
        return total

    # --- thresholds -----------------------------------------------------------------------

    @torch.jit.ignore
    @torch.no_grad()
    def confidences(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(N, K) top softmax probability of every sample at every exit (all exits evaluated)."""
        was = self.training
        self.eval()
        out = []
        for chunk in x.split(batch_size):
            h = chunk.reshape([chunk.shape[0]] + self.input_shape)
            cols = []
            for block in self.exits:
                h = block.segment(h)
                cols.append(torch.softmax(block.head(h), dim=1).amax(dim=1))
            out.append(torch.stack(cols, dim=1))
        self.train(was)
        return torch.cat(out)

    @torch.jit.ignore
    def calibrate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> list[dict[str, Any]]:
        """Set the thresholds on validation data; return every operating point worth measuring.

        The first setting is this trial's own (budget: thresholds for its q; direct: as sampled),
        then one per value of :attr:`q_grid`. Each is ``{"params": overrides of the trial's
        Optuna parameters, "state": {"thresholds": [...]}}``; :meth:`use_setting` applies one.
        """
        conf = self.confidences(x_val)
        if self.budget_q is not None:
            own = budget_thresholds(conf, self.budget_q)[:-1]
        else:
            own = [float(t) for t in self.thresholds[:-1]]
        settings = [{"params": {}, "state": {"thresholds": own}}]
        for q in self.q_grid:
            if self.budget_q is not None and math.isclose(q, self.budget_q, rel_tol=1e-3):
                continue
            settings.append(
                {
                    "params": {"exits.thresholds": "budget", "exits.q": q},
                    "state": {"thresholds": budget_thresholds(conf, q)[:-1]},
                }
            )
        for s in settings:
            _, fractions = exit_fractions(conf, [*s["state"]["thresholds"], -math.inf])
            s["state"]["val_exit_fractions"] = fractions
        self.use_setting(settings[0])
        return settings

    @torch.jit.ignore
    def use_setting(self, setting: Mapping[str, Any]) -> None:
        """Apply a setting returned by :meth:`calibrate` (in place: only the thresholds change)."""
        t = list(setting["state"]["thresholds"])
        if len(t) != len(self.exits) - 1:
            raise ValueError(f"{len(self.exits) - 1} thresholds must be given, but got {len(t)}")
        self.thresholds.copy_(torch.tensor([*t, -math.inf], dtype=self.thresholds.dtype))


def _cut_points(model: nn.Module, points: str) -> tuple[list[nn.Module], list[int]]:
    """The backbone as a flat list of modules, and after which of them an exit may be placed."""
    atoms: list[nn.Module] = []
    cuts: list[int] = []
    stages = list(model.stages)
    for s, stage in enumerate(stages):
        if points == "blocks" and isinstance(stage, nn.Sequential) and len(stage) > 1:
            children = list(stage)
            for j, child in enumerate(children):
                atoms.append(child)
                if j + 1 < len(children) and not isinstance(children[j + 1], _APPENDAGES):
                    cuts.append(len(atoms) - 1)
        else:
            atoms.append(stage)
        if s + 1 < len(stages):
            cuts.append(len(atoms) - 1)
    return atoms, sorted(set(cuts))


def _spread(candidates: list[int], count: int) -> list[int]:
    """``count`` of the candidates, evenly spaced, always including the latest when count >= 1."""
    if count >= len(candidates):
        return candidates
    n = len(candidates)
    picks = {candidates[round((i + 1) * n / count) - 1] for i in range(count)}
    return sorted(picks)


@register_method
class Exits(CompressionMethod):
    """Early exits on a staged model (MSDNet-style thresholds); see the module docstring."""

    name = "exits"
    prunable_layers = False
    stage = Stage.STRUCTURE
    # Thresholds are calibrated after training: expected MACs and latency are known only then.
    costs_after_training = True
    reference = (
        "Huang et al., ICLR 2018, arXiv:1703.09844 (MSDNet: early exits, budgeted thresholds); "
        "heads: Li et al., CVPR 2018, arXiv:1712.01034 (iSQRT-COV)"
    )
    hyperparameters = {
        "points": Categorical(["stages", "blocks"]),
        "count": Int(1, MAX_EXITS),
        "head": Categorical(["avgpool", "isqrtcov"]),
        "pool": Categorical([1, 2, 4]),
        "cov_dim": Categorical([8, 16, 32]),
        "iterations": Categorical([3, 5]),
        "training": Categorical(["frozen", "joint"]),
        "weighting": Categorical(["uniform", "linear"]),
        "thresholds": Categorical(["budget", "direct"]),
        "q": Float(0.05, 2.0),
        **{f"threshold_{k}": Float(0.5, 1.0) for k in range(MAX_EXITS)},
    }

    def space(self, trial: Any) -> dict[str, Any]:
        p: dict[str, Any] = {k: self.suggest(trial, k) for k in ("points", "count", "head")}
        if p["head"] == "avgpool":
            p["pool"] = self.suggest(trial, "pool")
        else:
            p["cov_dim"] = self.suggest(trial, "cov_dim")
            p["iterations"] = self.suggest(trial, "iterations")
        p["training"] = self.suggest(trial, "training")
        if p["training"] == "joint":
            p["weighting"] = self.suggest(trial, "weighting")
        p["thresholds"] = self.suggest(trial, "thresholds")
        if p["thresholds"] == "budget":
            p["q"] = self.suggest(trial, "q")
        else:
            for k in range(p["count"]):
                p[f"threshold_{k}"] = self.suggest(trial, f"threshold_{k}")
        return p

    def supports(self, model: nn.Module) -> str | None:
        if not isinstance(getattr(model, "stages", None), nn.ModuleList) or not hasattr(model, "head"):
            return "the model is not a StagedNet (no `stages` to attach exits to)"
        if not _cut_points(model, "blocks")[1]:
            # A module brought whole says why its traced graph gave no stages (automl._layout).
            why = getattr(model, "layout_reason", None)
            return "a single stage with no block boundary: nowhere to place an exit" + (f" ({why})" if why else "")
        return None

    def q_grid(self) -> list[float]:
        """The values of q every trained exit model is also measured at (within the narrowed range)."""
        return budget_q_grid(self.ranges)

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        base = clone(model).eval()
        example = context.example_input
        atoms, candidates = _cut_points(base, params["points"])
        if not candidates:
            raise ValueError(f"exits.points={params['points']!r}: the model has a single stage; use points='blocks'")
        cuts = _spread(candidates, int(params["count"]))

        seen: list[tuple[int, ...]] = []
        hook = base.stages[0].register_forward_pre_hook(lambda _m, a: seen.append(tuple(a[0].shape[1:])))
        with torch.no_grad():
            reference = base(example)
        hook.remove()
        input_shape = list(seen[0])
        num_classes = int(reference.shape[-1])

        bounds = [-1, *cuts, len(atoms) - 1]
        segments = [nn.Sequential(*atoms[a + 1 : b + 1]) for a, b in zip(bounds, bounds[1:])]
        exits: list[Exit] = []
        h = example.reshape([example.shape[0], *input_shape])
        shapes = []
        for i, segment in enumerate(segments):
            with torch.no_grad():
                h = segment(h)
            shapes.append(list(h.shape[1:]))
            if i + 1 < len(segments):
                exits.append(Exit(segment, self._head(params, tuple(h.shape[1:]), num_classes).to(h.device)))
            else:
                exits.append(Exit(segment, base.head))

        k = len(exits)
        frozen = params["training"] == "frozen"
        if frozen:
            weights = [1.0] * (k - 1) + [0.0]
        elif params.get("weighting") == "linear":
            weights = [(i + 1) / k for i in range(k)]
        else:
            weights = [1.0] * k
        budget = params["thresholds"] == "budget"
        thresholds = [NEVER] * (k - 1) if budget else [float(params[f"threshold_{i}"]) for i in range(k - 1)]
        net = EarlyExitNet(
            exits=exits,
            input_shape=input_shape,
            thresholds=thresholds,
            loss_weights=weights,
            frozen=frozen,
            budget_q=float(params["q"]) if budget else None,
            q_grid=self.q_grid(),
        )
        if frozen:
            for block in net.exits:
                block.segment.requires_grad_(False)
            net.exits[-1].head.requires_grad_(False)
        net.eval()
        with torch.no_grad():
            full = _Prefix(net, k - 1)(example)
        if not torch.allclose(full, reference, rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"{type(model).__name__}.forward does more than run its stages and head: exits cannot rebuild it "
                f"(max difference {float((full - reference).abs().max()):.3g})"
            )
        context.notes["exits.cuts"] = [type(atoms[c]).__name__ + f"@{c}" for c in cuts]
        context.notes["exits.feature_shapes"] = shapes
        if params["thresholds"] == "direct" and int(params["count"]) > k - 1:
            context.notes["exits.unused_thresholds"] = int(params["count"]) - (k - 1)
        return net

    @staticmethod
    def _head(params: Mapping[str, Any], shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(shape) < 2:
            raise ValueError(f"an exit needs a feature map (channels, positions...), but got features of shape {shape}")
        if params["head"] == "isqrtcov":
            return ISqrtCovHead(in_channels=shape[0], num_classes=num_classes, dim=int(params["cov_dim"]), iterations=int(params["iterations"]))
        return PoolHead(in_channels=shape[0], size=tuple(shape[1:]), pool=int(params["pool"]), num_classes=num_classes)
