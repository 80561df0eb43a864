"""Plain-PyTorch model parts (no Lightning): backbone, adapters, prompts, pooling, heads, text prompts."""
