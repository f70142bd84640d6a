"""The frozen start of a backbone (its first ``cut`` blocks) as a unit: run it alone, record its
layout, or short-circuit it with stored activations. Used by the feature cache (``src.features``)
and by the neighbourhood descriptors of ``src.model``.

Works on anything with the model's shape (``backbone``, ``blocks``, ``cfg.backbone``,
``forward_features``), so ``src.model`` can use it without importing itself.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from src.errors import InputError

if TYPE_CHECKING:
    from src.model import SpatialCellModel


class _StopForward(Exception):
    """Raised by a hook once the cut activation is captured: the rest of the forward is skipped."""


class PrefixSplit:
    """The backbone's first ``cut`` blocks as swappable modules, and the activation at the cut."""

    def __init__(self, model: SpatialCellModel, cut: int):
        if not 0 < cut <= len(model.blocks):
            raise ValueError(f"cut {cut} outside 1..{len(model.blocks)}")
        self.model = model
        self.cut = cut
        prefix_params = {name for block in model.blocks[:cut] for name in block}
        self.modules = _maximal_modules(model.backbone, prefix_params)
        self.order: list[str] = []  # execution order of self.modules
        self.shapes: dict[str, tuple[int, ...]] = {}

    def adopt(self, recorded: PrefixSplit) -> PrefixSplit:
        """Take another instance's recorded layout (same architecture): no second recording run."""
        self.order, self.shapes = list(recorded.order), dict(recorded.shapes)
        self.modules = {name: self.model.backbone.get_submodule(name) for name in self.order}
        return self

    def weights_digest(self) -> str:
        """Content hash of the prefix's parameters and buffers (BatchNorm statistics)."""
        backbone = self.model.backbone
        tensors = [backbone.get_parameter(n) for block in self.model.blocks[: self.cut] for n in block]
        tensors += [b for n, b in backbone.named_buffers() if any(n.startswith(m + ".") for m in self.modules)]
        h = hashlib.sha1()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def cut_module(self) -> str:
        return self.order[-1]

    @torch.no_grad()
    def _record(self, images: torch.Tensor) -> None:
        """Run once: the prefix modules' execution order and output shapes. Parameter-free siblings
        that finish before the cut (a stem's activation and max-pool, ViT's position dropout) join
        the prefix, so none of the prefix computes on placeholders later."""
        candidates = dict(self.modules)
        for parent in {name.rpartition(".")[0] for name in self.modules}:
            owner = self.model.backbone.get_submodule(parent) if parent else self.model.backbone
            for child_name, child in owner.named_children():
                full = f"{parent}.{child_name}" if parent else child_name
                if full not in candidates and not list(child.parameters()):
                    candidates[full] = child
        finished: list[tuple[str, torch.Tensor]] = []

        def hook(name):
            def fn(module, args, output):
                finished.append((name, output))
            return fn

        handles = [m.register_forward_hook(hook(n)) for n, m in candidates.items()]
        try:
            self.model.backbone(images)
        finally:
            for handle in handles:
                handle.remove()
        last_prefix = max(i for i, (name, _) in enumerate(finished) if name in self.modules)
        for name, output in finished[: last_prefix + 1]:
            if not isinstance(output, torch.Tensor):
                raise InputError(f"train.feature_cache: {self.model.cfg.backbone} module {name} "
                                 "returns no tensor; set train.feature_cache: false")
            if name not in self.shapes:
                self.order.append(name)
                self.shapes[name] = tuple(output.shape[1:])
        self.modules = {name: candidates[name] for name in self.order}

    @torch.no_grad()
    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The activation at the cut for a batch of normalized images (uncached path)."""
        if not self.order:
            self._record(images[:1])
        captured = {}

        def grab(module, args, output):
            captured["out"] = output
            raise _StopForward

        handle = self.modules[self.cut_module].register_forward_hook(grab)
        try:
            self.model.backbone(images)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["out"]

    @contextlib.contextmanager
    def substitute(self, cached: torch.Tensor):
        """Within the block, the backbone's prefix returns ``cached`` instead of computing it."""
        batch = cached.shape[0]
        originals = {}
        for name, module in self.modules.items():
            originals[name] = module.forward
            if name == self.cut_module:
                module.forward = lambda *a, **k: cached
            else:  # never read: an expanded zero costs no memory and no compute
                shape = self.shapes[name]
                module.forward = lambda *a, _s=shape, **k: cached.new_zeros(()).expand(batch, *_s)
        try:
            yield
        finally:
            for name, module in self.modules.items():
                module.forward = originals[name]

    def features(self, cached: torch.Tensor, input_size: int) -> torch.Tensor:
        """Pooled backbone features from cached activations (runs only the blocks after the cut)."""
        dummy = cached.new_zeros(()).expand(cached.shape[0], 3, input_size, input_size)  # never read
        with self.substitute(cached):
            return self.model.forward_features(dummy)


def _maximal_modules(backbone: nn.Module, prefix_params: set[str]) -> dict[str, nn.Module]:
    """Largest submodules whose parameters all lie in the prefix (children of mixed modules)."""
    out: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            names = {f"{full}.{n}" for n, _ in child.named_parameters()}
            if not names:
                continue
            if names <= prefix_params:
                out[full] = child
            elif names & prefix_params:
                visit(full + ".", child)

    visit("", backbone)
    return out


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
