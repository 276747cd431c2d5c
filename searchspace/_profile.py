"""A sensitivity profile of the base, and the per-layer allocations read from it.

Layers differ by an order of magnitude in how much accuracy they lose per saved parameter, so a
method that cuts every layer by the same amount spends accuracy where it buys little. The profile
records, for every layer a per-layer method (:class:`~searchspace.Profiled`) can act on and a
small grid of levels, the validation accuracy after compressing that layer alone, without
fine-tuning, beside the exact parameters and MACs that saves. It is computed once per study
(``automl._sensitivity``) and given to the methods through ``ApplyContext.profile``.

An allocation is a deterministic function of (profile, plan), so a plan's structure still follows
from its parameters: the dry run prices it exactly and ``automl.load_model`` rebuilds it (the
checkpoint keeps the profile beside the plan).

- :func:`allocate`: per-layer levels that remove a target number of parameters with the least
  predicted accuracy loss, greedily by loss per parameter saved (the selection of AIMET's greedy
  compression-ratio search and of NetAdapt, here on a measured one-layer-at-a-time table).
- :func:`global_counts`: how many channels each layer loses when the channels of all layers are
  ranked together by mean-normalised importance (Torch-Pruning's ``global_pruning=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = ["LayerLevel", "SensitivityProfile", "allocate", "global_counts"]


@dataclass(frozen=True)
class LayerLevel:
    """One layer compressed alone at one level, measured on the validation split (never test)."""

    level: float
    accuracy: float
    params_saved: int
    macs_saved: int

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "accuracy": self.accuracy, "params_saved": self.params_saved, "macs_saved": self.macs_saved}


@dataclass(frozen=True)
class SensitivityProfile:
    """The base's per-layer sensitivity, per method (see the module docstring).

    Attributes:
        base_accuracy: the base's accuracy on the same validation samples.
        base_params: the base's parameter count (the denominator of a plan's target share).
        base_macs: the base's MACs on one sample.
        layers: method name -> layer name -> the levels measured, by increasing saving. A level
            at which the layer would not change is not listed.
        extra: method name -> statistics of the base its allocation reads besides the table
            (pruning: each layer's mean-normalised channel importance, for the global ranking).
        samples: validation samples each accuracy is measured on.
        seconds: wall time of the whole profile.
    """

    base_accuracy: float
    base_params: int
    base_macs: int
    layers: Mapping[str, Mapping[str, tuple[LayerLevel, ...]]]
    extra: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0

    def rows(self, method: str) -> Mapping[str, tuple[LayerLevel, ...]]:
        """The table of ``method`` (empty when the profile has none)."""
        return self.layers.get(method, {})

    def drop(self, method: str) -> dict[str, dict[float, float]]:
        """Accuracy drop (base minus layer alone) by layer and level: what the report draws."""
        return {layer: {e.level: self.base_accuracy - e.accuracy for e in entries} for layer, entries in self.rows(method).items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_accuracy": self.base_accuracy,
            "base_params": self.base_params,
            "base_macs": self.base_macs,
            "layers": {m: {layer: [e.as_dict() for e in entries] for layer, entries in rows.items()} for m, rows in self.layers.items()},
            "extra": {m: dict(v) for m, v in self.extra.items()},
            "samples": self.samples,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityProfile:
        return cls(
            base_accuracy=float(d["base_accuracy"]),
            base_params=int(d["base_params"]),
            base_macs=int(d["base_macs"]),
            layers={
                m: {layer: tuple(LayerLevel(float(e["level"]), float(e["accuracy"]), int(e["params_saved"]), int(e["macs_saved"])) for e in entries) for layer, entries in rows.items()}
                for m, rows in d["layers"].items()
            },
            extra={m: dict(v) for m, v in d.get("extra", {}).items()},
            samples=int(d.get("samples", 0)),
            seconds=float(d.get("seconds", 0.0)),
        )


def allocate(
    rows: Mapping[str, Sequence[LayerLevel]],
    *,
    base_accuracy: float,
    target_saved: float,
    layers: Sequence[str] | None = None,
    saved_by: Callable[[Mapping[str, float]], int] | None = None,
) -> tuple[dict[str, float], int]:
    """Per-layer levels saving at least ``target_saved`` parameters with the least predicted loss.

    Every layer starts uncompressed. Each step moves one layer from its current level to its next
    one (by saving), choosing the move with the smallest predicted accuracy loss per parameter
    saved (loss: the profile's drop, base minus the layer alone); ties go to the larger saving, then
    to the layer listed first. The order of the moves depends on the table only; the target decides
    how many of them are taken: the fewest whose saving reaches it (all of them when none does).

    The saving of a set of levels is ``saved_by(levels)`` where given, else the sum of the layers'
    own savings. The sum is exact only where layers share no parameters: two pruned layers both
    shrink the convolution between them, so the sum counts its removed weights twice and stops
    early (three layers of a 128-channel CNN at a 91 % target stopped at 83 %). ``saved_by`` must
    not decrease along the moves (a layer compressed further never gains parameters); the number
    of moves taken is found by bisection, so it is called about log2(moves) times.

    Args:
        rows: layer -> its measured levels (see :class:`SensitivityProfile`).
        base_accuracy: the accuracy the drops are taken from.
        target_saved: parameters to remove.
        layers: the layers that may be compressed, in tie-break order (default: ``rows``' order).
        saved_by: the exact parameters a set of levels saves (layer -> level).

    Returns:
        ``({layer: level} of the compressed layers, parameters saved)``: the saving is
        ``saved_by``'s where given, else the predicted sum.
    """
    order = [n for n in (rows if layers is None else layers) if n in rows]
    current: dict[str, LayerLevel | None] = {n: None for n in order}
    # Every move in greedy order, with the plan and the summed saving after it.
    plans: list[tuple[dict[str, float], int]] = [({}, 0)]
    while True:
        best_key: tuple[float, int, int] | None = None
        move: tuple[str, LayerLevel, int] | None = None
        for index, layer in enumerate(order):
            now = current[layer]
            now_saved = now.params_saved if now else 0
            now_loss = base_accuracy - now.accuracy if now else 0.0
            # One level at a time (as NetAdapt shrinks each layer by one step per iteration): a
            # jump to a layer's strongest level would overshoot the target by up to that layer's
            # whole saving.
            e = next((e for e in rows[layer] if e.params_saved > now_saved), None)
            if e is None:
                continue
            gain = e.params_saved - now_saved
            key = ((base_accuracy - e.accuracy - now_loss) / gain, -gain, index)
            if best_key is None or key < best_key:
                best_key, move = key, (layer, e, gain)
        if move is None:
            break
        layer, entry, gain = move
        current[layer] = entry
        plans.append(({**plans[-1][0], layer: entry.level}, plans[-1][1] + gain))
    if saved_by is None:
        return next((p for p in plans if p[1] >= target_saved), plans[-1])
    if target_saved <= 0:
        return {}, 0
    # The fewest moves whose exact saving reaches the target (bisection on a non-decreasing saving).
    lo, hi = 1, len(plans) - 1
    known: dict[int, int] = {}
    while lo < hi:
        mid = (lo + hi) // 2
        known[mid] = int(saved_by(plans[mid][0]))
        if known[mid] >= target_saved:
            hi = mid
        else:
            lo = mid + 1
    if hi < 1:
        return {}, 0
    return dict(plans[hi][0]), known[hi] if hi in known else int(saved_by(plans[hi][0]))


def global_counts(scores: Mapping[str, Sequence[float]], ratio: float, *, max_ratio: float) -> dict[str, int]:
    """Channels removed per layer when all layers' channels are ranked together (lowest first).

    As Torch-Pruning's ``global_pruning=True``: ``n = N - int(N * (1 - ratio))`` of the ``N``
    channels go, the ``n`` with the lowest (already normalised) scores, each layer keeping at least
    ``N_l - int(N_l * max_ratio)`` of its ``N_l`` channels (the library's ``max_pruning_ratio``).
    Equal scores are taken in layer order, then channel order, so the count is exact and stable.
    """
    pool = sorted((float(s), i, c) for i, layer in enumerate(scores) for c, s in enumerate(scores[layer]))
    total = len(pool)
    target = total - int(total * (1 - ratio))
    names = list(scores)
    cap = {n: int(len(scores[n]) * max_ratio) for n in names}
    counts = {n: 0 for n in names}
    taken = 0
    for _, i, _ in pool:
        if taken >= target:
            break
        n = names[i]
        if counts[n] < cap[n]:
            counts[n] += 1
            taken += 1
    return counts
