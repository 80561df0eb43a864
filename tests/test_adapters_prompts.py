"""Adapters and camera prompts: zero at init, brute-force references once perturbed, and where they act."""

import math

import pytest
import torch
import torch.nn.functional as F

from farreid.models.adapters import CrossFrameAdapter, IntraFrameAdapter
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.prompts import CameraPrompts, ZeroGatedPromptAttention
from tests.conftest import TINY_VISION_CONFIG


def perturb(module: torch.nn.Module, suffixes: tuple[str, ...] = ("up.weight", "up.bias", ".gate", "gate")) -> None:
    """Move the zero-initialised parameters away from zero, as training would."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(suffixes):
                param.normal_(std=0.5)


def test_intra_adapter_zero_then_bottleneck_mlp():
    torch.manual_seed(0)
    adapter = IntraFrameAdapter(6, 3)
    x = torch.randn(2, 5, 6)
    assert torch.equal(adapter(x), torch.zeros_like(x))
    perturb(adapter)
    hidden = F.gelu(x @ adapter.down.weight.T + adapter.down.bias)
    torch.testing.assert_close(adapter(x), hidden @ adapter.up.weight.T + adapter.up.bias)


def cross_frame_reference(adapter: CrossFrameAdapter, x: torch.Tensor) -> torch.Tensor:
    """Loop over clips, token positions and heads: attention across the T frames, written out by hand."""
    batch, frames, tokens, _ = x.shape
    width = adapter.down.out_features
    head_dim = width // adapter.heads
    out = torch.zeros(batch, frames, tokens, adapter.up.out_features)
    for b in range(batch):
        for n in range(tokens):
            h = adapter.down(x[b, :, n])  # (T, r)
            q, k, v = adapter.qkv(h).split(width, dim=-1)
            heads = []
            for i in range(adapter.heads):
                cols = slice(i * head_dim, (i + 1) * head_dim)
                scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)  # (T, T)
                heads.append(scores.softmax(dim=-1) @ v[:, cols])
            out[b, :, n] = adapter.up(adapter.out(torch.cat(heads, dim=-1)))
    return out


def test_cross_frame_adapter_matches_loop_reference_in_both_layouts():
    torch.manual_seed(0)
    adapter = CrossFrameAdapter(6, 4, heads=2)
    x = torch.randn(2, 3, 5, 6)  # (B, T, N, d)
    assert torch.equal(adapter(x), torch.zeros_like(x))
    perturb(adapter)
    with torch.no_grad():
        reference = cross_frame_reference(adapter, x)
        torch.testing.assert_close(adapter(x), reference, rtol=1e-5, atol=1e-6)
        flat = adapter(x.flatten(0, 1), num_frames=3)  # (B*T, N, d) layout
        torch.testing.assert_close(flat, reference.flatten(0, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_frames"):
        adapter(x.flatten(0, 1), num_frames=4)
    with pytest.raises(ValueError, match="bottleneck divisible"):
        CrossFrameAdapter(6, 5, heads=2)


def test_camera_prompts_select_block_and_camera():
    prompts = CameraPrompts(num_blocks=2, num_cameras=3, num_tokens=4, dim=5)
    camids = torch.tensor([2, 0, 2])
    tokens = prompts(1, camids)
    assert tokens.shape == (3, 4, 5)
    for row, cam in enumerate(camids.tolist()):
        assert torch.equal(tokens[row], prompts.tokens[1, cam])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        prompts.check_camids(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        prompts.check_camids(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(IndexError, match="block=2"):
        prompts(2, camids)


def test_zero_gated_prompt_attention():
    torch.manual_seed(0)
    gated = ZeroGatedPromptAttention(num_heads=2)
    q, k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4)
    out = gated(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    (out * torch.randn_like(out)).sum().backward()
    assert bool((gated.gate.grad != 0).all())  # the gate learns from step 0
    with torch.no_grad():
        gated.gate.copy_(torch.tensor([0.5, -2.0]))
    weights = (q @ k.transpose(-1, -2) / 2.0).softmax(dim=-1)  # a separate softmax over the 6 prompts, d_head = 4
    expected = torch.tensor([0.5, -2.0]).view(1, 2, 1, 1) * (weights @ v)
    torch.testing.assert_close(gated(q, k, v).detach(), expected)


def tiny_backbone(**kwargs) -> CLIPVisionBackbone:
    torch.manual_seed(0)
    options = {"adapter_dim": 8, "adapter_heads": 2, "prompt_blocks": 2, "mid_block": None, **kwargs}
    model = CLIPVisionBackbone(config=TINY_VISION_CONFIG, **options).eval()
    perturb(model)
    return model


def test_frames_interact_only_through_the_cross_frame_adapter():
    torch.manual_seed(1)
    frames, camids = torch.randn(1, 3, 3, 32, 16), torch.tensor([1])
    changed = frames.clone()
    changed[0, 2] += 1.0  # alter the last frame only
    with torch.no_grad():
        for cross, expect_mixing in ((False, False), (True, True)):
            model = tiny_backbone(cross_frame_adapter=cross)
            first_frames_moved = (model(frames, camids) - model(changed, camids))[0, :2].abs().max()
            assert bool(first_frames_moved > 1e-4) == expect_mixing


def test_camera_prompts_act_once_gates_open():
    torch.manual_seed(1)
    frames = torch.randn(2, 2, 3, 32, 16)
    same_frames = torch.cat([frames[:1], frames[:1]])  # two identical clips seen from different cameras
    camids = torch.tensor([0, 1])
    with torch.no_grad():
        out = tiny_backbone()(same_frames, camids)
        assert (out[0] - out[1]).abs().max() > 1e-4
        closed = tiny_backbone()
        for block in closed.blocks:
            block.prompt_attention.gate.zero_()
        out = closed(same_frames, camids)
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)
