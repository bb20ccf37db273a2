"""The model's side outputs in the training step: MTP and balance losses, expert load,
and the aux-loss-free router bias update.

Per micro-batch, `aux_terms` turns `model(..., return_aux=True)`'s aux dict into
  - an extra loss *sum*, added to the token cross-entropy sum before the step divides
    by the global loss-token count: `mtp_loss_weight / D * sum_k CE_k` (MTP depth k
    predicts `targets[:, i + k]` where that token is in the same document), and the
    router losses `(aux_loss_alpha * balance + router_z_loss_coef * z) * tokens`
    (token-weighted, so accumulation and replicas average them like the main loss),
    and with DSA `indexer_loss_weight * sum(indexer KL * loss_mask)`;
  - `stats`: sums the step accumulates over micro-batches and all-reduces (SUM).
After `apply_gradients`, `update_router_biases` moves every noaux_tc router's
`e_score_correction_bias` by `bias_update_speed * sign(mean load - load_i)` from the
all-reduced (global) load, so every replica applies the same update (not for a
frozen router: the DSA dense warm-up leaves the main model bitwise unchanged).

Example (inside the step):
    >>> logits, aux = model(inputs, ..., return_aux=True)
    >>> extra_sum, stats = aux_terms(model.config, aux, batch)
"""

from __future__ import annotations

import tensorflow as tf

from deepseek_tf.config import ModelConfig
from deepseek_tf.layers.mtp import shift_left
from deepseek_tf.model import token_losses


def uses_aux(cfg: ModelConfig) -> bool:
    """True if the model has MoE layers, MTP modules or DSA indexers (the step then asks
    for aux)."""
    return cfg.n_routed_experts > 0 or cfg.num_nextn_predict_layers > 0 or cfg.use_dsa


def mtp_loss_sum(logits: tf.Tensor, batch: dict, k: int) -> tf.Tensor:
    """Summed CE of MTP depth k: position i predicts targets[:, i + k] (same document)."""
    targets = shift_left(batch["targets"], k)
    same_doc = tf.equal(shift_left(batch["segment_ids"], k), batch["segment_ids"])
    mask = shift_left(batch["loss_mask"], k) * tf.cast(same_doc, tf.float32)
    return tf.reduce_sum(token_losses(logits, targets) * mask)


def aux_terms(cfg: ModelConfig, aux: dict, batch: dict) -> tuple[tf.Tensor, dict]:
    """(extra loss sum, stats to accumulate) of one micro-batch; see the module doc."""
    extra, stats = tf.constant(0.0), {}
    if "mtp_logits" in aux:
        sums = [mtp_loss_sum(l, batch, k) for k, l in enumerate(aux["mtp_logits"], start=1)]
        stats["mtp_loss_sum"] = tf.stack(sums)                                  # (D,)
        extra += cfg.mtp_loss_weight / len(sums) * tf.add_n(sums)
    if "indexer_kl" in aux:  # DSA: the indexers' KL on the loss tokens
        kl_sum = tf.reduce_sum(aux["indexer_kl"] * batch["loss_mask"])
        stats["indexer_loss_sum"] = kl_sum
        extra += cfg.indexer_loss_weight * kl_sum
    if "expert_load" in aux:
        tokens = tf.reduce_sum(batch["loss_mask"])
        stats.update(expert_load=aux["expert_load"], dropped=aux["dropped"],   # (L, E), (L,)
                     balance_loss_sum=aux["balance_loss"] * tokens,
                     z_loss_sum=aux["z_loss"] * tokens)
        extra += (cfg.aux_loss_alpha * aux["balance_loss"]
                  + cfg.router_z_loss_coef * aux["z_loss"]) * tokens
    return extra, stats


def update_router_biases(model, expert_load: tf.Tensor, speed: float,
                         update=True) -> tf.Tensor:
    """Aux-loss-free balancing step from the global (L, E) load; returns bias spreads (L,)."""
    spreads = []
    for i, layer in enumerate(model.moe_layers):
        bias = layer.gate.e_score_correction_bias
        if bias is None or not layer.gate.kernel.trainable:  # frozen routers stay put
            spreads.append(tf.constant(0.0) if bias is None else
                           tf.reduce_max(bias) - tf.reduce_min(bias))
            continue
        load = expert_load[i]
        if speed > 0:
            gate = tf.cast(update, tf.float32)  # 0 on a skipped (overflowed) step
            bias.assign_add(gate * speed * tf.sign(tf.reduce_mean(load) - load))
        spreads.append(tf.reduce_max(bias) - tf.reduce_min(bias))
    return tf.stack(spreads)


def step_metrics(model, stats: dict, tokens: tf.Tensor, update=True) -> dict:
    """Global metrics from all-reduced stats; updates the router biases (call once per step;
    `update` False, a bool tensor on a skipped step, leaves them)."""
    out, denom = {}, tf.maximum(tokens, 1.0)
    if "mtp_loss_sum" in stats:
        out["mtp_loss"] = tf.reduce_mean(stats["mtp_loss_sum"]) / denom
    if "indexer_loss_sum" in stats:
        out["indexer_loss"] = stats["indexer_loss_sum"] / denom
    if "expert_load" in stats:
        load = stats["expert_load"]
        out.update(balance_loss=stats["balance_loss_sum"] / denom,
                   z_loss=stats["z_loss_sum"] / denom, expert_load=load,
                   dropped_frac=stats["dropped"] / tf.maximum(tf.reduce_sum(load, -1), 1.0),
                   bias_spread=update_router_biases(model, load,
                                                    model.config.bias_update_speed, update))
    return out


def log_metrics(model, out: dict) -> dict:
    """Host-side log entries: scalars, and per MoE layer its load (fractions per expert),
    imbalance (max load / mean load), dropped fraction and bias spread."""
    m = {k: float(out[k]) for k in ("mtp_loss", "indexer_loss", "balance_loss", "z_loss")
         if k in out}
    if "expert_load" not in out:
        return m
    load = out["expert_load"].numpy()
    dropped, spread = out["dropped_frac"].numpy(), out["bias_spread"].numpy()
    for i, layer_idx in enumerate(b for b in _moe_block_indices(model)):
        frac = load[i] / max(load[i].sum(), 1.0)
        p = f"moe/layer{layer_idx}"
        m.update({f"{p}/load": [float(x) for x in frac],
                  f"{p}/load_max": float(frac.max() * len(frac)),
                  f"{p}/dropped_frac": float(dropped[i]), f"{p}/bias_spread": float(spread[i])})
    m["moe/dropped_frac"] = float(dropped.mean())
    m["moe/load_max"] = float(max(m[k] for k in m if k.endswith("/load_max")))
    return m


def _moe_block_indices(model) -> list[int]:
    blocks = model.blocks + [mtp.block for mtp in model.mtp]
    return [b.layer_idx for b in blocks if b.is_moe]
