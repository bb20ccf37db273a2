"""Decode speed: our compiled Keras generator and SavedModel vs transformers' generate.

    python bench/decode.py [--new_tokens=32] [--models=issue3,tiny]

For each model (the issue-3 benchmark config, DeepSeek-V3 style MLA + MoE; the
tiny preset, dense GQA) with the same random weights on every side:
  keras        `Generator` (the one-graph tf.while_loop decode), without and with
               XLA-compiled decode steps (`_xla`)
  saved_model  the exported `generate_ids` signature, loaded back (`_xla`: exported
               with --jit_compile)
  hf           transformers' `generate` with its KV cache on our HF export
               (bench/hf_decode.py, a subprocess: torch never meets TensorFlow)
Decode latency per token at prompt lengths 16 and 512 = (time of NEW_TOKENS new
tokens - time of 1) / (NEW_TOKENS - 1), the fastest of five runs each; both positions use the
same cache length (the cache is static, so attention cost does not grow with the
position). Also prints the MLA cache bytes per token, latent vs the naive path's
expanded keys and values. Greedy, batch 1, 2 threads per side.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import cpu_summary

import numpy as np
import tensorflow as tf

from deepseek_tf.config import ModelConfig
from deepseek_tf.export.hf import export_hf
from deepseek_tf.export.saved_model import export_saved_model
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.generate import Generator
from deepseek_tf.model import DeepSeekCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
LENGTHS = (16, 512)
MODELS = {
    # The issue-3 benchmark config (bench/train_throughput.py), longer positions.
    "issue3": ModelConfig(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
        intermediate_size=768, max_position_embeddings=1024, attention_type="mla",
        q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=128, n_group=4, topk_group=2, first_k_dense_replace=1),
    # configs/tiny.flags (the quickstart model).
    "tiny": ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=352,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=1024),
}


def _latencies(call, new_tokens):
    """{length: (prefill s, decode s/token)} of `call(prompt, n)`, medians of three."""
    rng = np.random.default_rng(0)
    out = {}
    for length in LENGTHS:
        prompt = rng.integers(0, 256, size=(1, length)).astype(np.int32)

        def timed(n):
            call(prompt, n)  # warm (and trace) this shape
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                call(prompt, n)
                runs.append(time.perf_counter() - t0)
            return min(runs)  # the least disturbed run: robust on a busy machine

        prefill, full = timed(1), timed(new_tokens)
        out[length] = (prefill, (full - prefill) / (new_tokens - 1))
    return out


def _mla_cache_bytes(cfg: ModelConfig, model) -> tuple[int, int]:
    """(latent path bytes per token, naive expanded K/V bytes per token), float32."""
    per_token = sum(int(np.prod(t.shape)) // t.shape[2] for layer in model.init_cache(1, 8)
                    for t in layer) * 4
    naive = cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    assert per_token == expected, (per_token, expected)
    return per_token, naive


def hf_side(name, model, new_tokens, tmp):
    """transformers' decode on our HF export of `model` (bench/hf_decode.py)."""
    hf_dir = os.path.join(tmp, name, "hf")
    export_hf(model, _exp(model.config), hf_dir, log=lambda *_: None)
    # OpenMP threads that spin while they wait (torch's default) lose 10-20x whenever
    # anything else runs on a 2-core machine; passive waiting keeps torch steady.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "hf_decode.py"), hf_dir,
                           str(new_tokens), *map(str, LENGTHS)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    hf = json.loads(proc.stdout.strip().splitlines()[-1])
    return hf, {n: (hf[str(n)]["prefill_s"], hf[str(n)]["decode_s_per_token"]) for n in LENGTHS}


def our_sides(name, model, new_tokens, tmp):
    """{side: {length: (prefill s, s/token)}} and the SavedModel size."""
    max_length = max(LENGTHS) + new_tokens
    results, size = {}, 0
    for jit in (False, True):
        suffix = "_xla" if jit else ""
        gen = Generator(model, max_length, jit_compile=jit)
        results["keras" + suffix] = _latencies(
            lambda p, n: gen.generate(p, [p.shape[1]], max_new_tokens=n)[0].numpy(), new_tokens)
        sm_dir = os.path.join(tmp, name, "sm" + suffix)
        export_saved_model(model, None, sm_dir, log=lambda *_: None, max_length=max_length,
                           tokenizer=ByteTokenizer(), jit_compile=jit)
        results["saved_model" + suffix] = _latencies(_signature_call(sm_dir), new_tokens)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sm_dir)
                   for f in fs)
    return results, size


def _signature_call(sm_dir):
    sig = tf.saved_model.load(sm_dir).signatures["generate_ids"]

    def call(p, n):
        one = lambda v, d: tf.constant([v], d)  # noqa: E731
        return sig(input_ids=tf.constant(p), lengths=one(p.shape[1], tf.int32),
                   max_new_tokens=one(n, tf.int32), temperature=one(0.0, tf.float32),
                   top_k=one(0, tf.int32), top_p=one(1.0, tf.float32),
                   seed=one(0, tf.int32))["output_ids"].numpy()
    return call


def _exp(cfg):
    from deepseek_tf.config import Experiment
    return Experiment(model=cfg)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--models", default="issue3,tiny")
    args = parser.parse_args()
    print(f"machine: {cpu_summary()}; TF {tf.__version__}; torch side with OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}")
    tmp = tempfile.mkdtemp(prefix="decode-bench-")
    try:
        names = args.models.split(",")
        models = {}
        for name in names:
            tf.keras.utils.set_random_seed(0)
            models[name] = DeepSeekCausalLM(MODELS[name])
        # transformers first, in its own process while this one waits.
        hf_runs = {name: hf_side(name, models[name], args.new_tokens, tmp) for name in names}
        for name in names:
            cfg, model = MODELS[name], models[name]
            results, size = our_sides(name, model, args.new_tokens, tmp)
            hf, results["hf"] = hf_runs[name]
            mla_model = model if cfg.uses_mla else None
            print(f"\n{name}: {cfg.attention_type}, {cfg.num_hidden_layers} layers, hidden "
                  f"{cfg.hidden_size}" + (f", {cfg.n_routed_experts} experts" if
                                          cfg.n_routed_experts else "")
                  + f"; SavedModel {size / 2**20:.1f} MiB; torch {hf['torch']}, "
                  f"transformers {hf['transformers']}")
            print(f"{'side':12} {'pos':>5} {'prefill ms':>11} {'ms/token':>9} {'tokens/s':>9}")
            for side, by_len in results.items():
                for length, (prefill, per_token) in by_len.items():
                    print(f"{side:12} {length:5d} {prefill * 1e3:11.1f} {per_token * 1e3:9.2f} "
                          f"{1 / per_token:9.1f}")
            for side in ("saved_model", "saved_model_xla"):
                for length in LENGTHS:
                    ratio = results["hf"][length][1] / results[side][length][1]
                    print(f"{side} decode vs transformers at {length}: {ratio:.2f}x "
                          f"(target >= 1.5x)")
            for side in ("keras", "keras_xla", "saved_model", "saved_model_xla"):
                growth = results[side][512][1] / results[side][16][1]
                print(f"{side}: latency at 512 / at 16 = {growth:.2f} (target <= 1.5)")
            if mla_model is not None:
                latent, naive = _mla_cache_bytes(cfg, mla_model)
                print(f"MLA cache: {latent} bytes/token (= (kv_lora_rank {cfg.kv_lora_rank} + "
                      f"rope {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x 4) vs "
                      f"{naive} for expanded K/V: {naive / latent:.1f}x smaller")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
