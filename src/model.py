"""``SpatialCellModel``: a timm backbone with its last k blocks trainable, a coordinate encoder,
a fusion of the two and a deep head with one output per cell type.

``forward_features(images)`` -> pooled backbone features; ``forward_head(features, spot)`` ->
predictions, where ``spot`` holds the spot's normalized coordinates and, with neighbour aggregation
(``model.neighbour_radius``), the mean descriptor of the spots around it (``src.neighbours``). The
split lets inference reuse features (TTA) and lets features be cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from src.config import ModelConfig
from src.errors import InputError
from src.prefix import PrefixSplit, pool_positions

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone sees: the centre ``context`` px of a patch (0 = all of it), resized to
    ``input_size`` and normalized with the mean and std of its timm data config."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    context: int = 0

    def crop(self, patch_size: int) -> int:
        """Edge of the centre crop taken from a ``patch_size`` patch."""
        if self.context > patch_size:
            raise InputError(f"params: model.context = {self.context} px exceeds the patch store's "
                             f"{patch_size} px patches (raise patches.size)")
        return self.context or patch_size


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


class CoordinateEncoder(nn.Module):
    """Per-slide normalized (x, y) in [0, 1] -> ``dim`` features (the seed's coordinate branch)."""

    def __init__(self, dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, out_dim))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.net(coords)


class ProductFusion(nn.Module):
    """Element-wise product of image and coordinate features (the seed's fusion)."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        return image * coord


class ConcatFusion(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([image, coord], dim=1))


class FiLMFusion(nn.Module):
    """Feature-wise linear modulation: coordinates scale and shift the image features."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_scale_shift = nn.Linear(dim, 2 * dim)

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(coord).chunk(2, dim=1)
        return image * (1 + scale) + shift


class GatedFusion(nn.Module):
    """A learned per-feature gate chooses between image and coordinate features."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(torch.cat([image, coord], dim=1)))
        return gate * image + (1 - gate) * coord


FUSIONS: dict[str, type[nn.Module] | None] = {
    "product": ProductFusion,
    "concat": ConcatFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
    "none": None,  # image features only: no coordinate encoder at all
}


def head_mlp(dim: int, n_outputs: int, dropout: float) -> nn.Sequential:
    """The seed's deep head: dropout, two hidden layers (the first batch-normalized), outputs."""
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(dim, dim // 2), nn.ReLU(), nn.BatchNorm1d(dim // 2),
        nn.Dropout(dropout), nn.Linear(dim // 2, dim // 4), nn.ReLU(), nn.Linear(dim // 4, n_outputs),
    )


class SpatialCellModel(nn.Module):
    def __init__(self, cfg: ModelConfig, n_outputs: int, backbone: nn.Module | None = None):
        super().__init__()
        if cfg.fusion not in FUSIONS:
            raise InputError(f"params: model.fusion = {cfg.fusion!r}: choose {', '.join(FUSIONS)}")
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else create_backbone(cfg)
        data_cfg = timm.data.resolve_data_config({}, model=self.backbone)
        self.preprocessing = Preprocessing(
            mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
            input_size=cfg.input_size or int(data_cfg["input_size"][-1]), context=cfg.context,
        )
        self.blocks = backbone_blocks(self.backbone)
        if not 0 <= cfg.unfrozen_blocks <= len(self.blocks):
            raise InputError(
                f"params: model.unfrozen_blocks = {cfg.unfrozen_blocks}: {cfg.backbone} has "
                f"{len(self.blocks)} blocks"
            )
        self._freeze(cfg.unfrozen_blocks)
        # Pooled output width: timm's head_hidden_size where a model has a pre-logits layer
        # (MobileNetV3's conv_head), else num_features.
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.image_proj = nn.Sequential(nn.Linear(features, cfg.hidden), nn.ReLU(), nn.BatchNorm1d(cfg.hidden))
        fusion_cls = FUSIONS[cfg.fusion]
        self.coord_encoder = CoordinateEncoder(cfg.coord_dim, cfg.hidden, cfg.dropout) if fusion_cls else None
        self.fusion = fusion_cls(cfg.hidden) if fusion_cls else None
        self.head = head_mlp(cfg.hidden, n_outputs, cfg.dropout)
        self.neighbour_proj, self.descriptor_cut, self.descriptor_width = None, 0, 0
        if cfg.neighbour_radius > 0:
            self._init_neighbourhood()

    def _init_neighbourhood(self) -> None:
        """Neighbour aggregation: spots describe themselves to their neighbours by the frozen start of
        the backbone, pooled (fixed while training, so the descriptors are computed once)."""
        cfg = self.cfg
        self.descriptor_cut = len(self.blocks) - cfg.unfrozen_blocks
        if self.descriptor_cut < 1:
            raise InputError(f"params: model.neighbour_radius = {cfg.neighbour_radius:g} describes neighbours by "
                             f"the backbone's frozen blocks, but model.unfrozen_blocks = {cfg.unfrozen_blocks} "
                             f"trains all {len(self.blocks)} of {cfg.backbone}")
        self._descriptor_split = PrefixSplit(self, self.descriptor_cut)
        self._descriptor_digest: str | None = None
        size = self.preprocessing.input_size
        self.descriptor_width = int(self.spot_descriptors(torch.zeros(1, 3, size, size)).shape[1])
        self.neighbour_proj = nn.Sequential(nn.LayerNorm(self.descriptor_width),
                                            nn.Linear(self.descriptor_width, cfg.hidden), nn.ReLU())

    def _freeze(self, unfrozen: int) -> None:
        trainable = {name for block in self.blocks[len(self.blocks) - unfrozen:] for name in block}
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name in trainable)

    def train(self, mode: bool = True) -> "SpatialCellModel":
        """Frozen backbone parts always run in eval mode (BatchNorm statistics and dropout fixed)."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    def trainable_parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone's unfrozen parameters, every other trainable parameter) for the optimizer."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        return backbone, rest

    @torch.no_grad()
    def init_output_bias(self, mean_target: torch.Tensor) -> None:
        """Start from the mean target profile: the first prediction is the floor, not noise."""
        last = self.head[-1]
        last.bias.copy_(mean_target.to(last.bias))
        last.weight.mul_(0.1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized image batch (B, 3, H, W) -> pooled backbone features (B, C)."""
        return self.backbone(images)

    @torch.no_grad()
    def spot_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (B, 3, H, W) -> what each spot shows its neighbours (B, descriptor_width):
        the backbone's frozen blocks, pooled over positions, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            activation = self._descriptor_split.prefix(images)
        finally:
            self.train(was_training)
        return pool_positions(activation, getattr(self.backbone, "output_fmt", "NCHW") == "NHWC")

    def load_state_dict(self, *args, **kwargs):
        self._descriptor_digest = None  # new weights: hash the describing blocks again
        return super().load_state_dict(*args, **kwargs)

    def descriptor_digest(self) -> str:
        """Content hash of the blocks that describe spots (frozen for the model's life: hashed once)."""
        if self._descriptor_digest is None:
            self._descriptor_digest = self._descriptor_split.weights_digest()
        return self._descriptor_digest

    def forward_head(self, features: torch.Tensor, spot: torch.Tensor) -> torch.Tensor:
        """Pooled features and the spot's inputs -> one value per cell type (B, T). ``spot``: normalized
        coordinates (B, 2), then with neighbour aggregation the neighbourhood's mean descriptor."""
        fused = self.image_proj(features)
        if self.neighbour_proj is not None:
            fused = fused + self.neighbour_proj(spot[:, 2:])
        if self.fusion is not None:
            fused = self.fusion(fused, self.coord_encoder(spot[:, :2]))
        return self.head(fused)

    def forward(self, images: torch.Tensor, spot: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images), spot)


class Ensemble(nn.Module):
    """Models of one recipe (the CV's fold models) that predict as one: the mean of their outputs."""

    def __init__(self, members: list[SpatialCellModel]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg
        self.preprocessing = members[0].preprocessing
        if self.cfg.neighbour_radius > 0 and len({m.descriptor_digest() for m in members}) > 1:
            raise ValueError("ensemble members describe spots differently (frozen blocks differ)")

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [m.forward_features(images) for m in self.members]

    def forward_head(self, features: list[torch.Tensor], spot: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.forward_head(f, spot) for m, f in zip(self.members, features)]).mean(dim=0)

    def forward(self, images: torch.Tensor, spot: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images), spot)
