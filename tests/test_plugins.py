"""Plugins: an outside drafter registered through the hooks is used by name, exactly as a
user's installed plugin would be (entry point in the ``specplug`` group)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from tiny_models import reference_greedy, repetitive_prompts, tiny_llama

from specplug import SpecConfig
from specplug.drafters.base import Candidates, Drafter
from specplug.engine import ModelTargetRunner, Speculator, speculative_generate
from specplug.hookspecs import hookimpl
from specplug.plugins import get_registry, register_plugin, unregister_plugin

REPEAT_LAST = textwrap.dedent('''
    from specplug.drafters.base import Candidates, Drafter
    from specplug.hookspecs import hookimpl

    class RepeatLast(Drafter):
        """Proposes the previous token again (a deliberately naive drafter)."""
        name = "repeat_last"

        def begin(self, ctx):
            return [None] * len(ctx.tokens)

        def expand(self, frontier, k):
            return [[Candidates([it.token], [1.0], [None]) for it in row] for row in frontier]

    @hookimpl
    def specplug_register_drafters(register):
        register(RepeatLast)
''')


def test_runtime_registered_drafter_is_used_by_name():
    module = types.ModuleType("repeat_last_plugin")
    exec(REPEAT_LAST, module.__dict__)
    register_plugin(module, name="repeat_last_plugin")
    try:
        assert "repeat_last" in get_registry().drafters
        model = tiny_llama(0)
        ids, mask = repetitive_prompts([8, 5], seed=2)
        cfg = SpecConfig(method="repeat_last", num_speculative_tokens=3)
        got = speculative_generate(ModelTargetRunner(model), Speculator.from_config(cfg, model),
                                   ids, mask, max_new_tokens=12)
        assert got.sequences == reference_greedy(model, ids, mask, 12)
    finally:
        unregister_plugin(module)
    with pytest.raises(ValueError, match="unknown speculative method 'repeat_last'"):
        SpecConfig(method="repeat_last")


def test_entry_point_plugin_loads_in_a_fresh_process(tmp_path):
    """An installed distribution with an entry point in group 'specplug' is found at start-up."""
    (tmp_path / "repeat_last_plugin.py").write_text(REPEAT_LAST)
    dist = tmp_path / "repeat_last_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: repeat-last-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text("[specplug]\nrepeat_last = repeat_last_plugin\n")
    code = ("from specplug import SpecConfig; "
            "print(SpecConfig(method='repeat_last').method)")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "repeat_last"


class _NanCheck(Drafter):
    name = "nan_probe"

    def begin(self, ctx):
        return [None] * len(ctx.tokens)

    def expand(self, frontier, k):
        return [[Candidates([], [], []) for _ in row] for row in frontier]


def test_duplicate_names_are_an_error():
    class Clash(_NanCheck):
        name = "ngram"

    plugin = types.SimpleNamespace(
        specplug_register_drafters=hookimpl(lambda register: register(Clash)))
    register_plugin(plugin, name="clash")
    try:
        with pytest.raises(ValueError, match="two plugins register the drafter 'ngram'"):
            get_registry()
    finally:
        unregister_plugin(plugin)
    assert get_registry().drafters["ngram"].__name__ == "NgramDrafter"


def test_on_step_hook_sees_every_step():
    seen = []
    plugin = types.SimpleNamespace(specplug_on_step=hookimpl(lambda stats: seen.append(stats)))
    register_plugin(plugin, name="observer")
    try:
        model = tiny_llama(0)
        ids, mask = repetitive_prompts([6], seed=1)
        out = speculative_generate(ModelTargetRunner(model),
                                   Speculator.from_config(SpecConfig(method="ngram"), model),
                                   ids, mask, max_new_tokens=10)
    finally:
        unregister_plugin(plugin)
    assert len(seen) == out.stats.target_forwards - 1  # every step after the prefill
    assert sum(s.accepted[0] for s in seen) + len(seen) + 1 >= 10
    assert torch.is_tensor(ids)
