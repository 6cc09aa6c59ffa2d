"""The PyPI-shipped real models, loaded once per test session from specplug's cache."""

from __future__ import annotations

import pytest

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
