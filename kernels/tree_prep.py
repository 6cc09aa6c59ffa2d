"""Tree preparation: depth, positions, ancestor mask and root-to-node paths from parents.

A row's nodes are in topological order: ``parents[b, i]`` is in ``[-1, i)`` for a real node
(``i < num_nodes[b]``), -1 meaning the root (the last committed token, not itself a node).

Shapes: ``B`` rows, ``N`` nodes per row (padded), ``D`` path slots (``max_depth``, else ``N``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import pick_backend

__all__ = ["TreePrep", "check_topological", "prepare_tree", "prepare_tree_reference"]


@dataclass
class TreePrep:
    """What the runner and the verifier need from a batch of trees.

    Attributes:
        depth: ``[B, N]`` int64, 1 for children of the root; 0 for padding nodes.
        positions: ``[B, N]`` int64, ``root_positions[b] + depth`` (padding: the root's).
        ancestors: ``[B, N, N]`` bool, ``ancestors[b, i, j]``: j is i or an ancestor of i
            (padding nodes see only themselves).
        retrieve: ``[B, N, D]`` int64, node i's path from the root's child down to i (node
            indices in depth order, -1 padded; padding nodes: all -1).
    """

    depth: torch.Tensor
    positions: torch.Tensor
    ancestors: torch.Tensor
    retrieve: torch.Tensor


def prepare_tree(parents: torch.Tensor, num_nodes: torch.Tensor,
                 root_positions: torch.Tensor | None = None, max_depth: int | None = None,
                 backend: str | None = None) -> TreePrep:
    """Derive a batch of trees' layout from their parents (Triton on CUDA, torch otherwise).

    Args:
        parents: ``[B, N]`` int64, parent of node i (-1: the root), in ``[-1, i)`` for real
            nodes; entries of padding nodes are ignored.
        num_nodes: ``[B]`` int64, real nodes per row, in ``[0, N]``.
        root_positions: ``[B]`` int64, position of each row's root; None: zeros.
        max_depth: path slots ``D`` of ``retrieve``; None: ``N``.
        backend: ``"auto"`` / ``"torch"`` / ``"triton"`` (see ``pick_backend``).

    Returns:
        A ``TreePrep`` (see its attributes for shapes and dtypes).

    Raises:
        ValueError: bad shapes or dtypes, tensors on different devices, and, for CPU tensors
            only (the check would synchronise a GPU), parents out of topological order,
            num_nodes out of range or a node deeper than ``max_depth``. On CUDA nothing is
            checked: a parent outside ``[0, i)`` counts as -1 and ``retrieve`` keeps the first
            ``max_depth`` nodes of a longer path (both backends).
    """
    _check_args(parents, num_nodes, root_positions, max_depth)
    if pick_backend(parents, num_nodes, root_positions, backend=backend) == "torch":
        return prepare_tree_reference(parents, num_nodes, root_positions, max_depth)
    from ._triton_tree_prep import prepare_tree_triton

    prep = prepare_tree_triton(parents, num_nodes, root_positions, max_depth)
    _check_max_depth(prep.depth, max_depth)
    return prep


def prepare_tree_reference(parents: torch.Tensor, num_nodes: torch.Tensor,
                           root_positions: torch.Tensor | None = None,
                           max_depth: int | None = None) -> TreePrep:
    """Plain-torch ``prepare_tree``: the ancestor mask is the inverse of ``I - P`` (``P`` the
    parent one-hot matrix), one batched triangular solve, then one scatter for the paths.

    ``(I - P)^-1 = I + P + P^2 + ...`` counts the ways up from i to j: 1 for i itself and its
    ancestors, 0 otherwise. ``I - P`` is unit lower triangular with at most one -1 per row, so
    the solve only ever adds disjoint 0/1 rows and is exact in float32.
    """
    B, N = parents.shape
    dev = parents.device
    D = N if max_depth is None else max_depth
    idx = torch.arange(N, device=dev)
    real = idx < num_nodes[:, None]
    par = torch.where(real & (parents >= 0) & (parents < idx), parents, -1)
    eye = torch.eye(N, device=dev)
    step = eye - (par[..., None] == idx).float()  # [B, N, N] I - P
    anc = torch.linalg.solve_triangular(step, eye.expand(B, N, N), upper=False,
                                        unitriangular=True) > 0.5
    depth = torch.where(real, anc.sum(-1), 0)
    _check_max_depth(depth, max_depth)
    roots = torch.zeros(B, 1, dtype=torch.long, device=dev) if root_positions is None \
        else root_positions[:, None]
    # ancestor j of node i goes to slot depth[j] - 1 of row i; slot D is a bin for the rest
    # (non-ancestors, padding nodes and nodes deeper than D)
    slot = torch.where(anc & real[:, None, :], depth[:, None, :] - 1, D).clamp_(max=D)
    retrieve = torch.full((B, N, D + 1), -1, dtype=torch.long, device=dev)
    retrieve.scatter_(2, slot, idx.expand(B, N, N))
    return TreePrep(depth=depth, positions=roots + depth, ancestors=anc,
                    retrieve=retrieve[..., :D])


def _check_args(parents: torch.Tensor, num_nodes: torch.Tensor,
                root_positions: torch.Tensor | None, max_depth: int | None) -> None:
    if parents.dim() != 2 or parents.dtype != torch.long:
        raise ValueError(f"parents must be a [B, N] int64 tensor, got {tuple(parents.shape)} "
                         f"{parents.dtype} (use .long())")
    B, N = parents.shape
    for name, t in (("num_nodes", num_nodes), ("root_positions", root_positions)):
        if t is None:
            continue
        if t.shape != (B,) or t.dtype != torch.long:
            raise ValueError(f"{name} must be a [B] = [{B}] int64 tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if t.device != parents.device:
            raise ValueError(f"{name} is on {t.device} but parents on {parents.device}: "
                             "move them to one device")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int)
                                  or max_depth < 0):
        raise ValueError(f"max_depth must be None or an int >= 0, got {max_depth!r}")
    if parents.device.type == "cpu":
        check_topological(parents, num_nodes)


def check_topological(parents: torch.Tensor, num_nodes: torch.Tensor) -> None:
    """Raise unless ``num_nodes [B]`` lies in [0, N] and every real node's parent in
    ``parents [B, N]`` is in [-1, i) (reads the values: a host sync on a GPU)."""
    N = parents.shape[1]
    if ((num_nodes < 0) | (num_nodes > N)).any():
        raise ValueError(f"num_nodes must lie in [0, N] = [0, {N}], got {num_nodes.tolist()}")
    idx = torch.arange(N, device=parents.device)
    bad = (idx < num_nodes[:, None]) & ((parents >= idx) | (parents < -1))
    if bad.any():
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"tree nodes must be in topological order, parents[b, i] in [-1, i): "
                         f"parents[{b}, {i}] = {int(parents[b, i])}")


def _check_max_depth(depth: torch.Tensor, max_depth: int | None) -> None:
    """On CPU: raise if a node is deeper than ``max_depth`` (its path would not fit)."""
    if max_depth is None or depth.device.type != "cpu" or depth.numel() == 0:
        return
    deepest = int(depth.max())
    if deepest > max_depth:
        raise ValueError(f"a node at depth {deepest} does not fit max_depth={max_depth} path "
                         "slots: pass max_depth=None (N slots) or a larger bound")
