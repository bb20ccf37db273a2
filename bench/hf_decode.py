"""transformers' greedy `generate` (its own KV cache) on an HF export, timed.

    python bench/hf_decode.py HF_DIR NEW_TOKENS PROMPT_LEN... -> JSON on stdout

Per prompt length: the fastest of five timed generate(1 token) (prefill) and
generate(NEW_TOKENS); the decode latency per token is their difference over
NEW_TOKENS - 1. Runs in its own process so torch never meets TensorFlow.
"""

import json
import sys
import time

import torch
import transformers


def main():
    path, new, lengths = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3:]]
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))

        def timed(n):
            runs = []
            for _ in range(6):
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0, use_cache=True)
                runs.append(time.perf_counter() - t0)
            return min(runs[1:])  # the least disturbed run, as bench/decode.py

        prefill, full = timed(1), timed(new)
        out[str(length)] = {"prefill_s": prefill, "decode_s_per_token": (full - prefill) / (new - 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
