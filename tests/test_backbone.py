"""CLIPVisionBackbone: loading, identity with HF CLIP at init, selective fine-tuning and gradient coverage."""

import re
import warnings

import pytest
import torch
from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

from farreid.models.backbone import CLIPVisionBackbone
from tests.conftest import TINY_VISION_CONFIG

SMALL = {"adapter_dim": 8, "adapter_heads": 2, "prompt_blocks": 2, "prompt_tokens": 3, "mid_block": 0}
NEW_PARTS = ("intra_adapter", "cross_frame_adapter", "prompt_attention", "camera_prompts")


def make(tiny_clip_dir, **kwargs) -> CLIPVisionBackbone:
    torch.manual_seed(1)
    return CLIPVisionBackbone(pretrained=str(tiny_clip_dir), **{**SMALL, **kwargs})


def clip_input(batch: int = 2, frames: int = 3, height: int = 32, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return torch.randn(batch, frames, 3, height, width), torch.arange(batch) % 3


def hf_key(name: str) -> str | None:
    """The CLIPModel state-dict key a backbone weight comes from (None for the modules added on top)."""
    if any(part in name.split(".") for part in NEW_PARTS):
        return None
    if name.startswith("visual_projection."):
        return name
    return "vision_model." + re.sub(r"^blocks\.(\d+)\.layer\.", r"encoder.layers.\1.", name)


def test_shapes_and_forward(tiny_clip_dir):
    model = make(tiny_clip_dir)
    frames, camids = clip_input(batch=2, frames=3)
    out = model.forward_features(frames, camids)
    assert out.cls.shape == (2, 3, 32) and out.proj.shape == (2, 3, 16) and out.mid_cls.shape == (2, 3, 32)
    assert model.embed_dim == 32 and model.proj_dim == 16
    torch.testing.assert_close(model(frames, camids), out.cls, rtol=0, atol=0)
    assert make(tiny_clip_dir, mid_block=None).forward_features(frames, camids).mid_cls is None
    with pytest.raises(ValueError, match="camids must have shape"):
        model.forward_features(frames, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("height,width", [(32, 16), (32, 32), (48, 24)])
def test_identity_with_hf_clip_at_init(tiny_clip_dir, height, width):
    model = make(tiny_clip_dir, mid_block=0)  # adapters in every block, prompts in both blocks
    frames, camids = clip_input(height=height, width=width)
    pixels = frames.flatten(0, 1)  # (B, T, 3, H, W) -> (B*T, 3, H, W)
    hf = CLIPVisionModel.from_pretrained(tiny_clip_dir)
    hf_proj = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        ref_proj = hf_proj(pixel_values=pixels, interpolate_pos_encoding=True).image_embeds
        out = model.forward_features(frames, camids)
        ref_mid = hf.post_layernorm(ref.hidden_states[1][:, 0])  # CLS after block 0
    torch.testing.assert_close(out.cls.flatten(0, 1), ref.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.proj.flatten(0, 1), ref_proj, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.mid_cls.flatten(0, 1), ref_mid, rtol=0, atol=1e-5)


def test_loads_clip_model_dir_with_every_vision_weight(tiny_clip_dir):
    model = make(tiny_clip_dir)
    reference = CLIPModel.from_pretrained(tiny_clip_dir).state_dict()
    ours = model.state_dict()
    mapped = {hf_key(name): name for name in ours if hf_key(name) is not None}
    vision_keys = {k for k in reference if k.startswith(("vision_model.", "visual_projection."))}
    vision_keys.discard("vision_model.embeddings.position_ids")  # a non-persistent buffer
    assert set(mapped) - {"vision_model.embeddings.position_ids"} == vision_keys
    for key, name in mapped.items():
        assert torch.equal(ours[name], reference[key]), name


def test_loads_plain_vision_model_dir_with_random_projection(tiny_clip_dir, tmp_path):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    clip.vision_model.save_pretrained(tmp_path / "vision")
    with pytest.warns(UserWarning, match="no visual projection"):
        model = CLIPVisionBackbone(pretrained=str(tmp_path / "vision"), trainable_blocks=0, **SMALL)
    ours = model.state_dict()
    for key, value in clip.vision_model.state_dict().items():
        name = re.sub(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.layer.", key)
        assert torch.equal(ours[name], value), key
    assert model.visual_projection.weight.requires_grad  # trains even though the tower is frozen
    assert "visual_projection.weight" in dict(model.new_parameters())
    assert not model.pretrained_trainable_parameters()


def test_missing_or_invalid_directory_is_an_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*does not exist"):
        CLIPVisionBackbone(pretrained=str(missing))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CLIPVisionBackbone(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="exactly one of"):
        CLIPVisionBackbone()
    with pytest.raises(ValueError, match="exactly one of"):
        CLIPVisionBackbone(pretrained=str(tmp_path), config=TINY_VISION_CONFIG)


def expected_trainable(name: str, trainable_blocks: int) -> bool:
    """The selective fine-tuning rule, restated independently of the implementation."""
    if any(part in name.split(".") for part in NEW_PARTS) or trainable_blocks == -1:
        return True
    if trainable_blocks == 0:
        return False
    last = {str(i) for i in range(2 - trainable_blocks, 2)}  # the tiny model has 2 blocks
    return name.startswith(("post_layernorm.", "visual_projection.")) or (
        name.startswith("blocks.") and name.split(".")[1] in last and ".layer." in name
    )


def loss_of(model: CLIPVisionBackbone, frames: torch.Tensor, camids: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(frames, camids)
    torch.manual_seed(3)  # fixed random read-outs, so no gradient vanishes by symmetry
    return sum((t * torch.randn_like(t)).sum() for t in (out.cls, out.proj, out.mid_cls))


@pytest.mark.parametrize("trainable_blocks", [0, 1, -1])
def test_gradient_coverage(tiny_clip_dir, trainable_blocks):
    model = make(tiny_clip_dir, trainable_blocks=trainable_blocks)
    frames, camids = clip_input()
    loss_of(model, frames, camids).backward()
    groups = model.pretrained_trainable_parameters() + model.new_parameters()
    assert len({n for n, _ in groups}) == len(groups)
    for name, param in model.named_parameters():
        assert param.requires_grad == expected_trainable(name, trainable_blocks), name
        assert (param.grad is not None) == param.requires_grad, name
        assert (name in dict(groups)) == param.requires_grad, name
        is_new = any(part in name.split(".") for part in NEW_PARTS)
        assert (name in dict(model.new_parameters())) == is_new, name
        # zero-initialised outputs still learn at step 0: their weights see a non-zero gradient
        if name.endswith(("up.weight", "up.bias", ".gate")):
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("trainable_blocks", [0, 1, -1])
def test_optimizer_steps_train_chosen_weights_only(tiny_clip_dir, trainable_blocks):
    model = make(tiny_clip_dir, trainable_blocks=trainable_blocks)
    frames, camids = clip_input(batch=3)  # all three cameras, so every camera's prompts are used
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for _, p in model.pretrained_trainable_parameters() + model.new_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # zero-init gates/up projections: prompts and down projections move from step 2 on
        optimizer.zero_grad()
        loss_of(model, frames, camids).backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, before[name]), f"frozen weight {name} changed"
        elif not name.endswith("k_proj.bias"):  # softmax is shift-invariant: the key bias has no gradient
            assert not torch.equal(param, before[name]), f"trainable weight {name} did not change"
    tokens_moved = (model.camera_prompts.tokens - before["camera_prompts.tokens"]).flatten(3).abs().sum(-1)
    assert bool((tokens_moved > 0).all())  # every (block, camera, token) prompt trained


@pytest.mark.parametrize("blocks", [1, -1])
def test_gradient_checkpointing_matches_plain_backward(tiny_clip_dir, blocks):
    frames, camids = clip_input()
    grads = []
    for n in (0, blocks):
        model = make(tiny_clip_dir, trainable_blocks=-1, checkpoint_blocks=n).train()
        with torch.no_grad():  # non-zero adapters and gates, so every path carries gradient
            for name, param in model.named_parameters():
                if name.endswith(("up.weight", ".gate")):
                    param.normal_(std=0.1)
        loss_of(model, frames, camids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_position_cache_follows_loaded_weights(tiny_clip_dir):
    frames, camids = clip_input()
    model, other = make(tiny_clip_dir), CLIPVisionBackbone(config=TINY_VISION_CONFIG, **SMALL)
    with torch.no_grad():
        model(frames, camids)  # fills the cache with the first model's interpolated table
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(frames, camids), other(frames, camids), rtol=0, atol=1e-6)


def test_random_config_model_and_block_options():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # valid options warn about nothing
        model = CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_blocks=[-1], **SMALL)
    assert model.blocks[0].intra_adapter is None and model.blocks[1].intra_adapter is not None
    assert model.blocks[1].cross_frame_adapter is not None
    off = CLIPVisionBackbone(config=TINY_VISION_CONFIG, **{**SMALL, "adapter_dim": 0, "prompt_blocks": 0})
    assert off.camera_prompts is None and not off.new_parameters()
    assert all(b.intra_adapter is None and b.prompt_attention is None for b in off.blocks)
    with pytest.raises(ValueError, match="adapter_blocks: block 5"):
        CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_blocks=[5], **SMALL)
    with pytest.warns(UserWarning, match="mid_block=-4"):
        assert CLIPVisionBackbone(config=TINY_VISION_CONFIG, **{**SMALL, "mid_block": -4}).mid_block == 0


def test_bfloat16_autocast_runs_and_stays_close(tiny_clip_dir):
    model = make(tiny_clip_dir)
    frames, camids = clip_input()
    with torch.no_grad():
        reference = model.forward_features(frames, camids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_features(frames, camids)
    for ours, ref in zip(out, reference, strict=True):
        assert torch.isfinite(ours).all()
        cosine = torch.nn.functional.cosine_similarity(ours.float().flatten(0, 1), ref.flatten(0, 1), dim=-1)
        assert bool((cosine > 0.98).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, frames, camids)
    loss.backward()
    assert all(
        torch.isfinite(p.grad).all() for _, p in model.new_parameters() + model.pretrained_trainable_parameters()
    )


def test_out_of_range_camera_id_is_an_error_naming_the_range():
    backbone = CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_dim=8, prompt_blocks=1, mid_block=None)
    frames = torch.randn(2, 2, 3, 32, 16)
    with pytest.raises(ValueError, match=r"camids must lie in \[0, 3\)"):
        backbone(frames, torch.tensor([0, 3]))


def test_loads_clip_model_dir_whose_vision_config_has_another_projection_dim(tmp_path):
    """CLIPModel builds visual_projection from the top-level projection_dim; the vision sub-config's own value
    (here HF's default 512) is ignored, so the backbone must ignore it too."""
    from transformers import CLIPConfig

    from tests.conftest import TINY_TEXT_CONFIG

    torch.manual_seed(0)
    vision = {key: value for key, value in TINY_VISION_CONFIG.items() if key != "projection_dim"}
    config = CLIPConfig(text_config=TINY_TEXT_CONFIG, vision_config=vision | {"projection_dim": 512}, projection_dim=24)
    CLIPModel(config).save_pretrained(tmp_path)
    saved = CLIPConfig.from_pretrained(tmp_path)
    assert saved.vision_config.projection_dim == 512 and saved.projection_dim == 24  # the mismatch is on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "random projection" or "ignored weights" warning either
        model = make(tmp_path, mid_block=0)
    assert model.proj_dim == 24
    reference = CLIPModel.from_pretrained(tmp_path)
    torch.testing.assert_close(model.visual_projection.weight, reference.visual_projection.weight, rtol=0, atol=0)
    frames, camids = clip_input()
    pixels = frames.flatten(0, 1)  # (B, T, 3, H, W) -> (B*T, 3, H, W)
    with torch.no_grad():
        hf = CLIPVisionModel.from_pretrained(tmp_path)
        ref = hf(pixel_values=pixels, interpolate_pos_encoding=True, output_hidden_states=True)
        out = model.forward_features(frames, camids)
        ref_proj = reference.visual_projection(ref.pooler_output)  # what CLIPModel ranks images with
        ref_mid = hf.post_layernorm(ref.hidden_states[1][:, 0])  # CLS after block 0
    torch.testing.assert_close(out.mid_cls.flatten(0, 1), ref_mid, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.cls.flatten(0, 1), ref.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.proj.flatten(0, 1), ref_proj, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("blocks", "recomputed"), [(0, [1, 1]), (1, [2, 1]), (-1, [2, 2])])
def test_checkpoint_blocks_recomputes_only_the_first_n(tiny_clip_dir, blocks, recomputed):
    """A checkpointed block runs its forward twice (once more in the backward pass), the others once."""
    model = make(tiny_clip_dir, trainable_blocks=-1, checkpoint_blocks=blocks).train()
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    frames, camids = clip_input()
    loss_of(model, frames, camids).backward()
    assert calls == recomputed


def test_checkpoint_blocks_rejects_bad_values(tiny_clip_dir):
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        make(tiny_clip_dir, checkpoint_blocks=-2)


@pytest.mark.slow
def test_compiled_blocks_match_eager(tiny_clip_dir):
    """`compile=True` compiles each block in place: same outputs (1e-5) and the same state-dict names."""
    eager = make(tiny_clip_dir, trainable_blocks=-1).eval()
    with torch.no_grad():  # non-zero adapters and gates, so every path of the block is exercised
        for name, param in eager.named_parameters():
            if name.endswith(("up.weight", ".gate")):
                param.normal_(std=0.1)
    compiled = make(tiny_clip_dir, trainable_blocks=-1, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    frames, camids = clip_input()
    with torch.no_grad():
        expected, got = eager.forward_features(frames, camids), compiled.forward_features(frames, camids)
    for a, b in zip(expected, got, strict=True):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_sides_not_multiples_of_the_patch_are_cropped_top_left():
    """30x20 frames with 8-pixel patches are seen as their top-left 24x16 pixels: the same output as that crop."""
    torch.manual_seed(0)
    backbone = CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_dim=8, prompt_blocks=1).eval()
    frames, camids = clip_input(height=30, width=20)
    assert backbone.patch_grid(30, 20) == (3, 2)
    with torch.no_grad():
        torch.testing.assert_close(backbone(frames, camids), backbone(frames[..., :24, :16], camids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least the patch size 8"):
        backbone.patch_grid(7, 16)


def test_patch_14_at_256x128_is_an_18x9_grid_with_interpolated_positions():
    """The recipe's 256x128 input with a 14-pixel patch (ViT-L/14): 18 x 9 patches + CLS, positions interpolated
    from the pretrained square grid (here 4 x 4 at 56 pixels)."""
    torch.manual_seed(0)
    config = {**TINY_VISION_CONFIG, "patch_size": 14, "image_size": 56}
    backbone = CLIPVisionBackbone(config=config, adapter_dim=8, prompt_blocks=1).eval()
    assert backbone.patch_grid(256, 128) == (18, 9)
    tokens = torch.zeros(1, 1 + 18 * 9, TINY_VISION_CONFIG["hidden_size"])
    positions = backbone._position_embedding(tokens, 252, 126)
    assert positions.shape == (1, 163, TINY_VISION_CONFIG["hidden_size"])
    table = backbone.embeddings.position_embedding.weight
    torch.testing.assert_close(positions[0, 0], table[0])  # the CLS position is kept, the grid interpolated
    frames, camids = clip_input(height=256, width=128)
    with torch.no_grad():
        out = backbone.forward_features(frames, camids)
        cropped = backbone.forward_features(frames[..., :252, :126], camids)
    torch.testing.assert_close(out.cls, cropped.cls, rtol=0, atol=0)
