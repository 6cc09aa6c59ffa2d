"""specplug's draft trees in SGLang's NGRAM verify layout (no SGLang import: testable anywhere).

SGLang verifies a fixed number of slots per request, ``--speculative-num-draft-tokens`` (W):
slot 0 is the root (the request's last committed token, not yet scored) and slots ``1..W-1``
the draft nodes, each with an ancestor mask. From the mask alone SGLang derives each slot's
position and its first child and next sibling (``reconstruct_indices_from_tree_mask``), then
scores all ``W`` slots in one ``TARGET_VERIFY`` forward and walks the tree. A specplug tree
has its nodes in topological order (parents first), so node ``i`` becomes slot ``i + 1`` and
the largest ancestor SGLang takes for a slot's parent is its real parent. Slots the tree does
not fill are children of the root repeating the root's token: SGLang scores them either way,
and accepting one would only commit a token the target chose itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specplug.types import DraftTree

__all__ = ["sglang_verify_tree"]


def sglang_verify_tree(roots: Sequence[int], tree: DraftTree, width: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang's verify inputs for a batch of trees.

    Args:
        roots: ``B`` last committed tokens, one per row (slot 0).
        tree: ``[B, N]`` draft trees with ``N <= width - 1`` columns.
        width: SGLang's slots per row (``speculative_num_draft_tokens``), root included.

    Returns:
        ``tokens [B * width]`` int64 and ``mask [B * width * width]`` bool, flat row-major as
        SGLang's NGRAM worker hands them over: ``mask[b, i, j]`` is true when slot ``j`` is
        slot ``i`` or one of its ancestors (the root is every slot's ancestor).

    Raises:
        ValueError: a tree wider than ``width - 1`` nodes, or ``roots`` of the wrong length.
    """
    from specplug.kernels.tree_prep import prepare_tree

    rows, nodes = tree.tokens.shape
    if len(roots) != rows:
        raise ValueError(f"{len(roots)} roots for {rows} trees")
    if nodes >= width:
        raise ValueError(f"trees of {nodes} nodes do not fit SGLang's {width} slots a row (the root "
                         f"and {width - 1} drafts): raise --speculative-num-draft-tokens to "
                         f"{nodes + 1} or draft smaller trees")
    root = torch.as_tensor(list(roots), dtype=torch.long).view(rows, 1)
    tokens = root.expand(rows, width).clone()
    mask = torch.zeros(rows, width, width, dtype=torch.bool)
    mask[:, :, 0] = True
    mask[:, torch.arange(width), torch.arange(width)] = True
    if nodes:
        prep = prepare_tree(tree.parents, tree.num_nodes)
        real = prep.depth > 0
        tokens[:, 1:nodes + 1] = torch.where(real, tree.tokens, root)
        mask[:, 1:nodes + 1, 1:nodes + 1] = prep.ancestors
    return tokens.reshape(-1), mask.reshape(-1)
