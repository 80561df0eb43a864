"""Geometry-aware cross-view conditioning: camera altitude, horizontal distance and pitch as model inputs.

farreid's addition beyond the paper. The idea of conditioning attention on the capture geometry comes from GeoReID
(Hambarde & Proença, "Rectifying Geometry-Induced Similarity Distortions for Real-World Aerial-Ground Person
Re-Identification", arXiv 2601.21405); the modules below are farreid's own design:

- :class:`GeometryEncoder`: per tracklet, the three normalised values (in [0, 1], see
  :mod:`farreid.data.geometry`) -> Fourier features -> one embedding per quantity, or that quantity's learned
  "unknown" embedding where the value is not known (never a 0 that would read as 0 m) -> an MLP -> a code (B, E).
- :class:`GeometryPrompts`: the code -> prompt tokens per prompted block, added to the camera prompts.
- :class:`GeometryQK`: in a chosen block, ``q <- q + B_q(s_q(code) * A_q q)`` and the same for the keys: a rank-r
  correction ``(I + B diag(s(code)) A)`` of the query/key projections whose coefficients depend on the geometry.
  It changes q and k before SDPA, so the fused attention kernel is kept.

Both mechanisms start as the identity: the last layer of the prompt generator and the up projections B of the
query/key correction are zero, so a fresh model gives exactly the output it gives without them.
"""

import math

import torch
from torch import nn

NUM_QUANTITIES = 3  # altitude, horizontal distance, pitch (farreid.data.geometry.QUANTITIES)


class GeometryEncoder(nn.Module):
    """Normalised geometry and its known-mask -> one code per tracklet.

    Args:
        dim: width E of the code.
        num_frequencies: Fourier frequencies per quantity (features x, sin(2^k pi x), cos(2^k pi x), k < F).
    """

    def __init__(self, dim: int = 64, num_frequencies: int = 4) -> None:
        super().__init__()
        if dim <= 0 or num_frequencies <= 0:
            raise ValueError(f"GeometryEncoder: dim and num_frequencies must be positive, got {dim}, {num_frequencies}")
        self.dim = dim
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(num_frequencies), persistent=False)
        features = 1 + 2 * num_frequencies
        self.embed = nn.ModuleList(nn.Linear(features, dim) for _ in range(NUM_QUANTITIES))
        self.unknown = nn.Parameter(torch.randn(NUM_QUANTITIES, dim) * 0.02)  # one learned code per quantity
        self.mlp = nn.Sequential(nn.LayerNorm(NUM_QUANTITIES * dim), nn.Linear(NUM_QUANTITIES * dim, dim), nn.GELU())

    def forward(self, values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Encode a batch.

        Args:
            values: (B, 3) normalised altitude, distance, pitch in [0, 1] (any value where unknown).
            known: (B, 3) bool, True where the value is known.

        Returns:
            (B, E) geometry codes.
        """
        if values.dim() != 2 or values.shape[1] != NUM_QUANTITIES or known.shape != values.shape:
            raise ValueError(
                f"geometry must be (B, {NUM_QUANTITIES}) values with a (B, {NUM_QUANTITIES}) known-mask, got "
                f"{tuple(values.shape)} and {tuple(known.shape)}"
            )
        dtype = self.unknown.dtype
        values = torch.where(known, values, torch.zeros_like(values)).to(dtype)  # unknown values never reach a layer
        angles = values.unsqueeze(-1) * self.frequencies.to(dtype)  # (B, 3) -> (B, 3, F)
        features = torch.cat([values.unsqueeze(-1), angles.sin(), angles.cos()], dim=-1)  # (B, 3, 1 + 2F)
        codes = torch.stack([layer(features[:, i]) for i, layer in enumerate(self.embed)], dim=1)  # (B, 3, E)
        codes = torch.where(known.unsqueeze(-1), codes, self.unknown.unsqueeze(0).to(codes.dtype))
        return self.mlp(codes.flatten(1))  # (B, 3, E) -> (B, 3E) -> (B, E)

    def codes(self, batch: int, values: torch.Tensor | None, known: torch.Tensor | None) -> torch.Tensor:
        """(B, E) codes of a batch of B tracklets; ``values`` None means all unknown (a dataset without geometry)."""
        if values is None:
            values = self.unknown.new_zeros(batch, NUM_QUANTITIES)
            known = torch.zeros(batch, NUM_QUANTITIES, dtype=torch.bool, device=values.device)
        elif known is None:
            raise ValueError("geometry was given without geometry_known: pass the (B, 3) known-mask with it")
        if values.shape != (batch, NUM_QUANTITIES):
            raise ValueError(f"geometry must have shape ({batch}, {NUM_QUANTITIES}), got {tuple(values.shape)}")
        return self(values, known.bool())


class GeometryPrompts(nn.Module):
    """Geometry code -> prompt tokens of every prompted block, added to that block's camera prompts.

    Args:
        num_blocks: prompted blocks K (the camera prompts' blocks).
        num_tokens: tokens per block (the camera prompts' count).
        dim: token width d.
        code_dim: width E of the geometry code.
    """

    def __init__(self, num_blocks: int, num_tokens: int, dim: int, code_dim: int) -> None:
        super().__init__()
        self.shape = (num_blocks, num_tokens, dim)
        self.hidden = nn.Sequential(nn.Linear(code_dim, code_dim), nn.GELU())
        self.out = nn.Linear(code_dim, num_blocks * num_tokens * dim)
        nn.init.zeros_(self.out.weight)  # zero tokens at init: the camera prompts alone, exactly
        nn.init.zeros_(self.out.bias)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, E) codes -> (B, K, tokens, d) prompt tokens."""
        return self.out(self.hidden(codes)).unflatten(1, self.shape)  # (B, K*P*d) -> (B, K, P, d)


class LowRankGeometryMap(nn.Module):
    """``x + B(s(code) * A x)``: a rank-r, geometry-scaled correction of a (.., N, d) projection (B zero at init)."""

    def __init__(self, dim: int, rank: int, code_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        nn.init.normal_(self.down.weight, std=dim**-0.5)
        self.scale = nn.Linear(code_dim, rank)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """x (M, N, d), codes (M, E) -> (M, N, d)."""
        scale = self.scale(codes).to(x.dtype).unsqueeze(1)  # (M, r) -> (M, 1, r)
        return x + self.up(scale * self.down(x))


class GeometryQK(nn.Module):
    """Geometry-conditioned low-rank transformation of one block's attention queries and keys.

    Args:
        dim: token width d. rank: rank r of the correction. code_dim: width E of the geometry code.
    """

    def __init__(self, dim: int, rank: int, code_dim: int) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"GeometryQK.rank must be positive, got {rank}")
        self.query = LowRankGeometryMap(dim, rank, code_dim)
        self.key = LowRankGeometryMap(dim, rank, code_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected queries and keys (M, N, d) of M = B*T frames and their codes (M, E) -> rectified (q, k)."""
        return self.query(q, codes), self.key(k, codes)
