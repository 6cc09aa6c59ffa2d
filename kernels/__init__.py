"""``specplug.kernels``: the speculative hot path, each op a Triton kernel beside its torch
reference with the same signature (docs/kernels.md). Importing this never imports triton."""

from specplug.kernels._dispatch import pick_backend, triton_available
from specplug.kernels.kv_compact import compact_kv, compact_kv_layers
from specplug.kernels.softmax_topk import softmax_topk
from specplug.kernels.tree_prep import TreePrep, prepare_tree
from specplug.kernels.verify import (
    ChainVerifyOutput,
    TreeVerifyOutput,
    verify_chains,
    verify_tree,
)

__all__ = [
    "ChainVerifyOutput",
    "TreePrep",
    "TreeVerifyOutput",
    "compact_kv",
    "compact_kv_layers",
    "pick_backend",
    "prepare_tree",
    "softmax_topk",
    "triton_available",
    "verify_chains",
    "verify_tree",
]
