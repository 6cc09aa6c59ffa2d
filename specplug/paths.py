"""Where specplug keeps what it caches (converted models, cost curves, exported heads)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """specplug's cache root: ``$SPECPLUG_CACHE_DIR`` if set, else ``~/.cache/specplug``."""
    env = os.environ.get("SPECPLUG_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specplug"
