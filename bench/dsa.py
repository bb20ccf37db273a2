"""DeepSeek Sparse Attention vs dense MLA: one attention layer's cost by length.

    python bench/dsa.py [--lengths=1024,4096,8192] [--topk=256] [--smoke]

One `MultiHeadLatentAttention` layer, batch 1, the same shapes and weights twice:
dense MLA, and MLA with the lightning indexer (4 heads x 64) attending to the top-k
keys (256) of each query. The sparse path gathers each query's selected latents and
RoPE keys (work O(T k)), it does not mask a dense score matrix; the indexer itself
still scores every (query, key) pair (O(T^2), with 4 small heads instead of MLA's).
For each length T it prints the median seconds of
  fwd+bwd   forward and backward of the layer (gradients of all the main weights;
            the sparse side includes the indexer's forward, which the LM loss
            does not train)
  indexer   the indexer's scores + top-k alone (its share of the sparse fwd+bwd)
  decode    one absorbed decode step at position T-1 against a cache of T tokens
and the sparse/dense ratios, then the crossover: the shortest measured length at
which sparse fwd+bwd is cheaper than dense. The sides take turns round after round
(`common.interleaved_medians`), so a noisy machine slows them alike; even so, quote
figures only from a quiet machine. `--smoke` runs one short length once (for tests).
"""

import common  # before TensorFlow: keeps its start-up lines off the console

import tensorflow as tf

from deepseek_tf.layers import attention_mask
from deepseek_tf.layers.indexer import INDEX_CHUNK
from deepseek_tf.layers.kv_cache import cache_masks
from deepseek_tf.layers.mla import MultiHeadLatentAttention

SHAPE = dict(hidden_size=256, num_heads=4, q_lora_rank=128, kv_lora_rank=64,
             qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32)
INDEXER = dict(index_head_dim=64, index_n_heads=4)


def layer(topk: int) -> MultiHeadLatentAttention:
    tf.keras.utils.set_random_seed(0)
    mla = MultiHeadLatentAttention(**SHAPE, **(dict(INDEXER, index_topk=topk) if topk else {}))
    mla.build((1, None, SHAPE["hidden_size"]))
    return mla


def runners(mla, t: int, jit: bool) -> dict:
    """{"fwd+bwd", "decode"(, "indexer")}: callables timing one layer at length t."""
    x = tf.random.normal((1, t, SHAPE["hidden_size"]))
    pos = tf.range(t)[tf.newaxis]
    mask = attention_mask(tf.ones((1, t), tf.int32))
    variables = [v for v in mla.trainable_variables if "indexer" not in v.path]

    @tf.function(jit_compile=jit)
    def fwd_bwd():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(mla(x, positions=pos, attention_mask=mask)))
        return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, variables)])

    cache = tuple(tf.random.normal(s) for s in mla.cache_shape(1, t))
    dmask, _ = cache_masks(tf.constant([t - 1]), tf.zeros([1], tf.int32), t)

    @tf.function(jit_compile=jit)
    def decode():
        out, _ = mla.call_cached(x[:, -1:], pos[:, -1:], cache, tf.constant([t - 1]), dmask)
        return tf.reduce_sum(out)

    out = {"fwd+bwd": lambda: float(fwd_bwd()), "decode": lambda: float(decode())}
    if mla.indexer is not None:
        @tf.function(jit_compile=jit)
        def indexer():
            _, _, q_latent = mla._queries(x, pos)
            cos, sin = mla.rotary(pos)
            idx, _ = mla.indexer.top_k(x, q_latent, mla.indexer.keys(x, cos, sin), cos, sin,
                                       mask[:, 0], mla.index_topk, INDEX_CHUNK)
            return tf.reduce_sum(idx)
        out["indexer"] = lambda: float(indexer())
    return out


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--lengths", default="1024,4096,8192")
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jit_compile", action="store_true", help="XLA-compile each runner")
    a = common.start(p, argv)
    lengths = [128] if a.smoke else [int(v) for v in a.lengths.split(",")]
    topk, rounds = (16, 1) if a.smoke else (a.topk, a.rounds)
    print(f"MLA {SHAPE}; indexer {INDEXER['index_n_heads']} heads x "
          f"{INDEXER['index_head_dim']}; top-{topk}; batch 1; XLA {a.jit_compile}")
    dense, sparse = layer(0), layer(topk)
    print(f"{'T':>6} {'dense fwd+bwd':>14} {'sparse fwd+bwd':>15} {'ratio':>6} "
          f"{'indexer':>8} {'share':>6} {'dense dec':>10} {'sparse dec':>11} {'ratio':>6}")
    crossover = None
    for t in lengths:
        d, s = runners(dense, t, a.jit_compile), runners(sparse, t, a.jit_compile)
        m = common.interleaved_medians({"d": d["fwd+bwd"], "s": s["fwd+bwd"], "i": s["indexer"],
                                 "dd": d["decode"], "sd": s["decode"]}, rounds, warmup=1)
        ratio = m["s"] / m["d"]
        if crossover is None and ratio < 1:
            crossover = t
        print(f"{t:>6} {m['d']:>13.4f}s {m['s']:>14.4f}s {ratio:>5.2f}x {m['i']:>7.4f}s "
              f"{m['i'] / m['s']:>5.0%} {m['dd'] * 1e3:>8.2f}ms {m['sd'] * 1e3:>9.2f}ms "
              f"{m['sd'] / m['dd']:>5.2f}x")
    print(f"sparse/dense fwd+bwd at T={lengths[-1]}: {ratio:.2f}x; crossover: "
          + (f"sparse is cheaper from T={crossover} (of {lengths})" if crossover else
             f"none up to T={lengths[-1]}"))


if __name__ == "__main__":
    main()
