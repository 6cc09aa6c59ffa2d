"""The plugin manager: built-ins and entry-point plugins, loaded once, through one path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from specplug import hookspecs
from specplug.errors import ConfigError

__all__ = ["Registry", "get_plugin_manager", "get_registry", "register_plugin"]

BUILTIN_PLUGINS = (
    "specplug.drafters.ngram",
    "specplug.drafters.draft_model",
    "specplug.drafters.layer_skip",
    "specplug.drafters.trained_heads",
    "specplug.online.distill",
    "specplug.builtins",
)


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("specplug")
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints("specplug")
    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    return pm


@dataclass
class Registry:
    """Name -> implementation tables, filled by calling the registration hooks."""

    drafters: dict[str, type] = field(default_factory=dict)
    tree_builders: dict[str, Callable[..., Any]] = field(default_factory=dict)
    verifiers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    observers: dict[str, type] = field(default_factory=dict)

    def drafter(self, name: str) -> type:
        try:
            return self.drafters[name]
        except KeyError:
            raise ConfigError(
                f"unknown speculative method {name!r}; registered drafters: "
                f"{', '.join(sorted(self.drafters))}. Install or register a plugin that "
                "provides it (entry-point group 'specplug')."
            ) from None

    def observer(self, name: str) -> type:
        try:
            return self.observers[name]
        except KeyError:
            raise ConfigError(
                f"unknown adaptation {name!r} in adapt; registered observers: "
                f"{', '.join(sorted(self.observers)) or '(none)'}") from None


_registry: Registry | None = None


def _build_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry()

    def add(table: dict, name: str, obj: Any, what: str) -> None:
        if name in table and table[name] is not obj:
            raise ValueError(f"two plugins register the {what} {name!r}")
        table[name] = obj

    pm.hook.specplug_register_drafters(register=lambda cls: add(reg.drafters, cls.name, cls,
                                                                "drafter"))
    pm.hook.specplug_register_tree_builders(
        register=lambda name, f: add(reg.tree_builders, name, f, "tree builder"))
    pm.hook.specplug_register_verifiers(
        register=lambda name, f: add(reg.verifiers, name, f, "verifier"))
    pm.hook.specplug_register_observers(
        register=lambda cls: add(reg.observers, cls.name, cls, "observer"))
    return reg


def get_registry() -> Registry:
    """The registry of every drafter, tree builder and verifier currently registered."""
    global _registry
    if _registry is None:
        _registry = _build_registry(get_plugin_manager())
    return _registry


def register_plugin(plugin: object, name: str | None = None) -> None:
    """Register a plugin object or module at run time (what an entry point does at start-up)."""
    global _registry
    get_plugin_manager().register(plugin, name=name)
    _registry = None


def unregister_plugin(plugin: object) -> None:
    global _registry
    get_plugin_manager().unregister(plugin)
    _registry = None
