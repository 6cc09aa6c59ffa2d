"""Which implementation of an op runs: the Triton kernel or its plain-torch reference.

``auto`` (the default) picks Triton when every tensor is on a CUDA device and Triton imports,
and the torch reference otherwise (CPU tensors, or no Triton). ``SPECPLUG_KERNELS`` overrides
``auto`` for the whole process: ``torch`` forces the references everywhere (to rule a kernel
out while debugging), ``triton`` forces the kernels, which on CPU tensors needs Triton's
interpreter (``TRITON_INTERPRET=1``, set before Triton is imported): that is how the tests run
every kernel on CPU. A caller may also pass ``backend=`` to an op directly.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["BACKENDS", "POISON_INT", "interpreting", "new_output", "pick_backend", "poisoning",
           "triton_available"]

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is an optional extra)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def pick_backend(*tensors: torch.Tensor | None, backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for an op over ``tensors`` (None entries are ignored).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: Triton was asked for but cannot run these tensors.
    """
    choice = backend or os.environ.get("SPECPLUG_KERNELS", "auto") or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"unknown kernel backend {choice!r} (from backend= or SPECPLUG_KERNELS); "
                         f"choose one of {', '.join(BACKENDS)}")
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("the Triton kernels were asked for (backend='triton' or "
                           "SPECPLUG_KERNELS=triton) but triton is not installed: "
                           "pip install 'specplug[kernels]'")
    if not on_cuda and not interpreting():
        raise RuntimeError("the Triton kernels need CUDA tensors; to run them on CPU set "
                           "TRITON_INTERPRET=1 before importing triton (slow; for tests)")
    return "triton"


#: value written into every fresh kernel output while poisoning is on (see ``new_output``)
POISON_INT = -777_777


def poisoning() -> bool:
    """True when ``SPECPLUG_KERNELS_POISON=1``: the tests set it so that any output element a
    kernel fails to write keeps a poison value and fails the comparison with the reference."""
    return os.environ.get("SPECPLUG_KERNELS_POISON", "0") not in ("", "0")


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
               ) -> torch.Tensor:
    """Allocate a kernel's output: ``torch.empty``, or poisoned when ``poisoning()`` (NaN for
    floats, ``POISON_INT`` for integers, alternating True/False for bools)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.copy_((torch.arange(out.numel(), device=device) % 2 == 0).view(shape))
        else:
            out.fill_(POISON_INT)
    return out
