"""Triton kernels beside their torch references (see docs/kernels.md once they land)."""
