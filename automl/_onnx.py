"""ONNX for every method family: ``torch.export`` and the dynamo-based ONNX exporter.

:func:`to_onnx` exports the eager module: ``torch.export.export`` captures it (one program, also
saved as ``model.pt2`` by :mod:`automl._artifact`), and ``torch.onnx.export(program, dynamo=True)``
translates that program with onnxscript. Checked on torch 2.14.1 for every registered method on
``digits_cnn`` and ``mnist1d_cnn`` (``tests/automl/test_onnx.py``):

- data-dependent early exits are exported through ``torch.cond`` (the exporter's supported
  control flow), which becomes ONNX ``If``: ``EarlyExitNet`` switches to its ``torch.cond`` routing
  while ``torch.compiler.is_exporting()``; the parts its branches run are captured one by one
  first (:func:`_captured_parts`);
- a model may name buffers that must stay named, editable initializers in the file
  (``onnx_initializers``, e.g. the exit thresholds). The onnxscript graph optimiser runs with those
  buffers held as graph inputs (:func:`_optimize_keeping`), so it cannot fold them into anonymous
  constants, and they are initializers again in the file. The optimiser must run: the exporter's
  raw graph keeps each BatchNormalization in a form ONNX Runtime does not fuse into the convolution
  before it, so a dynamic model would pay for a separate BatchNormalization and ReLU per layer that
  its static base does not;
- initializers read only inside an ``If`` branch are moved into that branch
  (:func:`_scope_initializers`): ONNX Runtime applies its blocked layout and convolution fusions
  only to convolutions whose weights are initializers of their own graph;
- T-Net layers compute their kernel from the shared factors while exporting (their inference cache
  keys on tensor versions, which ``torch.export`` cannot trace);
- int8 is not exported from a quantised PyTorch module: the float model is exported and ONNX
  Runtime's own quantiser quantises the file (:mod:`searchspace.methods.int8`), so the ONNX model
  is the measured and shipped one.

The legacy TorchScript-based exporter (:func:`legacy_to_onnx`, ``dynamo=False``) remains for one
case only: a model that exists only as TorchScript, which ``torch.export`` cannot take (a model
scripted because ``torch.export`` could not capture it, and the ``torch.ao`` int8 modules of the
PyTorch runtimes, whose quantised packed weights ``torch.export`` cannot capture).
:data:`LEGACY_REASON` is what the artifact's metadata records.

Every dynamo export builds its translation table from onnxscript's torchlib, and onnxscript 0.7
rebuilds the list of its ~500 functions (parsing each one's source to read its domain) on every
call: a quarter of each export of a small model (digits_cnn: 1.1 s per export without the cache,
0.85 s with it, idle machine; 1.2 s of 3-4 s under load). The list depends only on the installed
onnxscript, so :func:`_cache_torchlib_ops` keeps it for the process (trial workers and the screen
export many models each); the exported files are byte-identical (``tests/automl/test_onnx.py``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searchspace import DynamicInference

__all__ = ["ATOL", "INT8_AGREEMENT", "LEGACY_REASON", "OPSET", "compare", "export_program", "is_quantized", "legacy_to_onnx", "onnx_initializers", "to_onnx"]

#: Opset of the dynamo exporter's output (its translation table targets opset 18 and later).
OPSET = 18
#: Opset of the legacy (TorchScript-based) exporter.
LEGACY_OPSET = 17
#: Float models: largest absolute difference of ONNX Runtime's outputs from PyTorch's accepted.
ATOL = 1e-4
#: int8 models against another runtime's int8 (export's cross-check of ONNX with TorchScript):
#: fraction of test samples on which both must predict the same.
INT8_AGREEMENT = 0.99
#: Why a model goes through the legacy exporter (recorded in the artifact metadata and the card).
LEGACY_REASON = (
    "torch.export cannot capture a TorchScript module or a torch.ao quantised module (packed int8 "
    f"weights are TorchScript objects); checked on torch {torch.__version__.split('+')[0]}"
)


@functools.cache
def _torchlib_api_modules() -> tuple[Any, ...]:
    """onnxscript's per-torch-version API modules (``onnxscript._framework_apis.torch_2_*``); each
    re-exports ``get_torchlib_ops`` under its own name, and the exporter calls the one for its torch."""
    import importlib
    import pkgutil

    try:
        import onnxscript._framework_apis as package
    except ImportError:
        return ()
    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("torch_"):
            try:
                found.append(importlib.import_module(f"{package.__name__}.{info.name}"))
            except ImportError:
                continue
    return tuple(m for m in found if callable(getattr(m, "get_torchlib_ops", None)))


def _cache_torchlib_ops() -> None:
    """Keep onnxscript's torchlib function list for the process instead of rebuilding it per export.

    Every API module that names the function gets the same cached one (one cache per underlying
    function), so the exporter reads the cache whichever module it calls through. An onnxscript
    without these modules is left alone: exports are then only slower.
    """
    cached: dict[Any, Any] = {}
    for module in _torchlib_api_modules():
        ops = module.get_torchlib_ops
        if hasattr(ops, "cache_info"):
            continue
        if ops not in cached:
            cached[ops] = functools.cache(ops)
        module.get_torchlib_ops = cached[ops]


def onnx_initializers(model: nn.Module) -> tuple[str, ...]:
    """Buffer names (last path component) that ``model`` or one of its submodules declares must stay
    named initializers in the ONNX file (``onnx_initializers`` class attribute)."""
    names: list[str] = []
    for m in model.modules():
        for n in getattr(m, "onnx_initializers", ()):
            if n not in names:
                names.append(n)
    return tuple(names)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` (eval mode, CPU) captured by ``torch.export`` with a dynamic batch axis.

    Captured with autograd off: the program is the same, and a ``torch.cond`` whose branches read
    parameters that require grad is otherwise traced again for autograd (its schema, built by
    tracing both branches, is checked for in-place writes) and through its autograd wrapper.

    A dynamic model (:class:`searchspace.DynamicInference`) is captured with the parts its branches
    run replaced by their own captures (:func:`_captured_parts`), and whole where that fails.

    Raises whatever ``torch.export`` raises for a model it cannot capture; the caller records it.
    """
    model = model.eval()
    with torch.no_grad():
        model(example)  # fill inference-time caches (T-Net's kernels) as inference would
        # Traced on two samples: torch.export specialises a dimension of size 1 to the constant 1.
        pair = example[:1].expand(2, *example.shape[1:]).contiguous()
        if not isinstance(model, DynamicInference):
            return _export(model, pair)
        parts = _captured_parts(model, pair)
        try:
            with _swapped(model, parts):
                return _export(model, pair)
        except Exception:  # noqa: BLE001 - a part captured at other sizes than the branch calls it with
            if not parts:
                raise
        return _export(model, pair)


def _export(model: nn.Module, pair: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model, (pair,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))


def _captured_parts(model: Any, pair: torch.Tensor) -> dict[str, nn.Module]:
    """Each of ``model.export_parts()`` captured alone by ``torch.export`` (functional ATen, shared
    parameters), by name: what a ``torch.cond`` branch can hold whatever the part's Python does.

    Inside a ``torch.cond`` branch the part is traced again (Dynamo), where in-place writes cannot
    be functionalised for the ONNX decomposition (Swin V2's attention mask) and functions that
    non-strict export patches (``torch.fx.wrap``: Swin's ``shifted_window_attention``) break
    Dynamo's guards; a captured part has neither. A part is captured on the inputs the last exit
    path gives it (the batch axis dynamic, any other axis where its calls differ left to
    ``torch.export``) and kept only where the capture reproduces every call; the others stay as
    they are.
    """
    names = list(model.export_parts())
    calls: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
                calls[name].append(args[0].clone())  # as called, whatever the part writes in place

        return hook

    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name), with_kwargs=True) for name in names]
    try:
        model.exit_paths()[-1](pair)  # the path that runs every part
    finally:
        for hook in hooks:
            hook.remove()
    captured: dict[str, nn.Module] = {}
    for name, inputs in calls.items():
        if not inputs:
            continue
        part, first = model.get_submodule(name), inputs[0]
        if any(t.dim() != first.dim() for t in inputs):
            continue
        dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
        dims.update({d: torch.export.Dim.AUTO for d in range(1, first.dim()) if any(t.shape[d] != first.shape[d] for t in inputs)})
        try:
            graph = torch.export.export(part, (first,), dynamic_shapes=(dims,)).module()
            same = all(torch.allclose(graph(t), part(t), rtol=1e-5, atol=1e-6) for t in inputs)
        except Exception:  # noqa: BLE001 - the part stays as it is; the whole model's export says why if it must
            continue
        if same:
            captured[name] = graph
    return captured


@contextlib.contextmanager
def _swapped(model: nn.Module, parts: dict[str, nn.Module]) -> Iterator[None]:
    """``model`` with the named submodules replaced by ``parts`` while the block runs."""
    held = {name: model.get_submodule(name) for name in parts}
    try:
        for name, part in parts.items():
            model.set_submodule(name, part)
        yield
    finally:
        for name, part in held.items():
            model.set_submodule(name, part)


def to_onnx(model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor, path: Path, *, keep: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Write ``model`` as ONNX (opset :data:`OPSET`, dynamic batch axis, input ``input``, output
    ``logits``) with the dynamo exporter; a ``ScriptModule`` goes through :func:`legacy_to_onnx`.

    Args:
        model: the eager module, or its ``torch.export`` program (:func:`export_program`).
        keep: buffer names to keep as named initializers (default: what the module declares,
            :func:`onnx_initializers`; pass them when ``model`` is a program).

    Returns:
        What made the file (exporter, opset, torch version, and why the legacy exporter where it was).

    Raises whatever the exporter raises for a graph it cannot export; the caller records it.
    """
    version = torch.__version__.split("+")[0]
    path = Path(path)
    if isinstance(model, torch.jit.ScriptModule):
        legacy_to_onnx(model, example, path, keep=keep or ("threshold", "thresholds"))
        return {"exporter": "torchscript (legacy, dynamo=False)", "opset": LEGACY_OPSET, "torch": version, "reason": LEGACY_REASON}
    if keep is None:
        keep = onnx_initializers(model) if isinstance(model, nn.Module) else ()
    program = model if isinstance(model, torch.export.ExportedProgram) else export_program(model, example)
    _cache_torchlib_ops()
    with torch.no_grad():  # the exporter re-traces the program (decompositions): as in export_program
        onnx_program = torch.onnx.export(
            program,
            (),
            input_names=["input"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            optimize=not keep,
            verbose=False,
        )
    if keep:
        _optimize_keeping(onnx_program.model, keep)
    _scope_initializers(onnx_program.model, keep)
    _drop_trace_metadata(onnx_program.model)
    onnx_program.save(str(path), external_data=False)
    return {"exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET, "torch": version, "optimized": True, "named_initializers": list(keep)}


def _optimize_keeping(model: Any, keep: tuple[str, ...]) -> None:
    """Run the onnxscript optimiser on ``model`` (an ``onnxscript.ir.Model``, in place) without
    folding the initializers whose last name part is in ``keep``: they are graph inputs while it
    runs (values it cannot know), then initializers again under their own names."""
    import onnxscript.optimizer

    graph = model.graph
    held = [v for name, v in list(graph.initializers.items()) if name.rsplit(".", 1)[-1] in keep]
    for value in held:
        graph.initializers.pop(value.name)
        graph.inputs.append(value)
    try:
        onnxscript.optimizer.optimize(model)
    finally:
        for value in held:
            graph.inputs.remove(value)
            graph.register_initializer(value)


def _scope_initializers(model: Any, keep: tuple[str, ...] = ()) -> int:
    """Move every initializer that only nodes inside one subgraph (an ``If`` branch) read into that
    subgraph, the innermost one holding all its uses; return how many moved.

    ONNX Runtime's layout and fusion transformers take a convolution's weights as constant only when
    they are initializers of the graph the convolution is in: weights read from an outer scope leave
    the convolution in the plain NCHW kernel, unfused with the residual Add, without the blocked
    (NCHWc) layout the same layer gets in a static graph. The exporter puts every initializer in the
    main graph, so without this move the stages after an early exit would run slower than the same
    stages in the base. Initializers named in ``keep`` stay in the main graph, where the artifact's
    settings are written (:func:`automl._artifact._rebind`).
    """
    import onnx_ir as ir

    parent: dict[Any, Any] = {}

    def index(graph: Any) -> None:
        for node in graph:
            for attr in node.attributes.values():
                subs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
                for sub in subs:
                    parent[sub] = graph
                    index(sub)

    index(model.graph)
    if not parent:
        return 0

    def lineage(graph: Any) -> list[Any]:
        out = [graph]
        while out[-1] in parent:
            out.append(parent[out[-1]])
        return out[::-1]  # main graph first

    moved = 0
    main = model.graph
    for value in list(main.initializers.values()):
        if value.name.rsplit(".", 1)[-1] in keep or value in main.outputs or not value.uses():
            continue
        chains = [lineage(node.graph) for node, _ in value.uses()]
        home = main
        for depth in range(1, min(len(c) for c in chains)):
            if any(c[depth] is not chains[0][depth] for c in chains):
                break
            home = chains[0][depth]
        if home is not main:
            main.initializers.pop(value.name)
            home.register_initializer(value)
            moved += 1
    return moved


def _drop_trace_metadata(model: Any) -> None:
    """Remove the exporter's per-node debug metadata (``pkg.torch.onnx.*``, ``pkg.onnxscript.*``).

    The dynamo exporter annotates every node with the Python stack trace, source paths and FX
    node text of the machine that exported it: a shipped file would carry the user's file paths and
    source lines, and about 5 % of a small model's bytes that no runtime reads.
    """
    from onnx_ir import traversal

    for node in traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()


# --- the legacy TorchScript-based exporter ------------------------------------------------
#
# Legacy notes (kept for the one case above): a saved-and-reloaded ScriptModule carries no tensor
# dtypes, so it is frozen first (``torch.jit.freeze``) for the exporter's shape inference; dynamic
# int8 Linear (``quantized::linear_dynamic``) has no PyTorch symbolic and is written here as
# QuantizeLinear + MatMulInteger with PyTorch's own arithmetic (reduce_range activation scale);
# static int8 uses PyTorch's symbolics, which round differently from fbgemm by about one
# quantisation step (``benchmarks/int8_onnx_rounding.py``).


_DYNAMIC_LINEAR: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}


def is_quantized(model: torch.jit.ScriptModule) -> bool:
    """Whether the model runs torch.ao quantised kernels (``quantized::`` ops, packed int8 weights)."""
    return "quantized::" in str(model.inlined_graph)


def _packed_linears(model: torch.jit.ScriptModule) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Graph parameter name -> (int8 weight (out, in), per-output scale, float bias) of every dynamic
    int8 Linear; the name is the attribute path the exporter gives the packed weights."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    for name, m in model.named_modules():
        packed = getattr(getattr(m, "_packed_params", None), "_packed_params", None)
        if not isinstance(packed, torch.ScriptObject) or "Linear" not in str(packed._type()):
            continue
        weight, bias = torch.ops.quantized.linear_unpack(packed)
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale = weight.q_per_channel_scales().float()
            if bool((weight.q_per_channel_zero_points() != 0).any()):
                continue  # asymmetric int8 weights: left to the exporter, which then says it cannot
        else:
            if weight.q_zero_point() != 0:
                continue
            scale = torch.full((weight.shape[0],), weight.q_scale(), dtype=torch.float32)
        out[f"{name}._packed_params._packed_params" if name else "_packed_params._packed_params"] = (
            weight.int_repr(), scale, None if bias is None else bias.detach().float(),
        )
    return out


def _linear_dynamic_symbolic(g: Any, x: Any, packed: Any, reduce_range: Any) -> Any:
    key = packed.debugName()
    if key not in _DYNAMIC_LINEAR:
        raise RuntimeError(f"dynamic int8 Linear {key!r} has weights this exporter cannot read (asymmetric int8 weights)")
    weight, w_scale, bias = _DYNAMIC_LINEAR[key]
    from torch.onnx import symbolic_helper

    rr = symbolic_helper._maybe_get_const(reduce_range, "b")
    qmax = 127.0 if (rr is None or bool(rr)) else 255.0  # PyTorch's module passes reduce_range=True

    def const(t: torch.Tensor) -> Any:
        return g.op("Constant", value_t=t)

    zero = const(torch.tensor(0.0))
    lo = g.op("Min", g.op("ReduceMin", x, keepdims_i=0), zero)
    hi = g.op("Max", g.op("ReduceMax", x, keepdims_i=0), zero)
    scale = g.op("Div", g.op("Sub", hi, lo), const(torch.tensor(qmax)))
    # All-zero input: any positive scale gives the exact result (PyTorch uses 0.1).
    scale = g.op("Where", g.op("Greater", scale, zero), scale, const(torch.tensor(0.1)))
    zp = g.op("Clip", g.op("Round", g.op("Div", g.op("Neg", lo), scale)), zero, const(torch.tensor(qmax)))
    zp = g.op("Cast", zp, to_i=2)  # uint8
    xq = g.op("QuantizeLinear", x, scale, zp)
    acc = g.op("MatMulInteger", xq, const(weight.t().contiguous()), zp, const(torch.tensor(0, dtype=torch.int8)))
    y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", scale, const(w_scale)))
    if bias is not None:
        y = g.op("Add", y, const(bias))
    return y


def legacy_to_onnx(model: torch.jit.ScriptModule, example: torch.Tensor, path: Path, *, keep: tuple[str, ...] = ()) -> None:
    """Write a TorchScript model as ONNX with the TorchScript-based exporter (see :data:`LEGACY_REASON`).

    ``keep``: buffer names (last path component) left as named initializers instead of being frozen.
    Raises whatever the exporter raises for a graph it cannot export; the caller records it.
    """
    quantized = is_quantized(model)
    keep = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] in keep]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # freeze is "deprecated" with the rest of TorchScript
        # optimize_numerics=False: no conv-BN folding or other rewrites that change the numbers.
        target: Any = model if quantized else torch.jit.freeze(model.eval(), preserved_attrs=keep, optimize_numerics=False)
    _DYNAMIC_LINEAR.clear()
    _DYNAMIC_LINEAR.update(_packed_linears(model))
    registered = bool(_DYNAMIC_LINEAR)
    if registered:
        torch.onnx.register_custom_op_symbolic("quantized::linear_dynamic", _linear_dynamic_symbolic, LEGACY_OPSET)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                target,
                (example,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=LEGACY_OPSET,
            )
    finally:
        if registered:
            torch.onnx.unregister_custom_op_symbolic("quantized::linear_dynamic", LEGACY_OPSET)
        _DYNAMIC_LINEAR.clear()


def compare(max_abs_diff: float, agree: int, total: int, correct_onnx: int, correct_torch: int, *, quantized: bool) -> str | None:
    """None if the ONNX model may ship in place of the TorchScript one, else why not.

    Float models: every output within :data:`ATOL` of PyTorch's. int8 models: ONNX Runtime's integer
    kernels round differently from fbgemm (see the module docstring), so logits differ by about a
    quantisation step; they ship when they reach the same test accuracy as PyTorch and make the same
    prediction on at least :data:`INT8_AGREEMENT` of the test samples; the card records both and the
    largest logit difference.
    """
    if not quantized:
        if max_abs_diff <= ATOL:
            return None
        return f"ONNX Runtime outputs differ from PyTorch by {max_abs_diff:.3g} > {ATOL:g}"
    if correct_onnx == correct_torch and agree >= INT8_AGREEMENT * total:
        return None
    return (
        f"int8: ONNX Runtime predicts differently from PyTorch on {total - agree} of {total} test samples "
        f"(accuracy {correct_onnx / max(total, 1):.4f} vs {correct_torch / max(total, 1):.4f}; max logit difference {max_abs_diff:.3g})"
    )
