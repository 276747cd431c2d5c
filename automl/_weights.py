"""The base model's starting weights: a library's hub weights, or the checkpoint file a user has.

``base.weights`` names hub weights (a torchvision weights name such as ``IMAGENET1K_V1`` or
``DEFAULT``; ``pretrained`` for timm), downloaded by the library's own loader into its cache only
when named. ``base.checkpoint`` is a file in the forms users have:

- a state dict with the library's key names (``torch.save(model.state_dict())`` of a torchvision
  or timm model), the factory module's, or the base model's own;
- a dict holding it under ``state_dict`` (Lightning, timm's train script), ``model`` or
  ``model_state_dict``;
- keys prefixed ``module.`` (DistributedDataParallel) or ``model.`` (a Lightning module's attribute);
- a ``torch.export`` program (``.pt2``), or a ``.safetensors`` file.

The weights are matched to the base model built for the dataset (:func:`automl.build_model`), so the
architecture is always the one a checkpoint's rebuild gets. Every entry must be there with its shape,
except the classifier's: entries whose shape changes with the number of classes (found by building the
model at another class count) may have another class count in the file, and are then replaced by the
fresh classifier of the dataset's classes (:attr:`Start.replaced`); the study then fine-tunes the whole
model with the base recipe. Anything else that does not fit raises :class:`WeightsError` naming the
first missing and unexpected keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from automl._models import _AUX_LOGITS, _TORCHVISION, build_model, library_keys

__all__ = ["Start", "WeightsError", "adapt_input_conv", "check_weights", "fit_state", "hub_state_dict", "load_start", "read_checkpoint"]

#: Entries a checkpoint may hold its state dict under, looked up in this order.
STATE_KEYS = ("state_dict", "model_state_dict", "model")
#: Key prefixes wrappers add (DistributedDataParallel, a Lightning module's attribute).
PREFIXES = ("module.", "model.")


class WeightsError(ValueError):
    """The named weights or checkpoint cannot start the base; ``str(err)`` is one line naming the field."""


@dataclass(frozen=True)
class Start:
    """Where the base's weights came from, and whether its classifier was replaced."""

    #: ``"checkpoint FILE"`` or ``"torchvision weights NAME"`` / ``"timm weights pretrained"``.
    source: str
    #: The classifier entries replaced by freshly initialised ones (empty: the file fit as is).
    replaced: tuple[str, ...] = ()
    #: Classes of the file's classifier where it was replaced, and the dataset's.
    file_classes: int | None = None
    num_classes: int | None = None

    @property
    def fits(self) -> bool:
        """The file's classifier has the dataset's classes: the model is used as is."""
        return not self.replaced

    def describe(self) -> str:
        if self.fits:
            return f"loaded {self.source}"
        return (
            f"loaded {self.source}; its classifier ({', '.join(self.replaced)}) has {self.file_classes} classes, "
            f"replaced by a new one of {self.num_classes}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "classifier_replaced": list(self.replaced), "file_classes": self.file_classes, "num_classes": self.num_classes}


def _library_arch(model: str) -> tuple[str, str] | None:
    if model in _TORCHVISION:
        return "torchvision", model
    library, _, arch = model.partition(":")
    return (library, arch) if library in ("torchvision", "timm") else None


def check_weights(model: str, weights: str) -> None:
    """Raise ``ValueError`` (one line, listing what is allowed) when ``model`` has no hub weights ``weights``."""
    found = _library_arch(model)
    if found is None:
        raise ValueError(f"hub weights need a torchvision or timm model (a short torchvision name, 'torchvision:NAME' or 'timm:NAME'), got base.model {model!r}")
    library, arch = found
    if library == "timm":
        import timm

        if weights != "pretrained":
            raise ValueError(f"a timm model's hub weights are named 'pretrained', got {weights!r}")
        if not timm.models.is_model_pretrained(arch):
            raise ValueError(f"timm model {arch!r} has no pretrained weights (timm.list_pretrained() lists those that do)")
        return
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        enum = None
    names = ["DEFAULT", *(w.name for w in enum)] if enum is not None else []
    if weights not in names:
        raise ValueError(f"torchvision model {arch!r} has the weights {', '.join(names) or 'none'}, got {weights!r}")


def hub_state_dict(model: str, weights: str, *, input_shape: Sequence[int], options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The library's pretrained state dict (its own key names, its own class count), downloaded into
    the library's cache where it is not there yet.

    The library's builder loads them into its model (so its own key fixes apply), and that model's
    state dict is returned; where the data has other than 3 channels, the first convolution's RGB
    kernel is adapted (:func:`adapt_input_conv`; timm adapts its own the same way).

    Raises:
        WeightsError: unknown weights, or the download or load failed.
    """
    try:
        check_weights(model, weights)
    except ValueError as exc:
        raise WeightsError(f"base.weights: {exc}") from None
    library, arch = _library_arch(model)  # type: ignore[misc]
    kwargs = dict(options or {})
    kwargs.pop("num_classes", None)
    try:
        if library == "timm":
            import timm

            net = timm.create_model(arch, pretrained=True, in_chans=int(input_shape[0]), **kwargs)
        else:
            import torchvision

            if arch in _AUX_LOGITS:
                kwargs = {"aux_logits": False, **kwargs}
            if model in _TORCHVISION:
                kwargs = {}  # the short names take no builder options
            net = torchvision.models.get_model(arch, weights=torchvision.models.get_model_weights(arch)[weights], **kwargs)
            state = dict(net.state_dict())
            first = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
            state[f"{first}.weight"] = adapt_input_conv(state[f"{first}.weight"], int(input_shape[0]))
            return state
    except Exception as exc:  # noqa: BLE001 - a download or file error is the user's to fix, in one line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(f"base.weights {weights!r} of {model!r} cannot be loaded: {type(exc).__name__}: {text}") from exc
    return dict(net.state_dict())


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """An RGB first convolution's kernel for ``channels`` input channels, as timm adapts its own
    pretrained weights: summed over RGB for one channel, else RGB repeated and scaled by 3/channels,
    so a grey image's response is that of the same image in RGB."""
    have = weight.shape[1]
    if channels == have:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-channels // have)
    return weight.repeat(1, reps, *([1] * (weight.dim() - 2)))[:, :channels] * (have / channels)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, from whichever form it holds them in (see the module doc).

    Raises:
        WeightsError: the file cannot be read, or holds no state dict.
    """
    p = Path(path)
    try:
        if p.suffix == ".pt2":
            program = torch.export.load(str(p))
            return {k: v for k, v in program.state_dict.items() if isinstance(v, torch.Tensor)}
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(p)))
        obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix, in one line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeightsError(f"base.checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {text})") from exc
    for _ in range(len(STATE_KEYS) + 1):
        if not isinstance(obj, Mapping):
            break
        nested = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is not None:
            obj = nested
            continue
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        break
    held = f"a dict with the keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise WeightsError(
        f"base.checkpoint {str(path)!r} must hold a state dict (itself, or under {' / '.join(STATE_KEYS)}) or be a torch.export .pt2 program, got {held}"
    )


def _variants(state: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state`` and the states with a wrapper's prefix stripped, one prefix at a time."""
    out = [dict(state)]
    while out[-1]:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in out[-1])), None)
        if prefix is None:
            break
        out.append({k[len(prefix):]: v for k, v in out[-1].items()})
    return out


def _classifier_keys(rebuild: Callable[[int], nn.Module], model: nn.Module, num_classes: int) -> set[str]:
    """The entries whose shape changes with the number of classes: the model built at another count
    differs from ``model`` exactly there. Built on the meta device where the constructor allows it."""
    other: nn.Module | None = None
    with contextlib.suppress(Exception):
        with torch.device("meta"):
            other = rebuild(num_classes + 1)
    if other is None:
        other = rebuild(num_classes + 1)
    theirs = other.state_dict()
    return {k for k, v in model.state_dict().items() if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)}


def fit_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    field: str,
    rebuild: Callable[[int], nn.Module],
    num_classes: int,
    describe: str,
) -> Start:
    """Load ``state`` into ``model`` (in place), its classifier replaced where its class count differs.

    Args:
        model: the base model built for the dataset.
        state: the file's tensors.
        source: what :attr:`Start.source` says.
        field: the config field named in errors (``base.checkpoint``, ``base.weights``).
        rebuild: builds the base at a given class count (to find the classifier's entries).
        num_classes: the dataset's classes.
        describe: how errors name the file and model, e.g. ``"'r18.pt' does not fit base.model 'resnet18'"``.

    Raises:
        WeightsError: entries missing or unexpected, or a shape other than the classifier's differs.
    """
    own = model.state_dict()
    names = library_keys(model)
    by_library = {v: k for k, v in names.items()}
    # The naming (own / library) and prefix depth under which the file's keys meet the model's most.
    best: tuple[int, int, dict[str, torch.Tensor], bool] | None = None
    for depth, variant in enumerate(_variants(state)):
        for translated in (False, True):
            hits = len(set(variant) & (set(by_library) if translated else set(own)))
            if best is None or hits > best[0]:
                best = (hits, depth, variant, translated)
    assert best is not None
    _, _, variant, translated = best
    shown = names if translated else {k: k for k in own}  # the file's names, for messages
    renamed = {by_library.get(k, k) if translated else k: v for k, v in variant.items()}
    missing = [k for k in own if k not in renamed]
    unexpected = [k for k in variant if (by_library.get(k, k) if translated else k) not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (first {shown[missing[0]]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        raise WeightsError(f"{field} {describe}: {', '.join(parts)}")
    differ = [k for k in own if tuple(renamed[k].shape) != tuple(own[k].shape)]
    replaced: tuple[str, ...] = ()
    file_classes = None
    if differ:
        classifier = _classifier_keys(rebuild, model, num_classes)
        other = [k for k in differ if k not in classifier]
        if other:
            k = other[0]
            raise WeightsError(
                f"{field} {describe}: {shown[k]!r} has shape {tuple(renamed[k].shape)} in the file and {tuple(own[k].shape)} in the model"
                + (f" ({len(other)} entries differ)" if len(other) > 1 else "")
            )
        replaced = tuple(k for k in own if k in classifier)
        weight = next((k for k in replaced if k.endswith("weight")), replaced[0])
        file_classes = int(renamed[weight].shape[0])
    result = model.load_state_dict({k: v for k, v in renamed.items() if k not in replaced}, strict=False)
    left = sorted(set(result.missing_keys) - set(replaced))
    if left or result.unexpected_keys:  # the checks above make this unreachable; never load half a model silently
        raise WeightsError(f"{field} {describe}: entries not loaded: {left[:3]} missing, {result.unexpected_keys[:3]} unexpected")
    return Start(source=source, replaced=tuple(shown[k] for k in replaced), file_classes=file_classes, num_classes=num_classes)


def load_start(
    model: nn.Module,
    *,
    name: str,
    weights: str | None,
    checkpoint: str | None,
    input_shape: Sequence[int],
    num_classes: int,
    options: Mapping[str, Any] | None = None,
) -> Start | None:
    """Load the configured starting weights into the base ``model`` (in place); None when none are named.

    Raises:
        WeightsError: the weights cannot be had, or the file does not fit (one line, naming the field).
    """
    if weights is None and checkpoint is None:
        return None

    def rebuild(n: int) -> nn.Module:
        return build_model(name, input_shape=input_shape, num_classes=n, options=dict(options or {}))

    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        return fit_state(
            model, state, source=f"checkpoint {checkpoint}", field="base.checkpoint", rebuild=rebuild, num_classes=num_classes,
            describe=f"{checkpoint!r} does not fit base.model {name!r}",
        )
    assert weights is not None
    library = (_library_arch(name) or ("",))[0]
    state = hub_state_dict(name, weights, input_shape=input_shape, options=options)
    return fit_state(
        model, state, source=f"{library} weights {weights}", field="base.weights", rebuild=rebuild, num_classes=num_classes,
        describe=f"{weights!r} do not fit base.model {name!r}",
    )
