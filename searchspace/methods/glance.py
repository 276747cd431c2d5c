"""Glance and focus: classify a downscaled image, look closer at one region only when unsure.

Wang, Huang, Song, Yang, Huang, "Glance and Focus: a Dynamic Approach to Reducing Spatial
Redundancy in Image Classification", NeurIPS 2020 (arXiv 2010.05300), GFNet. The glance runs
the network on the whole image at a reduced resolution; if its top softmax probability reaches the
step's threshold, the sample stops there. Otherwise the focus runs the network on a patch of the
full-resolution image at a location chosen from what the glance saw, and the prediction fuses both
steps. Thresholds follow MSDNet's budgeted classification (exit fractions geometric in ``q``, set
on the validation split; see :func:`searchspace.methods.exits.budget_thresholds`), so one trained
model yields one operating point per ``q`` (:meth:`GlanceFocusNet.calibrate`).

What the search chooses:

- ``scale``: the glance's resolution, a fraction of the input's height and width;
- ``crop``: the focus patch's side, a fraction of the full-resolution input's;
- ``thresholds``: ``budget`` with the geometric ``q`` (glance fraction ``1 / (1 + q)``), or
  ``direct`` with one ``threshold`` on the glance's top probability.

Changes from the paper, and why (one place): GFNet has two encoders (a global one for the glance, a
local one for patches), a GRU classifier over the steps' features, up to five focus steps and a
patch policy trained with PPO in a three-stage schedule. Here the user's trained model is both
encoders (the same weights see the glance and the patch, fine-tuned on both: the loss is the
glance's plus the fused prediction's), there is one focus step, and the patch is centred on the
peak of the glance's activation map (the channel mean of the deepest stage output that still has
at least :data:`MIN_GRID` positions per side on the glance input, read in steps of
:data:`SALIENCY_STEP` of that output's magnitude, ties to the first position) instead of a learned policy: it
needs no extra training stage and no extra parameters, and it is an argmax the ONNX file can
compute. The two steps are fused by averaging their softmax probabilities (the output is the log
of that mean, so ``softmax(output)`` is the mean), in place of the GRU's state; the focus runs only
for samples whose glance is not confident, as in the paper. The glance input is a bilinear resize
of the given image; the paper resizes the original image once for the glance.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from searchspace._base import ApplyContext, CompressionMethod, Stage
from searchspace._domains import Categorical, Float
from searchspace._registry import register_method
from searchspace._surgery import clone
from searchspace.methods.exits import NEVER, budget_q_grid, budget_thresholds, exit_fractions

__all__ = ["Glance", "GlanceFocusNet", "patch_origin"]

#: Fewest positions per side of the feature map the patch location is read from, where a stage
#: has that many on the glance input (else the first stage's map is used).
MIN_GRID = 3


#: The activation map is read in steps of this share of the stage output's mean magnitude: the peak
#: of a map flat up to float error (a LayerNorm output at initialisation, as in ConvNeXt) would
#: otherwise follow each runtime's float reordering (ONNX Runtime picked other patches than PyTorch).
SALIENCY_STEP = 1e-4


def patch_origin(peak: torch.Tensor, grid: int, full: int, patch: int) -> torch.Tensor:
    """First full-resolution row (or column) of the patch centred on feature-map position ``peak``.

    Position ``i`` of a ``grid``-long axis covers full-resolution pixels ``[i full / grid, (i + 1)
    full / grid)``; the patch is centred on that span's middle and shifted inside the image.
    """
    centre = torch.div((2 * peak + 1) * full, 2 * grid, rounding_mode="floor")
    return (centre - patch // 2).clamp(0, full - patch)


class _GlancePath(nn.Module):
    """What a sample that stops at the glance runs (for MAC counting)."""

    def __init__(self, net: GlanceFocusNet) -> None:
        super().__init__()
        self.inner = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner._glance(self.inner._image(x))[0]


class _FullPath(nn.Module):
    """What a sample that goes on to the focus runs: glance, patch, focus and fusion (MAC counting)."""

    def __init__(self, net: GlanceFocusNet) -> None:
        super().__init__()
        self.inner = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner._image(x)
        logits, saliency = self.inner._glance(x)
        return self.inner._focus(x, logits, saliency)


class GlanceFocusNet(nn.Module):
    """A classifier run on a downscaled image, then, for unsure samples, on a full-resolution patch.

    ``forward`` in eval mode is real early termination: at batch 1 a confident glance returns
    without running the focus; in a batch, only the unsure samples are cropped and run again. It is
    TorchScript-scriptable and, under ``torch.export``, routes through ``torch.cond`` (ONNX ``If``).
    In training mode ``forward`` returns the fused prediction of both steps; the trainer calls
    :meth:`training_loss` instead (glance loss plus fused loss).

    Args:
        net: the classifier (``stages`` then ``head``), shared by glance and focus.
        image_shape: one sample's (channels, height, width).
        glance_size: the glance's (height, width).
        crop_size: the focus patch's (height, width), in full-resolution pixels.
        saliency_stage: the stage whose output on the glance locates the patch.
        grid: that output's (height, width) on the glance input.
        threshold: the glance's confidence threshold.
        budget_q: q of the MSDNet procedure, or None when the threshold is set directly.
        q_grid: values of q measured as extra operating points.
    """

    #: Stay named initializers in the ONNX file, so the threshold can be edited there after export.
    onnx_initializers = ("thresholds",)

    def __init__(
        self,
        *,
        net: nn.Module,
        image_shape: list[int],
        glance_size: list[int],
        crop_size: list[int],
        saliency_stage: int,
        grid: list[int],
        threshold: float,
        budget_q: Optional[float] = None,
        q_grid: Optional[list[float]] = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.image_shape: list[int] = [int(s) for s in image_shape]
        self.glance_size: list[int] = [int(s) for s in glance_size]
        self.crop_size: list[int] = [int(s) for s in crop_size]
        self.saliency_stage = int(saliency_stage)
        self.grid: list[int] = [int(s) for s in grid]
        # [glance, focus]: the focus takes every sample that reaches it (MSDNet's last exit).
        self.register_buffer("thresholds", torch.tensor([threshold, -math.inf], dtype=torch.float32))
        self.budget_q = budget_q
        self.q_grid: list[float] = list(q_grid or [])

    # --- the two steps --------------------------------------------------------------------

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape([x.shape[0]] + self.image_shape)

    def _glance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the downscaled image and the activation map (batch, grid) locating the patch."""
        h = F.interpolate(x, size=self.glance_size, mode="bilinear", align_corners=False)
        saliency = h[:, 0]
        for i, stage in enumerate(self.net.stages):
            h = stage(h)
            if i == self.saliency_stage:
                unit = h.flatten(1).abs().mean(dim=1) * SALIENCY_STEP + 1e-30
                saliency = torch.round(h.mean(dim=1) / unit[:, None, None])
        return self.net.head(h), saliency

    def _patch(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """The full-resolution patch centred on each sample's activation peak (a gather: exportable)."""
        gh, gw = self.grid[0], self.grid[1]
        ch, cw = self.crop_size[0], self.crop_size[1]
        c, full_h, full_w = self.image_shape[0], self.image_shape[1], self.image_shape[2]
        peak = saliency.detach().flatten(1).argmax(dim=1)
        top = patch_origin(torch.div(peak, gw, rounding_mode="floor"), gh, full_h, ch)
        left = patch_origin(peak % gw, gw, full_w, cw)
        rows = top.unsqueeze(1) + torch.arange(ch, device=x.device)
        cols = left.unsqueeze(1) + torch.arange(cw, device=x.device)
        n = x.shape[0]
        x = x.gather(2, rows[:, None, :, None].expand(n, c, ch, full_w))
        return x.gather(3, cols[:, None, None, :].expand(n, c, ch, cw))

    def _focus(self, x: torch.Tensor, glance: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """The fused prediction: log of the mean of the glance's and the patch's softmax."""
        focus = self.net(self._patch(x, saliency))
        both = torch.stack([torch.log_softmax(glance, dim=1), torch.log_softmax(focus, dim=1)])
        return torch.logsumexp(both, dim=0) - math.log(2.0)

    # --- inference ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._image(x)
        if self.training:
            logits, saliency = self._glance(x)
            return self._focus(x, logits, saliency)
        if not torch.jit.is_scripting():
            if torch.compiler.is_exporting():
                return self._exported(x)
        return self._route(x)[0]

    @torch.jit.unused
    def _exported(self, x: torch.Tensor) -> torch.Tensor:
        """The routing as ``torch.export`` (and ONNX, as ``If``) holds it: when every sample of the
        batch is confident at the glance the focus is not run (the batch-1 case that is timed);
        otherwise it runs on the whole batch and confident samples keep their glance logits, the
        numbers :meth:`_route` gives."""
        logits, saliency = self._glance(x)
        done = torch.softmax(logits, dim=1).amax(dim=1) >= self.thresholds[0]

        def stop(x: torch.Tensor, logits: torch.Tensor, saliency: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            return logits.clone()

        def go_on(x: torch.Tensor, logits: torch.Tensor, saliency: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
            return torch.where(done.unsqueeze(1), logits, self._focus(x, logits, saliency))

        return torch.cond(done.all(), stop, go_on, (x, logits, saliency, done))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and step (0 glance, 1 focus) of every sample; only unsure samples are focused."""
        logits, saliency = self._glance(x)
        done = torch.softmax(logits, dim=1).amax(dim=1) >= self.thresholds[0]
        taken = (~done).long()
        if bool(done.all()):
            return logits, taken
        rest = ~done
        out = logits.clone()
        out[rest] = self._focus(x[rest], logits[rest], saliency[rest])
        return out, taken

    @torch.jit.export
    def exit_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Step each sample of ``x`` stops at (0: glance, 1: focus), under the current threshold."""
        logits, _ = self._glance(self._image(x))
        return (torch.softmax(logits, dim=1).amax(dim=1) < self.thresholds[0]).long()

    @torch.jit.ignore
    def exit_paths(self) -> list[nn.Module]:
        """What a sample stopping at the glance runs, and what one going on to the focus runs."""
        return [_GlancePath(self), _FullPath(self)]

    @torch.jit.ignore
    def export_parts(self) -> list[str]:
        """The shared classifier's stages and head, run by the glance and, in the branch, the focus."""
        return [f"net.stages.{i}" for i in range(len(self.net.stages))] + ["net.head"]

    # --- training -------------------------------------------------------------------------

    @torch.jit.ignore
    def training_loss(
        self, x: torch.Tensor, y: torch.Tensor, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``criterion(glance, y) + criterion(fused, y)``: the shared weights learn both inputs."""
        x = self._image(x)
        logits, saliency = self._glance(x)
        return criterion(logits, y) + criterion(self._focus(x, logits, saliency), y)

    # --- thresholds -----------------------------------------------------------------------

    @torch.jit.ignore
    @torch.no_grad()
    def confidences(self, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(N, 2) top softmax probability of every sample at the glance and after the focus."""
        was = self.training
        self.eval()
        out = []
        for chunk in x.split(batch_size):
            chunk = self._image(chunk)
            logits, saliency = self._glance(chunk)
            fused = self._focus(chunk, logits, saliency)
            out.append(torch.stack([torch.softmax(logits, dim=1).amax(dim=1), fused.exp().amax(dim=1)], dim=1))
        self.train(was)
        return torch.cat(out)

    @torch.jit.ignore
    def calibrate(self, x_val: torch.Tensor, y_val: torch.Tensor) -> list[dict[str, Any]]:
        """Set the glance threshold on validation data; return every operating point worth measuring.

        The first setting is this trial's own (budget: the threshold for its q; direct: as sampled),
        then one per value of :attr:`q_grid`. Each is ``{"params": overrides of the trial's Optuna
        parameters, "state": {"thresholds": [glance threshold], "val_exit_fractions": [...]}}``.
        """
        conf = self.confidences(x_val)
        own = budget_thresholds(conf, self.budget_q)[:-1] if self.budget_q is not None else [float(self.thresholds[0])]
        settings = [{"params": {}, "state": {"thresholds": own}}]
        for q in self.q_grid:
            if self.budget_q is not None and math.isclose(q, self.budget_q, rel_tol=1e-3):
                continue
            settings.append({"params": {"glance.thresholds": "budget", "glance.q": q}, "state": {"thresholds": budget_thresholds(conf, q)[:-1]}})
        for s in settings:
            s["state"]["val_exit_fractions"] = exit_fractions(conf, [*s["state"]["thresholds"], -math.inf])[1]
        self.use_setting(settings[0])
        return settings

    @torch.jit.ignore
    def use_setting(self, setting: Mapping[str, Any]) -> None:
        """Apply a setting returned by :meth:`calibrate` (in place: only the threshold changes)."""
        t = list(setting["state"]["thresholds"])
        if len(t) != 1:
            raise ValueError(f"one glance threshold must be given, but got {len(t)}: {t}")
        self.thresholds.copy_(torch.tensor([t[0], -math.inf], dtype=self.thresholds.dtype))


def _side(fraction: float, full: int, field: str) -> int:
    side = round(fraction * full)
    if not 1 <= side <= full:
        raise ValueError(f"1 <= round({field} x {full}) <= {full} must hold, but got {side} ({field}={fraction})")
    return side


@register_method
class Glance(CompressionMethod):
    """GFNet glance and focus on a staged image classifier; see the module docstring."""

    name = "glance"
    stage = Stage.STRUCTURE
    # The weights are shared, but the steps' patch gather and routing are not layers pruning may follow.
    prunable_layers = False
    # The threshold is calibrated after training: expected MACs and latency are known only then.
    costs_after_training = True
    reference = (
        "Wang et al., NeurIPS 2020, arXiv:2010.05300 (GFNet: glance and focus); "
        "thresholds: Huang et al., ICLR 2018, arXiv:1703.09844 (MSDNet budgeted classification)"
    )
    hyperparameters = {
        "scale": Categorical([0.5, 0.625, 0.75]),
        "crop": Categorical([0.5, 0.625, 0.75]),
        "thresholds": Categorical(["budget", "direct"]),
        "q": Float(0.05, 2.0),
        "threshold": Float(0.5, 1.0),
    }

    def space(self, trial: Any) -> dict[str, Any]:
        p: dict[str, Any] = {k: self.suggest(trial, k) for k in ("scale", "crop", "thresholds")}
        p["q" if p["thresholds"] == "budget" else "threshold"] = self.suggest(trial, "q" if p["thresholds"] == "budget" else "threshold")
        return p

    def supports(self, model: nn.Module) -> str | None:
        if not isinstance(getattr(model, "stages", None), nn.ModuleList) or not hasattr(model, "head"):
            return "the model is not a StagedNet (no `stages` whose output locates the patch)"
        if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
            return "no 2D convolution: glance and focus resize and crop images"
        if isinstance(model.head, nn.Identity):
            # A module brought whole whose traced graph gave no layout is one stage ending in logits:
            # no stage output is a feature map to read the patch location from.
            why = getattr(model, "layout_reason", None)
            return "the head is an identity (the stages end in logits): no feature map locates the patch" + (f" ({why})" if why else "")
        shape = getattr(model, "sample_shape", None)
        if shape is not None and len(shape) == 3:
            return self._runs_at_reduced_sizes(model, tuple(shape))
        return None

    def _runs_at_reduced_sizes(self, model: nn.Module, shape: tuple[int, ...]) -> str | None:
        """Why ``model`` cannot run on a glance or a patch of the searched sizes, or None."""
        for field in ("scale", "crop"):
            dom = self.ranges[field]
            for value in getattr(dom, "choices", None) or (dom.low, dom.high):
                size = [max(1, round(float(value) * shape[1])), max(1, round(float(value) * shape[2]))]
                training = model.training
                try:
                    with torch.no_grad():
                        model.eval()(torch.zeros(1, shape[0], *size))
                except Exception as exc:  # noqa: BLE001 - a shape error, or an assertion of the input size (torchvision's ViT)
                    return f"the model does not run on a {size[0]}x{size[1]} input (glance.{field}={value}): {str(exc).splitlines()[0][:160]}"
                finally:
                    model.train(training)
        return None

    def q_grid(self) -> list[float]:
        """The values of q every trained model is also measured at (within the narrowed range)."""
        return budget_q_grid(self.ranges)

    def apply(self, model: nn.Module, params: Mapping[str, Any], *, context: ApplyContext) -> nn.Module:
        net = clone(model).eval()
        example = context.example_input
        seen: list[tuple[int, ...]] = []
        hook = net.stages[0].register_forward_pre_hook(lambda _m, a: seen.append(tuple(a[0].shape[1:])))
        with torch.no_grad():
            reference = net(example)
        hook.remove()
        shape = list(seen[0])
        if len(shape) != 3:
            raise ValueError(f"glance needs image inputs (channels, height, width), but the first stage gets {tuple(shape)}")
        _, full_h, full_w = shape
        glance = [_side(float(params["scale"]), full_h, "glance.scale"), _side(float(params["scale"]), full_w, "glance.scale")]
        crop = [_side(float(params["crop"]), full_h, "glance.crop"), _side(float(params["crop"]), full_w, "glance.crop")]

        # The stage outputs' sizes on the glance input decide where the patch is read from.
        sizes: list[list[int]] = []
        h = F.interpolate(example.reshape([example.shape[0], *shape]), size=glance, mode="bilinear", align_corners=False)
        try:
            with torch.no_grad():
                for stage in net.stages:
                    h = stage(h)
                    sizes.append(list(h.shape[2:]))
                net.head(h)
                net(torch.zeros(1, shape[0], *crop, device=example.device))
        except RuntimeError as exc:
            raise ValueError(f"the model must run on the glance ({glance[0]}x{glance[1]}) and the patch ({crop[0]}x{crop[1]}), but: {str(exc).splitlines()[0][:200]}") from exc
        deep = [i for i, s in enumerate(sizes) if len(s) == 2 and min(s) >= MIN_GRID]
        saliency_stage = deep[-1] if deep else 0
        if len(sizes[saliency_stage]) != 2:
            raise ValueError(f"glance reads the patch location from a 2D feature map, but stage {saliency_stage} gives {sizes[saliency_stage]}")

        budget = params["thresholds"] == "budget"
        out = GlanceFocusNet(
            net=net,
            image_shape=shape,
            glance_size=glance,
            crop_size=crop,
            saliency_stage=saliency_stage,
            grid=sizes[saliency_stage],
            threshold=NEVER if budget else float(params["threshold"]),
            budget_q=float(params["q"]) if budget else None,
            q_grid=self.q_grid(),
        ).eval()
        with torch.no_grad():
            h = example.reshape([example.shape[0], *shape])
            for stage in net.stages:
                h = stage(h)
            composed = net.head(h)
        if not torch.allclose(composed, reference, rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"{type(model).__name__}.forward does more than run its stages and head: glance cannot read its features "
                f"(max difference {float((composed - reference).abs().max()):.3g})"
            )
        context.notes["glance.sizes"] = {"input": shape[1:], "glance": glance, "patch": crop, "saliency_stage": saliency_stage, "grid": sizes[saliency_stage]}
        return out
