"""fp32 where bf16 hurts (losses, retrieval embedding) and slim checkpoints that cannot lose trained weights."""

import copy

import pytest
import torch
import torch.nn.functional as F

from farreid.checkpointing import canonical_key
from farreid.losses import BatchHardTripletLoss, SupConLoss, pairwise_distance, scaled_logits
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.text import TextPromptLearner
from farreid.module import ReIDModule
from tests.conftest import TINY_TEXT_CONFIG, TINY_VISION_CONFIG
from tests.test_module import NUM_CLASSES, _batch, _module

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 64, generator=gen, requires_grad=True), torch.arange(16) % 4


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_distances_are_fp32_under_bf16_autocast(metric):
    x, _ = _inputs()
    reference = pairwise_distance(x, metric)
    with BF16:
        got = pairwise_distance(x, metric)
        # What the loss computed before: autocast turns the float32 product into a bf16 one.
        naive = 1.0 - F.normalize(x.float(), dim=1) @ F.normalize(x.float(), dim=1).T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    if metric == "cosine":
        assert (naive.float() - reference).abs().max() > 1e-3  # the error the fp32 context removes


def test_losses_and_their_gradients_match_fp32_under_bf16_autocast():
    x, labels = _inputs()
    text = F.normalize(torch.randn(4, 64), dim=1)

    def losses() -> list[torch.Tensor]:
        image = F.normalize(x, dim=1)
        return [
            BatchHardTripletLoss(0.3, "cosine")(x, labels),
            F.cross_entropy(scaled_logits(image, text, 100.0), labels),
            SupConLoss()(image * 100.0, text[labels], labels, labels),
        ]

    reference = [(loss.detach(), torch.autograd.grad(loss, x, retain_graph=True)[0]) for loss in losses()]
    with BF16:  # forward under autocast, backward outside it (as Lightning's precision plugin does)
        autocast_losses = losses()
    got = [(loss.detach(), torch.autograd.grad(loss, x, retain_graph=True)[0]) for loss in autocast_losses]
    for (ref_loss, ref_grad), (loss, grad) in zip(reference, got, strict=True):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_retrieval_embedding_is_fp32_under_bf16_autocast():
    """The heads, the frame sum and the normalisation run in fp32: only the backbone's rounding remains."""
    module = _module(1).eval()
    batch = _batch()
    with BF16:
        feats, weights = module.embed(batch)
        out = module(batch["frames"], batch["camid"], batch["mask"])
    assert feats.dtype == torch.float32 and weights.dtype == torch.float32
    # Reference: the same bf16 backbone outputs, then heads and normalisation in fp32 by hand.
    cls, proj = module.head_cls(out["cls"].float())[0], module.head_proj(out["proj"].float())[0]
    single = torch.cat([cls, proj], dim=1)
    flipped = dict(batch, frames=batch["frames"].flip(-1))
    with BF16:
        out_f = module(flipped["frames"], flipped["camid"], flipped["mask"])
    single = single + torch.cat(
        [module.head_cls(out_f["cls"].float())[0], module.head_proj(out_f["proj"].float())[0]], 1
    )
    torch.testing.assert_close(feats, F.normalize(single, dim=1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- checkpoints
def _train_a_little(module: ReIDModule) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.5)


def _slim(module: ReIDModule) -> dict:
    checkpoint = {"state_dict": copy.deepcopy(module.state_dict())}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


def test_slim_round_trip_with_trained_blocks_and_a_pretrained_directory(tiny_clip_dir):
    """trainable_blocks=1 from a directory: the fine-tuned block is kept and restored, frozen ones reloaded."""
    module = _module(1, pretrained=tiny_clip_dir)
    _train_a_little(module)
    checkpoint = _slim(module)
    state = checkpoint["state_dict"]
    assert any(k.startswith("backbone.blocks.1.layer.") for k in state)  # the last block trains: kept
    assert not any(k.startswith("backbone.blocks.0.layer.") for k in state)  # frozen: re-read from the directory
    fresh = _module(1, pretrained=tiny_clip_dir)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_load_refuses_a_checkpoint_missing_trained_weights(tiny_clip_dir):
    """A wrong "trainable" set at save time must not silently refill fine-tuned blocks from pretrained CLIP."""
    module = _module(1, pretrained=tiny_clip_dir)
    checkpoint = _slim(module)
    for key in [k for k in checkpoint["state_dict"] if k.startswith("backbone.blocks.1.layer.")]:
        del checkpoint["state_dict"][key]
    with pytest.raises(ValueError, match=r"lacks \d+ weights that train.*backbone\.blocks\.1\.layer"):
        _module(1, pretrained=tiny_clip_dir).on_load_checkpoint(checkpoint)


def test_slim_save_is_strategy_proof(tiny_clip_dir, monkeypatch):
    """Wrapped parameter names (as FSDP's use_orig_params gives them) still keep exactly the trained weights;
    names that match no state-dict key at all (flattened parameters) disable slimming instead of dropping them."""
    module = _module(1, pretrained=tiny_clip_dir)
    _train_a_little(module)
    expected = set(_slim(module)["state_dict"])
    plain = list(module.named_parameters())

    def wrapped(*_args, **_kwargs):
        return [
            (f"_fsdp_wrapped_module.{n.replace('.layer.', '.layer._checkpoint_wrapped_module.')}", p) for n, p in plain
        ]

    monkeypatch.setattr(module, "named_parameters", wrapped)
    assert set(_slim(module)["state_dict"]) == expected

    def flat(*_args, **_kwargs):
        return [("_fsdp_wrapped_module._flat_param", torch.nn.Parameter(torch.zeros(3)))]

    monkeypatch.setattr(module, "named_parameters", flat)
    assert set(_slim(module)["state_dict"]) == set(module.state_dict())  # nothing dropped


def test_canonical_key_strips_wrapper_segments():
    assert canonical_key("_fsdp_wrapped_module.backbone._orig_mod.blocks.0.layer.w") == "backbone.blocks.0.layer.w"
    assert canonical_key("module.head_cls.bn.weight") == "head_cls.bn.weight"


def test_text_tower_is_dropped_from_checkpoints(tiny_clip_dir):
    """Stage 2 with a text tower from the directory: only the learned context survives of the text side."""
    module = ReIDModule(
        backbone=CLIPVisionBackbone(pretrained=str(tiny_clip_dir), trainable_blocks=0, adapter_dim=8, prompt_blocks=1),
        num_classes=NUM_CLASSES,
        text=lambda n: TextPromptLearner(n, pretrained=str(tiny_clip_dir)),
    )
    assert module.text.pretrained == str(tiny_clip_dir)
    checkpoint = _slim(module)
    text_keys = [k for k in checkpoint["state_dict"] if k.startswith("text.")]
    assert text_keys == ["text.context"]
    fresh = ReIDModule(
        backbone=CLIPVisionBackbone(pretrained=str(tiny_clip_dir), trainable_blocks=0, adapter_dim=8, prompt_blocks=1),
        num_classes=NUM_CLASSES,
        text=lambda n: TextPromptLearner(n, pretrained=str(tiny_clip_dir)),
    )
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    for name, value in module.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_random_text_tower_is_kept():
    module = ReIDModule(
        backbone=CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_dim=8, prompt_blocks=1),
        num_classes=NUM_CLASSES,
        text=lambda n: TextPromptLearner(
            n,
            config=TINY_TEXT_CONFIG | {"num_hidden_layers": 1},
        ),
    )
    assert module.text.pretrained is None
    assert any(k.startswith("text.tower.") for k in _slim(module)["state_dict"])
