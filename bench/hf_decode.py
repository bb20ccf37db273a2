"""The transformers side of bench/decode.py: greedy `generate` (its own KV cache), timed.

    python bench/hf_decode.py --spec=SPEC.json     # prints `RESULT <json>`

SPEC (written by decode.py, which prints this command) names the HF exports of our
models, the prompt lengths, the new tokens and the runs. Per model and prompt length:
the fastest of `runs` timed generate(1 token) (prefill) and generate(new_tokens), after
one warm-up each; the decode latency per token is their difference over new_tokens - 1.
torch runs with its defaults (threads, OpenMP waiting): run it alone, by hand, to check
what the bench reports. Never imports TensorFlow.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import reference_spec, report, time_calls  # noqa: E402


def main(argv=None):
    spec = reference_spec(__doc__, argv)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    new, latency = spec["new_tokens"], {}
    for name, paths in spec["models"].items():
        model = transformers.AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
        model.generation_config.eos_token_id = None
        latency[name] = {}
        for length in spec["lengths"]:
            ids = torch.randint(0, model.config.vocab_size, (1, length),
                                generator=torch.Generator().manual_seed(0))

            def timed(n):
                def call():
                    with torch.no_grad():
                        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=0, use_cache=True)
                return min(time_calls(call, spec["runs"], warmup=1))  # the least disturbed

            prefill, full = timed(1), timed(new)
            latency[name][str(length)] = [prefill, (full - prefill) / (new - 1)]
    report({"latency": {n: {"hf": v} for n, v in latency.items()},
            "threads": torch.get_num_threads(),
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}"})


if __name__ == "__main__":
    main()
