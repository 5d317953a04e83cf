"""Where attnprog caches: ``$ATTNPROG_CACHE_DIR``, else the platform's user cache directory.

Under that root: ``models/`` (converted checkpoints), ``outputs/`` (program outputs) and
``llm/`` (LLM replies), whichever of them is set.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ATTNPROG_CACHE_DIR"


def cache_root() -> Path:
    """``$ATTNPROG_CACHE_DIR`` if set, else the user cache dir (e.g. ~/.cache/attnprog)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("attnprog"))
