"""Reading a CLIP tower from a local HuggingFace directory: what the vision and the text towers share.

farreid never downloads: ``pretrained`` is a directory written by ``save_pretrained`` (a whole ``CLIPModel`` or
one tower). A ``CLIPModel`` directory's per-tower ``projection_dim`` can disagree with the top-level value that
``CLIPModel`` builds its projections from (and that the saved weights have), so the tower's config takes the
top-level value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedModel

from farreid.paths import CLIP_ENV, from_env

Tower = Literal["vision", "text"]
_TOWER_TYPES = {"vision": ("clip_vision_model", CLIPVisionConfig), "text": ("clip_text_model", CLIPTextConfig)}


def source(pretrained: str | None, config: dict | None, key: str) -> tuple[str | None, dict | None]:
    """Exactly one of a pretrained directory (falling back to ``FARREID_CLIP``) and a random tower's config.

    Raises:
        ValueError: both or neither, naming the config ``key`` and the environment variable.
    """
    if config is None:
        pretrained = from_env(pretrained, CLIP_ENV)
    if (pretrained is None) == (config is None):
        raise ValueError(
            f"{key} needs exactly one of pretrained=, config=; got pretrained={pretrained!r}, config={config!r} "
            f"(pass --{key}.pretrained PATH or set {CLIP_ENV}=PATH)"
        )
    return pretrained, config


def tower_config(path: Path, tower: Tower):
    """The tower's config from a CLIPModel or single-tower directory, with the top-level ``projection_dim``.

    Raises:
        FileNotFoundError: no ``config.json`` in ``path``.
        ValueError: a ``model_type`` that is neither ``clip`` nor this tower's.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        problem = "it does not exist" if not path.is_dir() else "it has no config.json"
        raise FileNotFoundError(f"pretrained={str(path)!r}: expected a CLIP save_pretrained directory, but {problem}")
    model_type = json.loads(config_file.read_text()).get("model_type")
    own_type, config_class = _TOWER_TYPES[tower]
    if model_type == "clip":
        full = CLIPConfig.from_pretrained(path, local_files_only=True)
        config = full.vision_config if tower == "vision" else full.text_config
        config.projection_dim = full.projection_dim
        return config
    if model_type == own_type:
        return config_class.from_pretrained(path, local_files_only=True)
    raise ValueError(f"{config_file}: model_type {model_type!r}, expected 'clip' or {own_type!r}")


def load_tower(model_class: type[PreTrainedModel], path: Path, config) -> tuple[PreTrainedModel, dict]:
    """``from_pretrained`` of a local directory with SDPA attention in the default dtype; returns the loading info
    (``missing_keys``, ``mismatched_keys``, ``unexpected_keys``) for the caller to check."""
    return model_class.from_pretrained(
        path,
        config=config,
        attn_implementation="sdpa",
        local_files_only=True,
        output_loading_info=True,
        dtype=torch.get_default_dtype(),
    )


# The published shapes of the CLIP towers farreid's recipes use (OpenAI CLIP; HF `openai/clip-vit-*`), for towers
# with random weights of the real size (`farreid preflight --random-weights`, benchmarks): no weights involved.
_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}
ARCHITECTURES: dict[str, dict[str, dict]] = {
    "vit-l-14": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "patch_size": 14, "image_size": 224, "projection_dim": 768},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "projection_dim": 768, **_TEXT},
    },
    "vit-b-16": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "patch_size": 16, "image_size": 224, "projection_dim": 512},
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                 "projection_dim": 512, **_TEXT},
    },
}  # fmt: skip
