"""``SpecConfig``: the one validated object every adapter parses into.

Names follow vLLM's ``--speculative-config`` where vLLM has one (``method``,
``num_speculative_tokens``, ``prompt_lookup_min``/``prompt_lookup_max``, ``model``,
``acceptance_method``, ``posterior_threshold``, ``posterior_alpha``). Drafter-specific options
are given flat, as in vLLM, and validated by the chosen drafter's own ``Options`` model, so a
misspelt option is an error that names it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from specplug.drafters.base import DrafterOptions

__all__ = ["SpecConfig", "parse_tree_spec"]


class SpecConfig(BaseModel):
    """How to speculate.

    Attributes:
        method: drafter name (``ngram``, ``draft_model``, ``layer_skip`` or a plugin's).
        num_speculative_tokens: chain length; the max depth of trees (default: the drafter's
            ``default_num_speculative_tokens``: 32 for ``ngram``, whose adaptive depth makes a
            deep cap safe, 4 for model drafters).
        tree: ``chain`` | ``static`` (``tree_paths``) | ``dynamic`` (``tree_budget``,
            ``tree_topk``).
        tree_paths: static tree as paths of child ranks, e.g. ``[[0], [1], [0, 0]]``.
        tree_budget: dynamic tree: nodes kept per step (default ``2 * num_speculative_tokens``).
        tree_topk: dynamic tree: children per expanded node and nodes expanded per depth.
        acceptance_method: ``rejection_sampler`` (lossless; greedy at temperature 0) or
            ``typical_acceptance_sampler`` (Medusa's typical acceptance: LOSSY, opt-in).
        posterior_threshold, posterior_alpha: typical acceptance parameters.
        adaptive: size each step's draft (chain length, tree nodes) by what is expected to
            pay under the target's measured cost curve (``specplug.budget``): the drafter's
            own confidence, or for ``ngram`` the acceptance it has seen per kind of match;
            0 tokens when nothing pays. False: always the configured depth / budget.
        adapt: observers that adapt speculation while it serves, by name with their options,
            e.g. ``{"test_time": {"interval": 4}}`` (``specplug.online``; ``{}``: defaults).
        Any other key: an option of the chosen drafter (see ``docs/configuration.md``).
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: str
    num_speculative_tokens: int | None = Field(None, ge=1, le=64)
    tree: str = "chain"
    tree_paths: list[list[int]] | None = None
    tree_budget: int | None = Field(None, ge=1, le=512)
    tree_topk: int = Field(4, ge=1, le=64)
    acceptance_method: str = "rejection_sampler"
    posterior_threshold: float = Field(0.09, gt=0.0, le=1.0)
    posterior_alpha: float = Field(0.3, gt=0.0, le=1.0)
    adaptive: bool = True
    adapt: dict[str, dict[str, Any] | None] = Field(default_factory=dict)

    _options: DrafterOptions | None = PrivateAttr(default=None)
    _adapt_options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> SpecConfig:
        from specplug.plugins import get_registry
        from specplug.tree import parse_static_paths

        registry = get_registry()
        drafter_cls = registry.drafter(self.method)
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = drafter_cls.default_num_speculative_tokens
        for field, table in (("tree", registry.tree_builders),
                             ("acceptance_method", registry.verifiers)):
            if getattr(self, field) not in table:
                raise ValueError(f"{field}={getattr(self, field)!r} is not registered; "
                                 f"registered: {', '.join(sorted(table))}")
        if self.tree == "static":
            if self.tree_paths is None:
                raise ValueError("tree='static' needs tree_paths, e.g. [[0], [1], [0, 0]]")
            parse_static_paths(self.tree_paths)
        elif self.tree_paths is not None:
            raise ValueError(f"tree_paths is only used with tree='static' (tree={self.tree!r})")
        if self.tree != "dynamic" and self.tree_budget is not None:
            raise ValueError(f"tree_budget is only used with tree='dynamic' (tree={self.tree!r})")
        extras = dict(self.model_extra or {})
        try:
            self._options = drafter_cls.Options(**extras)
        except ValidationError as err:
            raise ValueError(
                f"invalid option for drafter {self.method!r}: {format_validation_error(err)}. "
                f"Options of {self.method!r}: {_allowed(drafter_cls.Options)}"
            ) from None
        self._adapt_options = {}
        for name, given in self.adapt.items():
            observer_cls = registry.observer(name)
            try:
                opts = observer_cls.Options(**(given or {}))
            except ValidationError as err:
                raise ValueError(
                    f"invalid option for adapt.{name}: {format_validation_error(err)}. "
                    f"Options of {name!r}: {_allowed(observer_cls.Options)}"
                ) from None
            observer_cls.check(opts, drafter_cls)
            self._adapt_options[name] = opts
        return self

    @property
    def adapt_options(self) -> dict[str, Any]:
        """Validated options of each observer in ``adapt``, by name."""
        return dict(self._adapt_options)

    @property
    def drafter_options(self) -> DrafterOptions:
        assert self._options is not None
        return self._options

    def describe(self) -> dict[str, Any]:
        """All settings, drafter options included, as JSON-friendly values (objects such as a
        loaded draft model appear as their class name)."""
        out = self.model_dump()
        for key, value in self.drafter_options.model_dump().items():
            json_ok = isinstance(value, (str, int, float, bool, list, dict, type(None)))
            out[key] = value if json_ok else type(value).__name__
        out["adapt"] = {name: opts.model_dump() for name, opts in self._adapt_options.items()}
        return out

    @property
    def max_depth(self) -> int:
        if self.tree == "static":
            assert self.tree_paths is not None
            return max(len(p) for p in self.tree_paths)
        return self.num_speculative_tokens

    @classmethod
    def from_cli(cls, method: str, num_speculative_tokens: int | None = None,
                 tree: str | None = None, options: dict[str, Any] | None = None) -> SpecConfig:
        """Build from CLI-style strings: ``--tree dynamic:budget=16,topk=4``."""
        kw: dict[str, Any] = {"method": method, **(options or {})}
        if num_speculative_tokens is not None:
            kw["num_speculative_tokens"] = num_speculative_tokens
        if tree:
            kw.update(parse_tree_spec(tree))
        return cls(**kw)


def format_validation_error(err: ValidationError) -> str:
    """One line naming each invalid field and its problem (``loc: message; ...``)."""
    return "; ".join((f"{'.'.join(str(x) for x in e['loc'])}: " if e["loc"] else "")
                     + e["msg"].removeprefix("Value error, ") for e in err.errors())


#: the drafter of a Python call that names none (``specplug.hf.generate(model, ids, ...)``)
DEFAULT_METHOD = "ngram"


def build_spec(spec: SpecConfig | dict | str | None, options: dict[str, Any]) -> SpecConfig:
    """A ``SpecConfig`` from what users pass: a config, a dict or a method name, with
    ``options`` (``SpecConfig`` fields and drafter options) over it; ``DEFAULT_METHOD`` when
    nothing names a drafter.

    Raises:
        ConfigError: an unknown drafter, tree or option, or a value out of range, naming each
            field and what it accepts.
    """
    from specplug.errors import ConfigError

    try:
        if isinstance(spec, SpecConfig):
            if options:
                return SpecConfig(**{**spec.model_dump(), **(spec.model_extra or {}),
                                     **options})
            return spec
        if isinstance(spec, str):
            return SpecConfig(method=spec, **options)
        fields = {**(spec or {}), **options}
        fields.setdefault("method", DEFAULT_METHOD)
        return SpecConfig(**fields)
    except ValidationError as err:
        raise ConfigError(f"invalid speculation config: {format_validation_error(err)}"
                          ) from None


def spec_option_names(spec: Any, kwargs: dict[str, Any]) -> set[str]:
    """Keyword names that belong to ``SpecConfig`` or to the chosen drafter's options (the
    drafter named by ``kwargs["method"]``, or by ``spec``: a name, dict or config)."""
    from specplug.plugins import get_registry

    keys = set(SpecConfig.model_fields) | {"method"}
    method = kwargs.get("method") or (spec if isinstance(spec, str) else None)
    if method is None and isinstance(spec, dict):
        method = spec.get("method")
    if method is None and isinstance(spec, SpecConfig):
        method = spec.method
    if method is not None:
        keys |= set(get_registry().drafter(method).Options.model_fields)
    return keys


def _allowed(options: type[BaseModel]) -> str:
    return ", ".join(options.model_fields) or "(none)"


def parse_key_value(text: str, what: str = "option") -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; the value is parsed as JSON when it is JSON
    (``4``, ``true``, ``[1, 2]``) and kept as a string otherwise.

    Raises:
        ValueError: naming ``what`` when there is no ``=`` or no key.
    """
    key, eq, raw = text.strip().partition("=")
    if not eq or not key:
        raise ValueError(f"{what} {text!r} must be KEY=VALUE")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def parse_key_values(text: str, what: str = "option") -> dict[str, Any]:
    """``a=1,b=[1,2],c=x`` -> ``{"a": 1, "b": [1, 2], "c": "x"}``: split at commas outside
    brackets, each part by ``parse_key_value``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return dict(parse_key_value(p, what) for p in [*parts, cur] if p.strip())


def parse_tree_spec(spec: str) -> dict[str, Any]:
    """``chain`` | ``static:[[0],[1],[0,0]]`` | ``dynamic[:budget=16,topk=4]`` -> config keys.

    Raises:
        ValueError: naming the bad part and the accepted forms.
    """
    forms = "chain | static:[[0],[1],[0,0]] | dynamic:budget=16,topk=4"
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind == "chain" and not rest:
        return {"tree": "chain"}
    if kind == "static":
        try:
            paths = json.loads(rest)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid static tree spec {rest!r} ({err}); forms: {forms}") from None
        if not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
            raise ValueError(f"static tree spec must be a JSON list of lists; forms: {forms}")
        return {"tree": "static", "tree_paths": paths}
    if kind == "dynamic":
        out: dict[str, Any] = {"tree": "dynamic"}
        try:
            options = parse_key_values(rest, "dynamic tree option")
        except ValueError as err:
            raise ValueError(f"invalid {err}; use budget=, topk=, depth=; forms: {forms}") \
                from None
        for key, val in options.items():
            if key not in ("budget", "topk", "depth"):
                raise ValueError(f"invalid dynamic tree option {key}={val!r}; use budget=, "
                                 f"topk=, depth=; forms: {forms}")
            if not isinstance(val, int) or isinstance(val, bool):
                raise ValueError(f"dynamic tree option {key} must be an integer, got {val!r}")
            out["num_speculative_tokens" if key == "depth" else f"tree_{key}"] = val
        return out
    raise ValueError(f"invalid tree spec {spec!r}; forms: {forms}")
