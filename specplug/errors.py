"""specplug's one error type for bad input, and the file readers that raise it.

Every input problem a user can cause (a value out of range, an unknown name, a missing or
malformed file, a checkpoint that is truncated) is a ``SpecplugError``: a ``ValueError``, so
callers that catch ``ValueError`` keep working. Its message names the parameter or file, the
value and the fix. The CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CacheDirError", "ConfigError", "InputFileError", "SpecplugError",
           "UnknownOptionError", "load_safetensors", "read_json", "read_text", "writable_dir"]


class SpecplugError(ValueError):
    """A problem with what the user passed; the message says what and how to fix it."""


class InputFileError(SpecplugError):
    """A file the user named is missing, unreadable, not text, or malformed."""


class CacheDirError(SpecplugError):
    """specplug's cache folder cannot be written."""


class ConfigError(SpecplugError):
    """A speculation option (``SpecConfig`` field or drafter option) is unknown or invalid."""


class UnknownOptionError(SpecplugError, TypeError):
    """A keyword that is neither a generation option nor a speculation option: also a
    ``TypeError``, as Python raises for an unexpected keyword."""


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` names where the path came from (``--prompts``).

    Raises:
        InputFileError: the file is missing, a folder, unreadable or not UTF-8.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} {p}: no such file (check the path)")
    if p.is_dir():
        raise InputFileError(f"{what} {p}: is a folder, not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(f"{what} {p}: not UTF-8 text (byte {err.start}); save it as "
                             "UTF-8") from None
    except OSError as err:
        raise InputFileError(f"{what} {p}: cannot be read ({err.strerror})") from None


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """``path`` parsed as JSON; errors name the file, the line and the column.

    Raises:
        InputFileError: as ``read_text``, or the text is not JSON.
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputFileError(f"{what} {path}: not valid JSON at line {err.lineno} column "
                             f"{err.colno} ({err.msg})") from None


def load_safetensors(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The tensors of a safetensors file, ``{name: tensor}``; never a pickle.

    Raises:
        InputFileError: the file is missing, truncated or its header is corrupt.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{what} {p}: no such file")
    try:
        return load_file(str(p))
    except SafetensorError as err:
        raise InputFileError(f"{what} {p}: not a complete safetensors file ({err}); it is "
                             "truncated or corrupt: save or download it again") from None


def writable_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) for specplug's cache and return it.

    Raises:
        CacheDirError: it cannot be created or written, naming ``SPECPLUG_CACHE_DIR``.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problem = err.strerror
    else:
        if os.access(path, os.W_OK):
            return path
        problem = "not writable"
    raise CacheDirError(f"cannot write specplug's cache at {path} ({problem}): set "
                        "SPECPLUG_CACHE_DIR to a writable folder")
