"""Plain-PyTorch model parts (no Lightning): backbone, adapters, prompts, pooling, heads, text prompts."""

CLIP_ENV = "FARREID_CLIP"  # a local HuggingFace CLIP directory used when no `pretrained` path or config is given
