"""Structured filter pruning with pluggable channel-importance criteria.

The model is made physically smaller: whole output channels are removed from convolutions (and the
matching BatchNorm entries and the next layers' input channels) with Torch-Pruning's
``DependencyGraph`` (Fang et al., CVPR 2023, "DepGraph"), which keeps residual additions, depthwise
convolutions and flatten-into-linear heads consistent. Which channels go is decided by a criterion
object; the pruning algorithm only calls it (the Torch-Pruning ``Importance`` protocol), so a new
criterion is one new subclass of :class:`ChannelCriterion`:

- ``l1``: Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 -- the sum of absolute weights
  of the filter that produces the channel (only the producing filters: Torch-Pruning's own
  ``MagnitudeImportance`` also adds the BN scale and the consuming layers' weights, which is not
  the paper's criterion).
- ``apoz``: Hu et al., "Network Trimming", arXiv:1607.03250, 2016 -- the average percentage of zeros
  of the channel's post-ReLU activation on training batches; many zeros = unimportant.
- ``thinet``: Luo et al., "ThiNet", ICCV 2017 -- on sampled training data, greedily remove the input
  channel of the next layer whose removal changes that layer's output least (the removed set is grown
  one channel at a time minimising the squared sum of the removed channels' contributions).
- ``gates``: Wang et al., "Interpret Neural Networks by Identifying Critical Data Routing Paths",
  CVPR 2018 -- a non-negative scalar gate per channel, trained with the network frozen, an L1
  sparsity penalty and distillation from the unpruned model; small gates are removed. The trained
  gates of kept channels are folded into the weights (exact, gates are >= 0 and sit before ReLU).

Every prunable layer loses the same fraction of its channels (``ratio``), or each stage of the
:class:`~automl._models.StagedNet` its own (``per_stage``); the trial fine-tunes afterwards.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

import searchspace
from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Float, Int
from searchspace._registry import register_method
from searchspace._surgery import clone

__all__ = ["APoZ", "ChannelCriterion", "CRITERIA", "L1Filter", "LearnedGates", "ThiNet", "Prune"]

#: Stages that get their own ratio when ``per_stage`` is on; deeper stages share the last one.
MAX_STAGE_RATIOS = 4
_CONV_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_CONV_IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def _accumulate(group: Any, pieces: list[tuple[torch.Tensor, list[int]]]) -> torch.Tensor | None:
    """Sum per-layer scores into one score per channel of the group's root (Torch-Pruning layout)."""
    n = len(group[0].idxs)
    out, hits = torch.zeros(n), torch.zeros(n)
    for scores, root_idxs in pieces:
        if any(r is None for r in root_idxs):
            continue
        idx = torch.as_tensor(root_idxs, dtype=torch.long)
        out.scatter_add_(0, idx, scores.detach().float().cpu())
        hits.scatter_add_(0, idx, torch.ones(len(idx)))
    if not pieces or hits.sum() == 0:
        return None
    return out / hits.clamp(min=1)


class ChannelCriterion(tp.importance.Importance, abc.ABC):
    """A channel-importance criterion: higher score = keep. Torch-Pruning calls it once per group.

    Data-driven criteria gather what they need in :meth:`prepare` (called once, on the model that
    is about to be pruned, before any channel is removed).
    """

    name: ClassVar[str]
    reference: ClassVar[str]

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        """Collect statistics from ``model`` and ``context`` (default: nothing to collect)."""

    @abc.abstractmethod
    def __call__(self, group: Any) -> torch.Tensor | None:
        """One score per channel of ``group``'s root layer, or None when the group has none."""


class L1Filter(ChannelCriterion):
    """Sum of absolute weights of the filters producing each channel (Li et al., ICLR 2017)."""

    name = "l1"
    reference = "Li et al., ICLR 2017, arXiv:1608.08710"

    def __call__(self, group: Any) -> torch.Tensor | None:
        pieces = []
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn in _CONV_OUT:
                w = dep.layer.weight.detach()[idxs].flatten(1)
                pieces.append((w.abs().sum(1), group[i].root_idxs))
        return _accumulate(group, pieces)


class _ActivationHooks:
    """Runs calibration batches through a model with forward hooks on chosen modules."""

    @staticmethod
    @torch.no_grad()
    def run(model: nn.Module, modules: list[nn.Module], hook: Any, context: ApplyContext, batches: int) -> None:
        handles = [m.register_forward_hook(hook) for m in modules]
        was_training = model.training
        model.eval()
        try:
            for x, _ in context.batches(batches):
                model(x)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)


class APoZ(ChannelCriterion):
    """1 - average percentage of zeros after ReLU, per channel (Hu et al., 2016).

    The zeros are counted at the output of each BatchNorm (or of a convolution that has no BatchNorm
    after it): ReLU maps exactly the non-positive values there to zero, and this is the one place the
    channel is still identified with its layer (torchvision ResNets reuse one ReLU module).
    """

    name = "apoz"
    reference = "Hu et al., 2016, arXiv:1607.03250 (Network Trimming, APoZ)"

    def __init__(self, *, batches: int = 4) -> None:
        self.batches = batches
        self.zeros: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            dims = [d for d in range(out.dim()) if d != 1]
            sums[module] = sums.get(module, 0) + (out <= 0).float().sum(dims).cpu()
            counts[module] = counts.get(module, 0) + out.numel() // out.shape[1]

        layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm))]
        _ActivationHooks.run(model, layers, hook, context, self.batches)
        self.zeros = {m: sums[m] / counts[m] for m in sums}

    def __call__(self, group: Any) -> torch.Tensor | None:
        bn = [(dep, idxs, group[i].root_idxs) for i, (dep, idxs) in enumerate(group) if dep.pruning_fn == tp.prune_batchnorm_out_channels]
        conv = [(dep, idxs, group[i].root_idxs) for i, (dep, idxs) in enumerate(group) if dep.pruning_fn in _CONV_OUT]
        pieces = [(1.0 - self.zeros[dep.layer][idxs], root) for dep, idxs, root in (bn or conv) if dep.layer in self.zeros]
        return _accumulate(group, pieces)


class ThiNet(ChannelCriterion):
    """Greedy next-layer reconstruction (Luo et al., ICCV 2017).

    For each layer that consumes the group's channels (a dense convolution or linear layer), the
    output at sampled positions is the sum of one contribution per input channel. Channels are
    removed one at a time, each time the one that keeps the summed contribution of all removed
    channels smallest (the paper's greedy solution of its Eq. 6); the removal order is the score.
    """

    name = "thinet"
    reference = "Luo et al., ICCV 2017, arXiv:1707.06342 (ThiNet)"

    def __init__(self, *, batches: int = 2, positions: int = 256, rows: int = 4096, seed: int = 0) -> None:
        self.batches, self.positions, self.rows, self.seed = batches, positions, rows, seed
        self.inputs: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        seen: dict[nn.Module, list[torch.Tensor]] = {}

        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            seen.setdefault(module, []).append(inputs[0].detach().cpu())

        layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and getattr(m, "groups", 1) == 1]
        _ActivationHooks.run(model, layers, hook, context, self.batches)
        self.inputs = {m: torch.cat(v) for m, v in seen.items()}

    def _contributions(self, layer: nn.Module, gen: torch.Generator) -> torch.Tensor:
        """(rows, in_features): the contribution of each input channel to sampled outputs."""
        x, w = self.inputs[layer], layer.weight.detach().cpu()
        if isinstance(layer, nn.Linear):
            a = x.reshape(-1, x.shape[-1])[:, None, :] * w[None]  # (N, O, I)
        else:
            if isinstance(layer, nn.Conv1d):
                x, w = x.unsqueeze(2), w.unsqueeze(2)
                k, s, p, d = (1, *layer.kernel_size), (1, *layer.stride), (0, *layer.padding), (1, *layer.dilation)
            else:
                k, s, p, d = layer.kernel_size, layer.stride, layer.padding, layer.dilation
            if isinstance(p, str):
                raise ValueError(f"thinet needs numeric padding, got padding={p!r}")
            cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*K, L)
            n, ck, length = cols.shape
            c = w.shape[1]
            cols = cols.view(n, c, ck // c, length)
            pick = torch.randint(0, n * length, (min(self.positions, n * length),), generator=gen)
            patches = cols.permute(0, 3, 1, 2).reshape(n * length, c, ck // c)[pick]  # (S, C, K)
            a = torch.einsum("sck,ock->soc", patches, w.flatten(2))
        a = a.reshape(-1, a.shape[-1])
        if a.shape[0] > self.rows:
            a = a[torch.randperm(a.shape[0], generator=gen)[: self.rows]]
        return a

    @staticmethod
    def greedy_order(a: torch.Tensor) -> torch.Tensor:
        """Scores from the greedy removal order: the first channel removed gets 0."""
        n = a.shape[1]
        a = a.double()
        sq = a.square().sum(0)
        removed_sum = torch.zeros(a.shape[0], dtype=a.dtype)
        left = torch.ones(n, dtype=torch.bool)
        score = torch.zeros(n)
        for step in range(n):
            cost = 2 * removed_sum @ a + sq  # ||r + a_c||^2 - ||r||^2 for every candidate c
            cost[~left] = float("inf")
            c = int(cost.argmin())
            score[c] = step
            left[c] = False
            removed_sum += a[:, c]
        return score

    def __call__(self, group: Any) -> torch.Tensor | None:
        gen = torch.Generator().manual_seed(self.seed)
        n = len(group[0].idxs)
        blocks = []
        for i, (dep, idxs) in enumerate(group):
            if dep.pruning_fn not in _CONV_IN or dep.layer not in self.inputs:
                continue
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            a = self._contributions(dep.layer, gen)[:, idxs]
            # Several inputs of one layer may come from one root channel (flatten -> linear).
            merged = torch.zeros(a.shape[0], n, dtype=a.dtype)
            merged.index_add_(1, torch.as_tensor(root, dtype=torch.long), a)
            blocks.append(merged)
        if not blocks:
            return L1Filter()(group)  # no dense consumer (e.g. the logits layer): fall back to weights
        return self.greedy_order(torch.cat(blocks))


class _Gated(nn.Module):
    """The frozen network with one learnable non-negative gate per channel on chosen layers."""

    def __init__(self, net: nn.Module, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.net = net
        for p in net.parameters():
            p.requires_grad_(False)
        width = {n: (m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.out_channels) for n, m in layers.items()}
        self.gates = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.ones(c)) for n, c in width.items()})
        self._handles = [m.register_forward_hook(self._hook(n.replace(".", "/"))) for n, m in layers.items()]
        self.last_input: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None

    def _hook(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            g = self.gates[key].clamp(min=0)
            return out * g.view(1, -1, *([1] * (out.dim() - 2)))

        return hook

    def train(self, mode: bool = True) -> _Gated:
        # The paper trains only the gates: BatchNorm keeps its running statistics.
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_input = x
        self.last_logits = self.net(x)
        return self.last_logits

    def detach_gates(self) -> dict[str, torch.Tensor]:
        for h in self._handles:
            h.remove()
        for p in self.net.parameters():
            p.requires_grad_(True)
        return {k.replace("/", "."): v.detach().clamp(min=0) for k, v in self.gates.items()}


class LearnedGates(ChannelCriterion):
    """Critical-data-routing-path gates (Wang et al., CVPR 2018), learned then used as scores.

    Gates sit on every BatchNorm output, and on the output of every convolution that no BatchNorm
    follows. Loss = the trial's task loss + ``l1`` * mean gate + KL to the unpruned model's
    predictions (the paper's distillation: the gated net must keep the original decision).
    """

    name = "gates"
    reference = "Wang et al., CVPR 2018, arXiv:1803.06629 (critical data routing paths)"

    def __init__(self) -> None:
        self.gates: dict[nn.Module, torch.Tensor] = {}

    @staticmethod
    def _gate_layers(model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
        order: list[str] = []
        names = {m: n for n, m in model.named_modules()}
        hooks = [m.register_forward_hook(lambda m, i, o: order.append(names[m])) for m in names if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm))]
        with torch.no_grad():
            model.eval()(example)
        for h in hooks:
            h.remove()
        mods = dict(model.named_modules())
        out: dict[str, nn.Module] = {}
        for i, n in enumerate(dict.fromkeys(order)):
            m = mods[n]
            nxt = mods[order[order.index(n) + 1]] if order.index(n) + 1 < len(order) else None
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                out[n] = m
            elif not (isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == m.out_channels):
                out[n] = m
        return out

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        layers = self._gate_layers(model, context.example_input)
        gated = _Gated(model, layers)
        base = context.base
        l1 = float(params.get("gate_l1", 0.01))

        def extra_loss(m: _Gated) -> torch.Tensor:
            sparsity = torch.cat([g.clamp(min=0) for g in m.gates.values()]).mean()
            loss = l1 * sparsity
            if base is not None and m.last_input is not None:
                with torch.no_grad():
                    target = F.softmax(base(m.last_input), dim=1)
                loss = loss + F.kl_div(F.log_softmax(m.last_logits, dim=1), target, reduction="batchmean")
            return loss

        if context.fit is not None:
            context.fit(gated, epochs=int(params.get("gate_epochs", 1)), extra_loss=extra_loss)
        values = gated.detach_gates()
        with torch.no_grad():
            for n, m in layers.items():
                g = values[n].to(m.weight.device)
                # Fold: gate * layer(x) == layer with weight and bias scaled per output channel.
                m.weight.mul_(g.view(-1, *([1] * (m.weight.dim() - 1))))
                if m.bias is not None:
                    m.bias.mul_(g)
        self.gates = {layers[n]: values[n] for n in layers}
        context.notes["prune.gates_zero"] = int(sum(int((v <= 1e-3).sum()) for v in values.values()))

    def __call__(self, group: Any) -> torch.Tensor | None:
        pieces = [(self.gates[dep.layer][idxs], group[i].root_idxs) for i, (dep, idxs) in enumerate(group) if dep.layer in self.gates and dep.pruning_fn in (*_CONV_OUT, tp.prune_batchnorm_out_channels)]
        return _accumulate(group, pieces) if pieces else L1Filter()(group)


#: Criterion name -> class; the ``criterion`` hyperparameter chooses among these.
CRITERIA: dict[str, type[ChannelCriterion]] = {c.name: c for c in (L1Filter, APoZ, ThiNet, LearnedGates)}


def prunable_output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs (the classes): never pruned."""
    with torch.no_grad():
        n_out = model.eval()(example).shape[-1]
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_out]


def channel_counts(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


@register_method
class Prune(CompressionMethod):
    """Filter pruning with Torch-Pruning's dependency graph and a searched importance criterion.

    Searched: ``criterion`` (l1, apoz, thinet, gates), one ``ratio`` of channels removed from every
    prunable layer, or with ``per_stage`` one ratio per stage (``stage_ratio_0..3``), and for gates
    the gate-training epochs and L1 weight. The trial fine-tunes (with the searched distillation)
    afterwards. The classifier's output layer is never pruned.
    """

    name = "prune"
    stage = Stage.PRUNE
    reference = (
        "Li et al. ICLR 2017 (L1); Hu et al. 2016 (APoZ); Luo et al. ICCV 2017 (ThiNet); Wang et al. CVPR 2018 "
        "(gates); via Torch-Pruning DepGraph, Fang et al. CVPR 2023"
    )
    hyperparameters = {
        "criterion": Categorical(sorted(CRITERIA)),
        "ratio": Float(0.1, 0.7),
        "per_stage": Categorical([False, True]),
        **{f"stage_ratio_{i}": Float(0.0, 0.7) for i in range(MAX_STAGE_RATIOS)},
        "gate_epochs": Int(1, 3),
        "gate_l1": Float(1e-3, 1e-1, log=True),
    }

    def space(self, trial: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"criterion": self.suggest(trial, "criterion"), "per_stage": self.suggest(trial, "per_stage")}
        keys = [f"stage_ratio_{i}" for i in range(MAX_STAGE_RATIOS)] if out["per_stage"] else ["ratio"]
        if out["criterion"] == "gates":
            keys += ["gate_epochs", "gate_l1"]
        out.update({k: self.suggest(trial, k) for k in keys})
        return out

    def accepts(self, chain: tuple[str, ...]) -> bool:
        # Methods whose layers Torch-Pruning cannot slice (computed kernels, channel permutations,
        # exit heads) declare it with CompressionMethod.prunable_layers.
        return all(searchspace.get_method(n).prunable_layers for n in chain)

    def supports(self, model: nn.Module) -> str | None:
        computed = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not isinstance(m.weight, nn.Parameter)]
        if computed:
            return f"layers {computed[:3]} compute their weight; Torch-Pruning can only slice stored weights"
        if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
            return "no convolution to prune"
        return None

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        name = params["criterion"]
        if name not in CRITERIA:
            raise ValueError(f"prune.criterion must be one of {sorted(CRITERIA)}, got {name!r}")
        out = clone(model).eval()
        example = context.example_input
        criterion = CRITERIA[name]()
        criterion.prepare(out, context, params)
        ratio_dict = None
        if params.get("per_stage"):
            stages = list(getattr(out, "stages", []))
            if not stages:
                raise ValueError("prune.per_stage needs a StagedNet (a model with `stages`)")
            ratio_dict = {s: float(params[f"stage_ratio_{min(i, MAX_STAGE_RATIOS - 1)}"]) for i, s in enumerate(stages)}
        before = channel_counts(out)
        pruner = tp.pruner.MetaPruner(
            out,
            example,
            importance=criterion,
            pruning_ratio=float(params.get("ratio", 0.0)),
            pruning_ratio_dict=ratio_dict,
            global_pruning=False,
            ignored_layers=prunable_output_layers(out, example),
        )
        pruner.step()
        after = channel_counts(out)
        context.notes["prune.criterion"] = name
        context.notes["prune.channels"] = {n: [before[n], after[n]] for n in after if after[n] != before.get(n)}
        return out
