"""DeepSeek-V4-tiny vs DeepSeek-V3-tiny: training tokens/s and decode ms/token by context.

    python bench/v4.py [--lengths=1024,8192] [--rounds=3] [--jit_compile] [--smoke]

The models of configs/deepseek-v4-tiny.flags (sliding / CSA / HCA attention, 4
hyper-connection streams, hash-routed then top-2 MoE) and configs/deepseek-v3-tiny.flags
(MLA, top-2 MoE), MTP off in both (V4's is not built), positions raised to the longest
length, random weights. Both are 4 x 128 with 8 routed experts of width 96 + 1 shared;
their parameter counts (total, active per token) print first.
  train   one real optimizer step of the trainer (`make_train_step`) on the presets'
          batch, 16 x 256, in the precision and XLA mode `--train.precision=auto` /
          `--train.jit_compile=auto` choose on this machine for each model (printed)
  decode  one step of our KV-cache decoding (the generator's `decode_step`, batch 1)
          at position T - 1 against a cache of T slots prefilled with T - 1 random
          tokens, the fastest of 5 in a round; `--jit_compile` XLA-compiles it as
          `generate --jit_compile=true` does (default: a plain tf.function). V3's step
          reads all T cache slots; V4's masks its sliding window over the T slots and
          reads the compressed entries (T / 4 for CSA, T / 32 for HCA here) and the
          indexer's keys over them.
Both models take turns round after round (a noisy machine slows them alike); min /
median / max over the rounds and the V4/V3 ratios of medians print. Quote figures from
a quiet machine. `--smoke`: one layer each, T = 64, one round, fp32, no XLA.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

BATCH, SEQ = 16, 256  # both presets' --train.batch_size / --data.seq_len
NAMES = {"v4": "deepseek-v4-tiny", "v3": "deepseek-v3-tiny"}


def models(max_len: int, smoke: bool) -> dict:
    """{"v4", "v3"}: ModelConfig of each preset, MTP off, positions up to `max_len`."""
    smoke_layer = {"v4": dict(layer_types="compressed_sparse_attention", mlp_layer_types="moe"),
                   "v3": dict(first_k_dense_replace=0)}  # one MoE layer each
    out = {}
    for key, name in NAMES.items():
        over = dict(num_nextn_predict_layers=0, max_position_embeddings=max_len)
        if smoke:
            over.update(num_hidden_layers=1, **smoke_layer[key])
        out[key] = common.preset_model(name, **over)
    return out


def train_runners(cfgs: dict, smoke: bool) -> tuple[dict, dict]:
    """({name: one timed step}, {name: "precision, XLA"}) under the trainer's auto rules."""
    batch, seq = (2, 32) if smoke else (BATCH, SEQ)
    runners, modes = {}, {}
    for key, cfg in cfgs.items():
        prec, jit, _ = ("float32", False, "") if smoke else common.trainer_choice(cfg, batch, seq)
        runners[key] = common.train_step_runner(cfg, batch, seq, jit, prec)
        modes[key] = f"{prec}, XLA {'on' if jit else 'off'}"
    return runners, modes


def train(cfgs: dict, rounds: int, smoke: bool) -> None:
    """Prints train tokens/s of both models, min / median / max over the rounds."""
    runners, modes = train_runners(cfgs, smoke)
    for fn in runners.values():
        fn()  # trace / compile
    batch, seq = (2, 32) if smoke else (BATCH, SEQ)
    steps = common.take_turns({k: lambda fn=fn: common.time_calls(fn, 1)[0] for k, fn in
                       runners.items()}, rounds)
    tokens = {f"{k} ({modes[k]})": [batch * seq / s for s in v] for k, v in steps.items()}
    common.print_stats(f"train {batch}x{seq}", tokens, "tokens/s")
    med = {k[:2]: common.stats(v)[1] for k, v in tokens.items()}
    print(f"train tokens/s V4 / V3: {med['v4'] / med['v3']:.2f}x")


def main(argv=None):
    from deepseek_tf.params import count_parameters
    p = common.parser(__doc__)
    p.add_argument("--lengths", default="1024,8192")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile the decode step")
    p.add_argument("--no_train", action="store_true", help="decode only")
    a = common.start(p, argv)
    lengths = [64] if a.smoke else [int(v) for v in a.lengths.split(",")]
    rounds = 1 if a.smoke else a.rounds
    cfgs = models(max(lengths), a.smoke)
    for key, cfg in cfgs.items():
        n = count_parameters(cfg)
        print(f"{key}: configs/{NAMES[key]}.flags, {n['total'] / 1e6:.2f}M params, "
              f"{n['active'] / 1e6:.2f}M active per token")

    if not a.no_train:
        train(cfgs, rounds, a.smoke)
    for t in lengths:
        m = common.decode_table(f"decode T={t} (XLA {'on' if a.jit_compile else 'off'})",
                                cfgs, t, a.jit_compile, rounds)
        print(f"decode ms/token at T={t}: V4 {m['v4']:.2f}, V3 {m['v3']:.2f}, "
              f"V4 / V3 {m['v4'] / m['v3']:.2f}x")


if __name__ == "__main__":
    main()
