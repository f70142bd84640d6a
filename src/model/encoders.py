"""Named encoder presets: what a backbone is built from and how it sees an image, in the spirit of timm's
``pretrained_cfg``.

``model.backbone`` names a preset (``uni``, ``virchow2``, ``resnet10t``, ...) or any timm model. A
preset names its timm architecture and the arguments its weights need (LayerScale, register tokens,
SwiGLU), its input size, the µm/px it was trained at, its mean/std and interpolation, how its
embedding is pooled, and where its weights live on the Hugging Face hub. The pathology encoders'
figures come from their model cards and hub configs: loaded without these arguments, their weights
fail a strict load (a ViT built without ``init_values`` has no LayerScale to put them in).

Weights come from the hub (``model.pretrained``), or offline from ``model.weights``: a state-dict file,
or a folder as the hub writes it (``config.json`` with ``architecture`` and ``model_args``, beside
``model.safetensors`` or ``pytorch_model.bin``), or a folder holding one such file or folder per
backbone, named by it (``weights/uni/``, ``weights/virchow2.safetensors``), for a study that searches
encoders. A folder's ``model_args`` take precedence over the
preset's; the preset adds the layer classes a hub config cannot name (Virchow2's SwiGLU). Either way
the load is strict. The resolved :class:`Encoder` is what a checkpoint records, so a model is rebuilt
without the weights it started from.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.core.errors import InputError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pt")

# Arguments a JSON config can only name: the class or function each name stands for.
_LAYERS = {"SwiGLUPacked": "timm.layers.SwiGLUPacked", "SiLU": "torch.nn.SiLU", "GELU": "torch.nn.GELU"}
POOLINGS = ("timm", "cls_mean")  # timm: the model's own pooling (average, CLS token); cls_mean: Virchow's CLS
# token beside the mean of its patch tokens (after the CLS and register tokens)


@dataclass(frozen=True)
class Encoder:
    """How one backbone is built and fed. ``input_size`` 0: the pipeline's ``model.input_size``;
    ``mean``/``std`` empty: the timm model's data config; ``um_per_px`` 0: not trained at a known scale."""

    name: str  # what model.backbone says
    architecture: str  # timm model name (or hf-hub: id for unnamed hub models)
    args: dict[str, Any] = field(default_factory=dict)  # timm.create_model keyword arguments (JSON values)
    input_size: int = 0
    um_per_px: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    interpolation: str = "bilinear"
    pooling: str = "timm"
    hub: str = ""  # hf-hub: id of its weights ("" = timm's own pretrained tag)
    foundation: bool = False  # a pathology encoder: pretrained weights are the point (no per-fold pretraining)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Encoder":
        values = dict(values, mean=tuple(values.get("mean", ())), std=tuple(values.get("std", ())))
        return cls(**values)


def _vit(name: str, architecture: str, args: dict, hub: str, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
         interpolation: str = "bicubic", pooling: str = "timm") -> Encoder:
    return Encoder(name, architecture, args, input_size=224, um_per_px=0.5, mean=mean, std=std,
                   interpolation=interpolation, pooling=pooling, hub=hub, foundation=True)


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
PRESETS: dict[str, Encoder] = {p.name: p for p in (
    # The fold backbone of the embedded default: trained on each fold's own spots (pretrain.*), fed at
    # model.input_size, resized bilinearly as every earlier figure was measured.
    Encoder("resnet10t", "resnet10t"),
    # The seed's backbone: ImageNet-22k weights fine-tuned on 1k, at 224 px.
    Encoder("convnext_small", "convnext_small.fb_in22k_ft_in1k", input_size=224, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, interpolation="bicubic"),
    # UNI (ViT-L/16, 1024-d CLS): its model card's transform resizes with torchvision's default (bilinear).
    _vit("uni", "vit_large_patch16_224", {"init_values": 1e-5, "dynamic_img_size": True}, "MahmoodLab/uni",
         interpolation="bilinear"),
    # UNI2-h (ViT-H/14, 1536-d CLS, 8 register tokens, SwiGLU).
    _vit("uni2-h", "vit_giant_patch14_224",
         {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
          "init_values": 1e-5, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
         "MahmoodLab/UNI2-h"),
    # H-optimus-0/1 (ViT-g/14 with 4 registers, 1536-d CLS) and their own mean/std.
    _vit("h-optimus-0", "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5},
         "bioptimus/H-optimus-0", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    _vit("h-optimus-1", "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5},
         "bioptimus/H-optimus-1", mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    # Virchow2 (ViT-H/14, 4 registers, SwiGLU): 2560-d = CLS + mean of the patch tokens.
    _vit("virchow2", "vit_huge_patch14_224",
         {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "",
          "dynamic_img_size": True, **_SWIGLU}, "paige-ai/Virchow2", pooling="cls_mean"),
    # Prov-GigaPath's tile encoder (ViT-g/16, 1536-d CLS); its card resizes to 256 and crops 224.
    _vit("prov-gigapath", "vit_giant_patch14_dinov2",
         {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "mlp_ratio": 5.33334}, "prov-gigapath/prov-gigapath"),
)}


def layer_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with layer names (``_LAYERS``) replaced by what they name."""
    import importlib

    out = {}
    for key, value in args.items():
        if isinstance(value, str) and value in _LAYERS:
            module, _, attr = _LAYERS[value].rpartition(".")
            value = getattr(importlib.import_module(module), attr)
        out[key] = value
    return out


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def weights_of(backbone: str, weights: str) -> str:
    """The weights ``model.weights`` gives ``backbone``: the file or hub-style folder itself, or, in a
    folder of several encoders' weights (one study searching presets), ``<folder>/<backbone>`` as a
    folder or file ("" when it holds none for this backbone: random init, or an error for a pathology
    encoder)."""
    path = Path(weights) if weights else None
    if path is None or not path.is_dir() or (path / "config.json").is_file() \
            or any((path / name).is_file() for name in WEIGHT_FILES):
        return weights
    for candidate in (path / backbone, *(path / f"{backbone}{suffix}" for suffix in WEIGHT_SUFFIXES)):
        if candidate.exists():
            return str(candidate)
    return ""


def weights_file(path: Path) -> Path:
    """The state-dict file of ``model.weights``: the file itself, or the one a hub-style folder holds."""
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise InputError(f"params: model.weights = {str(path)!r}: a folder without weights "
                         f"({' or '.join(WEIGHT_FILES)})")
    return path


def _folder_config(path: Path) -> dict:
    """(architecture, model_args) of a hub-style weights folder's config.json; {} without one."""
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return {}
    try:
        values = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{config}: not a JSON model config ({type(err).__name__})") from None
    if not isinstance(values, dict) or not isinstance(values.get("architecture"), str):
        raise InputError(f"{config}: no 'architecture' (the timm model it holds weights of)")
    return values


def resolve_encoder(backbone: str, weights: str = "") -> Encoder:
    """The encoder ``model.backbone`` names, with the architecture of a hub-style ``model.weights``
    folder where it has a config.json."""
    encoder = PRESETS.get(backbone) or Encoder(backbone, backbone)
    weights = weights_of(backbone, weights)
    config = _folder_config(Path(weights)) if weights else {}
    if config:
        args = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
        encoder = dataclasses.replace(encoder, architecture=config["architecture"], args={**encoder.args, **args})
    return encoder


def encoder_input_size(encoder: Encoder, backbone: nn.Module, requested: int) -> int:
    """Px the backbone is fed: the preset's own size; else a ViT's fixed size (one built for 224 px
    refuses anything else); else ``model.input_size`` (0: the timm data config's)."""
    if encoder.input_size:
        return encoder.input_size
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "strict_img_size", False) \
            and not getattr(backbone, "dynamic_img_size", False):
        return int(patch_embed.img_size[0])
    if requested:
        return requested
    import timm

    return int(timm.data.resolve_data_config({}, model=backbone)["input_size"][-1])


def embedding_width(backbone: nn.Module, encoder: Encoder) -> int:
    """Width of the pooled embedding: timm's pre-logits width, twice the token width for CLS + mean."""
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return 2 * width if encoder.pooling == "cls_mean" else width


def pool_tokens(backbone: nn.Module, encoder: Encoder, tokens: torch.Tensor) -> torch.Tensor:
    """The last block's normalized output -> the encoder's embedding."""
    if encoder.pooling == "cls_mean":
        return torch.cat([tokens[:, 0], tokens[:, backbone.num_prefix_tokens:].mean(dim=1)], dim=-1)
    return backbone.forward_head(tokens, pre_logits=True)


def embed(backbone: nn.Module, encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Normalized images -> the encoder's pooled embedding (what the head reads)."""
    if encoder.pooling == "timm":
        return backbone(images)
    return pool_tokens(backbone, encoder, backbone.forward_features(images))


def scale_note(encoder: Encoder, crop_px: int, input_size: int, data_um_per_px: float) -> str:
    """One line when an encoder sees tissue at another scale than it was trained at (by 25% or more):
    a pathology encoder trained at 0.5 µm/px, fed a 96-px context of 2.115 µm/px data resized to 224 px,
    sees 0.91 µm/px."""
    if not encoder.um_per_px or not data_um_per_px:
        return ""
    seen = data_um_per_px * crop_px / input_size
    if abs(seen / encoder.um_per_px - 1) < 0.25:
        return ""
    matching = round(encoder.um_per_px * input_size / data_um_per_px)
    return (f"note: {encoder.name} was trained at {encoder.um_per_px:g} um/px; it sees {seen:.2f} um/px here (a "
            f"{crop_px}-px context of {data_um_per_px:g} um/px data resized to {input_size} px); a {matching}-px "
            "context would match its scale")
