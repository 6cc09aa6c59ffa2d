"""``specplug.hf``: the Hugging Face Transformers entry points (imports transformers).

See ``specplug.adapters.hf`` for the two routes: ``assistant(...)`` for
``model.generate(assistant_model=...)`` and ``generate(...)`` / ``custom_generate(...)``.
"""

from specplug.adapters.hf import SUPPORTED, Assistant, assistant, custom_generate, generate

__all__ = ["SUPPORTED", "Assistant", "assistant", "custom_generate", "generate"]
