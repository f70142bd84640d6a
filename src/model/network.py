"""``SpatialCellModel``: a timm backbone with its last k blocks trainable, a coordinate encoder,
a fusion of the two and a deep head with one output per cell type.

``forward_features(images)`` -> pooled backbone features; ``forward_head(features, spot)`` ->
predictions, where ``spot`` holds the spot's normalized coordinates and, with neighbour aggregation
(``model.neighbour_radius``), the mean descriptor of the spots around it (``src.model.neighbours``).
``split_at(cut)`` cuts the backbone after its first ``cut`` blocks into a prefix and the rest: after
every block, the encoder's pooled embedding (``src.model.encoder_split``); within a ViT, through timm's
blocks; within other backbones, through their traced graph (``src.model.backbone_split``). The feature
cache stores the prefix's output and training runs the rest. The backbone is built as its encoder preset
says (``src.model.encoders``): input size, mean/std, interpolation and pooling.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from src.core.errors import InputError
from src.core.sections import ModelConfig
from src.model.backbone import backbone_blocks, create_backbone, frozen_backbone
from src.model.backbone_split import BackboneGraph, BackboneSplit, pool_positions
from src.model.encoder_split import TokenSplit, WholeSplit, forget_digest, is_token_model
from src.model.encoders import Encoder, embed, embedding_width, encoder_input_size, resolve_encoder, weights_of
from src.model.fusion import FUSIONS
from src.model.transforms import Preprocessing

Split = BackboneSplit | TokenSplit | WholeSplit  # a backbone cut into prefix and rest


class CoordinateEncoder(nn.Module):
    """Per-slide normalized (x, y) in [0, 1] -> ``dim`` features (the seed's coordinate branch)."""

    def __init__(self, dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, out_dim))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        return self.net(coords)


def head_mlp(dim: int, n_outputs: int, dropout: float) -> nn.Sequential:
    """The seed's deep head: dropout, two hidden layers (the first batch-normalized), outputs."""
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(dim, dim // 2), nn.ReLU(), nn.BatchNorm1d(dim // 2),
        nn.Dropout(dropout), nn.Linear(dim // 2, dim // 4), nn.ReLU(), nn.Linear(dim // 4, n_outputs),
    )


class SpatialCellModel(nn.Module):
    def __init__(self, cfg: ModelConfig, n_outputs: int, backbone: nn.Module | None = None,
                 encoder: Encoder | None = None, weights_follow: bool = False):
        """``weights_follow``: the caller loads a state dict next (a checkpoint, the model store), so a
        pathology encoder may be built without its weights file."""
        super().__init__()
        cfg = dataclasses.replace(cfg, weights=weights_of(cfg.backbone, cfg.weights))  # this backbone's own
        self.cfg = cfg
        self.encoder = encoder or resolve_encoder(cfg.backbone, cfg.weights)
        if backbone is None and cfg.unfrozen_blocks == 0 and cfg.weights:
            backbone = frozen_backbone(cfg, self.encoder)  # nothing trains it: one copy for every such model
        self.backbone = backbone if backbone is not None else create_backbone(cfg, self.encoder, weights_follow)
        self.preprocessing = preprocessing_of(self.backbone, self.encoder, cfg)
        self.blocks = backbone_blocks(self.backbone)
        if not 0 <= cfg.unfrozen_blocks <= len(self.blocks):
            raise InputError(
                f"params: model.unfrozen_blocks = {cfg.unfrozen_blocks}: {cfg.backbone} has "
                f"{len(self.blocks)} blocks"
            )
        self._freeze(cfg.unfrozen_blocks)
        self._graph: BackboneGraph | None = None  # traced on the first split_at within a non-ViT
        self._splits: dict[int, Split] = {}
        features = embedding_width(self.backbone, self.encoder)
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
        """Normalized image batch (B, 3, H, W) -> the encoder's pooled embedding (B, C)."""
        return embed(self.backbone, self.encoder, images)

    def split_at(self, cut: int) -> Split:
        """The backbone cut after its first ``cut`` blocks (made once per cut; a traced one is checked on a
        probe image)."""
        if cut not in self._splits and cut == len(self.blocks):
            self._splits[cut] = WholeSplit(self.backbone, self.encoder, cut)
        elif cut not in self._splits and is_token_model(self.backbone):
            if not 0 < cut < len(self.blocks):
                raise ValueError(f"cut {cut} outside 1..{len(self.blocks)}")
            self._splits[cut] = TokenSplit(self.backbone, self.encoder, cut)
        elif cut not in self._splits:
            if self._graph is None:
                self._graph = BackboneGraph(self.backbone, self.blocks, self.cfg.backbone)
            size = self.preprocessing.input_size
            device = next(self.backbone.parameters()).device
            probe = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
            self._splits[cut] = BackboneSplit(self._graph, cut, probe)
        return self._splits[cut]

    @torch.no_grad()
    def spot_descriptors(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (B, 3, H, W) -> what each spot shows its neighbours (B, descriptor_width):
        the backbone's frozen blocks, pooled over positions, in eval mode."""
        was_training = self.training
        self.eval()
        try:
            activation = self.split_at(self.descriptor_cut).prefix(images)
        finally:
            self.train(was_training)
        return pool_positions(activation, getattr(self.backbone, "output_fmt", "NCHW") == "NHWC")

    def load_state_dict(self, *args, **kwargs):
        self._descriptor_digest = None  # new weights: hash the describing blocks again
        self._splits.clear()
        forget_digest(self.backbone)
        return super().load_state_dict(*args, **kwargs)

    def descriptor_digest(self) -> str:
        """Content hash of the blocks that describe spots (frozen for the model's life: hashed once)."""
        if self._descriptor_digest is None:
            self._descriptor_digest = self.split_at(self.descriptor_cut).weights_digest()
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


def preprocessing_of(backbone: nn.Module, encoder: Encoder, cfg: ModelConfig) -> Preprocessing:
    """What the backbone is fed: the encoder's mean/std (else its timm data config's), input size and
    interpolation, and the recipe's context."""
    mean, std = encoder.mean, encoder.std
    if not mean:
        import timm

        data_cfg = timm.data.resolve_data_config({}, model=backbone)
        mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    return Preprocessing(mean=tuple(mean), std=tuple(std), input_size=encoder_input_size(encoder, backbone, cfg.input_size),
                         context=cfg.context, interpolation=encoder.interpolation)


class Ensemble(nn.Module):
    """Models of one recipe (the CV's fold models) that predict as one: the mean of their outputs.

    With neighbour aggregation each member describes spots by its own frozen blocks (fold models
    pretrained on their own folds differ there). ``describers`` holds one member per distinct set of
    describing blocks; the ensemble's spot input is the coordinates, then each describer's
    neighbourhood mean in that order (``src.model.neighbours.spot_inputs``), and every member reads
    the coordinates and its own describer's block."""

    def __init__(self, members: list[SpatialCellModel]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg
        self.preprocessing = members[0].preprocessing
        self.describers: list[SpatialCellModel] = []
        self._describer_of: list[int] = []  # member i reads describer _describer_of[i]'s block
        if self.cfg.neighbour_radius > 0:
            digests = [m.descriptor_digest() for m in members]
            distinct = list(dict.fromkeys(digests))
            self.describers = [members[digests.index(d)] for d in distinct]
            self._describer_of = [distinct.index(d) for d in digests]

    def member_spot(self, spot: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s part of the ensemble's spot input: coordinates and its own neighbourhood."""
        if not self._describer_of:
            return spot
        width, block = self.members[index].descriptor_width, self._describer_of[index]
        return torch.cat([spot[:, :2], spot[:, 2 + block * width : 2 + (block + 1) * width]], dim=1)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [m.forward_features(images) for m in self.members]

    def forward_head(self, features: list[torch.Tensor], spot: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.forward_head(f, self.member_spot(spot, i))
                            for i, (m, f) in enumerate(zip(self.members, features))]).mean(dim=0)

    def forward(self, images: torch.Tensor, spot: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images), spot)


class RecipeEnsemble:
    """Models of several recipes delivered as one (an ensemble selected over a study's trials): each
    model with its own settings (target transform, TTA, smoothing; ``settings[i]["weight"]`` its share).
    ``src.engine.inference.predict_abundance`` predicts with each and averages their within-spot ranks."""

    def __init__(self, models: list["SpatialCellModel | Ensemble"], settings: list[dict]):
        if len(models) != len(settings) or not models:
            raise ValueError("a recipe ensemble needs one settings mapping per model, and a model")
        self.models, self.settings = models, settings

    @property
    def weights(self) -> list[float]:
        return [float(s["weight"]) for s in self.settings]
