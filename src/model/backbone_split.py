"""A backbone cut at a block boundary into real modules: the frozen prefix (normalized images -> the
activation at the cut) and the rest (that activation -> the backbone's pooled features).

The backbone's forward is traced once with ``torch.fx``, treating as calls what timm's own FX feature
extraction treats as calls (its registered leaf modules and functions) and every module whose code
reads ``self.training`` (BatchNorm-with-activation, drop-path, attention dropout), so those follow the
module's train/eval mode at run time instead of the mode at trace time. The cut is the output of the
module that finishes last among the largest modules whose parameters all lie in the first ``cut``
blocks (``src.model.backbone.backbone_blocks``); everything after it, parameter-free steps included,
is the rest. Both halves are ``GraphModule``s built on the backbone itself: they share its parameters
and buffers, so training the rest trains the backbone, and the model's ``state_dict`` is unchanged.
A backbone whose graph passes more than one value across the cut cannot be split there (one clear
error); each split is checked against the whole backbone on a probe image when it is made.
"""
from __future__ import annotations

import inspect
from functools import cache

import torch
from torch import fx, nn

from src.core.errors import InputError
from src.model.encoder_split import digest_state

NOT_SPLITTABLE = "set train.feature_cache: false and model.neighbour_radius: 0"


@cache
def _reads_training_flag(cls: type) -> bool:
    try:
        return "self.training" in inspect.getsource(cls)
    except (OSError, TypeError):  # no source (compiled or dynamic class): keep it a call
        return True


class _Tracer(fx.Tracer):
    def __init__(self):
        from timm.layers import get_notrace_functions

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        from timm.layers import is_notrace_module

        if super().is_leaf_module(module, qualified_name) or is_notrace_module(module):
            return True
        return not type(module).__module__.startswith("torch.") and _reads_training_flag(type(module))


def trace(backbone: nn.Module, name: str) -> fx.Graph:
    """The backbone's forward as a graph; extra forward arguments keep their defaults."""
    extra = list(inspect.signature(backbone.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in extra if p.default is not inspect.Parameter.empty}
    try:
        return _Tracer().trace(backbone, concrete_args=concrete or None)
    except Exception as err:  # torch.fx raises many kinds on code it cannot trace
        raise InputError(f"params: model.backbone = {name!r} cannot be traced to cut off its frozen blocks "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         f"{NOT_SPLITTABLE}") from None


def maximal_modules(backbone: nn.Module, params: set[str]) -> list[str]:
    """Paths of the largest submodules whose parameters all lie in ``params``."""
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}{child_name}"
            names = {f"{path}.{n}" for n, _ in child.named_parameters()}
            if not names:
                continue
            if names <= params:
                out.append(path)
            elif names & params:
                visit(path + ".", child)

    visit("", backbone)
    return out


class BackboneGraph:
    """The traced backbone, from which splits at any block boundary are cut (one trace per model)."""

    def __init__(self, backbone: nn.Module, blocks: list[list[str]], name: str):
        self.backbone, self.blocks, self.name = backbone, blocks, name
        self.nodes = list(trace(backbone, name).nodes)
        self._position = {node: i for i, node in enumerate(self.nodes)}

    def cut_position(self, cut: int) -> int:
        """Index of the node whose output is the activation after the first ``cut`` blocks."""
        if not 0 < cut <= len(self.blocks):
            raise ValueError(f"cut {cut} outside 1..{len(self.blocks)}")
        params = {name for block in self.blocks[:cut] for name in block}
        modules = set(maximal_modules(self.backbone, params))
        last = [i for i, node in enumerate(self.nodes) if modules & set(node.meta.get("nn_module_stack", {}))]
        if not last:
            raise InputError(f"params: model.backbone = {self.name!r}: its first {cut} blocks hold no module "
                             f"to cut after; {NOT_SPLITTABLE}")
        position = max(last)
        crossing = {n for n in self.nodes[: position + 1] if n.op != "get_attr"
                    and any(self._position[user] > position for user in n.users)}
        if crossing != {self.nodes[position]}:
            raise InputError(f"params: model.backbone = {self.name!r}: {len(crossing)} values cross the cut after "
                             f"block {cut} ({', '.join(sorted(n.name for n in crossing))}); {NOT_SPLITTABLE}")
        return position

    def segment(self, start: int | None, end: int | None) -> fx.GraphModule:
        """The nodes after ``start`` (its output becomes the input; None: from the images) through
        ``end`` (its output is returned; None: through the backbone's output)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        first = 0 if start is None else start + 1
        last = len(self.nodes) - 1 if end is None else end
        if start is not None:
            env[self.nodes[start]] = graph.placeholder("activation")

        def lookup(node: fx.Node) -> fx.Node:
            if node not in env:  # a parameter read before the cut and used after it: read it here too
                env[node] = graph.node_copy(node, lookup)
            return env[node]

        for node in self.nodes[first : last + 1]:
            if node.op == "placeholder" and start is not None:
                continue
            env[node] = graph.node_copy(node, lookup)
        if end is not None:
            graph.output(env[self.nodes[end]])
        module = fx.GraphModule(self.backbone, graph)
        module.graph.lint()
        return module


class BackboneSplit:
    """The backbone after its first ``cut`` blocks: ``prefix`` (images -> activation) and ``rest``
    (activation -> pooled features), real modules that share the backbone's weights; ``between``
    runs the blocks from a shallower cut to this one."""

    def __init__(self, graph: BackboneGraph, cut: int, probe: torch.Tensor | None = None):
        self.graph, self.cut = graph, cut
        self.position = graph.cut_position(cut)
        self.prefix = graph.segment(None, self.position)
        self.rest = graph.segment(self.position, None)
        if probe is not None:
            self._check(probe)

    @torch.no_grad()
    def _check(self, probe: torch.Tensor) -> None:
        """rest(prefix(x)) must be the backbone's own output, in eval mode (modes restored after)."""
        modes = {module: module.training for module in self.graph.backbone.modules()}
        self.graph.backbone.eval()
        try:
            whole, cut = self.graph.backbone(probe), self.rest(self.prefix(probe))
        finally:
            for module, mode in modes.items():
                module.training = mode
        if whole.shape != cut.shape or not torch.allclose(whole, cut, rtol=1e-4, atol=1e-5):
            raise InputError(f"params: model.backbone = {self.graph.name!r}: cut after block {self.cut}, it computes "
                             f"other features than whole; {NOT_SPLITTABLE}")

    def between(self, source: BackboneSplit) -> fx.GraphModule:
        """The module from ``source``'s cut activation to this cut's."""
        if source.graph is not self.graph or source.position >= self.position:
            raise ValueError(f"a cut after block {self.cut} cannot be reached from one after block {source.cut}")
        return self.graph.segment(source.position, self.position)

    def weights_digest(self) -> str:
        """Content hash of the prefix's parameters and buffers (BatchNorm statistics included)."""
        return digest_state(self.prefix)


def pool_positions(activation: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """A block's output (B x ...) -> B x C, the mean over its positions: B x C x H x W maps (B x H x W
    x C for ``channels_last`` backbones), B x L x C token sequences, or B x C as it is."""
    if activation.ndim == 2:
        return activation
    if activation.ndim == 3:
        return activation.mean(dim=1)
    if activation.ndim == 4:
        return activation.mean(dim=(1, 2) if channels_last else (2, 3))
    raise ValueError(f"cannot pool an activation of shape {tuple(activation.shape)}")
