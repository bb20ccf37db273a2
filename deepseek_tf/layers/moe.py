"""DeepSeekMoE: shared experts plus top-k routed experts with sparse dispatch.

Sparse dispatch (compute grows with top_k, not with the number of experts):
  1. The (token, choice) pairs are ordered choice-major (every token's first choice
     before any second choice, so overflow drops low-ranked choices first); a cumsum
     over their one-hot experts gives each pair its position inside its expert.
  2. Pairs whose position is below the capacity C get the slot `expert * C +
     position`; an index map (slot -> token) gathers tokens into static [E, C, d]
     buffers (empty slots read a zero row).
  3. Experts run as two batched matmuls over the stacked weights [E, d, 2f] (gate
     and up fused) and [E, f, d].
  4. Each pair gathers its slot's output back (dropped pairs read a zero row),
     weighted by its combine weight and summed per token.
Capacity `C = ceil(capacity_factor * N * k / E)` (at most N). `capacity_factor <= 0`
is dropless: C is the largest expert load of the batch (exact, but a data-dependent
shape, so not under XLA). Dropped pairs are counted.

Few tokens (a decode step: N * k * GATHER_PAIRS_PER_EXPERT <= E), dropless and not
training: each token gathers its k experts' weights and runs them as batched matmuls
(`gathered_experts`): a step reads k experts' weights per token instead of all E (the
buffers above would give every expert every token once C = N, as static-shape decoding
must).
"""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf

from deepseek_tf.layers.mlp import GatedMLP, gated
from deepseek_tf.layers.router import TopkRouter, router_z_loss, sequence_balance_loss


def expert_capacity(num_tokens, top_k: int, num_experts: int, factor: float):
    """Buffer rows per expert: a Python int when `num_tokens` is static; None = dropless."""
    if factor <= 0:
        return None
    if isinstance(num_tokens, int):
        return max(1, min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts)))
    c = tf.cast(tf.math.ceil(factor * tf.cast(num_tokens * top_k, tf.float32) / num_experts),
                tf.int32)
    return tf.maximum(1, tf.minimum(num_tokens, c))


@contextlib.contextmanager
def local_variables():
    """Variables created inside are plain `tf.Variable`s of this process, also under a
    distribution strategy's scope (which would mirror them: one value on every worker,
    initialized from the first): expert-parallel workers each hold experts of their own.
    """
    # private: a ResourceVariable built directly passes no variable creator
    from tensorflow.python.ops.resource_variable_ops import ResourceVariable

    def plain(next_creator, **kwargs):  # skips the strategy's creator
        del next_creator
        kwargs = {k: v for k, v in kwargs.items()
                  if k in ("initial_value", "trainable", "name", "dtype", "shape")}
        return ResourceVariable(**kwargs)

    with tf.variable_creator_scope(plain):
        yield


_EXCHANGES = []  # the `expert_exchange` scopes entered, innermost last


@contextlib.contextmanager
def expert_exchange(exchange):
    """MoE layers with `expert_parallel > 1` created inside take `exchange` (an
    `ExpertExchange`, train/expert_parallel.py): the trainer builds the model inside it, so
    the layers run (and build, in the model's first forward pass) with their all-to-alls
    and initialize their own block of experts (`exchange.rank`)."""
    _EXCHANGES.append(exchange)
    try:
        yield
    finally:
        _EXCHANGES.pop()


def dropless_factor(cfg, static: bool) -> float:
    """The capacity factor of an exact (dropless) MoE call: 0 (capacity = the largest
    expert load, a data-dependent shape), or with `static` E/k, which gives C = N (every
    expert buffer holds all the call's tokens: static shapes, for XLA and TFLite; as
    costly as running every expert on every token)."""
    return cfg.n_routed_experts / cfg.num_experts_per_tok if static and cfg.n_routed_experts \
        else 0.0


def padded_gather(params, index, back_index, groups: int):
    """Rows of `params` (M, d) with a zero row appended, at `index` (R,) in [0, M]
    (M = the zero row), with a gradient that is a gather too: `back_index`
    (groups * M,) in [0, R] names, for each of `groups` blocks of M rows, the output row
    whose gradient each params row receives (R = none), and the blocks are summed.

    Dispatch's index maps are such inverse pairs (slot -> token, pair -> slot), so the
    gradient needs no scatter: TensorFlow's gather gradient is an UnsortedSegmentSum,
    which on the issue-3 config took 19 of its ~390 thread-ms per training step. The
    values equal the scatter's (the same terms, summed over the k choices).
    """
    d = params.shape[-1]

    @tf.custom_gradient
    def gather(p):
        def grad(g):                                                       # (R, d)
            back = tf.gather(tf.pad(g, [[0, 1], [0, 0]]), back_index)      # (groups M, d)
            return back if groups == 1 else tf.reduce_sum(
                tf.reshape(back, [groups, -1, d]), axis=0)                 # (M, d)
        return tf.gather(tf.pad(p, [[0, 1], [0, 0]]), index), grad         # (R, d)
    return gather(params)


def dispatch_combine(x, indices, weights, gate_up, down, capacity=None, activation="silu",
                     swiglu_limit: float = 0.0, exchange=None):
    """Runs every token through its chosen experts with static-capacity buffers.

    Args:
      x: (N, d) tokens.
      indices: int32 (N, k) chosen experts; weights: (N, k) combine weights.
      gate_up: (E, d, 2f) stacked fused gate/up weights; down: (E, f, d). With
        `exchange`: this worker's E / W experts, (E / W, d, 2f) and (E / W, f, d).
      capacity: rows per expert buffer (int or scalar tensor); None = dropless (with
        `exchange`: N, the same on every worker, as its all-to-alls need).
      activation: "silu" or "gelu".
      swiglu_limit: > 0 clips the experts' pre-activations (see `gated`).
      exchange: expert parallelism over W workers (`train/expert_parallel.py`), or None:
        an object with `world` (W) and `to_experts` / `from_experts`, which move the
        (E, C, d) buffers to the workers holding their experts, as (E / W, W C, d), and
        the experts' outputs back. Every worker's buffers are its own tokens', so the
        result equals the call with all E experts here.

    Returns (y (N, d), load (E,) float32 pairs routed per expert, dropped float32 pairs).
    """
    n = tf.shape(x)[0]
    world = exchange.world if exchange is not None else 1
    k, e, d = indices.shape[-1], gate_up.shape[0] * world, x.shape[-1]
    flat_e = tf.reshape(tf.transpose(indices), [-1])                       # (kN,) choice-major
    onehot = tf.one_hot(flat_e, e, dtype=tf.int32)                         # (kN, E)
    pos = tf.reduce_sum(tf.cumsum(onehot, axis=0, exclusive=True) * onehot, axis=1)  # (kN,)
    load = tf.reduce_sum(onehot, axis=0)                                   # (E,)
    if capacity is None:
        capacity = tf.reduce_max(load) if exchange is None else n
    keep = pos < capacity
    trash = e * capacity
    slot = tf.where(keep, flat_e * capacity + pos, trash)                  # (kN,)
    pair = tf.range(k * n)                                                 # (kN,) = choice N + token
    inverse = tf.math.unsorted_segment_sum(tf.where(keep, pair + 1, 0), slot, trash + 1)
    inverse = inverse[:-1] - 1                                             # (E*C,) -1 = empty
    index_map = tf.where(inverse < 0, n, inverse % n)                      # (E*C,) slot -> token
    inverse = tf.where(inverse < 0, k * n, inverse)                        # (E*C,) slot -> pair
    xe = tf.reshape(padded_gather(x, index_map, slot, k), [e, capacity, d])  # (E, C, d)
    if exchange is not None:
        xe = exchange.to_experts(xe)                                       # (E/W, W C, d)
    gate, up = tf.split(tf.matmul(xe, gate_up), 2, axis=-1)                # (E, C, f)
    ye = tf.matmul(gated(gate, up, activation, swiglu_limit), down)        # (E, C, d)
    if exchange is not None:
        ye = exchange.from_experts(ye)                                     # (E, C, d)
    yk = tf.reshape(padded_gather(tf.reshape(ye, [trash, d]), slot, inverse, 1),
                    [k, n, d])                                             # (k, N, d)
    w = tf.expand_dims(tf.cast(tf.transpose(weights), yk.dtype), -1)       # (k, N, 1)
    y = tf.reduce_sum(yk * w, axis=0)                                      # (N, d)
    dropped = tf.cast(tf.size(keep), tf.float32) - tf.reduce_sum(tf.cast(keep, tf.float32))
    return y, tf.cast(load, tf.float32), dropped


def gathered_experts(x, weights, gate_up, down, activation="silu", swiglu_limit: float = 0.0):
    """Every token through its own chosen experts' gathered weights (exact, dropless).

    Args:
      x: (N, d) tokens.
      weights: (N, k) combine weights.
      gate_up: (N, k, d, 2f) each token's chosen experts' fused gate/up weights.
      down: (N, k, f, d).
      activation, swiglu_limit: as `dispatch_combine`.

    Returns y (N, d).
    """
    gate, up = tf.split(tf.einsum("nd,nkdf->nkf", x, gate_up), 2, axis=-1)  # (N, k, f)
    yk = tf.einsum("nkf,nkfd->nkd", gated(gate, up, activation, swiglu_limit), down)  # (N, k, d)
    w = tf.expand_dims(tf.cast(weights, yk.dtype), -1)                     # (N, k, 1)
    return tf.reduce_sum(yk * w, axis=1)                                   # (N, d)


#: The gather path runs when tokens x top_k x this <= experts: it copies each token's
#: experts' weights, which costs more than reading the whole stack once when the copies
#: come near the stack's size (bench/batch_decode.py, 16 experts, top-2: batch 8 at 1 ran
#: 0.45x the tokens/s of never gathering; at 4 the same).
GATHER_PAIRS_PER_EXPERT = 4


@keras.saving.register_keras_serializable(package="deepseek_tf")
class DeepSeekMoE(keras.layers.Layer):
    """Shared experts + routed experts (stacked weights) with sparse dispatch.

    Args:
      hidden_size: input and output width.
      num_experts: routed experts E.
      top_k: experts per token.
      moe_intermediate_size: hidden width f of each expert.
      n_shared_experts: shared experts (one GatedMLP of width n_shared * f); 0 = none.
      scoring_func, topk_method, n_group, topk_group, norm_topk_prob,
        routed_scaling_factor: routing (see `TopkRouter`).
      capacity_factor: buffer capacity in training (<= 0 = dropless).
      inference_capacity_factor: the same outside training.
      activation: "silu" or "gelu".
      initializer_range: stddev of the normal initializer.
      swiglu_limit: > 0 clips routed and shared experts' pre-activations (V4).
      vocab_size: the token->expert table's rows with `topk_method="hash"`.
      weight_quantization: "int8" stores the expert stacks as int8 with a float32
        `<name>_scale` [E, out] each (`layers/quantized.py`), dequantized per call.
      expert_parallel: W > 1 splits the routed experts over W MultiWorkerMirroredStrategy
        workers: this layer holds E / W of them (worker r: experts [r E / W, (r + 1) E /
        W), initialized as those rows of the whole stack's draw) as plain variables of its
        worker (`local_variables`), and runs only with an exchange (created inside an
        `expert_exchange` scope, or `exchange` set); 1 = every expert here.

    Call: `moe(x, training=False, return_aux=False, capacity_factor=None,
    input_ids=None)` (input_ids (B, T): hash routing's tokens) with x
    (B, T, d) returns y (B, T, d), or (y, aux) where aux has float32 `load` (E,) routed pairs per
    expert, `dropped` pairs, `balance_loss` (sequence-wise, unweighted) and
    `z_loss`. `capacity_factor` overrides the configured factor (0 = dropless).

    Example:
        >>> moe = DeepSeekMoE(hidden_size=16, num_experts=8, top_k=2,
        ...                   moe_intermediate_size=8, n_shared_experts=1)
        >>> moe(tf.ones((2, 3, 16))).shape
        TensorShape([2, 3, 16])
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 moe_intermediate_size: int, n_shared_experts: int = 0,
                 scoring_func: str = "sigmoid", topk_method: str = "noaux_tc",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, capacity_factor: float = 1.25,
                 inference_capacity_factor: float = 0.0, activation: str = "silu",
                 initializer_range: float = 0.02, swiglu_limit: float = 0.0,
                 vocab_size: int = 0, weight_quantization: str = "none",
                 expert_parallel: int = 1, **kwargs):
        super().__init__(**kwargs)
        if expert_parallel > 1 and (num_experts % expert_parallel
                                    or weight_quantization != "none"):
            raise ValueError(f"expert_parallel={expert_parallel} needs float experts whose "
                             f"number ({num_experts}) it divides")
        self.expert_parallel = expert_parallel
        #: expert parallelism's all-to-alls (`dispatch_combine`'s `exchange`; from the
        #: `expert_exchange` scope around the layer's creation); None with expert_parallel = 1
        self.exchange = _EXCHANGES[-1] if expert_parallel > 1 and _EXCHANGES else None
        self.weight_quantization = weight_quantization
        #: The int8 weights (each with a `<name>_scale`), for `quantized.scale_variables`.
        self.int8_weights = ("gate_up_proj", "down_proj") if weight_quantization == "int8" \
            else ()
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.swiglu_limit = swiglu_limit
        self.moe_intermediate_size, self.n_shared_experts = moe_intermediate_size, n_shared_experts
        self.capacity_factor = capacity_factor
        self.inference_capacity_factor = inference_capacity_factor
        self.activation, self.initializer_range = activation, initializer_range
        self.gate = TopkRouter(num_experts, top_k, scoring_func, topk_method, n_group,
                               topk_group, norm_topk_prob, routed_scaling_factor,
                               initializer_range, vocab_size, name="gate")
        self.shared_experts = GatedMLP(
            hidden_size, moe_intermediate_size * n_shared_experts, activation,
            initializer_range, swiglu_limit, name="shared_experts") if n_shared_experts else None

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(stddev=self.initializer_range)
        e, d, f = self.num_experts, self.hidden_size, self.moe_intermediate_size
        self.gate.build((None, d))
        if self.int8_weights:  # filled by a restore or a conversion
            for name, shape in (("gate_up_proj", (e, d, 2 * f)), ("down_proj", (e, f, d))):
                setattr(self, name, self.add_weight(name=name, shape=shape, dtype="int8",
                                                    initializer="zeros", trainable=False))
                setattr(self, name + "_scale", self.add_weight(
                    name=name + "_scale", shape=(e, shape[2]), dtype="float32",
                    initializer="ones", trainable=False, autocast=False))
        else:
            local = e // self.expert_parallel
            block = init
            if self.expert_parallel > 1:  # this worker's rows of the whole stack's draw
                first = local * (self.exchange.rank if self.exchange else 0)
                block = lambda shape, dtype=None: init(  # noqa: E731
                    (e, *shape[1:]), dtype)[first:first + local]
            with local_variables() if self.expert_parallel > 1 else contextlib.nullcontext():
                self.gate_up_proj = self.add_weight(name="gate_up_proj",
                                                    shape=(local, d, 2 * f), initializer=block)
                self.down_proj = self.add_weight(name="down_proj", shape=(local, f, d),
                                                 initializer=block)
        if self.shared_experts is not None:
            self.shared_experts.build(input_shape)

    def call(self, x, training=False, return_aux=False, capacity_factor=None, input_ids=None):
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        static = x.shape[0] is not None and x.shape[1] is not None
        n = x.shape[0] * x.shape[1] if static else b * t
        ids = None if input_ids is None else tf.reshape(input_ids, [-1])
        route = self.gate(tf.reshape(x, [-1, self.hidden_size]), ids)      # (N, ...) float32
        factor = self.capacity_factor if training else self.inference_capacity_factor
        if capacity_factor is not None:  # the caller's choice (cached decoding: dropless)
            factor = capacity_factor
        flat = tf.reshape(x, [-1, self.hidden_size])                       # (N, d)
        dispatch = lambda: dispatch_combine(  # noqa: E731
            flat, route["indices"], route["weights"],
            self._experts("gate_up_proj", x.dtype),
            self._experts("down_proj", x.dtype),
            expert_capacity(n, self.top_k, self.num_experts, factor), self.activation,
            self.swiglu_limit, self.exchange)
        if self.expert_parallel > 1 and self.exchange is None:
            raise ValueError(f"{self.name} holds 1/{self.expert_parallel} of its experts: "
                             f"call it inside the strategy with `exchange` set")
        dropless = factor <= 0 or factor * self.top_k >= self.num_experts
        few = n * self.top_k * GATHER_PAIRS_PER_EXPERT <= self.num_experts
        if training or not dropless or (isinstance(n, int) and not few) or self.exchange:
            y, load, dropped = dispatch()
        elif isinstance(n, int):                    # a static decode step: few tokens
            y, load, dropped = self._gathered(flat, route)
        else:                                       # decided per call (graph mode)
            y, load, dropped = tf.cond(few, lambda: self._gathered(flat, route), dispatch)
        y = tf.reshape(y, tf.shape(x))                                     # (B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not return_aux:
            return y
        seq = lambda v: tf.reshape(v, [b, t, -1])  # noqa: E731
        aux = {"load": load, "dropped": dropped,
               "balance_loss": sequence_balance_loss(seq(route["scores"]), seq(route["indices"]),
                                                     self.num_experts),
               "z_loss": router_z_loss(route["logits"])}
        return y, aux

    def _gathered(self, flat, route):
        """`gathered_experts` with the aux values of `dispatch_combine` (nothing dropped)."""
        idx = route["indices"]                                             # (N, k)
        y = gathered_experts(flat, route["weights"],
                             self._experts("gate_up_proj", flat.dtype, idx),
                             self._experts("down_proj", flat.dtype, idx),
                             self.activation, self.swiglu_limit)
        load = tf.reduce_sum(tf.one_hot(tf.reshape(idx, [-1]), self.num_experts), axis=0)
        return y, load, tf.constant(0.0)                                   # load (E,)

    def _experts(self, name: str, dtype, idx=None):
        """The stacked expert weight `name` in `dtype` (int8 ones dequantized: q / scale):
        every expert's (E, in, out), or with `idx` (N, k) those chosen, (N, k, in, out)."""
        pick = (lambda v: v) if idx is None else (lambda v: tf.gather(v, idx))  # noqa: E731
        w = pick(getattr(self, name))
        if not self.int8_weights:
            return tf.cast(w, dtype)
        scale = pick(getattr(self, name + "_scale"))                      # (..., out)
        return tf.cast(tf.cast(w, tf.float32) / tf.expand_dims(scale, -2), dtype)

    def get_config(self):
        g = self.gate
        return {**super().get_config(), "hidden_size": self.hidden_size,
                "num_experts": self.num_experts, "top_k": self.top_k,
                "moe_intermediate_size": self.moe_intermediate_size,
                "n_shared_experts": self.n_shared_experts, "scoring_func": g.scoring_func,
                "topk_method": g.topk_method, "n_group": g.n_group, "topk_group": g.topk_group,
                "norm_topk_prob": g.norm_topk_prob,
                "routed_scaling_factor": g.routed_scaling_factor,
                "capacity_factor": self.capacity_factor,
                "inference_capacity_factor": self.inference_capacity_factor,
                "activation": self.activation, "initializer_range": self.initializer_range,
                "swiglu_limit": self.swiglu_limit, "vocab_size": g.vocab_size,
                "weight_quantization": self.weight_quantization,
                "expert_parallel": self.expert_parallel}
