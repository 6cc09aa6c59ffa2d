"""Runs one vLLM engine job in its own process and prints its result as JSON.

vLLM binds threads, installs signal handlers and keeps global state, so the integration tests
run each engine in a fresh process: ``python vllm_driver.py JOB_JSON``. The job names the model
folder, the speculative config, prompts and sampling; the last stdout line is
``RESULT {...}``: token ids and texts per prompt (per sample), and vLLM's spec-decode metrics.
``"images"`` (one PNG path per prompt) makes the prompts multimodal.
With ``"plugin_drafter": true`` a test drafter (``echo_last``: proposes the last token again) is
registered through specplug's plugin manager first, as a third-party plugin would be.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _register_test_drafter() -> None:
    from specplug.drafters.base import Candidates, Drafter
    from specplug.hookspecs import hookimpl
    from specplug.plugins import get_plugin_manager

    class EchoLast(Drafter):
        """Proposes the root token again at every depth (a deterministic token-only drafter)."""

        name = "echo_last"

        def begin(self, ctx):
            self.tokens = ctx.tokens
            return [t[-1] for t in ctx.tokens]

        def expand(self, frontier, k):
            return [[Candidates(tokens=[it.token], probs=[1.0], handles=[it.token])
                     for it in row] for row in frontier]

    class Plugin:
        @hookimpl
        def specplug_register_drafters(self, register):
            register(EchoLast)

    get_plugin_manager().register(Plugin(), name="echo-last-test-plugin")


def _import_pixtral_processor_without_torchvision() -> None:
    """vLLM's ``llava.py`` imports ``pixtral.py``, which imports transformers' Pixtral image
    processor, which imports ``torchvision.transforms.v2.functional`` at module level. PyPI's
    torchvision is a CUDA build that cannot load against the CPU torch here (docs/multimodal.md),
    and LLaVA never calls that processor. So import it once against an empty stand-in module,
    then remove the stand-in: transformers still sees no torchvision and uses its PIL image
    processors, and any call into the stand-in would fail loudly. Test environment only: a
    machine with a torchvision that matches its torch needs none of this."""
    import importlib.machinery
    import importlib.util
    import types

    import transformers  # noqa: F401 - decides its image backends before the stand-in exists

    if importlib.util.find_spec("torchvision") is not None:
        return
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional")
    stand_ins = {name: types.ModuleType(name) for name in names}
    for name, module in stand_ins.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for parent, child in zip(names, names[1:]):
        setattr(stand_ins[parent], child.rsplit(".", 1)[1], stand_ins[child])
    sys.modules.update(stand_ins)
    try:
        import transformers.models.pixtral.image_processing_pixtral  # noqa: F401
    finally:
        for name in names:
            sys.modules.pop(name, None)
    from transformers.utils import is_torchvision_available

    assert not is_torchvision_available(), "the torchvision stand-in leaked into transformers"
    # vLLM inspects the model class in a fresh interpreter (to keep CUDA uninitialised), which
    # would import pixtral.py without the processor imported above; on CPU, inspect in-process
    from vllm.model_executor.models import registry

    registry._run_in_subprocess = lambda fn: fn()


def main() -> None:
    job = json.loads(sys.argv[1])
    if job.get("images"):
        _import_pixtral_processor_without_torchvision()
    if job.get("plugin_drafter"):
        _register_test_drafter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], enforce_eager=True, dtype="float32", seed=job.get("seed", 0),
              max_model_len=job.get("max_model_len", 1024),
              speculative_config=job.get("speculative_config"),
              additional_config=job.get("additional_config") or {}, disable_log_stats=False)
    params = SamplingParams(temperature=job.get("temperature", 0.0), n=job.get("n", 1),
                            max_tokens=job["max_tokens"], seed=job.get("seed"),
                            ignore_eos=job.get("ignore_eos", False))
    prompts = job["prompts"]
    if job.get("images"):  # a vision-language target: one image file per prompt
        from PIL import Image

        prompts = [{"prompt": p, "multi_modal_data": {"image": Image.open(i).convert("RGB")}}
                   for p, i in zip(prompts, job["images"])]
    outs = llm.generate(prompts, params, use_tqdm=False)
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            metrics[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    result = {
        "token_ids": [[list(c.token_ids) for c in o.outputs] for o in outs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
        "texts": [[c.text for c in o.outputs] for o in outs],
        "metrics": metrics,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
