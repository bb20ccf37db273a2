"""The causal language model: embedding, decoder blocks, final norm, output head.

Example:
    >>> cfg = ModelConfig(vocab_size=300, hidden_size=32, num_attention_heads=4,
    ...                   num_hidden_layers=2, intermediate_size=64)
    >>> model = DeepSeekCausalLM(cfg)
    >>> model(tf.zeros((2, 8), tf.int32)).shape
    TensorShape([2, 8, 300])
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers import DecoderBlock, RMSNorm, attention_mask
from deepseek_tf.layers.hyper import HyperHead
from deepseek_tf.layers.kv_cache import cache_masks, slot_positions
from deepseek_tf.layers.mtp import MTPModule, shift_left
from deepseek_tf.layers.quantized import declare_int8
from deepseek_tf.layers.remat import fold_seed, maybe_remat


@contextlib.contextmanager
def policy_scope(policy: str):
    """Layers built inside use the `policy` dtype policy; the global policy is restored.

    Example:
        >>> with policy_scope("mixed_float16"):
        ...     model = DeepSeekCausalLM(cfg)
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DeepSeekCausalLM(keras.Model):
    """A DeepSeek-style decoder-only LM.

    Args:
      config: a `ModelConfig` (or its dict).
      remat: gradient checkpointing, "none", "block" (recompute each decoder block in
        the backward pass), "mlp" or "attention" (only that sub-layer). A training
        choice, not part of `get_config`.
      dsa_stage: with `use_dsa`, "sparse" (attend to the indexer's top-k; the default
        and inference) or "dense_warmup" (`call` attends densely; the indexer learns
        from the dense attention). A training choice, not part of `get_config`.

    Call args:
      inputs: int32 (B, T) token ids.
      segment_ids: int32 (B, T) document ids of packed windows (default: one
        document per row).
      positions: int32 (B, T) positions within each document (default 0..T-1).
      training: MoE layers use `capacity_factor` (else `inference_capacity_factor`);
        enables dropout (`attention_dropout`, `hidden_dropout`).
      return_aux: also return the training side outputs (see `collect_aux`).
      dropout_seed: int (2,) stateless seed of this call's dropout masks (the train
        step passes one per step, micro-batch and replica); drawn at random if None.
      moe_capacity_factor: overrides the MoE layers' capacity factor (decoder blocks;
        e.g. `layers.moe.dropless_factor` for exact scores in any mode).

    Returns float32 logits (B, T, vocab_size), or (logits, aux) with `return_aux`:
    aux has, when the config has MoE layers, float32 `expert_load` (L_moe, E) routed
    pairs per expert, `dropped` (L_moe,) dropped pairs, `balance_loss` and `z_loss`
    (summed over MoE layers, unweighted); with DSA, `indexer_kl` (B, T) the indexer's
    per-query KL loss averaged over layers; with MTP, `mtp_logits`: D float32 (B, T, V)
    tensors, entry k-1 at position i predicting `targets[:, i + k]` (the token k+1
    places after position i). MTP modules run only with `return_aux`.
    """

    def __init__(self, config, remat: str = "none", dsa_stage: str = "sparse", **kwargs):
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        # bfloat16 storage (--convert.dtype): every layer is built with bfloat16 variables
        with policy_scope(cfg.weight_dtype) if cfg.weight_dtype != "float32" else \
                contextlib.nullcontext():
            self._build_model(cfg, remat, dsa_stage, **kwargs)

    def _build_model(self, cfg, remat: str, dsa_stage: str, **kwargs):
        super().__init__(**kwargs)
        self.config = cfg
        self.remat = remat
        if dsa_stage not in ("sparse", "dense_warmup"):
            raise ValueError(f"dsa_stage={dsa_stage!r} is not sparse or dense_warmup")
        self.dsa_stage = dsa_stage
        self.embed_tokens = keras.layers.Embedding(
            cfg.vocab_size, cfg.hidden_size, name="embed_tokens",
            embeddings_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        self.blocks = [DecoderBlock(cfg, i, remat=remat, name=f"layers_{i}")
                       for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, name="norm")
        # Hyper-connections (V4): hc_mult streams per token, collapsed before the norm.
        self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps,
                                 cfg.initializer_range, name="hc_head") if cfg.hc_mult else None
        self.mtp = [MTPModule(cfg, k, name=f"mtp_{k}")
                    for k in range(1, cfg.num_nextn_predict_layers + 1)]
        self.lm_head = None if cfg.tie_word_embeddings else keras.layers.Dense(
            cfg.vocab_size, use_bias=False, name="lm_head",
            kernel_initializer=keras.initializers.RandomNormal(stddev=cfg.initializer_range))
        for block in self.blocks + [m.block for m in self.mtp]:
            block.self_attn.dsa_dense = dsa_stage == "dense_warmup"
        self.build_weights()
        if cfg.weight_quantization == "int8":  # Keras' int8 Dense kernels (layers/quantized.py)
            declare_int8(self)

    def build_weights(self) -> None:
        """Creates every variable (a forward pass on a tiny batch)."""
        self(tf.zeros((1, 2), tf.int32), return_aux=bool(self.mtp))

    def build(self, input_shape=None):
        """Nothing to do: every layer builds itself from its input shape during the
        eager pass of `build_weights`. (Without this method, Keras would first trace the
        whole model symbolically to build it: seconds of CPU per model of a few layers.)"""

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # Keras 3 keeps layer lists in a TrackedList that tf.train.Checkpoint does not
        # follow: without this, block weights reached checkpoints only through the
        # optimizer, and non-trainable ones (router biases) not at all.
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint":
            for i, block in enumerate(self.blocks):
                children.setdefault(f"layers_{i}", block)
            for k, module in enumerate(self.mtp, start=1):
                children.setdefault(f"mtp_{k}", module)
        return children

    @property
    def moe_layers(self) -> list:
        """The DeepSeekMoE layers, in the order of `aux["expert_load"]` rows."""
        blocks = self.blocks + [m.block for m in self.mtp]
        return [b.mlp for b in blocks if b.is_moe]

    def head(self, x):
        """Output head (shared by MTP): (B, T, D) normed states -> float32 logits."""
        if self.lm_head is None:
            logits = tf.matmul(x, tf.cast(self.embed_tokens.embeddings, x.dtype), transpose_b=True)
        else:
            logits = self.lm_head(x)
        return tf.cast(logits, tf.float32)                 # (B, T, V)

    def call(self, inputs, segment_ids=None, positions=None, training=False,
             return_aux=False, dropout_seed=None, moe_capacity_factor=None):
        inputs = tf.convert_to_tensor(inputs)
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        if segment_ids is None:
            segment_ids = tf.ones([b, t], tf.int32)
        if positions is None:
            positions = tf.broadcast_to(tf.range(t, dtype=tf.int32), [b, t])
        mask = attention_mask(segment_ids)                 # (B, 1, T, T)
        if self.config.attention_type == "v4":
            # As transformers: padding (segment 0) is no key of any query, so padding
            # rows read only the sinks; their tokens still enter compressed entries.
            mask = tf.logical_and(mask, (segment_ids > 0)[:, None, None, :])
        x = self.embed_tokens(inputs)                      # (B, T, D)
        if self.hc_head is not None:                       # (B, T, N, D) streams
            x = tf.tile(x[:, :, None], [1, 1, self.config.hc_mult, 1])
        seed = self._dropout_seed(training, dropout_seed)
        layer_aux = []
        for i, block in enumerate(self.blocks):
            run = lambda h, block=block, s=fold_seed(seed, i): block(  # noqa: E731
                h, positions=positions, attention_mask=mask, training=training,
                return_aux=return_aux, dropout_seed=s, moe_capacity_factor=moe_capacity_factor,
                input_ids=inputs)
            out = maybe_remat(run, self.remat == "block")(x)
            x, a = out if return_aux else (out, {})
            layer_aux.append(a)
        h = x                                              # MTP input: V4 the streams
        if self.hc_head is not None:
            x = self.hc_head(x)                            # (B, T, D)
        logits = self.head(self.norm(x))
        if not return_aux:
            return logits
        mtp_logits = []
        for k, module in enumerate(self.mtp, start=1):
            normed, h, a = module(h, self.embed_tokens(shift_left(inputs, k)), positions, mask,
                                  training=training, return_aux=True,
                                  dropout_seed=fold_seed(seed, len(self.blocks) + k))
            layer_aux.append(a)
            mtp_logits.append(self.head(normed))
        return logits, collect_aux(layer_aux, mtp_logits)

    def init_cache(self, batch_size, max_length: int, dtype=None) -> tuple:
        """A zero KV cache: per decoder block a tuple of (B, heads, max_length, width)
        tensors (GQA: keys, values; MLA: latent, rope key; V4: keys and the compressors'
        projections and compressed entries). See `layers.kv_cache`."""
        dtype = dtype or self.compute_dtype
        return tuple(tuple(tf.zeros(shape, dtype) for shape in
                           block.self_attn.cache_shape(batch_size, max_length))
                     for block in self.blocks)

    def call_cached(self, inputs, cache, start, pad=None, absorb=True, static_moe=False,
                    last_only=False):
        """Runs new tokens against a static-size KV cache (prefill or decode).

        Args:
          inputs: int32 (B, T) token ids, written into cache slots start..start+T-1.
          cache: from `init_cache` or a previous call (its max_length is M).
          start: int32 scalar, the first slot of `inputs`.
          pad: int32 (B,) left-padding slots per row (prompts are left-padded; the
            token in slot s of a row has position s - pad). Default: none.
          absorb: MLA attends in latent space (False: expand the latent, the reference).
          static_moe: MoE buffers sized for every token (static shapes, for XLA and
            TFLite; meant for decode steps, where N = B is small).
          last_only: logits of the last position only, (B, 1, vocab_size).

        Returns (float32 logits (B, T, vocab_size), the updated cache). MoE layers run
        dropless; MTP modules are not used.

        Example:
            >>> cache = model.init_cache(1, 16)
            >>> logits, cache = model.call_cached(tf.constant([[5, 6, 7]]), cache, 0)
            >>> logits, cache = model.call_cached(tf.constant([[8]]), cache, 3)
        """
        inputs = tf.convert_to_tensor(inputs, tf.int32)
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        pad = tf.zeros([b], tf.int32) if pad is None else tf.convert_to_tensor(pad, tf.int32)
        slots = tf.convert_to_tensor(start, tf.int32) + tf.range(t)                 # (T,)
        fresh = cache[0][0] is None  # `prefill`: the cache is the new tokens' own
        max_length = t if fresh else tf.shape(cache[0][0])[2]
        cfg = self.config
        window = cfg.sliding_window if cfg.attention_type in ("hybrid", "v4") else 0
        mask, local_mask = cache_masks(slots, pad, max_length, window)             # (B, 1, T, M)
        positions = slot_positions(slots, pad)                                      # (B, T)
        x = self.embed_tokens(inputs)                                               # (B, T, D)
        if self.hc_head is not None:                                                # streams
            x = tf.tile(x[:, :, None], [1, 1, cfg.hc_mult, 1])
        extra = {}
        if cfg.attention_type == "v4":  # hash routing; the compressors' slot positions
            extra = dict(input_ids=inputs,
                         key_positions=slot_positions(tf.range(max_length), pad))  # (B, M)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.call_cached(x, positions, layer_cache, slots, mask,
                                               local_mask, absorb=absorb, static_moe=static_moe,
                                               **extra)
            new_cache.append(layer_cache)
        if last_only:
            x = x[:, -1:]
        if self.hc_head is not None:
            x = self.hc_head(x)
        return self.head(self.norm(x)), tuple(new_cache)

    def prefill(self, inputs, max_length: int, pad=None, absorb=True, static_moe=False):
        """A prompt's prefill into an empty cache of `max_length` slots.

        Same results as `call_cached(inputs, init_cache(B, max_length), 0, pad)` (with
        `absorb=False` for MLA; equal bits in the tests), at less cost: the tokens attend
        each other (T x T scores, not T x M) and are the cache, padded to M afterwards,
        instead of a one-hot write into M slots; the output head runs on the last position
        only (what generation needs). MLA expands the T prompt latents into per-head keys
        and values (as transformers does) instead of attending in latent space: T x T scores
        cost H (nope + rope) multiply-adds each that way against H (kv_lora_rank + rope)
        absorbed (issue-3: 48 vs 80; DeepSeek-V3: 192 vs 576). Measured on a 2-core AMD
        EPYC: the issue-3 config's prefill 4 / 8 / 11% faster at 16 / 128 / 512 tokens; with
        DeepSeek-V3's attention shapes (16 heads) 21 / 34% at 128 / 512. Its logits differ
        from the absorbed path's by rounding (~1e-6); the cache holds the same latents. V4
        attention and the V3.2 indexer take the general path (with `absorb`).

        Args:
          inputs: int32 (B, T) left-padded prompts, T <= max_length.
          max_length: M, the cache length.
          pad: int32 (B,) left-padding per row (see `call_cached`).
          absorb: as in `call_cached`, for the general path (V4, DSA) only.
          static_moe: as in `call_cached` (for an XLA prefill).

        Returns (float32 logits of the last position (B, vocab_size), the cache).

        Example:
            >>> logits, cache = model.prefill(tf.constant([[5, 6, 7]]), 16)
        """
        inputs = tf.convert_to_tensor(inputs, tf.int32)
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        cfg = self.config
        if cfg.attention_type == "v4" or cfg.use_dsa:  # caches that are not slot lists
            logits, cache = self.call_cached(inputs, self.init_cache(b, max_length), 0, pad,
                                             absorb=absorb, static_moe=static_moe,
                                             last_only=True)
            return logits[:, -1], cache
        empty = tuple((None,) * len(block.self_attn.cache_shape(1, 1)) for block in self.blocks)
        logits, cache = self.call_cached(inputs, empty, 0, pad, absorb=False,
                                         static_moe=static_moe, last_only=True)
        grow = [[0, 0], [0, 0], [0, max_length - t], [0, 0]]      # (B, H, T, W) -> (B, H, M, W)
        static = max_length if isinstance(max_length, int) else None  # keeps M static

        def full(c):
            return tf.ensure_shape(tf.pad(c, grow), [None, c.shape[1], static, c.shape[3]])
        return logits[:, -1], tuple(tuple(full(c) for c in layer) for layer in cache)

    def _dropout_seed(self, training, dropout_seed):
        """The call's dropout seed, drawn outside any remat'd block when not given."""
        cfg = self.config
        if not training or not (cfg.attention_dropout or cfg.hidden_dropout):
            return None
        if dropout_seed is None:
            return tf.random.uniform([2], maxval=2 ** 31 - 1, dtype=tf.int32)
        return dropout_seed

    def get_config(self):
        return {"config": self.config.to_dict(), "name": self.name}


def collect_aux(layer_aux: list[dict], mtp_logits: list) -> dict:
    """Stacks the MoE layers' aux dicts (dense layers give {}) into the model's aux."""
    moe = [a for a in layer_aux if "load" in a]
    aux = {"mtp_logits": mtp_logits} if mtp_logits else {}
    kl = [a["indexer_kl"] for a in layer_aux if "indexer_kl" in a]
    if kl:
        aux["indexer_kl"] = tf.add_n(kl) / len(kl)
    if moe:
        aux.update(expert_load=tf.stack([a["load"] for a in moe]),
                   dropped=tf.stack([a["dropped"] for a in moe]),
                   balance_loss=tf.add_n([a["balance_loss"] for a in moe]),
                   z_loss=tf.add_n([a["z_loss"] for a in moe]))
    return aux


def token_losses(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    """Per-token cross entropy in float32 (B, T)."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=targets, logits=tf.cast(logits, tf.float32))


def count_params(model: keras.Model) -> tuple[int, int]:
    """(trainable, all) parameter counts (RNG states, e.g. LoRA dropout seeds, excluded)."""
    trainable = sum(int(tf.size(v)) for v in model.trainable_variables)
    total = sum(int(tf.size(v)) for v in model.variables if "seed_generator" not in v.path)
    return trainable, total
