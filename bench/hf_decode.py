"""The transformers side of bench/decode.py: greedy `generate` (its own KV cache), timed.

    python bench/hf_decode.py --spec=SPEC.json     # prints `RESULT <json>`

SPEC (written by decode.py, which prints this command) names the HF exports of our
models, the prompt lengths, the new tokens, the runs, the cache length and the settings
to run (all of `SETTINGS` if absent):
  hf           `generate` as it comes: eager, its default dynamic cache
  hf_compiled  transformers' recipe for fast decoding ("Optimizing inference" in its
               docs): a static cache (`StaticCache` of the spec's `max_length`, the
               length our side's cache has, reset before each call) and the model's
               forward under `torch.compile` (inductor's defaults); the warm-up calls
               compile (once per prompt shape, and the one-token decode step)
Per model, setting and prompt length: the fastest of `runs` timed generate(1 token)
(prefill) and generate(new_tokens), after one warm-up each; the decode latency per token
is their difference over new_tokens - 1. torch runs with its defaults (threads, OpenMP
waiting): run it alone, by hand, to check what the bench reports. Never imports
TensorFlow.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import reference_spec, report, time_calls  # noqa: E402

SETTINGS = ("hf", "hf_compiled")


def _generate(model, setting: str, max_length: int):
    """`call(ids, n)`: greedy `generate` of n new tokens in `setting`."""
    import torch
    from transformers import StaticCache

    cache = (StaticCache(config=model.config, max_cache_len=max_length)
             if setting == "hf_compiled" else None)

    def call(ids, n):
        kwargs = {}
        if cache is not None:
            cache.reset()
            kwargs["past_key_values"] = cache
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, use_cache=True, **kwargs)

    if cache is not None:
        call(torch.zeros((1, 1), dtype=torch.long), 1)  # allocates the cache, eagerly: a
        model.forward = torch.compile(model.forward)  # graph of the empty cache is not reused
    return call


def main(argv=None):
    spec = reference_spec(__doc__, argv, SETTINGS)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    new, latency = spec["new_tokens"], {}
    for name, paths in spec["models"].items():
        latency[name] = {}
        for setting in spec.get("settings") or SETTINGS:
            model = transformers.AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
            model.generation_config.eos_token_id = None
            generate, latency[name][setting] = _generate(model, setting, spec["max_length"]), {}
            for length in spec["lengths"]:
                ids = torch.randint(0, model.config.vocab_size, (1, length),
                                    generator=torch.Generator().manual_seed(0))

                def timed(n):  # the least disturbed run
                    return min(time_calls(lambda: generate(ids, n), spec["runs"], warmup=1))

                prefill, full = timed(1), timed(new)
                latency[name][setting][str(length)] = [prefill, (full - prefill) / (new - 1)]
    report({"latency": latency, "threads": torch.get_num_threads(),
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}"})


if __name__ == "__main__":
    main()
