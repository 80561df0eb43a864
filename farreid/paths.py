"""Machine paths that never live in a committed config: the dataset root and the local CLIP directory.

Precedence: the command line > the environment (``FARREID_DATA``, ``FARREID_CLIP``) > the YAML. The CLI applies it
to the config keys in :data:`PATH_KEYS` (so ``--print_config`` shows the resolved paths); classes built in Python
fall back to the environment through :func:`from_env`.
"""

from __future__ import annotations

import os

DATA_ENV = "FARREID_DATA"  # the dataset root
CLIP_ENV = "FARREID_CLIP"  # a local HuggingFace CLIP directory, used when no `pretrained` path or config is given

# config key -> environment variable that fills it when the command line does not
PATH_KEYS = {
    "data.root": DATA_ENV,
    "model.backbone.init_args.pretrained": CLIP_ENV,
    "model.text.init_args.pretrained": CLIP_ENV,
}


def from_env(value: str | None, env: str) -> str | None:
    """``value``, else the environment variable ``env`` (None when neither is set)."""
    return value if value else os.environ.get(env) or None
