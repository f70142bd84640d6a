"""timm backbones: creation from their encoder preset (hub weights, a local file or folder, or random init)
and their blocks in forward order."""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from src.core.errors import InputError
from src.core.sections import ModelConfig
from src.model.encoders import Encoder, embed, layer_args, resolve_encoder, weights_file, weights_of

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def create_backbone(cfg: ModelConfig, encoder: Encoder | None = None, weights_follow: bool = False) -> nn.Module:
    """timm backbone without classifier, built as its encoder preset says: hub weights, a local weights
    file or folder, or random init.

    A local file is loaded strictly (only the classifier's keys may be left out), so weights that do
    not fit the backbone are an error naming the first missing or unexpected keys, never a backbone
    left at random initialisation. Hub weights that cannot be fetched are one line, too. A pathology
    encoder without weights is an error, unless ``weights_follow`` (a checkpoint's state dict fills it)."""
    encoder = encoder or resolve_encoder(cfg.backbone, cfg.weights)
    weights = weights_of(cfg.backbone, cfg.weights)
    from_hub = cfg.pretrained and not weights
    if encoder.foundation and not (from_hub or weights or weights_follow):
        raise InputError(f"params: model.backbone = {cfg.backbone!r} is a pathology encoder: it needs its weights "
                         f"(model.pretrained: true reads hf-hub:{encoder.hub}, gated: accept its terms and log "
                         "in; or model.weights: a local file or hub-style folder)")
    name = f"hf-hub:{encoder.hub}" if from_hub and encoder.hub else encoder.architecture
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would precede the one-line error
    try:
        # Weights that replace the random init must not draw from the global generator either: a model
        # then starts from the same state whether its backbone is built here or shared (frozen_backbone).
        with torch.random.fork_rng(devices=[], enabled=bool(weights) or from_hub):
            backbone = timm.create_model(name, pretrained=from_hub, num_classes=0, **layer_args(encoder.args))
    except (RuntimeError, TypeError) as err:  # unknown model name, or arguments it does not take
        raise InputError(f"params: model.backbone = {cfg.backbone!r}: {str(err).splitlines()[0]}") from None
    except OSError as err:  # no hub access, or the hub has no such weights (FileNotFoundError is an OSError)
        if name.startswith("hf-hub:") and not from_hub:
            # The weights are at hand (model.weights, or a checkpoint's state dict): what is missing is the
            # model's definition, which timm reads from the hub's config.json for every hf-hub: name.
            raise InputError(f"model.backbone = {cfg.backbone!r}: timm builds an hf-hub: model from its config.json "
                             f"on the Hugging Face hub, also when the weights come from elsewhere (model.weights, a "
                             f"checkpoint), and it could not be read ({type(err).__name__}); run once where the hub "
                             "is reachable (it is then cached), or name the timm architecture itself") from None
        raise InputError(f"params: model.pretrained = true: the weights of {cfg.backbone} could not be fetched "
                         f"from the hub ({type(err).__name__}); download them where the hub is reachable and set "
                         "model.weights to the file or folder") from None
    finally:
        hub_log.setLevel(level)
    if weights:
        load_weights(backbone, Path(weights), cfg.backbone)
    return backbone


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of ``model.weights`` (a file, or a hub-style folder's weights file)."""
    where = f"params: model.weights = {str(path)!r}"
    if not path.exists():
        raise InputError(f"{where}: file not found")
    file = weights_file(path)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unreadable file is the same one-line error
        raise InputError(f"{where}: not a readable state dict ({type(err).__name__})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{where}: holds a {type(state).__name__}, not a state dict")
    return state


def load_weights(backbone: nn.Module, path: Path, name: str) -> None:
    """A local state dict (``.safetensors``, ``.pt``/``.pth``/``.bin``, or a hub-style folder), strictly:
    the classifier's keys are dropped (the backbone has none), every other key must match in name and shape."""
    where = f"params: model.weights = {str(path)!r}"
    state = read_state_dict(path)
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


_FROZEN: OrderedDict[tuple, nn.Module] = OrderedDict()
FROZEN_KEPT = 8  # backbones held: a study's fold backbones, or one pathology encoder shared by every fold


def frozen_backbone(cfg: ModelConfig, encoder: Encoder) -> nn.Module:
    """One backbone per weights file for every model that trains none of it (``model.unfrozen_blocks``
    0): the fold models of a study's trials, an ensemble's members, read one copy of a ViT-g, not 20.
    Keyed by the file's path, size and modification time, so a replaced file is read again."""
    path = Path(cfg.weights)
    stat = path.stat() if path.exists() else None
    key = (json.dumps(encoder.as_dict(), sort_keys=True), str(path.resolve()),
           (stat.st_size, stat.st_mtime_ns) if stat else None)
    if key in _FROZEN:
        _FROZEN.move_to_end(key)
        return _FROZEN[key]
    backbone = create_backbone(cfg, encoder)
    _FROZEN[key] = backbone
    while len(_FROZEN) > FROZEN_KEPT:
        _FROZEN.popitem(last=False)
    return backbone


def starts_from_weights(cfg: ModelConfig) -> bool:
    """Whether the backbone starts from trained weights (the hub's or a local file), not at random."""
    return bool(weights_of(cfg.backbone, cfg.weights)) or cfg.pretrained


def check_weights(cfg: ModelConfig) -> None:
    """Hub or file weights that cannot be had or do not fit, a pathology encoder without weights, a
    backbone that cannot embed an image at its input size: one line, before any trial or training."""
    from src.model.encoders import encoder_input_size

    encoder = resolve_encoder(cfg.backbone, cfg.weights)
    backbone = create_backbone(cfg, encoder)
    size = encoder_input_size(encoder, backbone, cfg.input_size)
    try:
        with torch.no_grad():
            embed(backbone.eval(), encoder, torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as err:
        raise InputError(f"params: model.backbone = {cfg.backbone!r} cannot embed a {size}-px image "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


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


def backbone_block_count(name: str, weights: str = "") -> int:
    """How many blocks ``backbone_blocks`` finds in the backbone ``name`` (a preset or timm name; built
    on the meta device: no memory, no init, also for a ViT-g)."""
    encoder = resolve_encoder(name, weights)
    try:
        with torch.device("meta"):
            backbone = timm.create_model(encoder.architecture, pretrained=False, num_classes=0,
                                         **layer_args(encoder.args))
    except (RuntimeError, TypeError) as err:
        raise InputError(f"params: model.backbone = {name!r}: {str(err).splitlines()[0]}") from None
    return len(backbone_blocks(backbone))
