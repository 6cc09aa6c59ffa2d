"""specplug's own tree builders and verifiers, registered through the public hooks."""

from __future__ import annotations

from typing import Any

from specplug.acceptance import verify_exact, verify_typical
from specplug.hookspecs import hookimpl
from specplug.tree import ChainBuilder, DynamicTreeBuilder, StaticTreeBuilder


@hookimpl
def specplug_register_tree_builders(register):
    register("chain", lambda cfg: ChainBuilder(cfg.num_speculative_tokens))
    register("static", lambda cfg: StaticTreeBuilder(cfg.tree_paths))
    register("dynamic", lambda cfg: DynamicTreeBuilder(
        budget=cfg.tree_budget or 2 * cfg.num_speculative_tokens,
        topk=cfg.tree_topk, depth=cfg.num_speculative_tokens))


def _exact(tree, logits, sampling, generator, layout, config: Any):
    return verify_exact(tree, logits, sampling, generator, layout)


def _typical(tree, logits, sampling, generator, layout, config: Any):
    return verify_typical(tree, logits, sampling, config.posterior_threshold,
                          config.posterior_alpha, generator, layout)


@hookimpl
def specplug_register_verifiers(register):
    register("rejection_sampler", _exact)
    register("typical_acceptance_sampler", _typical)
