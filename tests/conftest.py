"""pytest set-up for the unit tests: offline, two threads, the tiny-model fixture."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", params=["gemma", "llama"])
def tiny_model(request):
    from tiny_models import MODELS

    return request.param, MODELS[request.param](0)
