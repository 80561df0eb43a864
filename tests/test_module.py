"""The LightningModule: selective fine-tuning through the real optimizer set-up, losses, checkpoints."""

import copy
import functools
import io

import pytest
import torch

from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.pooling import MeanPooling, TemporalAttentionPooling
from farreid.module import ReIDModule
from farreid.optim import WarmupCosine
from tests.conftest import TINY_VISION_CONFIG

NUM_CLASSES = 4


def _module(trainable_blocks: int, pretrained=None, **kwargs) -> ReIDModule:
    torch.manual_seed(0)
    source = {"pretrained": str(pretrained)} if pretrained else {"config": TINY_VISION_CONFIG}
    backbone = CLIPVisionBackbone(
        **source, trainable_blocks=trainable_blocks, adapter_dim=8, prompt_blocks=1, prompt_tokens=2, mid_block=0
    )
    return ReIDModule(
        backbone=backbone,
        pooling=kwargs.pop("pooling", TemporalAttentionPooling),
        num_classes=NUM_CLASSES,
        lr_scheduler=functools.partial(WarmupCosine, warmup_steps=0),
        **kwargs,
    )


def _batch(b: int = 8, t: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "frames": torch.randn(b, t, 3, 32, 16, generator=g),
        "mask": torch.ones(b, t, dtype=torch.bool),
        "camid": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])[:b],
        "label": torch.arange(b) % NUM_CLASSES,
        "index": torch.arange(b),
    }


@pytest.mark.parametrize("trainable_blocks", [0, 1, -1])
def test_optimizer_step_trains_exactly_the_chosen_weights(trainable_blocks):
    """The known defect (DOMAIN.md §4): the optimizer set-up must not re-freeze the unfrozen last blocks."""
    module = _module(trainable_blocks)
    module.train()
    optimizer = module.build_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss = sum(module.losses(_batch()).values())
    loss.backward()
    for name, param in module.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
        assert (id(param) in in_optimizer) == param.requires_grad, name
    optimizer.step()
    depth = len(module.backbone.blocks)
    last = {
        f"backbone.blocks.{i}.layer."
        for i in range(depth - (depth if trainable_blocks == -1 else trainable_blocks), depth)
    }
    for name, param in module.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if param.requires_grad:
            # Weights with a zero gradient at step 0 (e.g. what feeds a zero-initialised gate) may stay put;
            # everything the chosen blocks, adapters, pooling and heads hold must move.
            if name.startswith(tuple(last)) or "adapter" in name or name.startswith(("head_", "pooling")):
                assert changed or param.grad.abs().max() == 0, name
        else:
            assert not changed, f"frozen weight {name} changed"
    moved_blocks = {
        n.split(".layer.")[0]
        for n, p in module.named_parameters()
        if ".layer." in n and not torch.equal(before[n], p.detach())
    }
    assert len(moved_blocks) == (depth if trainable_blocks == -1 else trainable_blocks)


def test_lr_multiplier_applies_to_pretrained_blocks_only():
    module = _module(1, backbone_lr_mult=0.1)
    optimizer = module.build_optimizer()
    base = optimizer.defaults["lr"]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone_decay"] == pytest.approx(0.1 * base)
    assert lrs["new_decay"] == pytest.approx(base)
    no_decay = [g for g in optimizer.param_groups if g["name"].endswith("no_decay")]
    assert no_decay and all(g["weight_decay"] == 0.0 for g in no_decay)
    decayed = [p for g in optimizer.param_groups if not g["name"].endswith("no_decay") for p in g["params"]]
    assert decayed and all(p.ndim >= 2 for p in decayed)  # biases and norm weights are never decayed


def test_embedding_is_normalised_and_flip_tta_is_flip_invariant():
    module = _module(1).eval()
    batch = _batch()
    feats, weights = module.embed(batch)
    assert feats.shape == (8, module.backbone.embed_dim + module.backbone.proj_dim)
    assert torch.allclose(feats.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(weights.sum(1), torch.ones(8), atol=1e-5)
    flipped, _ = module.embed(dict(batch, frames=batch["frames"].flip(-1)))
    assert torch.allclose(feats, flipped, atol=1e-5)


def test_mean_pooling_ablation_ignores_padding():
    module = _module(1, pooling=MeanPooling).eval()
    batch = _batch()
    batch["mask"][:, -1] = False
    feats, _ = module.embed(batch)
    batch["frames"][:, -1] = torch.randn_like(batch["frames"][:, -1])
    assert torch.allclose(feats, module.embed(batch)[0], atol=1e-5)


def test_non_finite_loss_names_the_step():
    module = _module(1)
    batch = _batch()
    batch["frames"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="global step 0"):
        module.training_step(batch, 0)


def _saved_bytes(checkpoint: dict) -> int:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.tell()


def test_frozen_backbone_checkpoint_keeps_only_trained_weights(tiny_clip_dir):
    module = _module(0, pretrained=tiny_clip_dir)
    full = {"state_dict": copy.deepcopy(module.state_dict())}
    slim = {"state_dict": copy.deepcopy(module.state_dict())}
    module.on_save_checkpoint(slim)
    assert _saved_bytes(slim) < _saved_bytes(full)
    assert not any(k.startswith("backbone.blocks.0.layer.") for k in slim["state_dict"])
    assert any("adapter" in k for k in slim["state_dict"])
    # Train-side weights change, then the slim checkpoint restores them into a fresh model.
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(1.0)
    slim = {"state_dict": copy.deepcopy(module.state_dict())}
    module.on_save_checkpoint(slim)
    fresh = _module(0, pretrained=tiny_clip_dir)
    fresh.on_load_checkpoint(slim)
    fresh.load_state_dict(slim["state_dict"], strict=True)
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_from_another_config_is_a_clear_error():
    small = _module(1)
    other = ReIDModule(
        backbone=CLIPVisionBackbone(
            config=TINY_VISION_CONFIG, adapter_dim=4, prompt_blocks=1, prompt_tokens=2, mid_block=0
        ),
        num_classes=NUM_CLASSES,
    )
    with pytest.raises(ValueError, match="another config"):
        other.on_load_checkpoint({"state_dict": small.state_dict()})


def test_clip_directory_comes_from_the_environment(tiny_clip_dir, monkeypatch):
    from farreid.models.text import TextPromptLearner

    monkeypatch.setenv("FARREID_CLIP", str(tiny_clip_dir))
    backbone = CLIPVisionBackbone(trainable_blocks=0, adapter_dim=0, prompt_blocks=0, mid_block=None)
    assert backbone.pretrained == str(tiny_clip_dir)
    assert TextPromptLearner(3).proj_dim == backbone.proj_dim
    monkeypatch.delenv("FARREID_CLIP")
    with pytest.raises(ValueError, match="FARREID_CLIP"):
        CLIPVisionBackbone()
