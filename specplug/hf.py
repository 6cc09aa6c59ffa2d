"""``specplug.hf``: the Hugging Face Transformers entry points (imports transformers).

Two routes, both token-identical to the model's own greedy ``generate`` and exact under
sampling:

* ``model.generate(**inputs, assistant_model=specplug.hf.assistant(model, method="ngram"))``:
  a specplug chain drafter inside transformers' assisted-decoding loop
  (``specplug.adapters.hf_assisted``);
* ``specplug.hf.generate(model, **inputs, spec=...)`` and ``model.generate(**inputs,
  custom_generate=specplug.hf.custom_generate(...))``: specplug's own engine
  (``specplug.adapters.hf_generate``).
"""

from specplug.adapters.hf_assisted import SUPPORTED, Assistant, assistant
from specplug.adapters.hf_generate import custom_generate, generate

__all__ = ["SUPPORTED", "Assistant", "assistant", "custom_generate", "generate"]
