"""The DeepSeekMoE router (gate) and its balancing losses, all in float32.

Selection (`topk_method`):
  - `noaux_tc` (DeepSeek-V3): choose by `score + e_score_correction_bias`; with
    `n_group > 1` only the `topk_group` groups with the largest sum of their two best
    biased scores are eligible. The bias is a non-trainable variable that the training
    step nudges toward balanced load (aux-loss-free balancing).
  - `group_limited_greedy` (DeepSeek-V2): groups ranked by their max score.
  - `greedy`: plain top-k.
  - `hash` (DeepSeek-V4's first layers): the experts of token id i are the frozen
    table row `tid2eid[i]` (a non-trainable int32 weight from the checkpoint).
Scores: sigmoid (V3), softmax (V2) or sqrtsoftplus (V4: sqrt(softplus(logit))).
Combine weights are the *unbiased* scores of the chosen experts, normalised to sum
1 if `norm_topk_prob`, times `routed_scaling_factor` (as HF's DeepseekV3TopkRouter /
DeepseekV2TopkRouter).
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="deepseek_tf")
class TopkRouter(keras.layers.Layer):
    """Scores tokens against experts and picks `top_k` of them.

    Args:
      num_experts: routed experts.
      top_k: experts per token.
      scoring_func: "sigmoid" (V3), "softmax" (V2) or "sqrtsoftplus" (V4).
      topk_method: "noaux_tc", "greedy", "group_limited_greedy" or "hash".
      n_group, topk_group: group-limited routing (1, 1 = off).
      norm_topk_prob: normalise the chosen weights to sum 1.
      routed_scaling_factor: multiplies the combine weights.
      initializer_range: stddev of the normal initializer.
      vocab_size: rows of the `hash` table tid2eid (vocab_size, top_k).

    Call: x (N, d), input_ids (N,) (hash routing only) -> dict of float32 `logits` (N, E), `scores` (N, E), `weights`
    (N, k) and int32 `indices` (N, k).

    Example:
        >>> r = TopkRouter(num_experts=8, top_k=2, n_group=4, topk_group=2)
        >>> r(tf.ones((3, 16)))["indices"].shape
        TensorShape([3, 2])
    """

    def __init__(self, num_experts: int, top_k: int, scoring_func: str = "sigmoid",
                 topk_method: str = "noaux_tc", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 initializer_range: float = 0.02, vocab_size: int = 0, **kwargs):
        super().__init__(**kwargs)
        if topk_method == "hash" and vocab_size <= 0:
            raise ValueError("hash routing needs vocab_size > 0 (the rows of tid2eid)")
        self.num_experts, self.top_k, self.vocab_size = num_experts, top_k, vocab_size
        self.scoring_func, self.topk_method = scoring_func, topk_method
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.initializer_range = initializer_range
        self.e_score_correction_bias = self.tid2eid = None

    def build(self, input_shape):
        # autocast=False: both weights are read in float32 even under a mixed policy
        # (Keras would otherwise cast them to the 16-bit compute dtype inside `call`).
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.num_experts), dtype="float32",
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_range),
            autocast=False)
        if self.topk_method == "noaux_tc":
            # Identical on every replica: the step updates it from all-reduced loads.
            self.e_score_correction_bias = self.add_weight(
                name="e_score_correction_bias", shape=(self.num_experts,), dtype="float32",
                initializer="zeros", trainable=False, aggregation="only_first_replica",
                autocast=False)
        if self.topk_method == "hash":
            # Frozen: the checkpoint's table; a fresh model spreads tokens over experts.
            self.tid2eid = self.add_weight(
                name="tid2eid", shape=(self.vocab_size, self.top_k), dtype="int32",
                initializer=_spread_table(self.num_experts), trainable=False,
                aggregation="only_first_replica", autocast=False)

    def _group_mask(self, choice: tf.Tensor) -> tf.Tensor:
        """Bool (N, E): experts inside the `topk_group` best groups."""
        g, per = self.n_group, self.num_experts // self.n_group
        grouped = tf.reshape(choice, [-1, g, per])                          # (N, G, E/G)
        if self.topk_method == "noaux_tc":
            group_scores = tf.reduce_sum(tf.math.top_k(grouped, 2).values, -1)  # (N, G)
        else:
            group_scores = tf.reduce_max(grouped, -1)
        top_groups = tf.math.top_k(group_scores, self.topk_group).indices    # (N, topk_group)
        chosen = tf.reduce_max(tf.one_hot(top_groups, g), axis=1)            # (N, G)
        mask = tf.tile(tf.expand_dims(chosen, -1), [1, 1, per])              # (N, G, E/G)
        return tf.reshape(mask, [-1, self.num_experts]) > 0

    def call(self, x, input_ids=None):
        logits = tf.matmul(tf.cast(x, tf.float32), self.kernel.value)       # (N, E) float32
        scores = score(logits, self.scoring_func)
        if self.tid2eid is not None:
            if input_ids is None:
                raise ValueError("hash routing needs the tokens' input_ids")
            # (int32: Keras traces a saved model's default signature with float ids)
            indices = tf.gather(self.tid2eid.value, tf.cast(input_ids, tf.int32))  # (N, k)
            return self._combine(logits, scores, indices)
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.value
        if self.topk_method != "greedy" and self.n_group > 1:
            choice = tf.where(self._group_mask(choice), choice, float("-inf"))
        return self._combine(logits, scores, tf.math.top_k(choice, self.top_k).indices)

    def _combine(self, logits, scores, indices):
        """The routing dict of the chosen `indices` (N, k)."""
        weights = tf.gather(scores, indices, batch_dims=1)                  # (N, k)
        if self.norm_topk_prob:
            weights = weights / (tf.reduce_sum(weights, -1, keepdims=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return {"logits": logits, "scores": scores, "indices": indices, "weights": weights}

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts, "top_k": self.top_k,
                "scoring_func": self.scoring_func, "topk_method": self.topk_method,
                "n_group": self.n_group, "topk_group": self.topk_group,
                "norm_topk_prob": self.norm_topk_prob,
                "routed_scaling_factor": self.routed_scaling_factor,
                "initializer_range": self.initializer_range, "vocab_size": self.vocab_size}


def score(logits: tf.Tensor, scoring_func: str) -> tf.Tensor:
    """Expert affinities (float32) of router logits."""
    if scoring_func == "sigmoid":
        return tf.sigmoid(logits)
    if scoring_func == "sqrtsoftplus":
        return tf.sqrt(tf.nn.softplus(logits))
    return tf.nn.softmax(logits, axis=-1)


def _spread_table(num_experts: int):
    """Initializer of a fresh tid2eid (V, k): token i gets experts i, i+1, ... mod E."""
    def init(shape, dtype=None):
        rows = tf.range(shape[0])[:, None] + tf.range(shape[1])[None, :]
        return tf.cast(rows % num_experts, dtype or "int32")
    return init


def sequence_balance_loss(scores: tf.Tensor, indices: tf.Tensor, num_experts: int) -> tf.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, before its weight alpha.

    Per sequence of T tokens: `f_i = E / (k T) * #{t: expert i chosen}`,
    `P_i = mean_t s_it / sum_j s_jt`, loss `sum_i f_i P_i`; averaged over sequences.
    It is 1 for perfectly balanced routing.

    Args:
      scores: float32 (B, T, E) affinities (sigmoid or softmax, unbiased).
      indices: int (B, T, k) chosen experts.
      num_experts: E.
    """
    k = tf.cast(tf.shape(indices)[-1], tf.float32)  # static or not (graphs of any length)
    t = tf.cast(tf.shape(scores)[1], tf.float32)
    chosen = tf.reduce_sum(tf.one_hot(indices, num_experts), axis=2)          # (B, T, E)
    f = tf.reduce_sum(chosen, axis=1) * (num_experts / (k * t))                # (B, E)
    p = tf.reduce_mean(scores / tf.reduce_sum(scores, -1, keepdims=True), 1)   # (B, E)
    return tf.reduce_mean(tf.reduce_sum(f * p, -1))


def router_z_loss(logits: tf.Tensor) -> tf.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return tf.reduce_mean(tf.square(tf.reduce_logsumexp(logits, axis=-1)))
