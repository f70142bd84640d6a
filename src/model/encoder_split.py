"""Cuts that need no tracing: after every block (the encoder's pooled embedding) for any backbone, and
between the transformer blocks of a timm Vision Transformer.

A cut after all blocks is what a frozen backbone (``model.unfrozen_blocks`` 0) trains on: its prefix is
the encoder's embedding (``src.model.encoders.embed``) and the rest nothing, so a feature cache holds one
pooled vector per patch and variant (1024 values for UNI) instead of its tokens (197 x 1024).

A ViT is cut through timm's own structure: the prefix runs the patch embedding, the position embedding
(with class and register tokens) and ``blocks[:j]``; the rest runs ``blocks[j:]``, the final norm and the
encoder's pooling. The split has the interface of ``src.model.backbone_split.BackboneSplit``
(``prefix``, ``rest``, ``between``, ``weights_digest``), and like it shares the backbone's weights.
"""
from __future__ import annotations

import hashlib
import weakref

import torch
from torch import nn

from src.model.encoders import Encoder, embed, pool_tokens


def is_token_model(backbone: nn.Module) -> bool:
    """A timm ViT: patch and position embedding, then a sequence of blocks and a norm."""
    return (isinstance(getattr(backbone, "blocks", None), nn.Sequential) and hasattr(backbone, "patch_embed")
            and hasattr(backbone, "_pos_embed") and hasattr(backbone, "norm"))


def digest_state(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (BatchNorm statistics included)."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Embedding(nn.Module):
    def __init__(self, backbone: nn.Module, encoder: Encoder):
        super().__init__()
        self.backbone, self.encoder = backbone, encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return embed(self.backbone, self.encoder, images)


class _Tokens(nn.Module):
    """Images -> the tokens after the first ``n`` transformer blocks (no final norm)."""

    def __init__(self, backbone: nn.Module, n: int):
        super().__init__()
        self.backbone, self.n = backbone, n

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(images))))
        return b.blocks[: self.n](x)


class _Blocks(nn.Module):
    """Tokens after block ``start`` -> after block ``end`` (None: through the norm and the pooling)."""

    def __init__(self, backbone: nn.Module, encoder: Encoder, start: int, end: int | None):
        super().__init__()
        self.backbone, self.encoder, self.start, self.end = backbone, encoder, start, end

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.blocks[self.start : self.end](tokens)
        return x if self.end is not None else pool_tokens(b, self.encoder, b.norm(x))


class _Split:
    cut: int
    prefix: nn.Module
    rest: nn.Module
    _digest: str | None = None

    def weights_digest(self) -> str:
        """Content hash of the prefix's weights (frozen for the model's life: hashed once)."""
        if self._digest is None:
            self._digest = digest_state(self.prefix)
        return self._digest


# Digests of whole backbones, by object: a frozen backbone shared by many models (a pathology encoder
# read by every fold and trial) is hashed once, not once per model (a ViT-L is 1.2 GB to hash).
_WHOLE_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def forget_digest(backbone: nn.Module) -> None:
    """New weights were loaded into ``backbone``: hash it again when asked."""
    _WHOLE_DIGESTS.pop(backbone, None)


class WholeSplit(_Split):
    """The cut after every block: the prefix is the encoder's pooled embedding, the rest the identity."""

    def __init__(self, backbone: nn.Module, encoder: Encoder, cut: int):
        self.cut, self.prefix, self.rest = cut, _Embedding(backbone, encoder), nn.Identity()
        self.backbone = backbone

    def weights_digest(self) -> str:
        if self.backbone not in _WHOLE_DIGESTS:
            _WHOLE_DIGESTS[self.backbone] = digest_state(self.backbone)
        return _WHOLE_DIGESTS[self.backbone]

    def between(self, source) -> nn.Module:
        """From a shallower cut's activation to the embedding: that cut's rest."""
        return source.rest


class TokenSplit(_Split):
    """A ViT after its first ``cut`` blocks of ``backbone_blocks`` (the stem, then ``cut - 1``
    transformer blocks): tokens are what the prefix gives and the rest reads."""

    def __init__(self, backbone: nn.Module, encoder: Encoder, cut: int):
        self.cut, self.backbone, self.encoder = cut, backbone, encoder
        self.prefix = _Tokens(backbone, cut - 1)
        self.rest = _Blocks(backbone, encoder, cut - 1, None)

    def between(self, source: "TokenSplit") -> nn.Module:
        if not isinstance(source, TokenSplit) or source.backbone is not self.backbone or source.cut >= self.cut:
            raise ValueError(f"a cut after block {self.cut} cannot be reached from one after block {source.cut}")
        return _Blocks(self.backbone, self.encoder, source.cut - 1, self.cut - 1)
