"""timm backbones: creation (hub weights, a local file or random init) and their blocks in forward order."""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from src.core.errors import InputError
from src.core.sections import ModelConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm backbone without classifier: hub weights, a local weights file, or random init.

    A local file is loaded strictly (only the classifier's keys may be left out), so weights that do
    not fit the backbone are an error naming the first missing or unexpected keys, never a backbone
    left at random initialisation. Hub weights that cannot be fetched are one line, too."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would precede the one-line error
    try:
        backbone = timm.create_model(cfg.backbone, pretrained=cfg.pretrained and not cfg.weights, num_classes=0)
    except RuntimeError as err:  # unknown model name
        raise InputError(f"params: model.backbone = {cfg.backbone!r}: {str(err).splitlines()[0]}") from None
    except OSError as err:  # no hub access, or the hub has no such weights (FileNotFoundError is an OSError)
        if cfg.backbone.startswith("hf-hub:") and not (cfg.pretrained and not cfg.weights):
            # The weights are at hand (model.weights, or a checkpoint's state dict): what is missing is the
            # model's definition, which timm reads from the hub's config.json for every hf-hub: name.
            raise InputError(f"model.backbone = {cfg.backbone!r}: timm builds an hf-hub: model from its config.json "
                             f"on the Hugging Face hub, also when the weights come from elsewhere (model.weights, a "
                             f"checkpoint), and it could not be read ({type(err).__name__}); run once where the hub "
                             "is reachable (it is then cached), or name the timm architecture itself") from None
        raise InputError(f"params: model.pretrained = true: the weights of {cfg.backbone} could not be fetched "
                         f"from the hub ({type(err).__name__}); download them where the hub is reachable and set "
                         "model.weights to the file") from None
    finally:
        hub_log.setLevel(level)
    if cfg.weights:
        load_weights(backbone, Path(cfg.weights), cfg.backbone)
    return backbone


def load_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """A local state dict (``.safetensors``, ``.pt``/``.pth``/``.bin``), strictly: the classifier's
    keys are dropped (the backbone has none), every other key must match in name and shape."""
    where = f"params: model.weights = {str(path)!r}"
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is the same one-line error
        raise InputError(f"{where}: not a readable state dict ({type(err).__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{where}: holds a {type(state).__name__}, not a state dict")
    classifier = backbone.pretrained_cfg.get("classifier") or ""
    heads = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    state = {k: v for k, v in state.items() if not any(h and (k == h or k.startswith(h + ".")) for h in heads)}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})" if unexpected else ""]
        raise InputError(f"{where}: the weights do not fit {name}: keys " + "; ".join(p for p in parts if p))
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise InputError(f"{where}: the weights do not fit {name}: {key} has shape {tuple(value.shape)}, "
                             f"the backbone {tuple(own[key].shape)}")
    backbone.load_state_dict(state, strict=True)


def check_weights(cfg: ModelConfig) -> None:
    """Hub or file weights that cannot be had or do not fit: one line, before any trial or training."""
    if cfg.weights or cfg.pretrained:
        create_backbone(cfg)


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
