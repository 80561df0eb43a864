"""Cross-view camera prompts for the CLIP vision blocks, read through a zero-gated attention.

Every camera (camid 0 = ground, 1/2 = the two UAV sessions) owns `num_tokens` learnable tokens per prompted
block. Instead of concatenating them to the attention sequence (which changes the softmax of every token even
at init), each block attends to them with a separate softmax whose output is scaled by a per-head gate that
starts at zero, as in LLaMA-Adapter's zero-init attention. A fresh model is therefore exactly CLIP; the gate
gets a gradient at once and the prompt tokens from the second optimizer step on.
"""

import torch
import torch.nn.functional as F
from torch import nn

from farreid.models.checks import value_checks


class CameraPrompts(nn.Module):
    """Learnable prompt tokens, one set per (block, camera).

    Args:
        num_blocks: number of prompted blocks K (the first K blocks of the backbone).
        num_cameras: number of camera ids; camids must lie in [0, num_cameras).
        num_tokens: prompt tokens per camera and block.
        dim: token width d.
        init_std: standard deviation of the normal initialisation of the tokens.
    """

    def __init__(self, num_blocks: int, num_cameras: int, num_tokens: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        for name, value in (("num_blocks", num_blocks), ("num_cameras", num_cameras), ("num_tokens", num_tokens)):
            if value <= 0:
                raise ValueError(f"CameraPrompts.{name} must be positive, got {value}")
        self.num_blocks = num_blocks
        self.num_cameras = num_cameras
        self.tokens = nn.Parameter(torch.randn(num_blocks, num_cameras, num_tokens, dim) * init_std)

    def forward(self, block: int, camids: torch.Tensor) -> torch.Tensor:
        """Prompt tokens of one block for a batch.

        Args:
            block: block index in [0, num_blocks).
            camids: (B,) integer camera ids in [0, num_cameras).

        Returns:
            (B, num_tokens, d) prompt tokens.
        """
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"CameraPrompts has {self.num_blocks} blocks, got block={block}")
        return self.tokens[block][camids.long()]

    def check_camids(self, camids: torch.Tensor) -> None:
        """Raise unless ``camids`` is (B,) with values in [0, num_cameras).

        Called once per forward pass by the backbone, not per block. The range check reads the values back to
        the host, a synchronisation on a GPU: it runs on CPU tensors, and on accelerators only under
        ``FARREID_CHECKS=1`` (see :mod:`farreid.models.checks`).
        """
        if camids.dim() != 1:
            raise ValueError(f"camids must have shape (B,), got {tuple(camids.shape)}")
        if not value_checks(camids):
            return
        low, high = int(camids.min()), int(camids.max())
        if low < 0 or high >= self.num_cameras:
            raise ValueError(f"camids must lie in [0, {self.num_cameras}), got values in [{low}, {high}]")


class ZeroGatedPromptAttention(nn.Module):
    """Attention of the sequence's queries to prompt keys/values, scaled by a zero-initialised per-head gate.

    Args:
        num_heads: number of attention heads of the host block.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(num_heads))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Gated attention to the prompts, with its own softmax over the prompt tokens.

        Args:
            q: (B, heads, N, d_head) queries of the sequence.
            k: (B, heads, P, d_head) prompt keys.
            v: (B, heads, P, d_head) prompt values.

        Returns:
            (B, heads, N, d_head), to be added to the block's ordinary attention output; zero at init.
        """
        out = F.scaled_dot_product_attention(q, k, v)
        return self.gate.to(out.dtype).view(1, -1, 1, 1) * out  # gate (heads,) -> (1, heads, 1, 1)
