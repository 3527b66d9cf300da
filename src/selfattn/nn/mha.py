"""A drop-in ``torch.nn.MultiheadAttention`` whose attention runs in selfattn's kernels.

Shape legend: L target (query) length, S source (key) length, N batch, E embed dim, H heads, D = E/H head dim.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks as _masks
from .. import recording
from ..functional import attention
from ._common import and_masks, attend, check_pos_int

__all__ = ["MultiheadAttention"]


def _selfattn_runs_the_attention(module, args):
    return None  # see MultiheadAttention.__init__: its presence turns torch's fused encoder fast path off


class MultiheadAttention(nn.Module):
    """Same constructor, parameters (state_dict keys), forward and return as ``torch.nn.MultiheadAttention``;
    the attention itself runs in selfattn's kernels.

    Masks keep torch's conventions: bool True = NOT allowed; float masks are added to the scores. Bool masks
    become ``selfattn.masks`` objects (so fully masked tiles are skipped), float masks a bias tensor.
    need_weights=False: automatic kernel (tiled for long sequences). need_weights=True: the reference kernel with
    exact weights; rows where every key is masked give output 0 and weights 0 (torch gives NaN there).
    is_causal is, as in torch, a hint that attn_mask is causal: without key_padding_mask and need_weights it
    runs a top-left causal mask (tiles above the diagonal skipped) instead of reading attn_mask.
    Dropout draws its pattern from selfattn's counter-based generator, so it is not bit-equal to torch's; the
    returned weights are the ones before dropout.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        check_pos_int("embed_dim", embed_dim, False)
        check_pos_int("num_heads", num_heads, False)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: embed_dim={embed_dim} must be divisible by it, got {num_heads}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        # torch's Transformer layers take a fused fast path in eval / no_grad that reads this module's weights and
        # runs torch's own kernel instead of calling forward; they skip it when any submodule has a forward hook.
        # This no-op pre-hook keeps selfattn's kernel the one that runs inside nn.TransformerEncoderLayer.
        self.register_forward_pre_hook(_selfattn_runs_the_attention)

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """As torch.nn.MultiheadAttention.merge_masks: (merged mask, type), type 1 for key_padding_mask alone, 2
        when attn_mask is given (expanded to (N, H, L, S), plus the padding if any), (None, None) for neither."""
        mask_type, merged = None, None
        if key_padding_mask is not None:
            mask_type, merged = 1, key_padding_mask
        if attn_mask is not None:
            Nb, L, _ = query.shape
            mask_type = 2
            if attn_mask.dim() == 3:
                merged = attn_mask.view(Nb, -1, L, L)  # (N, H, L, L)
            else:
                merged = attn_mask.view(1, 1, L, L).expand(Nb, self.num_heads, -1, -1)  # (N, H, L, L)
            if key_padding_mask is not None:
                merged = merged + key_padding_mask.view(Nb, 1, 1, L).expand(-1, self.num_heads, -1, -1)
        return merged, mask_type

    def _reset_parameters(self):
        # torch's initialization, so a freshly built layer is distributed like torch's
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _in_proj(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w.chunk(3)
            if query is key and key is value:
                return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)  # self-attention: one matmul
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    @staticmethod
    def _check_mask(name: str, m, shapes):
        if m is None:
            return None
        if not isinstance(m, Tensor):
            raise TypeError(f"{name}: expected a bool or float tensor, got {type(m).__name__}")
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"{name}: expected a bool (True = not allowed) or float (added) tensor, got {m.dtype}")
        if tuple(m.shape) not in shapes:
            raise ValueError(f"{name}: expected shape {' or '.join(str(s) for s in shapes)}, got {tuple(m.shape)}")
        return m

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """query (L, N, E) / (N, L, E) with batch_first / (L, E) unbatched; key (S, N, kdim), value (S, N, vdim).
        key_padding_mask (N, S) or (S,); attn_mask (L, S) or (N·H, L, S). Returns (output like query,
        weights (N, L, S) averaged over heads or (N, H, L, S), unbatched without N; None if not need_weights)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value: expected all 3-dim (batched) or all 2-dim (unbatched), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E)
            if key_padding_mask is not None and isinstance(key_padding_mask, Tensor):
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (L, N, E)
        L, Nb, E = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"query, key, value: expected last dims ({self.embed_dim}, {self.kdim}, {self.vdim}), "
                             f"got {E}, {key.shape[-1]}, {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != Nb:
            raise ValueError(f"key, value: expected (S, N={Nb}) leading dims alike, got {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        key_padding_mask = self._check_mask("key_padding_mask", key_padding_mask, [(Nb, S)])
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal: torch.nn.MultiheadAttention needs attn_mask with the is_causal hint "
                               "(e.g. nn.Transformer.generate_square_subsequent_mask); pass it too")
        use_causal = is_causal and key_padding_mask is None and not need_weights
        # under the hint torch ignores attn_mask (and so never checks its shape); otherwise it is read
        attn_mask = None if use_causal else self._check_mask("attn_mask", attn_mask, [(L, S), (Nb * H, L, S)])

        q, k, v = self._in_proj(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        extra = 0  # keys appended after S (bias_k, zero attention): always allowed
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, Nb, E)])  # (S+1, N, E)
            v = torch.cat([v, self.bias_v.expand(1, Nb, E)])
            extra += 1
        q = q.reshape(L, Nb, H, D).permute(1, 2, 0, 3)  # (N, H, L, D)
        k = k.reshape(k.shape[0], Nb, H, D).permute(1, 2, 0, 3)  # (N, H, S', D)
        v = v.reshape(v.shape[0], Nb, H, D).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            z = torch.zeros(Nb, H, 1, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, z], dim=2), torch.cat([v, z], dim=2)  # (N, H, S'+1, D)
            extra += 1

        mask, bias = None, None
        if use_causal:
            mask = _masks.causal("top_left")  # torch ignores attn_mask under the hint; so do we
        else:
            for m, shape4 in ((attn_mask, (1, 1, L, S) if attn_mask is not None and attn_mask.dim() == 2
                               else (Nb, H, L, S)),
                              (key_padding_mask, (Nb, 1, 1, S))):
                if m is None:
                    continue
                m = m.reshape(shape4)
                if extra:
                    m = F.pad(m, (0, extra), value=False if m.dtype == torch.bool else 0.0)
                if m.dtype == torch.bool:
                    mask = and_masks(mask, _masks.from_tensor(~m))  # torch: True = not allowed
                else:
                    m = m.to(q.dtype)
                    bias = m if bias is None else bias + m
        p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(D)
        weights = None
        if need_weights:
            out, lse, weights = self._weights_path(q, k, v, mask, bias, scale, p)
            if recording.active():
                recording.emit(recording.AttentionRecord(self, q, k, v, mask, bias, None, scale, lse))
        else:
            out = attend(self, q, k, v, mask, bias, scale, p, None)  # (N, H, L, D)
        out = out.permute(2, 0, 1, 3).reshape(L, Nb, E)  # (L, N, E)
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (N, L, S')
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)  # (N, L, E)
        return out, weights

    def _weights_path(self, q, k, v, mask, bias, scale, p):
        """The reference kernel: exact weights (B, H, L, S') beside the output, rows with no key all 0."""
        out, lse, w = attention(q, k, v, mask, bias=bias, scale=scale, dropout_p=p, return_lse=True,
                                return_weights=True)
        return out, lse, w
