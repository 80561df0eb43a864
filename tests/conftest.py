"""Shared fixtures: a tiny random CLIP model saved locally, so no test ever touches a hub."""

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The paper recipe shrunk to a tiny random CLIP without the text stage: the arguments most CLI tests start from.
TINY_RUN = [
    "--config", str(CONFIGS / "vitl14.yaml"), "--config", str(CONFIGS / "tiny.yaml"),
    "--model.text", "null", "--trainer.enable_progress_bar", "false",
]  # fmt: skip

# CLIPVisionConfig kwargs of a tiny ViT: width 32, 2 blocks, 4 heads, patch 8 on 32x32 images (a 4x4 grid).
TINY_VISION_CONFIG: dict = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 8,
    "image_size": 32,
    "intermediate_size": 64,
    "projection_dim": 16,
}

# CLIPTextConfig kwargs of a tiny text tower; the end-of-text id is the largest id, as in CLIP's real vocabulary.
TINY_TEXT_CONFIG: dict = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 1000,
    "max_position_embeddings": 77,
    "projection_dim": 16,
    "bos_token_id": 998,
    "eos_token_id": 999,
}


# The words of the default prompt template, with "x" the placeholder of the context tokens.
TEMPLATE_WORDS = ("a", "photo", "of", "x", "person", ".")


def write_clip_bpe(path: Path, bos_token_id: int, eos_token_id: int, words=TEMPLATE_WORDS) -> dict[str, int]:
    """Write vocab.json/merges.txt of a CLIP BPE that knows `words` (each merged left to right); returns the vocab."""
    vocab: dict[str, int] = {}
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab |= {"<|startoftext|>": bos_token_id, "<|endoftext|>": eos_token_id}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a tiny random `CLIPModel` written with `save_pretrained` (seeded, so reproducible) and
    its tokenizer, as a real CLIP directory has."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=TINY_TEXT_CONFIG, vision_config=TINY_VISION_CONFIG, projection_dim=16)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(path)
    write_clip_bpe(path, TINY_TEXT_CONFIG["bos_token_id"], TINY_TEXT_CONFIG["eos_token_id"])
    return path


@pytest.fixture(scope="session")
def make_release(tmp_path_factory: pytest.TempPathFactory):
    """Generated DetReIDX releases, one per argument set for the whole session: ``make_release(num_train_ids=...,
    num_test_ids=..., seed=..., max_frames=..., ...)`` -> its root. Tests read them and never write into them."""
    from farreid.data.synthetic import generate

    made: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in made:
            made[key] = generate(tmp_path_factory.mktemp("release"), **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def small_release(make_release) -> str:
    """12 training and 4 test identities, <= 6 frames per tracklet: the release most fit/resume/DDP tests share."""
    return str(make_release(num_train_ids=12, num_test_ids=4, seed=3, max_frames=6))


@pytest.fixture(scope="session")
def tiny_checkpoint(make_release, tmp_path_factory: pytest.TempPathFactory) -> str:
    """last.ckpt of a 2-step fit of the tiny recipe (no text stage) on a 6 + 3 identity release."""
    from farreid.cli import main

    release = make_release(num_train_ids=6, num_test_ids=3, seed=3, max_frames=6)
    out = tmp_path_factory.mktemp("fit")
    args = ["fit", *TINY_RUN, "--data.root", str(release), "--trainer.default_root_dir", str(out)]
    main([*args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "0"])
    found = sorted(out.rglob("last.ckpt"))
    assert len(found) == 1, found
    return str(found[0])


@pytest.fixture(autouse=True, scope="session")
def _index_cache_in_a_temporary_dir(tmp_path_factory: pytest.TempPathFactory):
    """DetReIDX index caches (and any other user cache) go to a temporary directory, never the user's ~/.cache;
    subprocesses (the console script) inherit it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    yield
    patch.undo()
