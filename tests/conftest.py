"""pytest set-up for the unit tests: offline, two threads, the tiny-model fixture."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run in its CPU interpreter and every fresh kernel output starts poisoned, so an
# element a kernel forgets to write fails its comparison with the torch reference (kernels/).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SPECPLUG_KERNELS_POISON", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))
# cost-curve calibrations (specplug.calibration) of tiny models go to a throw-away folder
os.environ.setdefault("SPECPLUG_COST_CACHE", tempfile.mkdtemp(prefix="specplug-cost-"))


@pytest.fixture(scope="session", params=["gemma", "llama"])
def tiny_model(request):
    from tiny_models import MODELS

    return request.param, MODELS[request.param](0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> str:
    """A tiny Llama and its tokenizer saved as an HF folder, for the CLI's ``--model``."""
    from tiny_models import tiny_llama, tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)
