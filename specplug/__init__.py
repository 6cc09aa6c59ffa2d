"""specplug: lossless speculative decoding as a plugin for the frameworks you already run.

The core imports torch, pluggy and pydantic only. ``specplug.hf`` (Hugging Face Transformers)
is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from specplug.config import SpecConfig
from specplug.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["SamplingParams", "SpecConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "hf":
        return importlib.import_module("specplug.hf")
    raise AttributeError(f"module 'specplug' has no attribute {name!r}")
