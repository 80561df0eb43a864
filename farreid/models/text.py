"""CLIP-ReID style text prompts: "A photo of a X X X X person." with learnable context vectors per identity.

Stage 1 trains only the context vectors (image<->text SupCon on frozen image features); stage 2 freezes them and
uses `all_features()` as the classifier weights of an image->text cross-entropy. The CLIP text tower is frozen
throughout; its HF modules (embeddings, encoder, final layer norm, projection) are reused unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.masking_utils import create_causal_mask

from farreid.models import clip_dir

PLACEHOLDER = "X"
# Either file set loads a CLIPTokenizer: the fast tokenizer's JSON or the BPE vocabulary and merges.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


class CLIPTextTower(CLIPTextModelWithProjection):
    """CLIPTextModelWithProjection that expects the vision half of a CLIPModel checkpoint as unused extra keys, so
    loading one reports only keys that are really unexpected."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]


def load_text_tower(pretrained: str) -> CLIPTextModelWithProjection:
    """Load the CLIP text tower and projection from a local `save_pretrained` directory.

    A CLIPModel directory works too: its `text_model.*` and `text_projection.weight` keys match. Its
    `text_config.projection_dim` can disagree with the top-level `projection_dim` that CLIPModel actually uses,
    so the text config is rebuilt with the top-level value.

    Raises:
        FileNotFoundError: `pretrained` is not a directory with a config.json.
        ValueError: unknown `model_type`, or text-tower weights missing / of the wrong shape in the checkpoint.
    """
    path = Path(pretrained)
    model, info = clip_dir.load_tower(CLIPTextTower, path, clip_dir.tower_config(path, "text"))
    missing = sorted(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(
            f"{path}: text-tower weights missing {missing} / shape-mismatched {mismatched}; expected a CLIPModel or "
            "CLIPTextModelWithProjection checkpoint (a bare CLIPTextModel has no text_projection)"
        )
    return model


def load_tokenizer(pretrained: str) -> CLIPTokenizer:
    """The CLIP tokenizer saved next to the text-tower weights in `pretrained`.

    A pretrained tower is only meaningful on the real tokens of the template, so a missing tokenizer is an error
    (filler ids are for random test towers only).

    Raises:
        FileNotFoundError: neither tokenizer.json nor vocab.json + merges.txt is in `pretrained`.
    """
    path = Path(pretrained)
    if not any(all((path / name).is_file() for name in files) for files in TOKENIZER_FILES):
        expected = " or ".join(" + ".join(files) for files in TOKENIZER_FILES)
        raise FileNotFoundError(
            f"{path}: no CLIP tokenizer ({expected}); the text prompts need it to encode their template. Save it "
            f"next to the weights, where the model was downloaded: CLIPTokenizer.from_pretrained("
            f"'openai/clip-vit-large-patch14').save_pretrained('{path}') (or copy those files from the original "
            "model directory)"
        )
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def template_ids(
    template: str, n_ctx: int, config: CLIPTextConfig, tokenizer: CLIPTokenizer | None
) -> tuple[list[int], int]:
    """Token ids of `template` with "{}" replaced by `n_ctx` placeholders, and the first placeholder's position.

    With a tokenizer, the text is tokenised as CLIP would (BOS ... EOS, no padding: the causal mask makes padding
    after EOS irrelevant). Without one (config-only runs), the sequence is
    `[bos] + fillers(words before "{}") + placeholders + fillers(words after "{}") + [eos]`, one filler per
    whitespace-separated word; fillers and placeholders take the smallest ids that are not bos/eos. Their token
    embeddings are meaningless but fixed, which is all a random-weight run needs.

    Returns:
        (ids of length L, start) with placeholders at ids[start : start + n_ctx].
    """
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r}: expected exactly one '{{}}' for the context tokens")
    if tokenizer is not None:
        placeholder = tokenizer(PLACEHOLDER, add_special_tokens=False).input_ids
        if len(placeholder) != 1:
            raise ValueError(f"tokenizer splits the placeholder {PLACEHOLDER!r} into {placeholder}, expected one token")
        placeholder_id = placeholder[0]
        ids = tokenizer(template.format(" ".join([PLACEHOLDER] * n_ctx))).input_ids
        hits = [i for i, token in enumerate(ids) if token == placeholder_id]
        if len(hits) != n_ctx or hits != list(range(hits[0], hits[0] + n_ctx)):
            raise ValueError(
                f"template {template!r}: expected {n_ctx} adjacent {PLACEHOLDER!r} tokens (id {placeholder_id}), "
                f"found them at positions {hits} of {ids}"
            )
        return ids, hits[0]
    prefix, suffix = template.split("{}")
    special = {config.bos_token_id, config.eos_token_id}
    if config.vocab_size - len(special) < len(prefix.split()) + 1 + len(suffix.split()):
        raise ValueError(f"config vocab_size={config.vocab_size}: too small for the filler ids of {template!r}")
    free = (i for i in range(config.vocab_size) if i not in special)
    prefix_ids = [next(free) for _ in prefix.split()]
    placeholder_id = next(free)
    suffix_ids = [next(free) for _ in suffix.split()]
    ids = [config.bos_token_id, *prefix_ids, *[placeholder_id] * n_ctx, *suffix_ids, config.eos_token_id]
    return ids, 1 + len(prefix_ids)


def pooled_position(ids: list[int], eos_token_id: int) -> int:
    """Position CLIPTextModel pools for `ids`: the highest id if eos_token_id == 2 (legacy configs), else the first
    occurrence of eos_token_id (mirrors CLIPTextModel.forward)."""
    if eos_token_id == 2:
        return max(range(len(ids)), key=lambda i: (ids[i], -i))
    return ids.index(eos_token_id) if eos_token_id in ids else 0


class TextPromptLearner(nn.Module):
    """Per-identity learnable context tokens in a fixed prompt, encoded by the frozen CLIP text tower.

    Args:
        num_classes: number of training identities C (given by the module, linked from the data).
        pretrained: local directory of a CLIPModel / CLIPTextModelWithProjection saved with `save_pretrained`;
            when neither this nor `config` is given, the ``FARREID_CLIP`` environment variable.
            It must hold the CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt), which tokenises the
            template; a missing tokenizer is an error.
        config: CLIPTextConfig keyword arguments for a random-weight tower (tiny runs; the template is then
            encoded with fixed filler ids, see :func:`template_ids`). Exactly one of
            `pretrained` and `config` must be given.
        n_ctx: learnable context tokens per identity.
        template: prompt text; "{}" becomes `n_ctx` placeholder tokens.

    Attributes:
        context: (C, n_ctx, W) learnable vectors, init N(0, 0.02²); the only parameters that train.
        proj_dim: P, size of the projected text features.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        pretrained: str | None = None,
        config: dict | None = None,
        n_ctx: int = 4,
        template: str = "A photo of a {} person.",
    ) -> None:
        super().__init__()
        pretrained, config = clip_dir.source(pretrained, config, "model.text.init_args")
        if num_classes < 1 or n_ctx < 1:
            raise ValueError(f"num_classes={num_classes} and n_ctx={n_ctx}: expected both >= 1")
        tokenizer = None
        # Read by the module's checkpoint hooks: a frozen tower from a directory is dropped from checkpoints.
        self.pretrained = None if pretrained is None else str(pretrained)
        if pretrained is not None:
            self.tower = load_text_tower(pretrained)
            tokenizer = load_tokenizer(pretrained)
        else:  # a random tower: the template is encoded with fixed filler ids (template_ids)
            self.tower = CLIPTextModelWithProjection(CLIPTextConfig(**{"attn_implementation": "sdpa", **config}))
        self.tower.requires_grad_(False)
        self.tower.eval()
        text_config = self.tower.config

        ids, start = template_ids(template, n_ctx, text_config, tokenizer)
        if max(ids) >= text_config.vocab_size or len(ids) > text_config.max_position_embeddings:
            raise ValueError(
                f"template ids {ids}: expected ids < vocab_size={text_config.vocab_size} and length <= "
                f"max_position_embeddings={text_config.max_position_embeddings}"
            )
        self.eos_position = pooled_position(ids, text_config.eos_token_id)
        if self.eos_position != len(ids) - 1:
            raise ValueError(
                f"template ids {ids}: CLIP pools position {self.eos_position} with config eos_token_id="
                f"{text_config.eos_token_id}, expected the final EOS at {len(ids) - 1}; tokenizer and config disagree"
            )
        self.register_buffer("token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.start = start
        self.n_ctx = n_ctx
        self.num_classes = num_classes
        self.proj_dim = text_config.projection_dim
        self.context = nn.Parameter(torch.randn(num_classes, n_ctx, text_config.hidden_size) * 0.02)

    def train(self, mode: bool = True) -> TextPromptLearner:
        """Switch mode but keep the frozen tower in eval mode (no dropout in a tower that never trains)."""
        super().train(mode)
        self.tower.eval()
        return self

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Projected text features of the prompts of `labels`.

        Args:
            labels: (B,) long identity indices in [0, num_classes).

        Returns:
            (B, P) features: EOS hidden state after final_layer_norm, then text_projection (not normalised).
        """
        text = self.tower.text_model
        batch = labels.shape[0]
        tokens = text.embeddings.token_embedding(self.token_ids)  # (L, W)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)  # (L, W) -> (B, L, W)
        ctx = self.context[labels].to(tokens.dtype)  # (B, n_ctx, W)
        end = self.start + self.n_ctx
        embeds = torch.cat([tokens[:, : self.start], ctx, tokens[:, end:]], dim=1)  # (B, L, W)

        hidden = text.embeddings(inputs_embeds=embeds)  # adds position embeddings, (B, L, W)
        # Same mask construction and flag as CLIPTextModel.forward; None means sdpa applies is_causal itself.
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        pooled = text.final_layer_norm(hidden[:, self.eos_position])  # (B, W)
        return self.tower.text_projection(pooled)  # (B, P)

    @torch.no_grad()
    def all_features(self, chunk: int = 256) -> torch.Tensor:
        """Text features of every identity, computed without gradients (stage 2, context frozen).

        Args:
            chunk: identities encoded per forward pass (bounds memory).

        Returns:
            (num_classes, P) features, row c for identity c.
        """
        labels = torch.arange(self.num_classes, device=self.context.device)
        return torch.cat([self(part) for part in labels.split(chunk)], dim=0)
