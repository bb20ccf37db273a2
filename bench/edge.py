"""Edge inference speed: TFLite (fp32 / fp16 / int8) in ai-edge-litert and in the
LiteRT-LM engine, against the SavedModel, on this machine; file sizes.

    python bench/edge.py                       # quickstart-sized model, random weights
    python bench/edge.py --family=mla_moe      # DeepSeek-V3 style (MLA + MoE + shared)
    python bench/edge.py --workdir=runs/tiny   # a trained run

Prefill: tokens/s of one --prompt_tokens prompt (TFLite: one prefill_<N> call;
SavedModel: generate_ids with one new token). Decode: tokens/s of --decode_tokens
steps after it (SavedModel: the compiled while-loop, (time(n) - time(1)) / (n - 1)).
LiteRT-LM figures come from its own Benchmark (prefill of the same length, decode
of the same count). Every runtime gets --threads threads. Medians of --repeats.
Targets of issue 10: int8 decode >= SavedModel fp32 decode; int8 file <= 0.3x fp32.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

QUICKSTART = dict(vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
V3_STYLE = dict(QUICKSTART, attention_type="mla", q_lora_rank=64, kv_lora_rank=64,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=64,
                first_k_dense_replace=1, n_group=2, topk_group=1)


def median_time(fn, repeats: int) -> float:
    return statistics.median(common.time_calls(fn, repeats, warmup=1))


def bench_savedmodel(path, prompt, n, repeats):
    sig = tf.saved_model.load(path).signatures["generate_ids"]

    def run(k):
        def go():
            out = sig(input_ids=tf.constant([prompt]), lengths=tf.constant([len(prompt)]),
                      max_new_tokens=tf.constant([k]), temperature=tf.constant([0.0]),
                      top_k=tf.constant([0]), top_p=tf.constant([1.0]), seed=tf.constant([0]))
            assert int(out["output_lengths"][0]) == k, "a stop token ended the run early"
        return go

    one, many = median_time(run(1), repeats), median_time(run(n), repeats)
    return len(prompt) / one, (n - 1) / max(many - one, 1e-9)


def bench_tflite(path, prompt, n, repeats, threads):
    from deepseek_tf.generate.tflite_runner import TFLiteRunner
    runner = TFLiteRunner(path, threads)

    def prefill():
        runner.reset()
        runner.prefill(prompt)

    def decode():
        runner.reset()
        runner.pos = len(prompt)
        for i in range(n):
            runner.decode(int(prompt[i % len(prompt)]))

    return len(prompt) / median_time(prefill, repeats), n / median_time(decode, repeats)


def bench_litertlm(path, p, n, context, threads):
    import litert_lm
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    info = litert_lm.Benchmark(path, litert_lm.Backend.CPU(thread_count=threads),
                               prefill_tokens=p, decode_tokens=n,
                               max_num_tokens=context,
                               activation_data_type=litert_lm.ActivationDataType.FLOAT32).run()
    return info.last_prefill_tokens_per_second, info.last_decode_tokens_per_second


def main(argv=None):
    ap = common.parser(__doc__)
    ap.add_argument("--family", default="gqa", choices=("gqa", "mla_moe"))
    ap.add_argument("--workdir", default="", help="bench a trained run instead")
    ap.add_argument("--prompt_tokens", type=int, default=128)
    ap.add_argument("--decode_tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads of every runtime (default: the CPU count, TF's default)")
    ap.add_argument("--repeats", type=int, default=5)
    args = common.start(ap, argv)
    if args.smoke:
        args.prompt_tokens, args.decode_tokens, args.context, args.repeats = 8, 4, 32, 1
    if args.threads != common.tf_threads():
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from deepseek_tf.config import Experiment, ModelConfig
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.export import export
    from deepseek_tf.model import DeepSeekCausalLM, count_params
    from deepseek_tf.workdir import load_run_tokenizer, load_workdir

    if args.workdir:
        model, exp = load_workdir(args.workdir)
        tok = load_run_tokenizer(args.workdir, exp)
    else:
        tf.keras.utils.set_random_seed(0)
        cfg = ModelConfig(**(QUICKSTART if args.family == "gqa" else V3_STYLE))
        if args.smoke:  # one layer: every export traces and converts the whole model
            cfg = cfg.replace(num_hidden_layers=1, first_k_dense_replace=0)
        model, exp, tok = DeepSeekCausalLM(cfg), Experiment(model=cfg), ByteTokenizer()
    p, n, c = args.prompt_tokens, args.decode_tokens, args.context
    rng = np.random.default_rng(0)
    prompt = [tok.bos_id] + rng.integers(32, 127, p - 1).tolist()  # printable bytes
    print(f"model: {args.workdir or args.family}, {count_params(model)[1]:,} parameters; "
          f"prompt {p} tokens, {n} decode steps, context {c}, {args.threads} threads; "
          f"TF {tf.__version__}")
    quiet = lambda *_: None  # noqa: E731
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sm = export(model, exp, "saved_model", os.path.join(tmp, "sm", "1"), log=quiet,
                    tokenizer=tok, max_length=c, max_new_tokens=n)
        sizes["SavedModel"] = sum(os.path.getsize(os.path.join(d, f))
                                  for d, _, fs in os.walk(sm) for f in fs)
        rows.append(("SavedModel fp32 (TF)", *bench_savedmodel(sm, prompt, n, args.repeats)))
        for q in ("none", "int8") if args.smoke else ("none", "fp16", "int8"):
            name = {"none": "fp32"}.get(q, q)
            path = os.path.join(tmp, f"{q}.tflite")
            export(model, exp, "tflite", path, log=quiet, max_length=c, prefill_lengths=(p,),
                   quantize=q)
            sizes[f"tflite {name}"] = os.path.getsize(path)
            rows.append((f"TFLite {name} (ai-edge-litert)",
                         *bench_tflite(path, prompt, n, args.repeats, args.threads)))
            if args.smoke and q == "none":  # smoke: the LiteRT-LM engine once (int8)
                continue
            bundle = os.path.join(tmp, f"{q}.litertlm")
            export(model, exp, "litertlm", bundle, log=quiet, tokenizer=tok, max_length=c,
                   prefill_lengths=(p,), quantize=q)
            sizes[f"litertlm {name}"] = os.path.getsize(bundle)
            try:
                rows.append((f"TFLite {name} (LiteRT-LM engine)",
                             *bench_litertlm(bundle, p, n, c, args.threads)))
            except Exception as e:  # noqa: BLE001 (report and go on)
                rows.append((f"TFLite {name} (LiteRT-LM engine): {type(e).__name__}: {e}",
                             float("nan"), float("nan")))
    print(f"\n{'runtime':<36} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, pre, dec in rows:
        print(f"{name:<36} {pre:>14,.0f} {dec:>13,.0f}")
    print("\nfile sizes:")
    for name, size in sizes.items():
        print(f"  {name:<16} {size / 2**20:8.2f} MiB  ({size / sizes['tflite fp32']:.2f}x "
              f"the fp32 .tflite)")
    sm_decode = rows[0][2]
    int8_decode = next(d for name, _, d in rows if name.startswith("TFLite int8 (ai-edge"))
    print(f"\ntargets: int8 decode {int8_decode:,.0f} vs SavedModel fp32 {sm_decode:,.0f} "
          f"tok/s ({int8_decode / sm_decode:.1f}x); int8 file "
          f"{sizes['tflite int8'] / sizes['tflite fp32']:.2f}x fp32 (target <= 0.3x)")


if __name__ == "__main__":
    main()
