"""The layout of a model brought whole, found from its traced graph: stages and a classifier head.

A user's module (or a torchvision / timm model) comes without a declared layout, yet early exits
attach after stages and iSQRT-COV replaces the head on the last feature map. The layout is read off
the model's ``torch.fx`` graph (:func:`find_layout`):

1. The forward pass is traced (``torch.fx``; a module without submodules, and timm's own leaf
   modules and wrapped functions where timm is loaded, stay whole), in eval and in training mode. A
   traced graph freezes every ``self.training`` it reads: a functional dropout given
   ``training=self.training`` (timm's classifier dropout) becomes the matching ``nn.Dropout``
   module, which reads the mode when it runs; any other module whose forward reads it (stochastic
   depth) is kept whole; a model whose own forward reads it otherwise is refused.
2. Shapes are propagated through the graph (on fake tensors: no arithmetic) for one example of the
   input shape, and again at twice its size: a channels-first tensor whose positions grow with the
   input is a *feature map* (for a model of one fixed input size, every tensor of rank >= 3 is).
3. A *cut* is a node after which a single tensor carries everything forward (no other value computed
   so far is used later): splitting there passes one tensor from one part to the next, so the parts
   composed compute exactly the original function.
4. The head is everything after the last feature map, which must be a cut (the model's
   global pooling, flatten and classifier follow). The stages end at the last cut of each resolution
   before the resolution drops, and the last stage ends at the head.

Each stage and the head is a :class:`torch.fx.GraphModule` holding the original submodules under
their own qualified names, so a stage's state-dict keys are the library's (or the factory module's)
keys, and both exports (``torch.export``, TorchScript) take them as they take any module. The found
parts compute the model's function by construction (each is a contiguous range of the graph's nodes,
and a value needed across a cut is refused), and every entry of the model's state dict must be in
exactly one part. The search is deterministic (tracing and shapes only), so a model rebuilt from a
plan gets the same layout.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
import torch.nn.functional as F

from searchspace._reason import first_line

__all__ = ["Layout", "LayoutError", "find_layout"]


class LayoutError(ValueError):
    """No layout was found; ``str(err)`` says why in one line."""


@dataclass(frozen=True)
class Layout:
    """Stages and head of a model, and where they were cut."""

    #: Feature extractors in order; each maps one tensor to one tensor.
    stages: list[fx.GraphModule]
    #: Maps the last stage's feature map to the model's output (global pooling, flatten, classifier).
    head: fx.GraphModule
    #: Name of the graph node each stage ends at, and its feature shape on the example (no batch).
    ends: list[tuple[str, tuple[int, ...]]]


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer, with weight-holding layers and the modules and functions timm marks as
    not traceable kept whole."""

    def __init__(self, leaves: tuple[type, ...] = ()) -> None:
        self._leaves: tuple[type, ...] = leaves
        functions: tuple[Any, ...] = ()
        if "timm" in sys.modules:  # only a timm model can hold timm's modules; never import it for others
            try:
                from timm.layers import _fx as timm_fx

                self._leaves += tuple(timm_fx.get_notrace_modules())
                functions = tuple(timm_fx.get_notrace_functions())
            except (ImportError, AttributeError):
                pass
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A module with no submodules (a library's Linear or Conv2d subclass, a user's custom layer)
        # stays one module: methods find layers by their module type, a traced-through layer would
        # leave only a bare parameter holder behind, and its forward runs as written (tracing would
        # run its Python once, at trace time, and keep only the tensor operations it recorded).
        return next(m.children(), None) is None or isinstance(m, self._leaves) or super().is_leaf_module(m, module_qualified_name)


def _trace(net: nn.Module, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    graph = _Tracer(leaves).trace(net)
    return fx.GraphModule(net, graph, class_name=type(net).__name__)


#: Most module types kept whole because their forward reads ``self.training``.
MAX_MODE_LEAVES = 8
#: Functional dropouts and the module that computes each with the mode it runs in.
MODE_DROPOUTS: dict[Any, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout, F.feature_alpha_dropout: nn.FeatureAlphaDropout,
}


def _mode_dropouts(evaluated: fx.GraphModule, trained: fx.GraphModule) -> None:
    """Replace, in both graphs, each functional dropout whose ``training`` argument is all that
    differs between the modes by a dropout module (added to each graph module) at the same place."""
    a, b = list(evaluated.graph.nodes), list(trained.graph.nodes)
    if len(a) != len(b):
        return
    for i, (x, y) in enumerate(zip(a, b)):
        if x.op != "call_function" or y.op != "call_function" or x.target is not y.target or x.target not in MODE_DROPOUTS:
            continue
        nx, ny = x.normalized_arguments(evaluated, normalize_to_only_use_kwargs=True), y.normalized_arguments(trained, normalize_to_only_use_kwargs=True)
        if nx is None or ny is None:
            continue
        kx, ky = dict(nx.kwargs), dict(ny.kwargs)
        if kx.pop("training", True) == ky.pop("training", True) or str(kx) != str(ky) or not isinstance(kx.get("p", 0.5), float):
            continue
        for gm, n, kw in ((evaluated, x, kx), (trained, y, ky)):
            name = f"mode_dropout_{i}"
            gm.add_submodule(name, MODE_DROPOUTS[n.target](p=kw.get("p", 0.5), inplace=bool(kw.get("inplace", False))))
            with gm.graph.inserting_before(n):
                module = gm.graph.call_module(name, (kw["input"],))
            n.replace_all_uses_with(module)
            gm.graph.erase_node(n)
    evaluated.recompile()
    trained.recompile()


def _trace_both_modes(net: nn.Module) -> fx.GraphModule:
    """The graph of ``net``'s forward, the same in eval and training mode.

    A traced graph freezes every ``self.training`` it reads; a module whose forward reads it
    (stochastic depth, a block's own dropout) is therefore kept whole (a leaf, whose forward runs
    as written), found where the two modes' graphs first differ, and the model traced again.

    Raises:
        LayoutError: the model cannot be traced, or its own forward (not a submodule's) reads the mode.
    """
    leaves: tuple[type, ...] = ()
    for _ in range(MAX_MODE_LEAVES + 1):
        try:
            net.eval()
            evaluated = _trace(net, leaves)
            net.train()
            trained = _trace(net, leaves)
        except Exception as exc:  # noqa: BLE001 - any trace failure is the reason the layout is unknown
            raise LayoutError(f"torch.fx cannot trace its forward ({first_line(exc)})") from exc
        finally:
            net.eval()
        if evaluated.code != trained.code:
            _mode_dropouts(evaluated, trained)
        if evaluated.code == trained.code:
            return evaluated
        a, b = list(evaluated.graph.nodes), list(trained.graph.nodes)
        pair = next(((x, y) for x, y in zip(a, b) if x.format_node() != y.format_node()), (a[-1], b[-1]))
        found: list[type] = []
        for n in pair:
            stack = list((n.meta.get("nn_module_stack") or {}).values())
            if n.op == "call_module":
                stack = stack[:-1]  # the called layer itself: its caller is the module that differs
            if stack and isinstance(stack[-1][1], type) and stack[-1][1] not in leaves:
                found.append(stack[-1][1])
        if not found or len(leaves) >= MAX_MODE_LEAVES:
            raise LayoutError(f"its forward branches on training mode at {pair[0].name}, which a traced graph would freeze")
        leaves += tuple(dict.fromkeys(found))
    raise AssertionError("unreachable: the loop returns or raises")


class _Shapes(fx.Interpreter):
    """Runs a graph and records each node's output shape (a tuple of ints; None for a non-tensor)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n.name] = tuple(int(s) for s in result.shape) if isinstance(result, torch.Tensor) else None
        return result


def _shapes(gm: fx.GraphModule, x: torch.Tensor, *, real: bool = True) -> dict[str, Any]:
    """Node name -> its output's shape on input ``x`` (None where it is not a tensor).

    Run on fake tensors (shapes only, no arithmetic: a large model costs milliseconds), and for real
    (when ``real``) where an op needs real values.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    # A failing op is expected here (a model of one fixed input size, at twice the size); the fake
    # tensor module would log its traceback as an error before the exception reaches us.
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            interpreter = _Shapes(gm)
            interpreter.run(mode.from_tensor(x))
            return interpreter.shapes
    except Exception:  # noqa: BLE001 - an op fake tensors cannot run (data-dependent): run it for real
        if not real:
            raise
    finally:
        quiet.setLevel(level)
    interpreter = _Shapes(gm)
    with torch.no_grad():
        interpreter.run(x)
    return interpreter.shapes


def _example(input_shape: Sequence[int], scale: int) -> torch.Tensor:
    shape = [int(s) for s in input_shape]
    # Every axis but the channels is scaled (a 1-D sample's single axis is its length).
    sizes = [shape[0], *(s * scale for s in shape[1:])] if len(shape) > 1 else [shape[0] * scale]
    return torch.randn(1, *sizes, generator=torch.Generator().manual_seed(0))


def _is_tensor(shape: Any) -> bool:
    return isinstance(shape, tuple)


def _cuts(nodes: list[fx.Node], index: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes after which their own output is the only value still needed later (get_attr nodes,
    constants a part can read for itself, do not count)."""
    live = [0] * (len(nodes) + 1)
    for n in nodes:
        if n.op == "get_attr" or not n.users:
            continue
        last = max(index[u] for u in n.users)
        live[index[n]] += 1
        live[last] -= 1
    out: set[fx.Node] = set()
    running = 0
    for i, n in enumerate(nodes):
        running += live[i]
        if running == 1 and n.op != "get_attr" and n.users and max(index[u] for u in n.users) > i:
            out.add(n)
    return out


def _part(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node, name: str) -> fx.GraphModule:
    """The nodes as their own GraphModule taking ``source``'s value and returning the last node's."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise LayoutError(f"node {n.name} is needed across a cut")
            env[n] = graph.get_attr(n.target)  # type: ignore[arg-type]
        return env[n]

    for n in nodes:
        if n.op == "get_attr":
            continue  # created where it is used, so a part holds only the attributes it reads
        env[n] = graph.node_copy(n, arg)
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph, class_name=name)


def find_layout(net: nn.Module, input_shape: Sequence[int]) -> Layout:
    """Stages and head of ``net`` from its traced graph (see the module docstring).

    Args:
        net: the model, mapping a batch of ``input_shape`` samples to logits.
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``.

    Raises:
        LayoutError: the model cannot be traced, or its graph has no last feature map carried by a
            single tensor; the message says which, in one line.
    """
    was = net.training
    try:
        gm = _trace_both_modes(net)
        try:
            small = _shapes(gm, _example(input_shape, 1))
        except Exception as exc:  # noqa: BLE001
            raise LayoutError(f"its traced graph does not run on one input of shape {tuple(input_shape)} ({first_line(exc)})") from exc
        try:
            large: dict[str, Any] | None = _shapes(gm, _example(input_shape, 2), real=False)
        except Exception:  # noqa: BLE001 - a model of one fixed input size: its feature maps are the >= 3-D tensors
            large = None
        return _split(gm, small, large, input_shape, set(net.state_dict()))
    finally:
        net.train(was)


def _split(gm: fx.GraphModule, small: dict[str, Any], large: dict[str, Any] | None, input_shape: Sequence[int], whole: set[str]) -> Layout:
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise LayoutError(f"its forward takes {len(inputs)} inputs; a layout is found for one")
    output = nodes[-1]
    result = output.args[0]
    if not isinstance(result, fx.Node) or not _is_tensor(small.get(result.name)):
        raise LayoutError("its forward does not return a single tensor")

    def spatial(n: fx.Node) -> bool:
        shape = small.get(n.name)
        if not _is_tensor(shape) or len(shape) < 3:
            return False
        if large is None:
            return True
        other = large.get(n.name)
        # Channels first: the channels stay, a position axis grows with the input (a channels-last
        # tensor inside a block, as ConvNeXt's, is not a feature map to cut at).
        return _is_tensor(other) and len(other) == len(shape) and other[1] == shape[1] and other[2:] != shape[2:]

    cuts = _cuts(nodes, index)
    maps = [n for n in nodes if n.op != "placeholder" and spatial(n)]
    if not maps:
        raise LayoutError("its traced graph has no feature map that changes with the input's size")
    last = maps[-1]
    if last not in cuts or last is result:
        raise LayoutError(f"its last feature map ({last.name}) is not the single tensor its classifier reads")
    features = [n for n in nodes[1 : index[last] + 1] if n in cuts and spatial(n) and n.op != "placeholder"]
    area = lambda n: math.prod(small[n.name][2:])  # noqa: E731
    ends = [a for a, b in zip(features, features[1:]) if area(b) < area(a)] + [last]

    stages: list[fx.GraphModule] = []
    start = inputs[0]
    for end in ends:
        stages.append(_part(gm, nodes[index[start] + 1 : index[end] + 1], start, "Stage"))
        start = end
    head = _part(gm, nodes[index[last] + 1 : index[result] + 1], last, "Head")
    layout = Layout(stages=stages, head=head, ends=[(e.name, small[e.name][1:]) for e in ends])
    _check(layout, whole)
    return layout


def _check(layout: Layout, whole: set[str]) -> None:
    """The parts hold every state entry of the model exactly once.

    That they compute the model's function needs no run: each part is a copy of a contiguous range
    of the graph's nodes, in order, and :func:`_part` refuses any value needed across a cut.
    """
    keys: list[str] = [k for part in (*layout.stages, layout.head) for k in part.state_dict()]
    if len(keys) != len(set(keys)):
        shared = next(k for k in keys if keys.count(k) > 1)
        raise LayoutError(f"its parameter {shared!r} is used on both sides of a cut")
    if set(keys) != whole:
        unused = sorted(whole - set(keys))
        raise LayoutError(f"its forward does not use every entry of its state dict (e.g. {unused[0]!r})" if unused else "its parts hold entries the model does not")
