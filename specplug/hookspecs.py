"""pluggy hook specifications of the ``specplug`` project.

Built-in drafters, tree builders and verifiers register through these same hooks, so a
third-party plugin (an installed package with an entry point in the ``specplug`` group, or a
module passed to ``specplug.plugins.register_plugin``) is indistinguishable from a built-in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("specplug")
hookimpl = pluggy.HookimplMarker("specplug")


@hookspec
def specplug_register_drafters(register: Callable[[type], None]) -> None:
    """Call ``register(DrafterClass)`` for each drafter (a ``specplug.drafters.base.Drafter``
    subclass with a ``name`` and an ``Options`` model)."""


@hookspec
def specplug_register_tree_builders(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call ``register(name, factory)``; ``factory(config: SpecConfig) -> TreeBuilder``."""


@hookspec
def specplug_register_verifiers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Call ``register(name, fn)``; ``fn(tree, target_logits, sampling, generator, layout,
    config) -> VerifyResult``."""


@hookspec
def specplug_register_observers(register: Callable[[type], None]) -> None:
    """Call ``register(ObserverClass)`` for each observer (a ``specplug.online.observer.Observer``
    subclass with a ``name`` and an ``Options`` model), configured by name in
    ``SpecConfig.adapt``: it sees every verification step and may adapt the drafter."""


@hookspec
def specplug_on_step(stats: Any) -> None:
    """Called after every verification step with a ``specplug.engine.StepStats``."""
