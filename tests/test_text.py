"""TextPromptLearner: prompt substitution and EOS pooling match HF, only the context trains, local loading."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from farreid.models.text import TextPromptLearner
from tests.conftest import write_clip_bpe

# Tiny text tower; the special ids are the two largest, as in CLIP's vocabulary.
TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 77,
    "bos_token_id": 98,
    "eos_token_id": 99,
}
VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
VISION |= {"image_size": 32, "patch_size": 8}
# Only the top-level value: the saved text_config keeps its default 512, which CLIPModel ignores.
PROJECTION = 24
WORDS = ["a", "photo", "of", "x", "person", "."]


def save_tiny_clip(path: Path, **text_overrides: int) -> CLIPModel:
    """Save a seeded tiny random CLIPModel to `path` and return it."""
    torch.manual_seed(0)
    text = TEXT | text_overrides
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=PROJECTION))
    model.save_pretrained(path)
    return model


def save_tiny_tokenizer(path: Path) -> dict[str, int]:
    """Write vocab.json/merges.txt of a CLIP BPE that knows WORDS; returns the vocab."""
    return write_clip_bpe(path, TEXT["bos_token_id"], TEXT["eos_token_id"], WORDS)


def tiny_learner(num_classes: int = 5, n_ctx: int = 4) -> TextPromptLearner:
    torch.manual_seed(1)
    return TextPromptLearner(config=TEXT | {"projection_dim": 16}, num_classes=num_classes, n_ctx=n_ctx)


def assert_matches_hf(learner: TextPromptLearner, word_ids: torch.Tensor) -> None:
    """Put the embeddings of `word_ids` (C, n_ctx) into the context; forward must equal HF on the token ids."""
    tower = learner.tower
    with torch.no_grad():
        learner.context.copy_(tower.get_input_embeddings()(word_ids))  # (C, n_ctx, W)
    ids = learner.token_ids.repeat(len(word_ids), 1)  # (C, L)
    ids[:, learner.start : learner.start + learner.n_ctx] = word_ids
    labels = torch.arange(len(word_ids)).flip(0)
    expected = tower(input_ids=ids[labels]).text_embeds
    torch.testing.assert_close(learner(labels), expected, atol=1e-5, rtol=0)


def test_config_only_template_ids() -> None:
    learner = tiny_learner()
    # [bos] + 4 fillers ("A photo of a") + 4 placeholders (next free id) + 1 filler ("person.") + [eos].
    assert learner.token_ids.tolist() == [98, 0, 1, 2, 3, 4, 4, 4, 4, 5, 99]
    assert (learner.start, learner.eos_position) == (5, 10)


@pytest.mark.parametrize("n_ctx", [1, 4])
def test_forward_equals_hf_on_real_token_sequence(n_ctx: int) -> None:
    learner = tiny_learner(num_classes=3, n_ctx=n_ctx)
    word_ids = torch.randint(0, 90, (3, n_ctx), generator=torch.Generator().manual_seed(2))
    assert_matches_hf(learner, word_ids)


def test_gradients_reach_only_context() -> None:
    learner = tiny_learner()
    labels = torch.tensor([3, 0, 3])
    weights = torch.randn(3, learner.proj_dim)
    (learner(labels) * weights).sum().backward()
    assert all(p.grad is None for p in learner.tower.parameters())
    grad_norm = learner.context.grad.flatten(1).norm(dim=1)  # (C, n_ctx, W) -> (C,)
    assert (grad_norm[[0, 3]] > 0).all()
    assert (grad_norm[[1, 2, 4]] == 0).all()


def test_sgd_step_changes_only_batch_rows() -> None:
    learner = tiny_learner()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.5)
    labels = torch.tensor([1, 4])
    learner(labels).pow(2).sum().backward()
    optimizer.step()
    after = learner.state_dict()
    for key, value in before.items():
        if key != "context":
            assert torch.equal(after[key], value), key
    changed = (after["context"] != before["context"]).flatten(1).any(dim=1)  # (C, n_ctx, W) -> (C,)
    assert changed.tolist() == [False, True, False, False, True]


def test_all_features_equals_forward_in_chunks() -> None:
    learner = tiny_learner(num_classes=5)
    features = learner.all_features(chunk=2)
    assert features.shape == (5, 16) and not features.requires_grad
    # A batch of 2 and a batch of 5 take different GEMM blockings, so the sums round differently (seen: 1.3e-6 on
    # values ~1.5): float32's default tolerance, not bit equality.
    torch.testing.assert_close(features, learner(torch.arange(5)))


def test_bf16_autocast_close_to_fp32() -> None:
    learner = tiny_learner()
    labels = torch.tensor([0, 2, 4])
    reference = learner(labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = learner(labels)
    assert low.shape == reference.shape and torch.isfinite(low).all()
    assert torch.nn.functional.cosine_similarity(low.float(), reference).min() > 0.99


def test_load_clipmodel_dir_has_every_text_weight(tmp_path: Path) -> None:
    clip = save_tiny_clip(tmp_path)
    save_tiny_tokenizer(tmp_path)
    learner = TextPromptLearner(pretrained=str(tmp_path), num_classes=3)
    reference = {k: v for k, v in clip.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    loaded = learner.tower.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert learner.proj_dim == PROJECTION
    assert not any(p.requires_grad for p in learner.tower.parameters())


def test_load_text_with_projection_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT, projection_dim=8))
    tower.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    learner = TextPromptLearner(pretrained=str(tmp_path), num_classes=2)
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in learner.tower.state_dict().items())
    assert learner.proj_dim == 8


def test_bare_text_model_dir_is_rejected(tmp_path: Path) -> None:
    CLIPTextModel(CLIPTextConfig(**TEXT)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text_projection"):
        TextPromptLearner(pretrained=str(tmp_path), num_classes=2)


# eos_token_id 2 is the legacy config of the released OpenAI checkpoints: CLIP then pools the largest id.
@pytest.mark.parametrize("eos_token_id", [TEXT["eos_token_id"], 2])
def test_tokenizer_directory_template_and_forward(tmp_path: Path, eos_token_id: int) -> None:
    save_tiny_clip(tmp_path, eos_token_id=eos_token_id)
    vocab = save_tiny_tokenizer(tmp_path)
    learner = TextPromptLearner(pretrained=str(tmp_path), num_classes=2, n_ctx=3)
    tokens = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", *["x</w>"] * 3, "person</w>", ".</w>"]
    assert learner.token_ids.tolist() == [vocab[t] for t in [*tokens, "<|endoftext|>"]]
    assert (learner.start, learner.eos_position) == (5, 10)
    assert_matches_hf(learner, torch.tensor([[vocab["photo</w>"], vocab["of</w>"], vocab["a</w>"]], [1, 2, 3]]))


def test_pretrained_tower_without_tokenizer_is_refused(tmp_path: Path) -> None:
    save_tiny_clip(tmp_path)
    (tmp_path / "vocab.json").write_text("{}")  # half a BPE tokenizer is no tokenizer
    with pytest.raises(FileNotFoundError, match=r"no CLIP tokenizer .*save_pretrained\('" + re.escape(str(tmp_path))):
        TextPromptLearner(pretrained=str(tmp_path), num_classes=2)


def test_placeholder_word_in_template_is_rejected(tmp_path: Path) -> None:
    save_tiny_clip(tmp_path)
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="adjacent"):
        TextPromptLearner(pretrained=str(tmp_path), num_classes=2, template="x photo of a {} person.")


def test_missing_directory_error_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        TextPromptLearner(pretrained=str(missing), num_classes=2)


def test_exactly_one_source_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TextPromptLearner(num_classes=2)
    with pytest.raises(ValueError, match="exactly one"):
        TextPromptLearner(pretrained=str(tmp_path), config=TEXT, num_classes=2)


def test_train_mode_keeps_tower_in_eval() -> None:
    learner = tiny_learner().train()
    assert learner.training and not learner.tower.training


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes for code
    points from 256 up, in byte order; listed printable bytes first, as CLIP's vocabulary starts."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def write_real_clip_bpe(gz: Path, out: Path) -> None:
    """vocab.json + merges.txt of CLIP's 49408-token vocabulary from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    import gzip

    lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # CLIP keeps the first 48894 merges
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.mark.skipif(
    not os.environ.get("FARREID_CLIP_BPE"), reason="set FARREID_CLIP_BPE=.../bpe_simple_vocab_16e6.txt.gz"
)
def test_real_clip_vocabulary_tokenises_the_template(tmp_path: Path) -> None:
    """With CLIP's real BPE (from the open-clip-torch wheel, no download in the test) the template gets CLIP's ids."""
    write_real_clip_bpe(Path(os.environ["FARREID_CLIP_BPE"]), tmp_path)
    save_tiny_clip(tmp_path, vocab_size=49408, bos_token_id=49406, eos_token_id=49407)
    learner = TextPromptLearner(pretrained=str(tmp_path), num_classes=2, n_ctx=4)
    # CLIP's ids of "a photo of a x x x x person." (a=320, photo=1125, of=539, x=343, person=2533, .=269).
    assert learner.token_ids.tolist() == [49406, 320, 1125, 539, 320, 343, 343, 343, 343, 2533, 269, 49407]
    assert (learner.start, learner.eos_position) == (5, 11)
