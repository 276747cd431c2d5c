"""Structured filter pruning with pluggable channel-importance criteria.

The model is made physically smaller: whole output channels are removed from convolutions (and the
matching BatchNorm entries and the next layers' input channels) with Torch-Pruning's
``DependencyGraph`` (Fang et al., CVPR 2023, "DepGraph"), which keeps residual additions, depthwise
convolutions and flatten-into-linear heads consistent. Which channels go is decided by a criterion
object; the pruning algorithm only calls it (the Torch-Pruning ``Importance`` protocol), so a new
criterion is one new subclass of :class:`ChannelCriterion`:

- ``l1``: Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 -- the sum of absolute weights
  of the filter that produces the channel.
- ``apoz``: Hu et al., "Network Trimming", arXiv:1607.03250, 2016 -- the average percentage of zeros
  of the channel's post-ReLU activation on training batches; many zeros = unimportant.
- ``thinet``: Luo et al., "ThiNet", ICCV 2017 -- layer by layer on the progressively pruned network,
  greedily remove the input channels of the next layer whose removal changes that layer's output
  least, then rescale the kept channels by least squares.
- ``gates``: Wang et al., "Interpret Neural Networks by Identifying Critical Data Routing Paths",
  CVPR 2018 -- per-sample non-negative control gates on every layer's output channels, learned with
  the network frozen by distillation plus L1 sparsity (no labels); the mean gate over training
  samples is the channel's importance.
- ``slimming``: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
  ICCV 2017 -- one non-negative scaling factor per channel for the whole data set, under an L1
  penalty; small factors are removed.

How many channels each layer loses is the ``allocation`` (the criterion decides which):

- ``uniform`` (the default): every prunable layer loses the same fraction of its channels
  (``ratio``), or each stage of the :class:`~automl._models.StagedNet` its own (``per_stage``);
- ``global``: the channels of all convolutions are ranked together by their mean-normalised L1 filter
  norm on the base (Torch-Pruning's ``global_pruning=True``, its own non-uniform baseline) and the
  lowest ``ratio`` of them go, each layer keeping at least 1 - :data:`MAX_GLOBAL_RATIO` of its own;
- ``sensitivity``: ``share`` is the share of the parameters of the model it gets (the base's, unless
  an earlier stage changed it) to remove, and each
  layer's ratio (one of :data:`PROFILE_LEVELS`) is chosen from the base's sensitivity profile with
  the least predicted accuracy loss (:func:`searchspace._profile.allocate`). It is a setting of its
  own, not ``ratio``: a share of parameters reaches further than the same share of channels
  (removing 70 % of every layer's channels removes about 91 % of the parameters).

Channel counts can be kept at a multiple of ``round_to`` (Torch-Pruning's ``round_to``; 1, the
default, keeps the exact count): each pruned layer keeps the multiple nearest to the count its ratio
asks for, at least one multiple and at most its own channels (a layer narrower than the multiple is
pruned as asked). Runtimes run aligned widths on their fast paths: ONNX Runtime's blocked (NCHWc)
convolutions on x86 need channels in multiples of the vector width (8 floats with AVX2, 16 with
AVX-512); off those multiples a convolution falls back to a slower kernel and a pruned model can be
slower than its base (BENCHMARKS.md, "Which channel counts run fast?").

``global`` and ``sensitivity`` read the study's profile (``context.profile``), measured on the base
once, so the per-layer counts follow from (profile, plan) and the dry run and the checkpoint's
rebuild give the trial's structure. They act on the base's layers: a layer an earlier structure
stage replaced is stood in for by the replacement's last convolution with the same output channels
(Tucker's ``last``; ``prune.stand_ins``), whose channels are the replaced layer's; any other layer
the profile does not know keeps its channels, listed in ``prune.unprofiled``.
The trial fine-tunes afterwards.

Where the dependency graph cannot follow the model (a channel shuffle or another reshape that
regroups channels, which Torch-Pruning would map as a flatten; a slice of part of the channels or a
split of them into parts, whose bounds and sizes it cannot change in the model's code; a graph that
does not build; or a model pruned as a whole that no longer runs, or whose pruning raised),
the model is pruned run by run instead: each run of layers that feed only each other is pruned on
its own with its interface kept, so only channels internal to a run go (:func:`prunable_parts`,
noted as ``prune.split``).

Changes from the papers, and why (one place):

- ``l1``: only the producing filters are summed (Torch-Pruning's ``MagnitudeImportance`` also adds
  the BN scale and the consuming layers' weights, which is not the paper's criterion). The paper
  prunes and retrains layer by layer or all at once; here all at once, then the trial fine-tunes.
- ``apoz``: zeros are counted on the real ``nn.ReLU``/``nn.ReLU6`` outputs. A channel whose layer
  output reaches no ReLU unchanged (MobileNetV2's linear bottlenecks, a ResNet BN before the
  residual add, a functional ``F.relu``) has no APoZ: the paper does not define it. Such groups are
  ranked by the ``l1`` criterion of their producing filters (``fallback="l1"``, what studies use) or
  left unpruned (``APoZ(fallback="keep")``, a constructor option, not searched); the trial notes list
  them (``prune.apoz_fallback``: layer name -> fallback). The paper
  prunes iteratively with retraining between rounds; here one round, then fine-tuning.
- ``round_to``: Torch-Pruning rounds the kept count down (16 channels at ratio 0.2 keep 8, and a
  layer narrower than the multiple would lose every channel); here the nearest multiple is kept,
  at least one, so the ratio stays what was asked up to half a multiple.
- ``thinet``: the paper fine-tunes one or two epochs after each layer; here the layers are pruned
  in turn without fine-tuning in between (the trial's fine-tuning budget comes after the last),
  which keeps a trial within its budget. Sampled positions and rows are capped (``positions``,
  ``rows``). A group whose channels no dense layer reads (only depthwise convolutions or the logits
  layer consume them) has no reconstruction error to measure and falls back to ``l1``.
- ``gates``: the paper's optimiser settings were not checked against its code; here Adam (lr 0.1)
  for ``gate_steps`` iterations per batch of samples, gates initialised at 1 and projected to
  ``>= 0`` after each step. Gates sit on BatchNorm outputs (or conv outputs with no BN after them),
  before the ReLU: for a gate ``g >= 0``, ``relu(g x) = g relu(x)``, so this is the paper's gate on
  the layer's output. The classifier's output layer carries no gate (it is never pruned).
- ``global``: Torch-Pruning ranks each group by the trial's criterion on the model it prunes;
  here the per-layer counts come from the L1 norms of the base (in the profile) and the criterion
  then picks which channels within each layer. Ranking on the trial's model would make the
  structure depend on trained values (a fine-tuned earlier stage, learned gates), which the dry
  run cannot know and a rebuild cannot replay. Torch-Pruning's global ranking may empty a layer;
  here each keeps at least 1 - :data:`MAX_GLOBAL_RATIO` of its channels.
- ``slimming``: the paper trains the weights and BN scales together from the start with the L1
  penalty; here the trained weights stay frozen and a separate gate per channel is trained with
  the task loss, the L1 penalty and a KL term to the unpruned model for ``gate_epochs`` epochs,
  then folded into the weights (exact: gates are ``>= 0`` and sit before the ReLU). A trial cannot
  retrain the base from scratch.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import fx, nn

import searchspace
from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Float, Int
from searchspace._profile import SensitivityProfile, allocate, global_counts
from searchspace._reason import first_line
from searchspace._registry import register_method
from searchspace._surgery import clone

__all__ = [
    "APoZ",
    "CRITERIA",
    "ChannelCriterion",
    "CriticalPathGates",
    "L1Filter",
    "NetworkSlimming",
    "Prune",
    "ThiNet",
]

#: Stages that get their own ratio when ``per_stage`` is on; deeper stages share the last one.
MAX_STAGE_RATIOS = 4
#: How a pruning amount is spread over the layers (see the module docstring).
ALLOCATIONS = ("uniform", "global", "sensitivity")
#: The largest share of one layer's channels the ``global`` ranking may remove.
MAX_GLOBAL_RATIO = 0.9
#: Multiples a pruned layer's channel count may be kept at (``round_to``; 1: the exact count).
ROUND_TO = (1, 4, 8, 16, 32, 64)
#: Pruning ratios each layer is measured at for the sensitivity profile.
PROFILE_LEVELS = (0.2, 0.4, 0.6, 0.8, 0.9)
_CONV_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_CONV_IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_OUT = (*_CONV_OUT, tp.prune_batchnorm_out_channels)
#: Knows every output-channel pruning function of Torch-Pruning (depthwise convolutions have their own).
_PRUNING_FNS = tp.DependencyGraph()
_PRODUCERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


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


def _root(group: Any) -> nn.Module:
    return group[0].dep.target.module


class ChannelCriterion(tp.importance.Importance, abc.ABC):
    """A channel-importance criterion: higher score = keep. Torch-Pruning calls it once per group.

    Data-driven criteria gather what they need in :meth:`prepare` (called once, on the model that
    is about to be pruned, before any channel is removed).
    """

    name: ClassVar[str]
    reference: ClassVar[str]
    #: True for criteria defined layer by layer on the progressively pruned network (ThiNet): the
    #: pruner then scores and prunes one group at a time, in forward order, each scored on the
    #: model with every earlier group already pruned. False: all groups scored on the unpruned model.
    layerwise: ClassVar[bool] = False

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        """Collect statistics from ``model`` and ``context`` (default: nothing to collect)."""

    @abc.abstractmethod
    def __call__(self, group: Any) -> torch.Tensor | None:
        """One score per channel of ``group``'s root layer, or None to leave the group unpruned."""

    def before_prune(self, group: Any) -> None:
        """Called with each pruning group (the channels about to go) just before they are removed.

        Default: nothing. ThiNet rescales the kept channels here.
        """


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


class _DirectConsumers:
    """Which module receives a conv/BN output tensor unchanged, found with forward hooks.

    A consumer counts when its first input *is* the producer's output tensor and that tensor has
    not been modified in place since (its version counter is unchanged): torchvision's ResNet adds
    the shortcut in place (``out += identity``) before its ReLU, which must not count as the BN
    feeding the ReLU. ``on_consume(producer, consumer, output)`` is called after each such consumer
    ran, so activation modules shared by several layers (torchvision reuses one ReLU per block)
    are attributed call by call.
    """

    def __init__(self, model: nn.Module, on_consume: Any = None) -> None:
        self.model, self.on_consume = model, on_consume
        self.consumers: dict[nn.Module, set[type]] = {}
        self._live: dict[int, tuple[nn.Module, int, torch.Tensor]] = {}
        self._pending: dict[nn.Module, list[nn.Module]] = {}

    def _produced(self, module: nn.Module, inputs: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self._live[id(out)] = (module, out._version, out)

    def _pre(self, module: nn.Module, inputs: Any) -> None:
        x = inputs[0] if inputs else None
        hit = self._live.get(id(x)) if isinstance(x, torch.Tensor) else None
        if hit is not None and hit[2] is x and hit[1] == x._version:
            self.consumers.setdefault(hit[0], set()).add(type(module))
            self._pending.setdefault(module, []).append(hit[0])

    def _post(self, module: nn.Module, inputs: Any, out: Any) -> None:
        producers = self._pending.pop(module, [])
        if producers and self.on_consume is not None:
            self.on_consume(producers[-1], module, out)

    @torch.no_grad()
    def run(self, batches: Iterator[torch.Tensor]) -> None:
        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = []
        for m in leaves:
            handles.append(m.register_forward_pre_hook(self._pre))
            handles.append(m.register_forward_hook(self._post))
            if isinstance(m, _PRODUCERS):
                handles.append(m.register_forward_hook(self._produced))
        was_training = self.model.training
        self.model.eval()
        try:
            for x in batches:
                self.model(x)
                self._live.clear()
                self._pending.clear()
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)


def _calibration_inputs(context: ApplyContext, limit: int) -> Iterator[torch.Tensor]:
    return (x for x, _ in context.batches(limit))


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


class APoZ(ChannelCriterion):
    """1 - average percentage of zeros of the channel's ReLU output (Hu et al., 2016).

    Zeros are counted on the outputs of the real ``nn.ReLU`` / ``nn.ReLU6`` modules, attributed to
    the conv or BatchNorm whose output the activation received unchanged (see
    :class:`_DirectConsumers`). Groups with no such channel use ``fallback``.

    Args:
        batches: calibration batches to count on.
        fallback: ``"l1"`` (rank such groups by their filters' L1 norm) or ``"keep"`` (leave them
            unpruned).
    """

    name = "apoz"
    reference = "Hu et al., 2016, arXiv:1607.03250 (Network Trimming, APoZ)"
    FALLBACKS = ("l1", "keep")

    def __init__(self, *, batches: int = 4, fallback: str = "l1") -> None:
        if fallback not in self.FALLBACKS:
            raise ValueError(f"apoz fallback must be one of {list(self.FALLBACKS)}, got {fallback!r}")
        self.batches, self.fallback = batches, fallback
        self.zeros: dict[nn.Module, torch.Tensor] = {}
        self.names: dict[nn.Module, str] = {}
        self.notes: dict[str, Any] = {}

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def count(producer: nn.Module, act: nn.Module, out: torch.Tensor) -> None:
            if not isinstance(act, _ACTIVATIONS):
                return
            dims = [d for d in range(out.dim()) if d != 1]
            sums[producer] = sums.get(producer, 0) + (out <= 0).float().sum(dims).cpu()
            counts[producer] = counts.get(producer, 0) + out.numel() // out.shape[1]

        _DirectConsumers(model, count).run(_calibration_inputs(context, self.batches))
        self.zeros = {m: sums[m] / counts[m] for m in sums}
        self.names = _names(model)
        self.notes = context.notes
        self.notes["prune.apoz_fallback"] = {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        pieces = [
            (1.0 - self.zeros[dep.layer][idxs], group[i].root_idxs)
            for i, (dep, idxs) in enumerate(group)
            if dep.pruning_fn in _OUT and dep.layer in self.zeros
        ]
        if pieces:
            return _accumulate(group, pieces)
        self.notes.setdefault("prune.apoz_fallback", {})[self.names.get(_root(group), "?")] = self.fallback
        return L1Filter()(group) if self.fallback == "l1" else None


class _Stop(Exception):
    """Ends a calibration forward early once the hooked layers have their inputs."""


class _NoLongerRuns(Exception):
    """A layer-by-layer pass left the model unable to run its forward (the message says why)."""


class ThiNet(ChannelCriterion):
    """ThiNet (Luo et al., ICCV 2017): greedy next-layer reconstruction, layer by layer.

    For the layers that consume the group's channels (dense convolutions or linear layers), the
    output at sampled positions is the sum of one contribution per input channel, computed on the
    current (already partly pruned) network. Channels are removed one at a time, each time the one
    that keeps the squared sum of all removed channels' contributions smallest (the paper's
    Algorithm 1, a greedy solution of its Eq. 6); the removal order is the score. Just before the
    removal, each consumer's kept input channels are rescaled by the least-squares weights that
    best reproduce its output from the kept channels alone (the paper's Eq. 7).

    Args:
        batches: calibration batches run through the current network per group.
        positions: sampled output positions per consumer layer.
        rows: cap on (position, filter) rows used for selection and least squares.
        seed: seed of the position sampling.
        least_squares: apply the least-squares rescaling (False only to measure what it adds).
    """

    name = "thinet"
    reference = "Luo et al., ICCV 2017, arXiv:1707.06342 (ThiNet)"
    layerwise = True

    def __init__(
        self, *, batches: int = 2, positions: int = 256, rows: int = 4096, seed: int = 0, least_squares: bool = True
    ) -> None:
        self.batches, self.positions, self.rows, self.seed = batches, positions, rows, seed
        self.least_squares = least_squares
        self.model: nn.Module | None = None
        self.context: ApplyContext | None = None
        self._pending: dict[nn.Module, tuple[int, list[tuple[nn.Module, list[int], list[int], torch.Tensor]]]] = {}
        self.names: dict[nn.Module, str] = {}

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        self.model, self.context = model, context
        self.names = _names(model)
        context.notes["prune.thinet_rescaled"] = {}
        context.notes.pop("prune.thinet_fallback_l1", None)  # from an earlier attempt on another copy

    def _inputs(self, layers: list[nn.Module]) -> dict[nn.Module, torch.Tensor]:
        """Inputs of ``layers`` on calibration batches, run through the current model.

        Each forward stops once every layer of ``layers`` has seen its input (the rest of the
        network is not needed).
        """
        seen: dict[nn.Module, list[torch.Tensor]] = {}
        hit: set[nn.Module] = set()

        def hook(module: nn.Module, inputs: Any) -> None:
            seen.setdefault(module, []).append(inputs[0].detach().cpu())
            hit.add(module)
            if len(hit) == len(layers):
                raise _Stop

        assert self.model is not None and self.context is not None, "prepare() must run first"
        handles = [m.register_forward_pre_hook(hook) for m in layers]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for x in _calibration_inputs(self.context, self.batches):
                    hit.clear()
                    try:
                        self.model(x)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return {m: torch.cat(v) for m, v in seen.items()}

    def contributions(self, layer: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(rows, in_channels): each input channel's contribution to sampled outputs of ``layer``.

        A row is one (sampled position, output filter) pair; the row sum is the layer's output
        there without bias.
        """
        w = layer.weight.detach().cpu()
        if isinstance(layer, nn.Linear):
            patches, w = x.reshape(-1, x.shape[-1], 1), w.unsqueeze(2)  # (S, I, 1), (O, I, 1)
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
            pick = torch.randperm(n * length, generator=gen)[: min(self.positions, n * length)]
            patches = cols.view(n, c, ck // c, length).permute(0, 3, 1, 2).reshape(n * length, c, ck // c)[pick]  # (S, C, K)
            w = w.flatten(2)  # (O, C, K)
        # Rows are (position, filter) pairs: all of them when they fit in ``rows``, else a sample.
        pairs = patches.shape[0] * w.shape[0]
        chosen = torch.arange(pairs) if pairs <= self.rows else torch.randperm(pairs, generator=gen)[: self.rows]
        pos, filt = chosen // w.shape[0], chosen % w.shape[0]
        return (patches[pos] * w[filt]).sum(2)

    @staticmethod
    def greedy_order(a: torch.Tensor) -> torch.Tensor:
        """Scores from the greedy removal order of Algorithm 1: the first channel removed gets 0.

        Each step removes the channel ``c`` minimising ``||r + a_c||^2`` with ``r`` the summed
        contribution of the channels removed so far. That is ``2 r.a_c + ||a_c||^2``, and ``r.a_c``
        is the sum of the Gram matrix ``a^T a``'s entries ``(j, c)`` over the removed ``j``: one
        matrix product, then a row added per step (re-reading every row of ``a`` per step costs
        minutes on a ViT's 3072-channel MLP, fed by tens of thousands of rows).
        """
        n = a.shape[1]
        a = a.double()
        gram = a.T @ a
        sq = gram.diagonal().clone()
        cross = torch.zeros(n, dtype=a.dtype)  # r . a_c for every c
        left = torch.ones(n, dtype=torch.bool)
        score = torch.zeros(n)
        for step in range(n):
            cost = 2 * cross + sq  # ||r + a_c||^2 - ||r||^2 for every candidate c
            cost[~left] = float("inf")
            c = int(cost.argmin())
            score[c] = step
            left[c] = False
            cross += gram[c]
        return score

    @staticmethod
    def scaling(a: torch.Tensor, kept: list[int]) -> torch.Tensor:
        """Least-squares weights ``w`` minimising ``||a.sum(1) - a[:, kept] @ w||^2`` (Eq. 7)."""
        target = a.double().sum(1, keepdim=True)
        return torch.linalg.lstsq(a[:, kept].double(), target).solution[:, 0]

    def __call__(self, group: Any) -> torch.Tensor | None:
        gen = torch.Generator().manual_seed(self.seed)
        n = len(group[0].idxs)
        consumers = [
            (dep.layer, idxs, group[i].root_idxs)
            for i, (dep, idxs) in enumerate(group)
            if dep.pruning_fn in _CONV_IN and getattr(dep.layer, "groups", 1) == 1 and not any(r is None for r in group[i].root_idxs)
        ]
        inputs = self._inputs(list(dict.fromkeys(layer for layer, _, _ in consumers)))
        blocks = []
        for layer, idxs, root in consumers:
            if layer not in inputs:
                continue
            a = self.contributions(layer, inputs[layer], gen)[:, idxs]
            # Several inputs of one layer may come from one root channel (flatten -> linear).
            merged = torch.zeros(a.shape[0], n, dtype=a.dtype)
            merged.index_add_(1, torch.as_tensor(root, dtype=torch.long), a)
            blocks.append((layer, list(idxs), list(root), merged))
        if not blocks:
            self.context.notes.setdefault("prune.thinet_fallback_l1", []).append(self.names.get(_root(group), "?"))  # type: ignore[union-attr]
            return L1Filter()(group)  # no dense consumer (e.g. only the logits layer): fall back to weights
        self._pending[_root(group)] = (n, blocks)
        return self.greedy_order(torch.cat([b[3] for b in blocks]))

    @torch.no_grad()
    def before_prune(self, group: Any) -> None:
        pending = self._pending.pop(_root(group), None)
        if pending is None or not self.least_squares:
            return
        n, blocks = pending
        removed = set(int(r) for r in group[0].root_idxs)
        kept = [c for c in range(n) if c not in removed]
        if not kept or not removed:
            return
        notes = self.context.notes.setdefault("prune.thinet_rescaled", {})  # type: ignore[union-attr]
        for layer, idxs, root, a in blocks:
            if a.shape[0] < len(kept):
                continue  # under-determined: keep the weights as they are
            w = self.scaling(a, kept)
            target = a.double().sum(1)
            before = float((target - a[:, kept].double().sum(1)).square().sum())
            after = float((target - a[:, kept].double() @ w).square().sum())
            per_root = torch.ones(n, dtype=torch.float64)
            per_root[kept] = w
            cols = torch.as_tensor(idxs, dtype=torch.long)
            scale = per_root[torch.as_tensor(root, dtype=torch.long)].to(layer.weight.dtype).to(layer.weight.device)
            layer.weight[:, cols] *= scale.view(1, -1, *([1] * (layer.weight.dim() - 2)))
            notes[self.names.get(layer, "?")] = [before, after]


def _gate_layers(model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
    """Every BatchNorm, and every convolution whose output no BatchNorm takes directly."""
    probe = _DirectConsumers(model)
    probe.run(iter([example]))
    names = _names(model)
    out: dict[str, nn.Module] = {}
    for m, n in names.items():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[n] = m
        elif isinstance(m, nn.modules.conv._ConvNd) and m in probe.consumers:
            if not any(issubclass(t, nn.modules.batchnorm._BatchNorm) for t in probe.consumers[m]):
                out[n] = m
    return out


def _nothing_to_gate(layers: Mapping[str, nn.Module], context: ApplyContext) -> bool:
    """Where no layer takes a gate (a ViT: its one convolution feeds a reshape), say so in the notes;
    every group is then ranked by its L1 norm (the criteria's fallback for a group without gates)."""
    if layers:
        return False
    context.notes["prune.gates"] = "no BatchNorm, nor convolution feeding a module, to gate: channels ranked by L1 norm"
    return True


def _width(m: nn.Module) -> int:
    return m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.out_channels


class CriticalPathGates(ChannelCriterion):
    """Critical data routing paths (Wang et al., CVPR 2018): per-sample gates, mean gate as score.

    For each calibration sample ``x`` and every gated layer, a gate vector ``g(x) >= 0`` (one entry
    per output channel, initialised at 1) multiplies the layer's output. With every weight frozen
    (BatchNorm in eval mode, so samples do not interact), the gates of each sample minimise

        KL(softmax(f(x)) || softmax(f(x; g(x)))) + l1 * sum |g(x)|

    -- distillation from the network's own original prediction plus L1 sparsity; no label is
    used. A batch of samples is optimised at once: the loss is a sum of per-sample terms and Adam
    works per coordinate, so each sample's gates follow their own problem exactly. The channel
    importance is the mean gate over the samples (a channel that no sample routes through scores
    0; one that every sample needs scores about 1); ``prune.gates_unused`` in the notes counts the
    channels closed (< 1e-3) on every sample.

    Args:
        batches: calibration batches whose samples get gates.
        steps: gate-optimisation iterations per batch (``gate_steps`` overrides).
        l1: weight of the L1 penalty (``gate_l1`` overrides).
        lr: Adam learning rate.
    """

    name = "gates"
    reference = "Wang et al., CVPR 2018, arXiv:1803.06629 (critical data routing paths)"

    def __init__(self, *, batches: int = 4, steps: int = 30, l1: float = 0.01, lr: float = 0.1) -> None:
        self.batches, self.steps, self.l1, self.lr = batches, steps, l1, lr
        self.gates: dict[nn.Module, torch.Tensor] = {}

    def sample_gates(self, model: nn.Module, layers: Mapping[str, nn.Module], x: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """The (samples, channels) gates of every layer in ``layers`` for the samples ``x``."""
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        gates = {m: torch.ones(len(x), _width(m), device=x.device, requires_grad=True) for m in layers.values()}

        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            g = gates[module]
            return out * g.view(*g.shape, *([1] * (out.dim() - 2)))

        try:
            with torch.no_grad():
                target = F.log_softmax(model(x), dim=1)
            handles = [m.register_forward_hook(hook) for m in gates]
            opt = torch.optim.Adam(list(gates.values()), lr=self.lr)
            try:
                for _ in range(self.steps):
                    logits = model(x)
                    kl = F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="none").sum(1)
                    l1 = torch.cat(list(gates.values()), dim=1).sum(1)  # gates are >= 0: this is |g|_1
                    loss = (kl + self.l1 * l1).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for g in gates.values():
                            g.clamp_(min=0)
            finally:
                for h in handles:
                    h.remove()
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
        return {m: g.detach() for m, g in gates.items()}

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        self.steps = int(params.get("gate_steps", self.steps))
        self.l1 = float(params.get("gate_l1", self.l1))
        layers = _gate_layers(model, context.example_input)
        if _nothing_to_gate(layers, context):
            return
        sums: dict[nn.Module, torch.Tensor] = {m: torch.zeros(_width(m)) for m in layers.values()}
        peak: dict[nn.Module, torch.Tensor] = {m: torch.zeros(_width(m)) for m in layers.values()}
        samples = 0
        for x in _calibration_inputs(context, self.batches):
            for m, g in self.sample_gates(model, layers, x).items():
                sums[m] += g.sum(0).cpu()
                peak[m] = torch.maximum(peak[m], g.max(0).values.cpu())
            samples += len(x)
        if samples == 0:
            raise ValueError("prune.criterion=gates needs calibration samples, but the context gave none")
        self.gates = {m: s / samples for m, s in sums.items()}
        context.notes["prune.gates_samples"] = samples
        context.notes["prune.gates_unused"] = int(sum(int((p < 1e-3).sum()) for p in peak.values()))

    def __call__(self, group: Any) -> torch.Tensor | None:
        pieces = [(self.gates[dep.layer][idxs], group[i].root_idxs) for i, (dep, idxs) in enumerate(group) if dep.layer in self.gates and dep.pruning_fn in _OUT]
        return _accumulate(group, pieces) if pieces else L1Filter()(group)


class _Gated(nn.Module):
    """The frozen network with one learnable non-negative gate per channel on chosen layers."""

    def __init__(self, net: nn.Module, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.net = net
        for p in net.parameters():
            p.requires_grad_(False)
        self.gates = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.ones(_width(m))) for n, m in layers.items()})
        self._handles = [m.register_forward_hook(self._hook(n.replace(".", "/"))) for n, m in layers.items()]
        self.last_input: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None

    def _hook(self, key: str) -> Any:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
            g = self.gates[key].clamp(min=0)
            return out * g.view(1, -1, *([1] * (out.dim() - 2)))

        return hook

    def train(self, mode: bool = True) -> _Gated:
        # Only the gates train: BatchNorm keeps its running statistics.
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


class NetworkSlimming(ChannelCriterion):
    """One scaling factor per channel for the whole data set under L1 (Liu et al., ICCV 2017).

    Gates sit on every BatchNorm output and on the output of every convolution no BatchNorm takes.
    Loss = the trial's task loss + ``gate_l1`` * mean gate + KL to the unpruned model's predictions,
    for ``gate_epochs`` epochs of ``context.fit``; see the module docstring for how this differs
    from the paper.
    """

    name = "slimming"
    reference = "Liu et al., ICCV 2017, arXiv:1708.06519 (Network Slimming)"

    def __init__(self) -> None:
        self.gates: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, model: nn.Module, context: ApplyContext, params: Mapping[str, Any]) -> None:
        layers = _gate_layers(model, context.example_input)
        if _nothing_to_gate(layers, context):
            return
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
        pieces = [(self.gates[dep.layer][idxs], group[i].root_idxs) for i, (dep, idxs) in enumerate(group) if dep.layer in self.gates and dep.pruning_fn in _OUT]
        return _accumulate(group, pieces) if pieces else L1Filter()(group)


#: Criterion name -> class; the ``criterion`` hyperparameter chooses among these.
CRITERIA: dict[str, type[ChannelCriterion]] = {c.name: c for c in (L1Filter, APoZ, ThiNet, CriticalPathGates, NetworkSlimming)}


def prunable_output_layers(model: nn.Module, example: torch.Tensor, graph: Any = None) -> list[nn.Module]:
    """The layers whose output channels are the model's outputs (the classes): never pruned.

    Found on Torch-Pruning's dependency graph: the layers of every group whose out-channels reach the
    model's output (through the graph's output node, or by being the layer that returns it), so a
    convolutional classifier (SqueezeNet's 1x1 conv, then ReLU and global pooling), a linear one, or
    several layers summed into the logits all keep their width and the output its shape. ``graph``:
    the model's dependency graph where the caller has built it already.
    """
    produced: list[nn.Module] = []

    def hook(module: nn.Module, inputs: Any, out: Any) -> None:
        produced.append(module)
        seen[module] = out

    seen: dict[nn.Module, Any] = {}
    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            output = model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    # The layer that returns the output itself (a final Linear): the graph has no output node after it.
    last = {m for m in layers if seen.get(m) is output}
    if graph is None:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    out: list[nn.Module] = []
    for group in graph.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        sliced = [dep.target.module for dep, _ in group if dep.pruning_fn in _CONV_OUT]
        if any(isinstance(dep.target.module, tp.ops._OutputOp) for dep, _ in group) or last & set(sliced):
            out += [m for m in sliced if m not in out]
    return out


class _Part(NamedTuple):
    """What one Torch-Pruning pass prunes: ``module`` traced on ``example``, ``ignored`` never cut."""

    module: nn.Module
    example: torch.Tensor
    ignored: list[nn.Module]


def _input_probe(x: torch.Tensor) -> nn.Module | None:
    """An identity layer that produces ``x``'s channels, put in front of a part so that the groups
    reaching the part's input show up in its dependency graph (and are kept: the probe is ignored)."""
    c = x.shape[1]
    layer: nn.Module
    if x.dim() == 4:
        layer = nn.Conv2d(c, c, 1, bias=False)
    elif x.dim() == 3:
        layer = nn.Conv1d(c, c, 1, bias=False)
    elif x.dim() == 2:
        layer = nn.Linear(c, c, bias=False)
    else:
        return None
    with torch.no_grad():
        layer.weight.copy_(torch.eye(c).view(layer.weight.shape))
    return layer.to(x.device)


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


class _LayerTracer(fx.Tracer):
    """``torch.fx``'s tracer with every convolution, linear and BatchNorm layer kept whole, library
    subclasses included: timm's ``BatchNormAct2d`` holds its activation, and traced through it
    became a functional ``batch_norm`` that broke every run at the first BatchNorm."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (*_LAYERS, nn.modules.batchnorm._BatchNorm)) or super().is_leaf_module(m, module_qualified_name)


def _module_chains(model: nn.Module) -> list[list[str]]:
    """Maximal runs of leaf modules in ``model``'s traced graph that feed only each other.

    Each run is a list of module names ``m1, m2, ...`` where ``m2`` takes exactly ``m1``'s output as
    its only input and nothing else reads it, so ``nn.Sequential(m1, m2, ...)`` computes what the run
    computes in the model.
    """
    graph = _LayerTracer().trace(model)
    calls = [n for n in graph.nodes if n.op == "call_module"]

    def follows(node: fx.Node) -> fx.Node | None:
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        ok = isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
        return src if ok else None

    chains: list[list[str]] = []
    linked = {follows(n): n for n in calls if follows(n) is not None}
    for node in calls:
        if follows(node) is not None:
            continue
        chain = [str(node.target)]
        while node in linked:
            node = linked[node]
            chain.append(str(node.target))
        chains.append(chain)
    return chains


class _ChannelMoves(torch.overrides.TorchFunctionMode):
    """Records the operations of a forward pass that regroup the channels of a feature map, which
    Torch-Pruning's dependency graph does not follow.

    Torch-Pruning maps channel indices through a reshape as a flatten of ``(N, C, H, W)`` into
    ``(N, C*H*W)`` (or back). A reshape that splits the channel axis into groups, or merges groups
    back, with the spatial axes unchanged (ShuffleNet's channel shuffle: ``(N, C, H, W) -> (N, 2,
    C/2, H, W)``, transpose, back to ``(N, C, H, W)``; split attention) is mapped as if it were such
    a flatten, and a channel or pixel shuffle as if it kept every channel in place: pruning across
    it removes the wrong channels, sometimes with shapes that still fit. Reshapes of token
    sequences (``(N, L, C) -> (N, L, heads, C/heads)``) or of channels-last maps are not of this
    kind and are not recorded.

    A split of the channels of a feature map into parts (``split``, ``chunk``, ``tensor_split``
    along dim 1 of ``(N, C, H, W)``; CSPNet's ``x.split(C // 2, dim=1)``) is recorded for the same
    reason as a slice below: its sizes are numbers in the model's code.

    A slice of part of the channels of a feature map (``x[:, a:b]`` or ``narrow`` on ``(N, C, H, W)``;
    ReXNet's partial residual ``cat([x[:, :C] + shortcut, x[:, C:]])``) is recorded too: its bounds
    are numbers in the model's code, which Torch-Pruning cannot change (it updates only its own
    record of them), so removing a channel before the slice shifts which channels the slice takes.
    Torch-Pruning 1.6 also counts a slice's output as all of its input's channels, which gives a
    following concatenation wrong offsets; on chained partial residuals its group search then
    revisits each layer with ever new (wrong) index lists and does not finish (four such blocks:
    minutes). A slice of all channels, or of a token sequence ``(N, L, C)``, is not recorded.
    """

    RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})
    SHUFFLES = frozenset({"channel_shuffle", "native_channel_shuffle", "pixel_shuffle", "pixel_unshuffle"})
    SLICES = frozenset({"__getitem__", "narrow"})
    SPLITS = frozenset({"split", "split_with_sizes", "chunk", "tensor_split"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    @staticmethod
    def regroups(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        """``a`` ``(N, C, *S)`` reshaped to ``b`` ``(N, G, C/G, *S)`` with 1 < G < C."""
        return len(a) >= 3 and len(b) == len(a) + 1 and b[0] == a[0] and b[1] * b[2] == a[1] and b[3:] == a[2:] and 1 < b[1] < a[1]

    @staticmethod
    def slices_channels(name: str, args: Any, kwargs: Any) -> str | None:
        """``x[:, a:b]`` (``__getitem__``) or ``narrow(x, 1, ...)`` taking part of the channels of a
        feature map ``(N, C, H, W)``, as text; else None."""
        x = args[0]
        if x.dim() < 4:
            return None
        c = x.shape[1]
        if name == "__getitem__" and len(args) > 1:
            idx = args[1]
            if not (isinstance(idx, tuple) and len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], slice)):
                return None
            kept = range(*idx[1].indices(c))
            text = f"slice [:, {'' if idx[1].start is None else idx[1].start}:{'' if idx[1].stop is None else idx[1].stop}]"
        elif name == "narrow":
            given = {**dict(zip(("dim", "start", "length"), args[1:])), **kwargs}
            if given.get("dim") != 1:
                return None
            start, length = int(given["start"]), int(given["length"])
            kept, text = range(start, start + length), f"narrow(1, {start}, {length})"
        else:
            return None
        return None if len(kept) == c else f"{text} of {c} channels"

    @staticmethod
    def splits_channels(name: str, args: Any, kwargs: Any, parts: Any) -> str | None:
        """``split`` / ``chunk`` / ``tensor_split`` of a feature map ``(N, C, H, W)`` along its
        channels into several parts, as text (CSPNet's ``x.split(C // 2, dim=1)``); else None."""
        x = args[0]
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
        if x.dim() < 4 or dim not in (1, 1 - x.dim()) or not isinstance(parts, (tuple, list)) or len(parts) < 2:
            return None
        return f"{name} of {x.shape[1]} channels into {[int(p.shape[1]) for p in parts]}"

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in self.SPLITS and args and isinstance(args[0], torch.Tensor) and len(self.found) < 3:
            text = self.splits_channels(name, args, kwargs or {}, out)
            if text is not None:
                self.found.append(text)
            return out
        if not (args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)) or len(self.found) >= 3:
            return out
        a = args[0]
        if name in self.RESHAPES | self.SHUFFLES:
            moved = name in self.SHUFFLES or self.regroups(tuple(a.shape), tuple(out.shape)) or self.regroups(tuple(out.shape), tuple(a.shape))
            if moved:
                self.found.append(f"{name} {tuple(a.shape)} -> {tuple(out.shape)}")
        elif name in self.SLICES:
            text = self.slices_channels(name, args, kwargs or {})
            if text is not None:
                self.found.append(text)
        return out


def channel_moves(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The operations of ``model``'s forward on ``example`` that move values between channels in a
    way Torch-Pruning does not map (:class:`_ChannelMoves`), the first three, as text."""
    probe = _ChannelMoves()
    was_training = model.training
    try:
        with torch.no_grad(), probe:
            model.eval()(example)
    finally:
        model.train(was_training)
    return probe.found


def prunable_parts(model: nn.Module, example: torch.Tensor, whole_failed: str | None = None) -> tuple[list[_Part], dict[str, Any]]:
    """The parts of ``model`` that Torch-Pruning prunes, each in its own pass, and what was left out.

    The whole model is one part when its dependency graph builds, with its output layers kept
    (:func:`prunable_output_layers`). Where it does not, or where the forward moves values between
    channels in a way the graph does not follow (:func:`channel_moves`: ShuffleNet's channel
    shuffle, a reshape that interleaves two branches; the graph would build and map it wrongly),
    the parts are the runs of layers in the model's traced (``torch.fx``) graph that feed only each
    other (:func:`_module_chains`), from the first to the last convolution or linear layer of the
    run, each traced on the input it receives in the model's forward. A part keeps its interface:
    the layers whose output channels reach its output, and those whose channels are tied to its
    input (found through an identity probe layer put in front of it), are not pruned; so whatever
    operation Torch-Pruning cannot read sees the channels of the unpruned model. Only channels internal
    to a run go (in ShuffleNetV2: inside each block's branches).

    ``whole_failed``: why pruning the model as one part already failed (the caller tried it): the
    runs are used, with that reason.

    Returns:
        The parts, and notes: empty when the model is one part, else ``reason`` (why the whole
        graph is not used) and ``parts`` (each part's first and last layer).

    Raises:
        ValueError: the whole graph does not build and the model cannot be traced by ``torch.fx``
            either (both reasons given).
    """
    moves = [] if whole_failed else channel_moves(model, example)
    if whole_failed:
        reason = whole_failed
    elif moves:
        reason = f"Torch-Pruning cannot map channels through {'; '.join(moves)}"
    else:
        try:
            return [_Part(model, example, prunable_output_layers(model, example))], {}
        except Exception as exc:  # noqa: BLE001 - any tracing failure of the whole: prune its runs, and say why
            reason = first_line(exc)
    try:
        chains = _module_chains(model)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"prune needs Torch-Pruning's dependency graph of the model ({reason}) or, failing that, a torch.fx "
            f"trace to prune its runs of layers, which fails too ({first_line(exc)})"
        ) from exc
    modules = dict(model.named_modules())
    runs = []
    for chain in chains:
        idx = [i for i, name in enumerate(chain) if isinstance(modules[name], _LAYERS)]
        # The run's last layer keeps its output channels (the part's interface), which a grouped
        # convolution ties to its input's (ReXNet's depthwise conv before its squeeze-excitation):
        # the run ends at the last layer before it that is not grouped.
        while idx and getattr(modules[chain[idx[-1]]], "groups", 1) > 1:
            idx.pop()
        if len(idx) >= 2:  # one layer alone has no internal channel
            runs.append(chain[idx[0] : idx[-1] + 1])
    calls: dict[nn.Module, list[tuple[Any, ...]]] = {}

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        calls.setdefault(module, []).append(args)

    used = {modules[name] for run in runs for name in run}
    handles = [m.register_forward_pre_hook(record) for m in used]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    parts: list[_Part] = []
    notes: dict[str, Any] = {"reason": reason, "parts": []}
    for run in runs:
        layers = [modules[name] for name in run]
        # A layer called more than once (shared) has its channels tied to every place that calls it.
        if any(len(calls.get(m, [])) != 1 for m in layers if any(True for _ in m.parameters())):
            continue
        x = calls[layers[0]][0][0].detach()
        probe = _input_probe(x)
        if probe is None:
            continue
        wrapped = nn.Sequential(probe, *layers)
        try:
            keep = prunable_output_layers(wrapped, x)
        except Exception:  # noqa: BLE001 - a run Torch-Pruning cannot read either: left as it is
            continue
        parts.append(_Part(wrapped, x, [probe, *keep]))
        notes["parts"].append(f"{run[0]}..{run[-1]}")
    return parts, notes


def _runs_as_before(model: nn.Module, example: torch.Tensor, shape: tuple[int, ...]) -> str | None:
    """None when ``model`` runs on ``example`` and gives an output of ``shape``; else why not."""
    try:
        with torch.no_grad():
            got = tuple(model.eval()(example).shape)
    except Exception as exc:  # noqa: BLE001 - the reason is the caller's note
        return f"does not run: {first_line(exc)}"
    return None if got == shape else f"outputs {got}, not {shape}"


def channel_counts(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


class _OneGroup(tp.importance.Importance):
    """Scores only the group that holds ``root`` among its out-pruned layers; the others stay."""

    def __init__(self, criterion: ChannelCriterion, root: nn.Module) -> None:
        self.criterion, self.root = criterion, root

    def __call__(self, group: Any) -> torch.Tensor | None:
        # The root may be a depthwise convolution (its own pruning function, not in _CONV_OUT):
        # Torch-Pruning roots a group at whichever of its layers it meets first.
        if _root(group) is self.root or any(dep.layer is self.root and dep.pruning_fn in _CONV_OUT for dep, _ in group):
            return self.criterion(group)
        return None


def _forward_order(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    order: dict[nn.Module, int] = {}

    def hook(module: nn.Module, inputs: Any, out: Any) -> None:
        order.setdefault(module, len(order))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _out_pruned(group: Any) -> list[nn.Module]:
    """The convolution and linear layers whose output channels ``group`` prunes."""
    return [dep.target.module for dep, _ in group if isinstance(dep.target.module, (nn.modules.conv._ConvNd, nn.Linear)) and _PRUNING_FNS.is_out_channel_pruning_fn(dep.handler)]


def _group_roots(model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]) -> list[Any]:
    """Torch-Pruning's pruning groups of ``model`` (each rooted at the conv or linear layer whose
    output channels it slices), the never-pruned output layers left out."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    return list(graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)))


def _stand_ins(
    profiled: Mapping[str, int], present: list[str], channels: Mapping[str, int], order: Mapping[nn.Module, int], modules: Mapping[str, nn.Module]
) -> dict[str, str]:
    """Profiled layer -> the prunable layer that stands in for it where an earlier stage replaced
    it: the last (in forward order) prunable convolution inside the replacement (names under the
    profiled name) with the profiled layer's ``profiled[name]`` output channels."""
    out = {}
    for name, width in profiled.items():
        if name in present or not width:
            continue
        inside = [p for p in present if p.startswith(name + ".") and channels.get(p) == width]
        if inside:
            out[name] = max(inside, key=lambda p: order.get(modules[p], -1))
    return out


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ratio_for_count(removed: int, channels: int) -> float:
    """The ratio for which Torch-Pruning removes exactly ``removed`` of ``channels`` channels
    (it removes ``channels - int(channels * (1 - ratio))``)."""
    return 0.0 if removed <= 0 else (removed - 0.5) / channels


def aligned_keep(channels: int, ratio: float, multiple: int) -> int:
    """How many of ``channels`` a layer pruned at ``ratio`` keeps when counts are rounded to
    ``multiple`` (``round_to``): the multiple nearest to Torch-Pruning's count (halves round up), at
    least ``multiple`` and at most ``channels``; a layer narrower than ``multiple`` keeps the exact count."""
    keep = int(channels * (1 - ratio)) if ratio > 0 else channels
    if multiple <= 1 or channels < multiple:
        return keep
    return min(channels, max(multiple, multiple * int(keep / multiple + 0.5)))


def _aligned_ratios(model: nn.Module, ratio_of: Callable[[nn.Module], float], multiple: int) -> dict[nn.Module, float]:
    """Per-layer ratios that make every convolution or linear layer that ``ratio_of`` prunes keep
    :func:`aligned_keep` channels."""
    out = {}
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and ratio_of(m) > 0:
            channels = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
            out[m] = _ratio_for_count(channels - aligned_keep(channels, ratio_of(m), multiple), channels)
    return out


@register_method
class Prune(CompressionMethod):
    """Filter pruning with Torch-Pruning's dependency graph and a searched importance criterion.

    Searched: ``criterion`` (l1, apoz, thinet, gates, slimming), the ``allocation`` (uniform, global,
    sensitivity; default uniform), ``round_to`` (the multiple channel counts are kept at; default 1),
    with ``uniform`` one ``ratio`` of channels removed from every prunable layer, or with
    ``per_stage`` one ratio per stage (``stage_ratio_0..3``); with ``global`` ``ratio`` is the share
    of all channels removed, with ``sensitivity`` ``share`` is the share of the model's parameters
    removed; for gates the gate-optimisation steps per sample batch and the L1 weight,
    for slimming the gate-training epochs and the L1 weight. The trial fine-tunes (with the searched
    distillation) afterwards. The classifier's output layer is never pruned.
    """

    name = "prune"
    stage = Stage.PRUNE
    #: The notes record the pruned layers' channel counts (before, after).
    converted_note = "channels"
    reference = (
        "Li et al. ICLR 2017 (L1); Hu et al. 2016 (APoZ); Luo et al. ICCV 2017 (ThiNet); Wang et al. CVPR 2018 "
        "(gates); Liu et al. ICCV 2017 (slimming); via Torch-Pruning DepGraph, Fang et al. CVPR 2023"
    )
    hyperparameters = {
        "criterion": Categorical(sorted(CRITERIA)),
        "allocation": Categorical(list(ALLOCATIONS)),
        "ratio": Float(0.1, 0.9),
        "share": Float(0.1, 0.98),
        "per_stage": Categorical([False, True]),
        **{f"stage_ratio_{i}": Float(0.0, 0.7) for i in range(MAX_STAGE_RATIOS)},
        "gate_steps": Int(10, 60),
        "gate_epochs": Int(1, 3),
        "gate_l1": Float(1e-3, 1e-1, log=True),
        "round_to": Categorical(list(ROUND_TO)),
    }
    # A config may open ``ratio`` up to 0.9 (the deepest level the profile measures and the
    # ``global`` cap), to reach as far as a ``share`` near 1 does; by default a ratio above 0.7
    # (91 % of a plain CNN's parameters) is not sampled.
    # Counts are exact unless a config names ``round_to`` (a study's deployment target decides
    # which multiple pays: BENCHMARKS.md, "Which channel counts run fast?").
    default_ranges = {"allocation": Categorical(["uniform"]), "ratio": Float(0.1, 0.7), "round_to": Categorical([1])}

    def space(self, trial: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"criterion": self.suggest(trial, "criterion")}
        allocation = self.suggest(trial, "allocation")
        if allocation == "uniform":
            # A uniform plan holds the uniform settings only: it equals the same plan of a study
            # whose config does not search the allocation.
            out["per_stage"] = self.suggest(trial, "per_stage")
            keys = [f"stage_ratio_{i}" for i in range(MAX_STAGE_RATIOS)] if out["per_stage"] else ["ratio"]
        else:
            out["allocation"] = allocation
            keys = ["ratio" if allocation == "global" else "share"]
        if out["criterion"] == "gates":
            keys += ["gate_steps", "gate_l1"]
        elif out["criterion"] == "slimming":
            keys += ["gate_epochs", "gate_l1"]
        out.update({k: self.suggest(trial, k) for k in keys})
        round_to = self.suggest(trial, "round_to")
        if round_to != 1:
            # Exact counts are not recorded: the plan equals that of a study that does not search round_to.
            out["round_to"] = round_to
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

    # --- the sensitivity profile (searchspace.Profiled) -------------------------------------

    def needs_profile(self) -> bool:
        domain = self.ranges["allocation"]
        return any(a != "uniform" for a in getattr(domain, "choices", ()))

    def profile_levels(self) -> tuple[float, ...]:
        return PROFILE_LEVELS

    @staticmethod
    def _conv_groups(model: nn.Module, example: torch.Tensor) -> list[tuple[str, Any]]:
        """(layer name, pruning group) of every convolution a pass can prune, part by part as
        :meth:`_prune` prunes it: the whole model, or its runs where the graph cannot follow it
        (ShuffleNetV2's channel shuffle), so the profile and the allocations see those runs' layers."""
        names = _names(model)
        parts, _ = prunable_parts(model, example)
        out = []
        for part in parts:
            for g in _group_roots(part.module, part.example, part.ignored):
                root = _root(g)
                if isinstance(root, nn.modules.conv._ConvNd) and root in names:
                    out.append((names[root], g))
        return out

    def profile_layers(self, model: nn.Module, example: torch.Tensor) -> list[str]:
        return [name for name, _ in self._conv_groups(model, example)]

    def compress_layer(self, model: nn.Module, layer: str, level: float, *, context: ApplyContext) -> nn.Module | None:
        # Measured with the l1 criterion whatever a trial's criterion: the profile asks how much a
        # layer's channels matter, which needs no calibration and no training.
        probe = ApplyContext(example_input=context.example_input, calibration=context.calibration, fit=context.fit, base=context.base)
        out = self._prune(model, L1Filter, {layer: level}, None, probe)
        return out if probe.notes["prune.channels"] else None

    def profile_extra(self, model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
        scores: dict[str, list[float]] = {}
        for name, g in self._conv_groups(model, example):
            imp = L1Filter()(g)
            if imp is not None:
                # Torch-Pruning's "mean" normaliser: comparable across layers of different scale.
                scores[name] = (imp / imp.mean().clamp(min=1e-12)).tolist()
        return {"scores": scores}

    # --- apply -------------------------------------------------------------------------------

    @staticmethod
    def _uniform(model: nn.Module, params: Mapping[str, Any]) -> tuple[Any, dict[nn.Module, float] | None, float]:
        """A function layer -> pruning ratio, the Torch-Pruning ``pruning_ratio_dict`` (or None) and its default ratio."""
        if not params.get("per_stage"):
            ratio = float(params.get("ratio", 0.0))
            return (lambda layer: ratio), None, ratio
        stages = list(getattr(model, "stages", []))
        if not stages:
            raise ValueError("prune.per_stage needs a StagedNet (a model with `stages`)")
        ratios = {s: float(params[f"stage_ratio_{min(i, MAX_STAGE_RATIOS - 1)}"]) for i, s in enumerate(stages)}
        owner = {m: r for s, r in ratios.items() for m in s.modules()}
        return (lambda layer: owner.get(layer, 0.0)), ratios, float(params.get("ratio", 0.0))

    def allocated(self, model: nn.Module, params: Mapping[str, Any], profile: SensitivityProfile | None, example: torch.Tensor, notes: dict[str, Any]) -> dict[str, float]:
        """Per-layer pruning ratios of a ``global`` or ``sensitivity`` plan, read from ``profile``.

        Raises:
            ValueError: no profile was given.
        """
        allocation = params.get("allocation", "uniform")
        if profile is None or self.name not in profile.layers:
            raise ValueError(f"prune.allocation={allocation} needs the base's sensitivity profile, but the context has none for {self.name!r}")
        present = self.profile_layers(model, example)
        channels = channel_counts(model)
        base_scores = profile.extra.get(self.name, {}).get("scores", {})
        # A profiled layer an earlier stage replaced (Tucker's first/core/last convolutions in
        # place of one) is stood in for by the replacement's last convolution with the same
        # output channels: pruning those channels is pruning the profiled layer's outputs.
        stand_in = _stand_ins({n: len(base_scores.get(n, ())) for n in profile.rows(self.name)}, present, channels, _forward_order(model, example), dict(model.named_modules()))
        if stand_in:
            notes["prune.stand_ins"] = dict(sorted(stand_in.items()))
        known = {stand_in.get(n, n): n for n in profile.rows(self.name) if stand_in.get(n, n) in present}
        notes["prune.unprofiled"] = sorted(set(present) - set(known))
        if allocation == "global":
            ratio = float(params["ratio"])
            scores = {layer: base_scores[n] for layer, n in known.items() if len(base_scores.get(n, ())) == channels.get(layer)}
            counts = global_counts(scores, ratio, max_ratio=MAX_GLOBAL_RATIO)
            return {n: _ratio_for_count(k, channels[n]) for n, k in counts.items() if k > 0}
        rows = {layer: profile.rows(self.name)[n] for layer, n in known.items()}
        before = _params(model)

        def saved_by(levels: Mapping[str, float]) -> int:
            # Pruned layers share the convolutions between them, so their own savings do not add
            # up: the plan is pruned (l1; the criterion picks which channels, not how many) and counted.
            probe = ApplyContext(example_input=example)
            return before - _params(self._prune(model, L1Filter, levels, {"round_to": params.get("round_to", 1)}, probe))

        levels, saved = allocate(
            rows, base_accuracy=profile.base_accuracy, target_saved=float(params["share"]) * before,
            layers=sorted(known, key=lambda layer: list(profile.rows(self.name)).index(known[layer])), saved_by=saved_by,
        )
        notes["prune.allocated_saved"] = saved
        return levels

    def _prune(self, model: nn.Module, make: Callable[[], ChannelCriterion], levels: Mapping[str, float] | None, params: Mapping[str, Any] | None, context: ApplyContext) -> nn.Module:
        """Prune a copy of ``model`` with a fresh criterion ``make()`` (one per attempt): per-layer ratios ``levels`` (layer name
        -> ratio, others kept), or the uniform / per-stage ratios of ``params``; run by run where
        the dependency graph cannot follow the model (:func:`prunable_parts`)."""
        example = context.example_input
        want: tuple[int, ...] | None = None
        whole_failed = None
        while True:
            out = clone(model).eval()
            if want is None:
                with torch.no_grad():
                    want = tuple(out(example).shape)
            criterion = make()
            criterion.prepare(out, context, params or {})
            if levels is None:
                ratio_of, ratio_dict, default = self._uniform(out, params or {})
            else:
                modules = dict(out.named_modules())
                ratio_dict = {modules[n]: float(r) for n, r in levels.items() if n in modules and r > 0}
                default = 0.0
                ratio_of = lambda layer, d=ratio_dict: d.get(layer, 0.0)  # noqa: E731
            multiple = int((params or {}).get("round_to", 1))
            if multiple > 1:
                ratio_dict = _aligned_ratios(out, ratio_of, multiple)
                ratio_of = lambda layer, d=ratio_dict: d.get(layer, 0.0)  # noqa: E731
            parts, split = prunable_parts(out, example, whole_failed)
            before = channel_counts(out)
            order = _forward_order(out, example) if criterion.layerwise else {}
            try:
                for part in parts:
                    self._prune_part(part, criterion, default, ratio_of, ratio_dict or None, order)
            except _NoLongerRuns as exc:
                if split or whole_failed:
                    raise ValueError(f"a part pruned run by run must still run, but pruned up to {exc}") from exc
                # A layer-by-layer criterion scores each group on the model pruned so far, which
                # needs it to run: where the graph mapped an operation wrongly, it stops there.
                whole_failed = f"the model pruned as a whole, layer by layer up to {exc}"
                continue
            except Exception as exc:  # noqa: BLE001 - Torch-Pruning's own failure on the whole graph
                if split or whole_failed:
                    raise
                # An operation the graph maps wrongly can also make Torch-Pruning itself fail (an
                # index past a layer's channels): the runs are pruned instead, as for a broken model.
                whole_failed = f"pruning the model as a whole raised {first_line(exc)}"
                continue
            if split or whole_failed:
                break
            # The dependency graph can map an operation it does not know wrongly (channels removed
            # on one side only): a pruned model that no longer runs, or outputs another shape, is
            # pruned again run by run.
            broken = _runs_as_before(out, example, want)
            if broken is None:
                break
            whole_failed = f"the model pruned as a whole {broken}"
        if split:
            context.notes["prune.split"] = split
        after = channel_counts(out)
        context.notes["prune.channels"] = {n: [before[n], after[n]] for n in after if after[n] != before.get(n)}
        return out

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        name = params["criterion"]
        if name not in CRITERIA:
            raise ValueError(f"prune.criterion must be one of {sorted(CRITERIA)}, got {name!r}")
        allocation = params.get("allocation", "uniform")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"prune.allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
        if params.get("round_to", 1) not in ROUND_TO:
            raise ValueError(f"prune.round_to must be one of {list(ROUND_TO)}, got {params['round_to']!r}")
        levels = None
        if allocation != "uniform":
            levels = self.allocated(model, params, context.profile, context.example_input, context.notes)
            context.notes["prune.levels"] = {n: round(r, 4) for n, r in sorted(levels.items())}
        out = self._prune(model, CRITERIA[name], levels, params, context)
        context.notes["prune.criterion"] = name
        return out

    @staticmethod
    def _prune_part(part: _Part, criterion: ChannelCriterion, default: float, ratio_of: Any, ratio_dict: Any, order: dict[nn.Module, int]) -> None:
        """One Torch-Pruning pass over ``part`` (the model, or one part of it: :func:`prunable_parts`)."""
        model, example, ignored = part
        if criterion.layerwise:
            # One group at a time in forward order, each scored on the network pruned so far, so
            # the part must still run after each group (Torch-Pruning may have mapped an operation
            # wrongly, e.g. a split into fixed sizes that the model's code keeps).
            groups = _group_roots(model, example, ignored)
            # Each pass builds only its own group: Torch-Pruning's MetaPruner builds every group of
            # the model twice per pass (counting, then pruning), so one pass per group would build
            # groups times groups of them (DenseNet's concatenations: minutes). The other groups'
            # output-pruned layers are passed as ignored (except those this group prunes too: a split
            # Torch-Pruning maps by index gives each piece a group holding part of the producer).
            members = {_root(g): _out_pruned(g) for g in groups}
            with torch.no_grad():
                want = tuple(model.eval()(example).shape)
            names, last = _names(model), "nothing"
            for root in sorted(members, key=lambda m: order.get(m, len(order))):
                ratio = ratio_of(root)
                if ratio <= 0:
                    continue
                broken = _runs_as_before(model, example, want)
                if broken is not None:
                    raise _NoLongerRuns(f"the group of {last}, {broken}")
                last = names.get(root, "?")
                others = [m for r, layers in members.items() if r is not root for m in layers if m not in members[root]]
                pruner = tp.pruner.MetaPruner(model, (example,), importance=_OneGroup(criterion, root), pruning_ratio=ratio, global_pruning=False, ignored_layers=[*ignored, *others])
                for group in pruner.step(interactive=True):
                    criterion.before_prune(group)
                    group.prune()
            return
        pruner = tp.pruner.MetaPruner(
            model,
            (example,),
            importance=criterion,
            pruning_ratio=default,
            pruning_ratio_dict=ratio_dict,
            global_pruning=False,
            ignored_layers=ignored,
        )
        for group in pruner.step(interactive=True):
            criterion.before_prune(group)
            group.prune()
