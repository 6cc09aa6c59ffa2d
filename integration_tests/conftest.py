"""Real-model fixtures: the PyPI-shipped models, loaded once per session from the cache."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

_loaded: dict[str, tuple] = {}


def real_model(name: str):
    from specplug import models

    if name not in _loaded:
        try:
            models.locate_gguf(name)
        except models.ModelPackageMissingError as err:  # README's setup installs them
            pytest.skip(f"{name} weights package is not installed: {err}")
        _loaded[name] = models.load_model(name)
    return _loaded[name]
