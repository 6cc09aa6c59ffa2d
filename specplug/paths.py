"""Where specplug keeps what it caches (converted models, cost curves, exported heads)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """specplug's cache root: ``$SPECPLUG_CACHE_DIR`` if set, else ``~/.cache/specplug``."""
    env = os.environ.get("SPECPLUG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "specplug"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers)
        from specplug.errors import CacheDirError

        raise CacheDirError("no home folder to keep specplug's cache in (HOME is unset and "
                            "the user has no passwd entry): set SPECPLUG_CACHE_DIR to a "
                            "writable folder") from None
