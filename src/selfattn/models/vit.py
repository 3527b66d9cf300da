"""ViT (Dosovitskiy et al. 2021): an image cut into P patches, each linearly embedded (a stride-p convolution),
a learned [CLS] token in front, learned position embeddings, then a pre-LayerNorm bidirectional encoder on
``selfattn.nn.Attention`` (no mask: every patch sees every patch).

    model = selfattn.models.load("path/to/vit")     # ViTModel or ViTForImageClassification directory
    h = model(pixel_values)                          # (B, 1 + P, E) last hidden state
    h = model(bigger, interpolate_pos_encoding=True) # other image sizes: positions resampled (bicubic) to the grid
    logits = model.classify(h)                       # (B, num_labels), when the checkpoint has the classifier

Shape legend: B batch, C channels, Hi/Wi image height/width, p patch size, P patches, E hidden size,
I intermediate size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Attention
from .activations import activation
from .loading import MAX_HEADS, MAX_LAYERS, MAX_WIDTH, Field, check_config, register

__all__ = ["ViTConfig", "ViT", "convert_state_dict"]


def _pair(name: str, x) -> Tuple[int, int]:
    if isinstance(x, int) and not isinstance(x, bool):
        return (x, x)
    if isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) for v in x):
        return (int(x[0]), int(x[1]))
    raise ValueError(f"config.json: {name} must be an int or a pair of ints, got {x!r}")


def _prefix(state: Dict[str, Tensor]) -> str:
    # ViTFor* checkpoints nest the encoder under "vit."; ViTModel checkpoints do not
    return "vit." if any(k.startswith("vit.") for k in state) else ""


# config.json fields from_hf reads, checked (type, range, layer count against the weights) before use
HF_FIELDS = {
    "hidden_size": Field("int", 1, MAX_WIDTH, required=True, multiple_of="num_attention_heads"),
    "num_hidden_layers": Field("int", 1, MAX_LAYERS, required=True,
                               layers=r"(?:vit\.)?encoder\.layer\.(\d{1,9})\."),
    "num_attention_heads": Field("int", 1, MAX_HEADS, required=True),
    "intermediate_size": Field("int", 1, MAX_WIDTH, required=True),
    "image_size": Field("pair", 1, 1 << 16), "patch_size": Field("pair", 1, 1 << 16),
    "num_channels": Field("int", 1, 1 << 10),
    "qkv_bias": Field("bool"), "layer_norm_eps": Field("float", 0, 1),
    "hidden_act": Field("str"), "pooler_act": Field("str"),
    "pooler_output_size": Field("int", 1, MAX_WIDTH, null_ok=True),
}


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_size: Tuple[int, int] = (224, 224)  # position embeddings are learned for this grid (others: resampled)
    patch_size: Tuple[int, int] = (16, 16)    # P = (224/16)² = 196 tokens + [CLS]: attention is cheap, MLP dominates
    num_channels: int = 3
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"                  # exact (erf) GELU
    pooler: bool = False                      # tanh(dense(h[CLS])): ViTModel checkpoints ship it
    pooler_act: str = "tanh"
    pooler_output_size: Optional[int] = None
    num_labels: int = 0                       # > 0: a linear classifier on h[CLS] (ViTForImageClassification)

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size[0]) * (self.image_size[1] // self.patch_size[1])

    @classmethod
    def from_hf(cls, hf: dict, state: Optional[Dict[str, Tensor]] = None) -> "ViTConfig":
        """From config.json; the checkpoint's tensors (when given) say whether a pooler / classifier is there."""
        check_config(hf, HF_FIELDS, state)
        state = state or {}
        pre = _prefix(state)
        has_pooler = f"{pre}pooler.dense.weight" in state
        cls_w = state.get("classifier.weight")
        pooler_act = hf.get("pooler_act", "tanh")
        if has_pooler and pooler_act != "tanh":
            activation(pooler_act)  # raises for an activation selfattn does not have
        return cls(hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                   image_size=_pair("image_size", hf.get("image_size", 224)),
                   patch_size=_pair("patch_size", hf.get("patch_size", 16)),
                   num_channels=hf.get("num_channels", 3), qkv_bias=bool(hf.get("qkv_bias", True)),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
                   pooler=has_pooler, pooler_act=pooler_act,
                   pooler_output_size=hf.get("pooler_output_size") or hf["hidden_size"],
                   num_labels=0 if cls_w is None else int(cls_w.shape[0]))


class ViTBlock(nn.Module):
    """x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        E = c.hidden_size
        self.attn_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        # fused q|k|v: one matmul; the output projection always has a bias, q/k/v only with qkv_bias
        self.attn = Attention(E, c.num_heads, bias=c.qkv_bias, out_bias=True, qkv_fused=True)
        self.mlp_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(E, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, E)
        self.act = activation(c.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, 1 + P, E)
        return x + self.fc2(self.act(self.fc1(self.mlp_norm(x))))


class ViT(nn.Module):
    """ViTModel (+ pooler) or ViTForImageClassification, by what the checkpoint holds."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config: expected a ViTConfig, got {type(config).__name__}")
        self.config = c = config
        E = c.hidden_size
        self.patch_embed = nn.Conv2d(c.num_channels, E, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, E))
        self.layers = nn.ModuleList(ViTBlock(c) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.pooler = nn.Linear(E, c.pooler_output_size) if c.pooler else None
        self.classifier = nn.Linear(E, c.num_labels) if c.num_labels > 0 else None

    def position_embeddings(self, grid: Tuple[int, int]) -> Tensor:
        """(1, 1 + gh·gw, E) position embeddings for a (gh, gw) patch grid: the learned ones on the training grid,
        else the patch part resampled bicubically (align_corners=False) as transformers'
        ``interpolate_pos_encoding=True`` does; the [CLS] position is kept. (transformers reshapes the learned
        grid as a square; here it is the configured (Hi/p, Wi/p), the same for square models.)"""
        c = self.config
        g0 = (c.image_size[0] // c.patch_size[0], c.image_size[1] // c.patch_size[1])
        if tuple(grid) == g0:
            return self.pos_embed
        E = self.pos_embed.shape[-1]
        patch = self.pos_embed[:, 1:].reshape(1, g0[0], g0[1], E).permute(0, 3, 1, 2)  # (1, E, gh0, gw0)
        patch = F.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False)  # (1, E, gh, gw)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], E)  # (1, gh·gw, E), row-major
        return torch.cat([self.pos_embed[:, :1], patch], dim=1)

    def embed(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """(B, C, Hi, Wi) -> [CLS] + patch embeddings + positions, (B, 1 + P, E). interpolate_pos_encoding: accept
        another image size (at least one patch each way; a remainder smaller than a patch is dropped, as the
        stride-p convolution does) with the position embeddings resampled to its grid."""
        c = self.config
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"pixel_values: expected a (B, C, Hi, Wi) float tensor, got {type(pixel_values).__name__}")
        if not isinstance(interpolate_pos_encoding, bool):
            raise TypeError(f"interpolate_pos_encoding: expected a bool, got {type(interpolate_pos_encoding).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values: expected (B, C, Hi, Wi), got shape {tuple(pixel_values.shape)}")
        B, C, Hi, Wi = pixel_values.shape
        if C != c.num_channels or (not interpolate_pos_encoding and (Hi, Wi) != tuple(c.image_size)):
            raise ValueError(f"pixel_values: expected (B, {c.num_channels}, {c.image_size[0]}, {c.image_size[1]}) "
                             f"(position embeddings are learned for that grid; pass interpolate_pos_encoding=True "
                             f"for other sizes), got {tuple(pixel_values.shape)}")
        grid = (Hi // c.patch_size[0], Wi // c.patch_size[1])
        if min(grid) < 1:
            raise ValueError(f"pixel_values: an image of {Hi}x{Wi} holds no {c.patch_size[0]}x{c.patch_size[1]} "
                             f"patch")
        x = pixel_values.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, E, Hi/p, Wi/p) -> (B, P, E), row-major patches
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1 + P, E)
        return x + self.position_embeddings(grid)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        """pixel_values (B, C, Hi, Wi) -> last hidden state (B, 1 + P, E), after the final LayerNorm."""
        x = self.embed(pixel_values, interpolate_pos_encoding)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def pool(self, hidden: Tensor) -> Tensor:
        """ViTModel's pooler output act(dense(h[CLS])): (B, 1 + P, E) -> (B, pooler_output_size)."""
        if self.pooler is None:
            raise ValueError("pool: this checkpoint has no pooler weights (config.pooler=False)")
        act = torch.tanh if self.config.pooler_act == "tanh" else activation(self.config.pooler_act)
        return act(self.pooler(hidden[:, 0]))

    def classify(self, hidden: Tensor) -> Tensor:
        """Image classification logits from h[CLS]: (B, 1 + P, E) -> (B, num_labels)."""
        if self.classifier is None:
            raise ValueError("classify: this checkpoint has no classifier weights (config.num_labels=0)")
        return self.classifier(hidden[:, 0])


def convert_state_dict(hf_state: Dict[str, Tensor], config: ViTConfig) -> Dict[str, Tensor]:
    """Hugging Face ``ViTModel`` / ``ViTForImageClassification`` names (as saved on disk) -> ours; query|key|value
    concatenated for the fused projection. Unknown names are kept for the strict check in ``load`` to report."""
    sd = dict(hf_state)
    pre = _prefix(sd)
    out: Dict[str, Tensor] = {}

    def move(src: str, dst: str):
        if src in sd:
            out[dst] = sd.pop(src)

    move(pre + "embeddings.cls_token", "cls_token")
    move(pre + "embeddings.position_embeddings", "pos_embed")
    for p in ("weight", "bias"):
        move(pre + f"embeddings.patch_embeddings.projection.{p}", f"patch_embed.{p}")
        move(pre + f"layernorm.{p}", f"norm.{p}")
        move(pre + f"pooler.dense.{p}", f"pooler.{p}")
        move(f"classifier.{p}", f"classifier.{p}")
        for i in range(config.num_layers):
            a, o = f"{pre}encoder.layer.{i}.", f"layers.{i}."
            qkv = [f"{a}attention.attention.{n}.{p}" for n in ("query", "key", "value")]
            if all(k in sd for k in qkv):
                out[o + f"attn.qkv_proj.{p}"] = torch.cat([sd.pop(k) for k in qkv])  # (3E, E) / (3E,)
            for src, dst in (("attention.output.dense", "attn.out_proj"), ("layernorm_before", "attn_norm"),
                             ("layernorm_after", "mlp_norm"), ("intermediate.dense", "fc1"),
                             ("output.dense", "fc2")):
                move(f"{a}{src}.{p}", f"{o}{dst}.{p}")
    out.update(sd)  # leftovers: reported by the strict check
    return out


register("vit", config_from_hf=ViTConfig.from_hf, model_cls=ViT, convert_state_dict=convert_state_dict)
