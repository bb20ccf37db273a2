"""MoE decoding at active-parameter cost: decode ms/token with 64 routed experts vs 8.

    python bench/moe_decode.py [--experts=8,64] [--length=256] [--rounds=3] [--smoke]

The model of configs/deepseek-v3-tiny.flags (MLA, a dense first layer, then MoE layers
with top-2 of E routed experts of width 96 + 1 shared), random weights, with E = 8 and
E = 64: same top-k, same expert width, so a token's active parameters are the same and
only the routed experts' total grows (8x). One step of our KV-cache decoding (the
generator's `decode_step`, batch 1, at position `--length` - 1 of a prefilled cache;
the fastest of 5 in a round), without XLA (a plain tf.function) and with it (as
`generate --jit_compile=true`). A decode step gathers only the chosen experts' weights
(`layers/moe.py`), so the E=64 / E=8 ratio should stay near 1 (target <= 1.2). Both
models take turns round after round; min / median / max over the rounds print, then
the ratios of medians. Quote figures from a quiet machine. `--smoke`: one MoE layer,
E = 4 and 8, T = 16, one round.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)


def main(argv=None):
    from deepseek_tf.params import count_parameters
    p = common.parser(__doc__)
    p.add_argument("--experts", default="8,64")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    a = common.start(p, argv)
    experts = [4, 8] if a.smoke else [int(v) for v in a.experts.split(",")]
    length, rounds = (16, 1) if a.smoke else (a.length, a.rounds)
    small = dict(num_hidden_layers=2, max_position_embeddings=64) if a.smoke else {}
    cfgs = {f"E={e}": common.preset_model("deepseek-v3-tiny", n_routed_experts=e,
                                          n_group=1, topk_group=1,
                                          num_nextn_predict_layers=0, **small)
            for e in experts}
    for key, cfg in cfgs.items():
        n = count_parameters(cfg)
        print(f"{key}: top-{cfg.num_experts_per_tok}, expert width "
              f"{cfg.moe_intermediate_size}, {n['total'] / 1e6:.2f}M params, "
              f"{n['active'] / 1e6:.2f}M active per token")
    first, last = f"E={experts[0]}", f"E={experts[-1]}"
    for jit in (False, True):
        m = common.decode_table(f"decode at T={length} (XLA {'on' if jit else 'off'})", cfgs,
                                length, jit, rounds)
        print(f"XLA {'on' if jit else 'off'}: {last} / {first} decode time "
              f"{m[last] / m[first]:.2f}x (target <= 1.2)")


if __name__ == "__main__":
    main()
