"""timm backbones: creation (hub weights, a local file or random init) and their blocks in forward order."""
from __future__ import annotations

from pathlib import Path

import timm
from timm.models import group_parameters
from torch import nn

from src.core.config import ModelConfig
from src.core.errors import InputError

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm backbone without classifier: hub weights, a local weights file, or random init."""
    kwargs: dict = {"num_classes": 0}
    if cfg.weights:
        path = Path(cfg.weights)
        if not path.is_file():
            raise InputError(f"params: model.weights = {cfg.weights!r}: file not found")
        # timm loads .safetensors or .pt/.pth (torch.load with weights_only) and drops the classifier.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    else:
        kwargs["pretrained"] = cfg.pretrained
    try:
        return timm.create_model(cfg.backbone, **kwargs)
    except RuntimeError as err:  # unknown model name, or a weights file that does not fit it
        raise InputError(f"params: model.backbone = {cfg.backbone!r}: {str(err).splitlines()[0]}") from None


def backbone_blocks(backbone: nn.Module) -> list[list[str]]:
    """The backbone's blocks in forward order, as lists of parameter names.

    Uses timm's fine-grained ``group_matcher`` (stem, then one group per residual/transformer block),
    so it works for ResNet, ConvNeXt, ViT, EfficientNet, ... A trailing group holding only
    normalization layers (ConvNeXt's ``head.norm``) belongs to the last block.
    """
    groups = [names for names in group_parameters(backbone, backbone.group_matcher(coarse=False)).values()]
    if len(groups) > 1 and all(_is_norm_param(backbone, n) for n in groups[-1]):
        norms = groups.pop()
        groups[-1] = groups[-1] + norms
    return groups


def _is_norm_param(model: nn.Module, param_name: str) -> bool:
    module = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return isinstance(module, _NORM_TYPES)


def backbone_block_count(name: str) -> int:
    """How many blocks ``backbone_blocks`` finds in the timm model ``name`` (random weights)."""
    try:
        return len(backbone_blocks(timm.create_model(name, pretrained=False, num_classes=0)))
    except RuntimeError as err:
        raise InputError(f"params: model.backbone = {name!r}: {str(err).splitlines()[0]}") from None
