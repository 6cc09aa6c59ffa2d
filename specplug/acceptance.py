"""The acceptance rules (``SpecConfig.acceptance_method``): which drafted nodes the target
accepts, and the bonus token after them.

Three verifiers, all batched with ragged acceptance per row:

* ``greedy``: the longest path whose every token equals the target's argmax at its parent.
  Output is token-identical to the target's own greedy decoding.
* ``exact``: multi-candidate recursive rejection sampling (SpecInfer; Chen et al. / Leviathan
  et al. for chains). At a node with target distribution p, siblings are tried in order: child
  x drawn from q is accepted with probability min(1, p(x) / q(x)); on rejection
  p <- norm(max(p - q, 0)). Deterministic drafts are one-hot q (so p <- p without x). If no
  child is accepted, the bonus token is drawn from the final p. The emitted tokens have exactly
  the target's distribution.
* ``typical``: Medusa's typical acceptance, an explicitly lossy opt-in.

``greedy`` and ``exact`` run ``specplug.kernels.verify_tree`` (Triton on CUDA, its torch
reference on CPU); the algorithm and how randomness enters are described there.

Shapes: ``B`` rows, ``N`` nodes, ``V`` vocabulary, ``D`` max accepted depth. Target logits are
``[B, N + 1, V]``: index 0 is the root (the last committed token), index i + 1 is node i.
"""

from __future__ import annotations

import torch

from specplug.kernels.verify import TreeVerifyOutput, accepted_path, verify_tree
from specplug.sampling import SamplingParams, check_finite, probs_from_logits, warp_logits
from specplug.types import DraftTree, TreeLayout, VerifyResult

__all__ = ["VerifyResult", "verify_exact", "verify_greedy", "verify_typical"]


def _check_logits(tree: DraftTree, logits: torch.Tensor) -> None:
    B, N = tree.tokens.shape
    if logits.dim() != 3 or logits.shape[0] != B or logits.shape[1] != N + 1:
        raise ValueError(f"target logits must be [B, N+1, V] = [{B}, {N + 1}, V], "
                         f"got {tuple(logits.shape)}")
    check_finite(logits, "the target model")


def _path_result(layout: TreeLayout, best: torch.Tensor, best_depth: torch.Tensor,
                 bonus: torch.Tensor) -> VerifyResult:
    """Turn a chosen node per row (-1 = none) into the accepted path."""
    return VerifyResult(accepted_nodes=accepted_path(layout.retrieve_indices(), best),
                        num_accepted=best_depth, bonus_tokens=bonus)


def _on_device(tree: DraftTree, layout: TreeLayout, device: torch.device
               ) -> dict[str, torch.Tensor]:
    """The tree and its layout as ``verify_tree`` arguments, on the logits' device (the
    builder makes trees on the host; on CUDA this is what lets the kernel run)."""
    t = dict(tokens=tree.tokens, parents=tree.parents, num_nodes=tree.num_nodes,
             ancestors=layout.ancestors, depth=layout.depth,
             retrieve=layout.retrieve_indices())
    return {k: v.to(device, non_blocking=True) for k, v in t.items()}


def _result(out: TreeVerifyOutput) -> VerifyResult:
    return VerifyResult(accepted_nodes=out.accepted_nodes.cpu(),
                        num_accepted=out.num_accepted.cpu(), bonus_tokens=out.bonus_tokens.cpu())


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor,
                  layout: TreeLayout | None = None) -> VerifyResult:
    """Accept the deepest path whose tokens all match the target's argmax (the earliest of
    equally deep ones); the bonus token is the argmax after it. Runs
    ``specplug.kernels.verify_tree``: the Triton kernel on CUDA, its torch reference on CPU."""
    _check_logits(tree, target_logits)
    layout = layout or TreeLayout.from_tree(tree)
    return _result(verify_tree(target_logits=target_logits, temperature=0.0,
                               **_on_device(tree, layout, target_logits.device)))


def verify_exact(tree: DraftTree, target_logits: torch.Tensor, sampling: SamplingParams,
                 generator: torch.Generator | None = None,
                 layout: TreeLayout | None = None) -> VerifyResult:
    """Lossless recursive rejection sampling over trees (chains are the one-child case),
    through ``specplug.kernels.verify_tree``; its uniforms come from ``generator``. Top-k /
    top-p warp the logits first (temperature then travels inside the warped logits)."""
    if sampling.greedy:
        return verify_greedy(tree, target_logits, layout)
    _check_logits(tree, target_logits)
    layout = layout or TreeLayout.from_tree(tree)
    B, N = tree.tokens.shape
    temperature = sampling.temperature
    if sampling.top_k or sampling.top_p < 1.0:
        target_logits, temperature = warp_logits(target_logits, sampling), 1.0
    dev = target_logits.device
    # float64 draws on the generator's own device (the engine's is a CPU generator)
    gen_dev = generator.device if generator is not None else dev
    uniforms = torch.rand(B, N, generator=generator, dtype=torch.float64, device=gen_dev)
    bonus_uniforms = torch.rand(B, generator=generator, dtype=torch.float64, device=gen_dev)
    q = None if tree.draft_probs is None else tree.draft_probs.to(dev, non_blocking=True)
    return _result(verify_tree(target_logits=target_logits, temperature=temperature,
                               draft_probs=q, uniforms=uniforms.to(dev),
                               bonus_uniforms=bonus_uniforms.to(dev),
                               **_on_device(tree, layout, dev)))


def verify_typical(tree: DraftTree, target_logits: torch.Tensor, sampling: SamplingParams,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3,
                   generator: torch.Generator | None = None,
                   layout: TreeLayout | None = None) -> VerifyResult:
    """Medusa's typical acceptance (LOSSY): accept x if p(x) > min(threshold, alpha * exp(-H(p)))
    along the deepest such path; the bonus token is sampled from the target at its end."""
    _check_logits(tree, target_logits)
    layout = layout or TreeLayout.from_tree(tree)
    B, N = tree.tokens.shape
    warm = SamplingParams(temperature=sampling.temperature or 1.0, top_k=sampling.top_k,
                          top_p=sampling.top_p)
    p_all = probs_from_logits(target_logits, warm)
    if N == 0:
        z = torch.zeros(B, dtype=torch.long)
        best, depth = z - 1, z
    else:
        p_parent = p_all.gather(1, (tree.parents + 1)[..., None].expand(-1, -1, p_all.shape[-1]))
        px = p_parent.gather(-1, tree.tokens[..., None]).squeeze(-1)
        ent = -(p_parent * p_parent.clamp(min=1e-30).log()).sum(-1)
        thresh = torch.minimum(torch.full_like(ent, posterior_threshold),
                               posterior_alpha * torch.exp(-ent))
        matched = (px > thresh) & layout.real
        ok = ~(layout.ancestors & ~matched[:, None, :]).any(-1) & layout.real
        depth, best = torch.where(ok, layout.depth, 0).max(-1)
        best = torch.where(depth > 0, best, -1)
    end = p_all[torch.arange(B), best + 1]
    if sampling.greedy:
        bonus = end.argmax(-1)
    else:
        bonus = torch.multinomial(end, 1, generator=generator).squeeze(-1)
    return _path_result(layout, best, depth, bonus)
