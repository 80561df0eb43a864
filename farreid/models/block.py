"""One CLIP encoder layer with VSLA-CLIP's additions: SDPA attention, zero-gated camera-prompt attention, the
cross-frame adapter parallel to attention, the intra-frame adapter parallel to the MLP and the geometry-conditioned
query/key transformation (each None = off).

Per block, with x the (B*T, N, d) tokens of every frame:

    h = LN1(x);   q, k = GeometryQK(q, k of h, geometry code)     # when the block has one
                  a = SDPA(q, k, v of h) + gate * Attn(q, k/v of LN1(camera prompt tokens))
    x = x + out_proj(a) + CrossFrameAdapter(h)          # attention across the T frames, per token position
    h2 = LN2(x);  x = x + MLP(h2) + IntraFrameAdapter(h2)
"""

import torch
import torch.nn.functional as F
from torch import nn

from farreid.models.adapters import CrossFrameAdapter, IntraFrameAdapter
from farreid.models.geometry import GeometryQK
from farreid.models.prompts import ZeroGatedPromptAttention


class AdaptedBlock(nn.Module):
    """One CLIP encoder layer run with SDPA plus its optional adapters and prompt attention (None = off).

    Args:
        layer: a HF `CLIPEncoderLayer` (layer_norm1, self_attn, layer_norm2, mlp).
        intra_adapter: adapter parallel to the MLP, or None.
        cross_frame_adapter: adapter parallel to self-attention, or None.
        prompt_attention: zero-gated attention to the camera prompts, or None.
        geometry_qk: geometry-conditioned low-rank transformation of the queries and keys, or None.
    """

    def __init__(
        self,
        layer: nn.Module,
        intra_adapter: IntraFrameAdapter | None,
        cross_frame_adapter: CrossFrameAdapter | None,
        prompt_attention: ZeroGatedPromptAttention | None,
        geometry_qk: GeometryQK | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.intra_adapter = intra_adapter
        self.cross_frame_adapter = cross_frame_adapter
        self.prompt_attention = prompt_attention
        self.geometry_qk = geometry_qk

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.layer.self_attn.num_heads, -1)).transpose(1, 2)  # (B, L, d) -> (B, H, L, d/H)

    def forward(
        self, x: torch.Tensor, num_frames: int, prompts: torch.Tensor | None, codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Map tokens (B*T, N, d) (frames of a clip consecutive), prompts (B*T, P, d) | None and geometry codes
        (B*T, E) | None (read only by a block with ``geometry_qk``) to (B*T, N, d)."""
        attn = self.layer.self_attn
        h = self.layer.layer_norm1(x)
        q, k = attn.q_proj(h), attn.k_proj(h)  # (B*T, N, d)
        if self.geometry_qk is not None:
            if codes is None:
                raise ValueError("AdaptedBlock: this block has a geometry_qk transformation but got no geometry codes")
            q, k = self.geometry_qk(q, k, codes)
        q, k, v = self._heads(q), self._heads(k), self._heads(attn.v_proj(h))
        dropout = attn.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=attn.scale)  # (B*T, H, N, d/H)
        if self.prompt_attention is not None and prompts is not None:
            p = self.layer.layer_norm1(prompts)
            a = a + self.prompt_attention(q, self._heads(attn.k_proj(p)), self._heads(attn.v_proj(p)))
        x = x + attn.out_proj(a.transpose(1, 2).flatten(2))  # (B*T, H, N, d/H) -> (B*T, N, d)
        if self.cross_frame_adapter is not None:
            x = x + self.cross_frame_adapter(h, num_frames)
        h2 = self.layer.layer_norm2(x)
        out = x + self.layer.mlp(h2)
        if self.intra_adapter is not None:
            out = out + self.intra_adapter(h2)
        return out
