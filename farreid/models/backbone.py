"""CLIP vision tower for video ReID: local loading, selective unfreezing, adapter and camera-prompt insertion.

The Hugging Face modules supply the weights (embeddings, each encoder layer's sub-modules, the layer norms and
the visual projection); the loop over the blocks is written here so that adapters and prompt attention sit
where VSLA-CLIP puts them. Per block, with x the (B*T, N, d) tokens of every frame:

    h = LN1(x);   a = SDPA(q, k, v of h) + gate * Attn(q, k/v of LN1(camera prompt tokens))
    x = x + out_proj(a) + CrossFrameAdapter(h)          # attention across the T frames, per token position
    h2 = LN2(x);  x = x + MLP(h2) + IntraFrameAdapter(h2)

Optionally (farreid's addition beyond the paper, :mod:`farreid.models.geometry`), each tracklet's altitude, distance
and pitch condition the model: geometry prompt tokens added to the camera prompts, and a low-rank geometry-conditioned
transformation of the queries and keys in chosen blocks.

Gates, adapter up projections and the geometry modules' last layers start at zero, so a fresh model reproduces CLIP
exactly. The cross-frame adapter
reads LN1(x) rather than the raw residual stream, whose scale grows with depth, like the attention it parallels.
"""

import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from farreid.models import clip_dir
from farreid.models.adapters import CrossFrameAdapter, IntraFrameAdapter
from farreid.models.block import AdaptedBlock
from farreid.models.geometry import GeometryEncoder, GeometryPrompts, GeometryQK
from farreid.models.prompts import CameraPrompts, ZeroGatedPromptAttention

_TEXT_KEYS = ("text_model.", "text_projection.", "logit_scale")
# Modules added on top of CLIP: always trainable, full learning rate.
_NEW_MODULES = frozenset(
    {
        "intra_adapter",
        "cross_frame_adapter",
        "prompt_attention",
        "camera_prompts",
        "geometry_encoder",
        "geometry_prompts",
        "geometry_qk",
    }
)
_EXPECTED_DIR = "a local directory saved by CLIPModel, CLIPVisionModel or CLIPVisionModelWithProjection.save_pretrained"


class BackboneOutput(NamedTuple):
    """Per-frame features: `cls` (B, T, D) post-layernorm CLS; `proj` (B, T, P) its visual projection;
    `mid_cls` (B, T, D) the post-layernorm CLS after `mid_block`, or None when disabled."""

    cls: torch.Tensor
    proj: torch.Tensor
    mid_cls: torch.Tensor | None


def load_clip_vision(pretrained: str | None, config: dict | None) -> tuple[CLIPVisionModelWithProjection, bool]:
    """Build the HF vision tower from a local `save_pretrained` directory or from CLIPVisionConfig kwargs.

    Returns:
        The tower and whether its visual projection was created randomly (absent from the directory).
    """
    pretrained, config = clip_dir.source(pretrained, config, "model.backbone.init_args")
    if config is not None:
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config)), False
    path = Path(pretrained).expanduser()
    try:
        tower, info = clip_dir.load_tower(CLIPVisionModelWithProjection, path, clip_dir.tower_config(path, "vision"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"pretrained={str(path)!r}: could not load a CLIP vision tower, expected {_EXPECTED_DIR}"
        ) from err
    missing = set(info["missing_keys"])
    projection_is_new = "visual_projection.weight" in missing
    missing.discard("visual_projection.weight")
    if missing or info["mismatched_keys"]:
        raise ValueError(
            f"pretrained={str(path)!r}: expected {_EXPECTED_DIR}; missing weights {sorted(missing)}, "
            f"mismatched {sorted(str(k) for k in info['mismatched_keys'])}"
        )
    ignored = sorted(k for k in info["unexpected_keys"] if not k.startswith(_TEXT_KEYS))
    if ignored:
        warnings.warn(f"pretrained={str(path)!r}: ignored {len(ignored)} unknown weights: {ignored[:5]}", stacklevel=3)
    if projection_is_new:
        warnings.warn(f"pretrained={str(path)!r} has no visual projection: a random one will train", stacklevel=3)
    return tower, projection_is_new


def _block_index(value: int, depth: int, name: str, clip: bool) -> int:
    """Resolve a possibly negative block index; out of range it is clipped with a warning, or an error."""
    index = value + depth if value < 0 else value
    clipped = min(max(index, 0), depth - 1)
    if clipped != index and not clip:
        raise ValueError(f"CLIPVisionBackbone.{name}: block {value} does not exist in a {depth}-block model")
    if clipped != index:
        warnings.warn(f"CLIPVisionBackbone.{name}={value} outside {depth} blocks: using {clipped}", stacklevel=3)
    return clipped


class CLIPVisionBackbone(nn.Module):
    """CLIP ViT with selective fine-tuning, VSLA-CLIP adapters and zero-gated per-camera prompts.

    Args:
        pretrained: local directory of a CLIPModel / CLIPVisionModel / CLIPVisionModelWithProjection saved with
            `save_pretrained` (never downloaded). Exactly one of `pretrained` and `config` is given.
        config: CLIPVisionConfig kwargs of a randomly initialised tower.
        trainable_blocks: the last N blocks train (N above the depth: all); 0 freezes the tower; -1 fine-tunes
            everything. The post layer norm and the projection train whenever this is not 0.
        adapter_dim: bottleneck width of the adapters; 0 disables both adapters.
        intra_adapter: add the intra-frame adapter parallel to each chosen block's MLP.
        cross_frame_adapter: add the cross-frame adapter parallel to each chosen block's self-attention.
        adapter_heads: attention heads of the cross-frame adapter.
        adapter_blocks: indices of the blocks that get adapters (negative counts from the end); None = all.
        num_cameras: number of camera ids (0 ground, 1/2 UAV sessions).
        prompt_blocks: the first K blocks get camera prompts (clipped to the depth); 0 disables prompts.
        prompt_tokens: prompt tokens per camera and block.
        mid_block: block whose output CLS is returned as `mid_cls` (negative counts from the end); None = off.
        checkpoint_blocks: the first N blocks recompute their activations in the backward pass while training
            (activation checkpointing: about +1/3 of the compute of each such block, its activations not kept);
            0 = none, -1 = all. The first blocks are chosen because the last ones usually train in full, so
            their weights' gradients need their inputs anyway. See docs/GPU.md for picking N from memory.
        geometry_prompts: add prompt tokens generated from the tracklet's geometry to the camera prompts (needs
            prompt_blocks > 0).
        geometry_qk_blocks: blocks (negative counts from the end) whose queries and keys get the geometry-conditioned
            low-rank transformation; None or [] = off.
        geometry_qk_rank: rank of that transformation.
        geometry_dim: width of the geometry code. geometry_frequencies: Fourier frequencies per quantity.
        compile: compile each block with `torch.compile` (one graph per block: the loop, the prompts and the
            output reshapes stay eager). Off by default; needs a C compiler on the CPU and Triton on a GPU.
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        config: dict | None = None,
        trainable_blocks: int = 2,
        adapter_dim: int = 256,
        intra_adapter: bool = True,
        cross_frame_adapter: bool = True,
        adapter_heads: int = 4,
        adapter_blocks: list[int] | None = None,
        num_cameras: int = 3,
        prompt_blocks: int = 9,
        prompt_tokens: int = 4,
        mid_block: int | None = -4,
        checkpoint_blocks: int = 0,
        geometry_prompts: bool = False,
        geometry_qk_blocks: list[int] | None = None,
        geometry_qk_rank: int = 4,
        geometry_dim: int = 64,
        geometry_frequencies: int = 4,
        compile: bool = False,
    ) -> None:
        super().__init__()
        pretrained, config = clip_dir.source(pretrained, config, "model.backbone.init_args")
        tower, projection_is_new = load_clip_vision(pretrained, config)
        vision = tower.vision_model
        layers = vision.encoder.layers
        depth, dim, heads = len(layers), tower.config.hidden_size, tower.config.num_attention_heads
        self.pretrained = None if pretrained is None else str(pretrained)  # read by the checkpoint hooks
        self.embed_dim: int = dim
        self.proj_dim: int = tower.config.projection_dim
        if trainable_blocks < -1:
            raise ValueError(f"trainable_blocks must be -1 (all), 0 (frozen) or a block count, got {trainable_blocks}")
        if adapter_dim < 0 or prompt_blocks < 0:
            raise ValueError(f"adapter_dim and prompt_blocks must be >= 0, got {adapter_dim=}, {prompt_blocks=}")
        chosen = set(range(depth) if adapter_blocks is None else adapter_blocks)
        chosen = {_block_index(i, depth, "adapter_blocks", clip=False) for i in chosen}
        self.num_prompt_blocks = min(prompt_blocks, depth)
        if prompt_blocks > depth:
            warnings.warn(f"CLIPVisionBackbone: prompt_blocks={prompt_blocks} > depth {depth}, using all", stacklevel=2)
        self.mid_block = None if mid_block is None else _block_index(mid_block, depth, "mid_block", clip=True)
        qk_blocks = {_block_index(i, depth, "geometry_qk_blocks", clip=False) for i in geometry_qk_blocks or ()}
        if geometry_prompts and not self.num_prompt_blocks:
            raise ValueError("CLIPVisionBackbone.geometry_prompts=true needs camera prompts (prompt_blocks > 0)")
        self.uses_geometry = bool(geometry_prompts or qk_blocks)

        self.embeddings = vision.embeddings
        self.pre_layrnorm = vision.pre_layrnorm
        self.blocks = nn.ModuleList(
            AdaptedBlock(
                layer,
                IntraFrameAdapter(dim, adapter_dim) if adapter_dim and intra_adapter and i in chosen else None,
                CrossFrameAdapter(dim, adapter_dim, adapter_heads)
                if adapter_dim and cross_frame_adapter and i in chosen
                else None,
                ZeroGatedPromptAttention(heads) if i < self.num_prompt_blocks else None,
                GeometryQK(dim, geometry_qk_rank, geometry_dim) if i in qk_blocks else None,
            )
            for i, layer in enumerate(layers)
        )
        self.post_layernorm = vision.post_layernorm
        self.visual_projection = tower.visual_projection
        self.camera_prompts = (
            CameraPrompts(self.num_prompt_blocks, num_cameras, prompt_tokens, dim) if self.num_prompt_blocks else None
        )
        self.geometry_encoder = GeometryEncoder(geometry_dim, geometry_frequencies) if self.uses_geometry else None
        self.geometry_prompts = (
            GeometryPrompts(self.num_prompt_blocks, prompt_tokens, dim, geometry_dim) if geometry_prompts else None
        )
        self._projection_is_new = projection_is_new
        self._set_trainable(trainable_blocks, projection_is_new)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        if checkpoint_blocks < -1:
            raise ValueError(f"checkpoint_blocks must be -1 (all), 0 (none) or a block count, got {checkpoint_blocks}")
        self.checkpoint_blocks = depth if checkpoint_blocks == -1 else min(checkpoint_blocks, depth)
        if compile:
            for block in self.blocks:  # in place: parameter and state-dict names stay unchanged
                block.compile()

    def _set_trainable(self, trainable_blocks: int, projection_is_new: bool) -> None:
        """Freeze every pretrained weight, then unfreeze the chosen ones; new modules always train."""
        self.requires_grad_(False)
        if trainable_blocks == -1:
            trainable = [self.embeddings, self.pre_layrnorm, *(b.layer for b in self.blocks)]
        else:
            trainable = [b.layer for b in self.blocks[len(self.blocks) - min(trainable_blocks, len(self.blocks)) :]]
        if trainable_blocks != 0:
            trainable.append(self.post_layernorm)
        if trainable_blocks != 0 or projection_is_new:
            trainable.append(self.visual_projection)
        trainable += [m for n, m in self.named_modules() if n.rpartition(".")[2] in _NEW_MODULES]
        for module in trainable:
            module.requires_grad_(True)

    def _is_new(self, name: str) -> bool:
        from_checkpoint = self._projection_is_new and name.startswith("visual_projection.")
        return from_checkpoint or not _NEW_MODULES.isdisjoint(name.split("."))

    def pretrained_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The pretrained weights that train (they get the backbone learning-rate multiplier)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not self._is_new(n)]

    def new_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Adapters, prompt tokens, prompt gates (and a projection absent from the checkpoint): full learning rate."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and self._is_new(n)]

    def _position_embedding(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(1, N, D) position embeddings for an input of height x width pixels, interpolated as HF does; cached
        while the table is frozen (keyed on its version counter, so loading a state dict invalidates it)."""
        table = self.embeddings.position_embedding.weight
        if table.requires_grad:
            return self.embeddings.interpolate_pos_encoding(tokens, height, width)
        mode = torch.is_inference_mode_enabled()
        key = (height, width, table.device, table.dtype, table._version, table.data_ptr(), mode)
        if key not in self._pos_cache:
            with torch.no_grad():
                self._pos_cache = {key: self.embeddings.interpolate_pos_encoding(tokens, height, width)}
        return self._pos_cache[key]

    @property
    def patch_size(self) -> int:
        return self.embeddings.patch_embedding.kernel_size[0]

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patches the tower sees in a height x width frame: whole patches only.

        A frame whose sides are not multiples of the patch size is cropped to whole patches from the top-left
        corner, as the strided patch convolution of the CLIP-ReID code lineage does: 256x128 with 14-pixel patches
        is seen as 252x126, an 18x9 grid (the last 4 rows and 2 columns are not seen), and the pretrained
        position table is interpolated to that grid.

        Raises:
            ValueError: a side shorter than one patch.
        """
        patch = self.patch_size
        if height < patch or width < patch:
            raise ValueError(f"frames of {height}x{width} pixels: both sides must be at least the patch size {patch}")
        return height // patch, width // patch

    def forward_features(
        self,
        frames: torch.Tensor,
        camids: torch.Tensor,
        geometry: torch.Tensor | None = None,
        geometry_known: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """Encode every frame of a batch of clips.

        Args:
            frames: (B, T, 3, H, W) normalised pixels; cropped to whole patches (see :meth:`patch_grid`).
            camids: (B,) integer camera ids in [0, num_cameras).
            geometry: (B, 3) normalised altitude, distance, pitch (:mod:`farreid.data.geometry`), or None (all
                unknown). Read only when a geometry mechanism is on.
            geometry_known: (B, 3) bool, True where the value is known.

        Returns:
            BackboneOutput with cls (B, T, D), proj (B, T, P), mid_cls (B, T, D) | None.
        """
        if frames.dim() != 5:
            raise ValueError(f"frames must have shape (B, T, 3, H, W), got {tuple(frames.shape)}")
        batch, num_frames, _, height, width = frames.shape
        if camids.shape != (batch,):
            raise ValueError(f"camids must have shape ({batch},) to match frames, got {tuple(camids.shape)}")
        rows, columns = self.patch_grid(height, width)
        height, width = rows * self.patch_size, columns * self.patch_size
        frames = frames[..., :height, :width]  # a no-op view when the sides are whole patches
        patch = self.embeddings.patch_embedding
        pixels = frames.flatten(0, 1).to(patch.weight.dtype)  # (B, T, 3, H, W) -> (B*T, 3, H, W)
        x = patch(pixels).flatten(2).transpose(1, 2)  # (B*T, D, h, w) -> (B*T, h*w, D)
        cls_token = self.embeddings.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B*T, 1, D)
        x = torch.cat([cls_token, x], dim=1)  # (B*T, N, D), N = 1 + h*w
        x = self.pre_layrnorm(x + self._position_embedding(x, height, width))
        if self.camera_prompts is not None:
            self.camera_prompts.check_camids(camids)
        frame_camids = camids.repeat_interleave(num_frames)  # (B,) -> (B*T,)
        codes = None if self.geometry_encoder is None else self.geometry_encoder.codes(batch, geometry, geometry_known)
        geo_prompts = None if self.geometry_prompts is None else self.geometry_prompts(codes)  # (B, K, P, D)
        frame_codes = None if codes is None else codes.repeat_interleave(num_frames, dim=0)  # (B, E) -> (B*T, E)
        mid = None
        for i, block in enumerate(self.blocks):
            prompts = self.camera_prompts(i, frame_camids) if i < self.num_prompt_blocks else None  # (B*T, P, D)
            if prompts is not None and geo_prompts is not None:
                prompts = prompts + geo_prompts[:, i].repeat_interleave(num_frames, dim=0).to(prompts.dtype)
            if i < self.checkpoint_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, num_frames, prompts, frame_codes, use_reentrant=False)
            else:
                x = block(x, num_frames, prompts, frame_codes)
            if i == self.mid_block:
                mid = self.post_layernorm(x[:, 0])  # (B*T, D)
        cls = self.post_layernorm(x[:, 0])  # (B*T, D)
        proj = self.visual_projection(cls)  # (B*T, P)
        # (B*T, D | P) -> (B, T, D | P)
        return BackboneOutput(*(None if t is None else t.reshape(batch, num_frames, -1) for t in (cls, proj, mid)))

    def forward(self, frames: torch.Tensor, camids: torch.Tensor, geometry=None, geometry_known=None) -> torch.Tensor:
        """(B, T, 3, H, W) frames, (B,) camids and optional (B, 3) geometry -> (B, T, D) post-layernorm CLS."""
        return self.forward_features(frames, camids, geometry, geometry_known).cls
