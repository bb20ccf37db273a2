"""Decode speed: our compiled Keras generator and SavedModel vs transformers' generate.

    python bench/decode.py [--rounds=3] [--new_tokens=32] [--models=issue3,tiny]

For each model (the issue-3 benchmark config, DeepSeek-V3 style MLA + MoE; the tiny
preset, dense GQA) with the same random weights on every side:
  keras        `Generator` (the one-graph tf.while_loop decode), without and with
               XLA-compiled decode steps (`_xla`)
  saved_model  the exported `generate_ids` signature, loaded back (`_xla`: exported
               with --jit_compile=true, the decode loop one XLA computation, and the
               prefill XLA-compiled up to the prompt width the export's timer picks);
               the export's default, --jit_compile=auto, times both at export and keeps
               the faster: the summary says which it picks here
  hf           transformers' `generate` on our HF export (bench/hf_decode.py): as it
               comes (eager, dynamic cache), and `hf_compiled`, its documented recipe
               for fast decoding (a static cache of the length ours has, the forward
               under `torch.compile`); ratios are against the faster of the two
The method of bench/README.md: each side runs alone in its own fresh process with its
library's defaults (no thread-policy variables); the sides take turns round after round.
Decode latency per token at the prompt lengths of --lengths (16, 128, 512) = (time of
NEW_TOKENS new tokens - time of 1) / (NEW_TOKENS - 1); prefill = the time of 1 new token.
In a round the fastest of --runs runs each; printed as min / median / max over the rounds,
with ratios of medians. Every position uses the same cache length (the cache is static,
so attention cost does not grow with the position).
Also prints the MLA cache bytes per token, latent vs the naive path's expanded keys and
values. Greedy, batch 1.
"""

import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

from deepseek_tf.config import ModelConfig  # noqa: E402
from hf_decode import SETTINGS as HF_SIDES  # noqa: E402  (the smoke runs both)

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {
    "issue3": common.ISSUE3.replace(max_position_embeddings=1024),  # longer positions
    # configs/tiny.flags (the quickstart model).
    "tiny": ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=352,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024),
}
OURS = ("keras", "keras_xla", "saved_model", "saved_model_xla")
# `--smoke`: each of our decode paths once, XLA once; a one-layer tiny model.
SMOKE_SIDES = ("keras", "saved_model_xla")
MODELS["smoke"] = MODELS["tiny"].replace(num_hidden_layers=1)


def _latencies(call, spec):
    """{length: [prefill s, decode s/token]} of `call(prompt, n)`."""
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}
    for length in spec["lengths"]:
        prompt = rng.integers(0, 256, size=(1, length)).astype(np.int32)

        def timed(n):  # the least disturbed run: robust on a busy machine
            return min(common.time_calls(lambda: call(prompt, n), spec["runs"], warmup=1))

        prefill, full = timed(1), timed(spec["new_tokens"])
        out[str(length)] = [prefill, (full - prefill) / (spec["new_tokens"] - 1)]
    return out


def _signature_call(sm_dir):
    import tensorflow as tf
    sig = tf.saved_model.load(sm_dir).signatures["generate_ids"]

    def call(p, n):  # p: (B, T) prompts of one length
        one = lambda v, d: tf.constant([v] * p.shape[0], d)  # noqa: E731
        return sig(input_ids=tf.constant(p), lengths=one(p.shape[1], tf.int32),
                   max_new_tokens=one(n, tf.int32), temperature=one(0.0, tf.float32),
                   top_k=one(0, tf.int32), top_p=one(1.0, tf.float32),
                   seed=one(0, tf.int32))["output_ids"].numpy()
    return call


def ours(spec: dict) -> dict:
    """Our side: {"latency": {model: {side: {length: [prefill s, s/token]}}}, ...}."""
    import tensorflow as tf

    from deepseek_tf.generate import Generator
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.workdir import restore_model

    latency = {}
    for name, paths in spec["models"].items():
        model = DeepSeekCausalLM(MODELS[name])
        restore_model(model, paths["weights"])
        latency[name] = {}
        for jit in (False, True):
            suffix = "_xla" if jit else ""
            if "keras" + suffix in spec["sides"]:
                gen = Generator(model, spec["max_length"], jit_compile=jit)
                latency[name]["keras" + suffix] = _latencies(
                    lambda p, n: gen.generate(p, [p.shape[1]], max_new_tokens=n)[0].numpy(),
                    spec)
            if "saved_model" + suffix in spec["sides"]:
                latency[name]["saved_model" + suffix] = _latencies(
                    _signature_call(paths["sm" + suffix]), spec)
    return {"latency": latency, "threads": common.tf_threads(),
            "version": f"TensorFlow {tf.__version__}"}


def prepare(names, max_length, tmp, sides=OURS) -> dict:
    """Builds each model (seed 0) and writes its weights, HF export and the SavedModels
    that `sides` time."""
    import tensorflow as tf

    from deepseek_tf.config import Experiment
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.export.hf import export_hf
    from deepseek_tf.export.saved_model import export_saved_model
    from deepseek_tf.model import DeepSeekCausalLM

    quiet = lambda *_: None  # noqa: E731
    paths, info = {}, {}
    for name in names:
        d = os.path.join(tmp, name)
        tf.keras.utils.set_random_seed(0)
        model = DeepSeekCausalLM(MODELS[name])
        paths[name] = {"weights": tf.train.Checkpoint(model=model).save(f"{d}/weights"),
                       "hf": export_hf(model, Experiment(model=MODELS[name]), f"{d}/hf",
                                       log=quiet)}
        default, prefill_jit = (_default_jit(model, max_length)
                                if {"saved_model", "saved_model_xla"} <= set(sides)
                                else (None, 0))
        for jit in (False, True):
            if "saved_model" + ("_xla" if jit else "") not in sides:
                continue
            paths[name]["sm" + ("_xla" if jit else "")] = export_saved_model(
                model, Experiment(model=MODELS[name]), f"{d}/sm{'_xla' if jit else ''}",
                log=quiet, max_length=max_length, tokenizer=ByteTokenizer(), jit_compile=jit,
                prefill_jit=prefill_jit)
        sm = paths[name].get("sm") or paths[name]["sm_xla"]
        info[name] = (model, sum(os.path.getsize(os.path.join(r, f))
                                 for r, _, fs in os.walk(sm) for f in fs), default)
    return paths, info


def _default_jit(model, max_length: int) -> tuple[str, int]:
    """What `export` picks by default (`--jit_compile=auto`) for this model on this
    machine: (its own timer's log lines, the prefill's XLA width); the XLA SavedModel is
    exported with that prefill, so that it is the default export when XLA decodes."""
    from deepseek_tf.generate.run import pick_generator
    lines = []
    gen = pick_generator(model, max_length, log=lines.append)
    return "; ".join(lines), gen.prefill_jit


def _mla_cache_bytes(cfg: ModelConfig, model) -> tuple[int, int]:
    """(latent path bytes per token, naive expanded K/V bytes per token), float32."""
    import numpy as np
    per_token = sum(int(np.prod(t.shape)) // t.shape[2] for layer in model.init_cache(1, 8)
                    for t in layer) * 4
    naive = cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert per_token == expected, (per_token, expected)
    return per_token, naive


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--rounds", type=int, default=3, help="turns of each side")
    p.add_argument("--runs", type=int, default=5, help="timed runs per length and round")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--models", default="issue3,tiny")
    p.add_argument("--lengths", default="16,128,512", help="prompt lengths (prefill and the "
                   "decode position)")
    p.add_argument("--keep", action="store_true", help="keep the exports (to re-run a side)")
    args = common.start(p, argv)
    if common.run_as_side(args, {"ours": ours}):
        return
    lengths, ours_sides = [int(n) for n in args.lengths.split(",")], OURS
    if args.smoke:
        args.rounds, args.runs, args.new_tokens, args.models, lengths = 1, 1, 4, "smoke", [8, 32]
        ours_sides = SMOKE_SIDES
    names = args.models.split(",")
    tmp = tempfile.mkdtemp(prefix="decode-bench-")
    try:
        paths, info = prepare(names, max(lengths) + args.new_tokens, tmp, ours_sides)
        spec = {"models": paths, "lengths": lengths, "new_tokens": args.new_tokens,
                "runs": args.runs, "max_length": max(lengths) + args.new_tokens,
                "sides": ours_sides}
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        sides = {"deepseek_tf": [__file__, "--side=ours", f"--spec={tmp}/spec.json"],
                 "transformers": [os.path.join(HERE, "hf_decode.py"), f"--spec={tmp}/spec.json"]}
        common.print_sides(sides)
        results = common.alternate(sides, args.rounds)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    common.print_side_info(results)
    for name in names:
        summarize(name, info[name], results, lengths, ours_sides)


def summarize(name, info, results, lengths, ours_sides=OURS):
    """Per model: ms/token and prefill ms per side and position (min / median / max over
    rounds), ratios of medians against transformers, latency growth with the position."""
    cfg, (model, size, default) = MODELS[name], info
    print(f"\n{name}: {cfg.attention_type}, {cfg.num_hidden_layers} layers, hidden "
          f"{cfg.hidden_size}" + (f", {cfg.n_routed_experts} experts" if cfg.n_routed_experts
                                  else "") + f"; SavedModel {size / 2**20:.1f} MiB")
    rounds = [dict(o["latency"][name], **t["latency"][name])
              for o, t in zip(results["deepseek_tf"], results["transformers"])]
    med = {}
    for i, (what, unit) in enumerate((("prefill", "ms"), ("decode", "ms/token"))):
        rows = {f"{side} pos {n}": [1e3 * r[side][str(n)][i] for r in rounds]
                for side in (*ours_sides, *HF_SIDES) for n in lengths}
        common.print_stats(what, rows, unit, "{:,.2f}")
        med.update({(what, k): statistics.median(v) for k, v in rows.items()})
    dec = {k: v for (what, k), v in med.items() if what == "decode"}
    pre = {k: v for (what, k), v in med.items() if what == "prefill"}
    ref = {}  # (what, position): transformers' best median there
    for d, what in ((dec, "decode"), (pre, "prefill")):
        best = {n: min(HF_SIDES, key=lambda s: d[f"{s} pos {n}"]) for n in lengths}
        ref.update({(what, n): d[f"{best[n]} pos {n}"] for n in lengths})
        print(f"transformers' faster {what}: " + ", ".join(
            f"at {n}: {best[n]}" for n in lengths))
    lo, hi = lengths[0], lengths[-1]
    for side in ours_sides:
        print(f"{side}: prefill time, ours / transformers' best (ratio of medians) " + ", ".join(
            f"at {n}: {pre[f'{side} pos {n}'] / ref['prefill', n]:.2f}" for n in lengths))
    for side in ours_sides:
        ratios = ", ".join(f"at {n}: {ref['decode', n] / dec[f'{side} pos {n}']:.2f}x"
                           for n in lengths)
        print(f"{side}: transformers' best / ours decode time (ratio of medians) {ratios}; "
              f"latency at {hi} / at {lo} = {dec[f'{side} pos {hi}'] / dec[f'{side} pos {lo}']:.2f}")
    if default:  # which of the two SavedModels `export` writes without flags
        side = "saved_model_xla" if "jit_compile: auto -> true" in default else "saved_model"
        print(f"the default export (--jit_compile=auto, timed at export): {default}; it is "
              f"{side}: " + ", ".join(
                  f"at {n}: {ref['decode', n] / dec[f'{side} pos {n}']:.2f}x" for n in lengths)
              + " the decode speed of transformers' best")
    if cfg.uses_mla:
        latent, naive = _mla_cache_bytes(cfg, model)
        print(f"MLA cache: {latent} bytes/token (= (kv_lora_rank {cfg.kv_lora_rank} + "
              f"rope {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x 4) vs "
              f"{naive} for expanded K/V: {naive / latent:.1f}x smaller")


if __name__ == "__main__":
    main()
