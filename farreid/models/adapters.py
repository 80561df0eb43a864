"""Bottleneck adapters inserted into the CLIP vision blocks (VSLA-CLIP style).

Both adapters end in a zero-initialised up projection, so a freshly built adapter adds exactly zero to the
residual stream and the backbone reproduces CLIP at step 0. The up projection still receives a gradient at
init (its input, the bottleneck activation, is non-zero); the down projection starts receiving one after the
first optimizer step has moved the up projection away from zero.
"""

import torch
import torch.nn.functional as F
from torch import nn


class IntraFrameAdapter(nn.Module):
    """Per-token bottleneck MLP, run in parallel to a block's MLP: d -> bottleneck -> GELU -> d.

    Args:
        dim: token width d.
        bottleneck: hidden width of the adapter.
    """

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        if dim <= 0 or bottleneck <= 0:
            raise ValueError(f"IntraFrameAdapter needs dim > 0 and bottleneck > 0, got dim={dim}, {bottleneck=}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map tokens (..., d) to an additive update (..., d); exactly zero at init."""
        return self.up(self.act(self.down(x)))


class CrossFrameAdapter(nn.Module):
    """Multi-head attention across the T frames of a clip, separately for every token position.

    d -> bottleneck, self-attention over the time axis (each of the N token positions of a frame attends to the
    same position in the other frames of its clip), -> d. Padded (repeated) frames are not masked: they are
    copies of real frames, so attending to them only re-weights real content.

    Args:
        dim: token width d.
        bottleneck: width of the attention inside the adapter; must be divisible by `heads`.
        heads: number of attention heads.
    """

    def __init__(self, dim: int, bottleneck: int, heads: int) -> None:
        super().__init__()
        if heads <= 0 or bottleneck <= 0 or bottleneck % heads != 0:
            raise ValueError(f"CrossFrameAdapter needs bottleneck divisible by heads > 0, got {bottleneck=}, {heads=}")
        self.heads = heads
        self.down = nn.Linear(dim, bottleneck)
        self.qkv = nn.Linear(bottleneck, 3 * bottleneck)
        self.out = nn.Linear(bottleneck, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """Attend across frames.

        Args:
            x: tokens, either (B, T, N, d), or (B*T, N, d) with the frames of a clip consecutive and
                `num_frames` = T given.
            num_frames: T when `x` is 3-D; must be None (or equal to x.shape[1]) when `x` is 4-D.

        Returns:
            An additive update of the same shape as `x`; exactly zero at init.
        """
        if x.dim() == 4:
            if num_frames is not None and num_frames != x.shape[1]:
                raise ValueError(f"CrossFrameAdapter got 4-D input with T={x.shape[1]} but {num_frames=}")
            batch, frames, tokens, _ = x.shape
        elif x.dim() == 3:
            if num_frames is None or num_frames <= 0 or x.shape[0] % num_frames != 0:
                raise ValueError(
                    f"CrossFrameAdapter got 3-D input of shape {tuple(x.shape)}: needs num_frames dividing "
                    f"the leading dimension, got {num_frames=}"
                )
            frames, tokens = num_frames, x.shape[1]
            batch = x.shape[0] // frames
        else:
            raise ValueError(f"CrossFrameAdapter expects (B, T, N, d) or (B*T, N, d), got shape {tuple(x.shape)}")

        h = self.down(x)
        width = h.shape[-1]
        h = h.reshape(batch, frames, tokens, width)  # (B*T, N, r) or (B, T, N, r) -> (B, T, N, r)
        h = h.transpose(1, 2).reshape(batch * tokens, frames, width)  # (B, T, N, r) -> (B*N, T, r)
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # each (B*N, T, r)
        # (B*N, T, r) -> (B*N, heads, T, r/heads)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B*N, heads, T, r/heads)
        h = h.transpose(1, 2).flatten(2)  # (B*N, heads, T, r/heads) -> (B*N, T, r)
        h = self.out(h)
        h = h.reshape(batch, tokens, frames, width).transpose(1, 2)  # (B*N, T, r) -> (B, T, N, r)
        h = h.reshape(x.shape[:-1] + (width,))  # (B, T, N, r) -> input layout with width r
        return self.up(h)
