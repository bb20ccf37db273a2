"""`ModelConfig`, the architecture of the decoder, and its `RopeScaling`."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Optional

from deepseek_tf.config.base import _Section, _split_list, knob, nested
from deepseek_tf.config.v4 import V4_LAYER_TYPES, check_indexer, check_v4


@dataclasses.dataclass(frozen=True)
class RopeScaling(_Section):
    """RoPE scaling (HF `rope_scaling` / `rope_parameters`): none, YaRN or llama3.

    `ModelConfig.rope_scaling` holds one; its knobs keep their flat flags and
    config.json keys (`--model.rope_scaling_type`, `--model.beta_fast`, ...: the
    `flag` metadata). The field names are HF's, so `to_dict()` is the dict HF and the
    layers' `get_config` use.

    Example:
        >>> RopeScaling(type="yarn", factor=4.0).beta_fast
        32.0
    """

    SECTION = "model"

    type: str = knob("none", "RoPE scaling: none, yarn (DeepSeek-V2/V3 long context) or "
                     "llama3 (Llama 3.1 / R1-Distill-Llama).",
                     choices=("none", "yarn", "llama3"), flag="rope_scaling_type")
    factor: float = knob(1.0, "RoPE scaling: context extension factor.",
                         flag="rope_scaling_factor")
    original_max_position_embeddings: int = knob(0, "RoPE scaling: the pre-extension "
                                                 "context length; 0 means "
                                                 "max_position_embeddings.")
    beta_fast: float = knob(32.0, "YaRN: rotations above which dims extrapolate.")
    beta_slow: float = knob(1.0, "YaRN: rotations below which dims interpolate.")
    mscale: float = knob(1.0, "YaRN: mscale of the cos/sin attention factor.")
    mscale_all_dim: float = knob(0.0, "YaRN: mscale_all_dim; > 0 also multiplies the MLA "
                                 "softmax scale by (0.1 * mscale_all_dim * ln(factor) + 1)^2.")
    attention_factor: float = knob(0.0, "YaRN: explicit cos/sin attention factor; 0 derives "
                                   "it from factor, mscale, mscale_all_dim.",
                                   flag="rope_attention_factor")
    low_freq_factor: float = knob(1.0, "llama3 RoPE scaling: low_freq_factor.")
    high_freq_factor: float = knob(4.0, "llama3 RoPE scaling: high_freq_factor.")

    def __post_init__(self):
        self._coerce_and_check_types()
        r = self._require
        r(self.original_max_position_embeddings >= 0,
          "--model.original_max_position_embeddings must be >= 0 (0 = max_position_embeddings).")
        if self.type != "none":
            r(self.factor >= 1.0, f"--model.rope_scaling_factor={self.factor} must be >= 1 "
                                  f"with --model.rope_scaling_type={self.type}.")
        if self.type == "yarn":
            r(self.beta_fast > self.beta_slow > 0,
              "--model.beta_fast must be > --model.beta_slow > 0 for YaRN.")
        if self.type == "llama3":
            r(self.high_freq_factor > self.low_freq_factor > 0,
              "--model.high_freq_factor must be > --model.low_freq_factor > 0 for llama3 RoPE.")

    @classmethod
    def coerce(cls, value: "RopeScaling | Mapping[str, Any] | None") -> Optional["RopeScaling"]:
        """A RopeScaling from itself or its `to_dict()` (a layer config); None if unscaled."""
        if not value:
            return None
        s = value if isinstance(value, cls) else cls.from_dict(value)
        return None if s.type == "none" else s


#: The flat flags / config.json keys of `RopeScaling`, in field order.
ROPE_FLAGS = tuple(f.metadata["flag"] or f.name for f in dataclasses.fields(RopeScaling))


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Architecture of the decoder (HF `LlamaConfig` / `DeepseekV3Config` names).

    Args: see each field's help text (`python -m deepseek_tf.train --help`).

    Example:
        >>> ModelConfig(hidden_size=64, num_attention_heads=4).resolved_kv_heads
        4
    """

    SECTION = "model"

    vocab_size: int = knob(320, "Vocabulary size of the embedding and output head; "
                           "must be >= the tokenizer's vocabulary.")
    hidden_size: int = knob(256, "Width of the residual stream.")
    intermediate_size: int = knob(704, "Hidden width of the SwiGLU MLP.")
    num_hidden_layers: int = knob(4, "Number of decoder blocks.")
    num_attention_heads: int = knob(8, "Number of query heads.")
    num_key_value_heads: int = knob(0, "Number of key/value heads for grouped-query "
                                    "attention; 0 means num_attention_heads (MHA).")
    head_dim: int = knob(0, "Per-head width; 0 means hidden_size // num_attention_heads.")
    hidden_act: str = knob("silu", "Activation of the gated MLP.", choices=("silu", "gelu"))
    rms_norm_eps: float = knob(1e-6, "Epsilon of RMSNorm.")
    rope_theta: float = knob(10000.0, "Base of the rotary position embedding.")
    max_position_embeddings: int = knob(2048, "Longest sequence the model is built for.")
    tie_word_embeddings: bool = knob(False, "Share the embedding matrix with the output head.")
    initializer_range: float = knob(0.02, "Stddev of the normal weight initializer.")
    attention_bias: bool = knob(False, "Use biases on the q/k/v projections (Qwen2 style); "
                                "with MLA: on q_a_proj, kv_a_proj_with_mqa and o_proj "
                                "(DeepSeek-V2 style).")
    attention_type: str = knob("gqa", "Attention kind: gqa (dense Llama/Qwen2-style grouped-"
                               "query attention), mla (DeepSeek multi-head latent "
                               "attention), hybrid (global + sliding-window local mix "
                               "on the hybrid_base projections) or v4 (DeepSeek-V4 shared-KV "
                               "multi-query attention: a sliding window plus the compressed "
                               "entries layer_types selects).",
                               choices=("gqa", "mla", "hybrid", "v4"))
    # mla
    q_lora_rank: int = knob(0, "MLA: rank of the low-rank query path (q_a_proj -> norm -> "
                            "q_b_proj); 0 means a plain q_proj.")
    kv_lora_rank: int = knob(64, "MLA: width of the compressed KV latent.")
    qk_nope_head_dim: int = knob(32, "MLA: per-head query/key width without RoPE.")
    qk_rope_head_dim: int = knob(16, "MLA: per-head query width with RoPE (and of the "
                                 "key's shared RoPE part); v4: each head's last dims "
                                 "with RoPE.")
    v_head_dim: int = knob(32, "MLA: per-head value width.")
    rope_interleave: bool = knob(False, "RoPE on interleaved pairs (x0, x1), (x2, x3), ... "
                                 "(DeepSeek's checkpoint layout) instead of rotate-half.")
    # dsa (DeepSeek-V3.2 sparse attention; HF DeepseekV32Config names)
    use_dsa: bool = knob(False, "DeepSeek Sparse Attention (V3.2): a lightning indexer per "
                         "MLA layer scores every earlier token and attention reads only the "
                         "index_topk best (needs MLA with q_lora_rank > 0).")
    index_topk: int = knob(2048, "DSA: tokens each query attends to (the indexer's top-k).")
    index_head_dim: int = knob(128, "DSA: the indexer's per-head query/key width (its first "
                               "qk_rope_head_dim dims get rotate-half RoPE).")
    index_n_heads: int = knob(64, "DSA: the indexer's query heads.")
    indexer_loss_weight: float = knob(1.0, "DSA training: weight of the indexer's KL loss "
                                      "(per token, like the LM loss).", resumable=True)
    # hybrid
    hybrid_base: str = knob("mla", "hybrid: the projections the global and local "
                            "branches share.", choices=("mla", "gqa"))
    sliding_window: int = knob(128, "hybrid: the local branch attends to the last "
                               "sliding_window tokens (the query's included); v4: every "
                               "layer's window branch, the same way.")
    hybrid_global_weight: float = knob(0.7, "hybrid: weight of the global attention output.")
    hybrid_local_weight: float = knob(0.3, "hybrid: weight of the local attention output.")
    # v4 (DeepSeek-V4; HF DeepseekV4Config names)
    layer_types: str = knob("", "v4: comma-separated attention type of each layer: "
                            "sliding_attention, compressed_sparse_attention (CSA: indexer "
                            "top-k over entries compressing compress_rate_csa tokens) or "
                            "heavily_compressed_attention (HCA: all entries compressing "
                            "compress_rate_hca tokens); empty = HF's default (2 HCA, then "
                            "CSA/HCA alternating).")
    compress_rate_csa: int = knob(4, "v4: tokens per compressed entry of CSA layers.")
    compress_rate_hca: int = knob(128, "v4: tokens per compressed entry of HCA layers.")
    compress_rope_theta: float = knob(160000.0, "v4: RoPE base of CSA/HCA layers (their "
                                      "window, compressed entries and indexer); sliding "
                                      "layers use rope_theta.")
    o_groups: int = knob(2, "v4: head groups of the grouped output projection.")
    o_lora_rank: int = knob(64, "v4: per-group width of the grouped output projection.")
    hc_mult: int = knob(0, "Hyper-connections (mHC, V4): residual streams per token; 0 = "
                        "a plain residual (V3).")
    hc_sinkhorn_iters: int = knob(20, "mHC: Sinkhorn-Knopp iterations of the stream mixing.")
    hc_eps: float = knob(1e-6, "mHC: epsilon of the pre/comb weights and Sinkhorn sums.")
    mlp_layer_types: str = knob("", "Comma-separated MoE kind of each layer: hash_moe (V4: "
                                "experts from the frozen token->expert table tid2eid) or moe "
                                "(learned top-k); empty = first_k_dense_replace / "
                                "moe_layer_freq decide (V3).")
    swiglu_limit: float = knob(0.0, "V4: clip the experts' gate pre-activations to <= limit "
                               "and their up ones to [-limit, limit]; 0 = off.")
    # rope scaling: one RopeScaling; flags and config.json keys stay flat (ROPE_FLAGS)
    rope_scaling: RopeScaling = nested(RopeScaling, "RoPE scaling (flags: RopeScaling's).")
    # ModelConfig(rope_scaling_type=..., beta_fast=..., ...) and replace() with the flat
    # keys (flags, config.json, HF conversion) set rope_scaling's knobs; not attributes.
    rope_scaling_type: dataclasses.InitVar[Optional[str]] = None
    rope_scaling_factor: dataclasses.InitVar[Optional[float]] = None
    original_max_position_embeddings: dataclasses.InitVar[Optional[int]] = None
    beta_fast: dataclasses.InitVar[Optional[float]] = None
    beta_slow: dataclasses.InitVar[Optional[float]] = None
    mscale: dataclasses.InitVar[Optional[float]] = None
    mscale_all_dim: dataclasses.InitVar[Optional[float]] = None
    rope_attention_factor: dataclasses.InitVar[Optional[float]] = None
    low_freq_factor: dataclasses.InitVar[Optional[float]] = None
    high_freq_factor: dataclasses.InitVar[Optional[float]] = None
    # moe
    n_routed_experts: int = knob(0, "DeepSeekMoE: routed experts per MoE layer; 0 = a dense "
                                 "model (every layer a SwiGLU MLP).")
    n_shared_experts: int = knob(0, "DeepSeekMoE: always-active shared experts (one MLP of "
                                 "width n_shared_experts * moe_intermediate_size).")
    num_experts_per_tok: int = knob(2, "DeepSeekMoE: routed experts per token (top-k).")
    moe_intermediate_size: int = knob(128, "DeepSeekMoE: hidden width of each expert.")
    scoring_func: str = knob("sigmoid", "Router affinity: sigmoid (V3), softmax (V2) or "
                             "sqrtsoftplus (V4: sqrt(softplus(logit))).",
                             choices=("sigmoid", "softmax", "sqrtsoftplus"))
    topk_method: str = knob("noaux_tc", "Expert selection: noaux_tc (V3: scores + "
                            "e_score_correction_bias, groups ranked by the sum of their top-2), "
                            "greedy (plain top-k) or group_limited_greedy (V2: groups ranked "
                            "by their max score).",
                            choices=("noaux_tc", "greedy", "group_limited_greedy"))
    n_group: int = knob(1, "DeepSeekMoE: expert groups for group-limited routing.")
    topk_group: int = knob(1, "DeepSeekMoE: groups a token may route to.")
    routed_scaling_factor: float = knob(1.0, "DeepSeekMoE: multiplier of the routed "
                                        "experts' combine weights.")
    norm_topk_prob: bool = knob(True, "DeepSeekMoE: normalise the top-k weights to sum 1.")
    first_k_dense_replace: int = knob(0, "DeepSeekMoE: the first k layers keep a dense MLP.")
    moe_layer_freq: int = knob(1, "DeepSeekMoE: layer i >= first_k_dense_replace is MoE "
                               "when i % moe_layer_freq == 0.")
    capacity_factor: float = knob(1.25, "MoE training: expert buffer capacity = factor * "
                                  "tokens * top_k / experts (overflow tokens are dropped and "
                                  "counted); <= 0 = dropless (exact; dynamic shapes, so not "
                                  "with --train.jit_compile).", resumable=True)
    inference_capacity_factor: float = knob(0.0, "MoE outside training (eval, export, "
                                            "generation): like capacity_factor; <= 0 = "
                                            "dropless.", resumable=True)
    expert_parallel: int = knob(1, "MoE expert parallelism: W > 1 splits each MoE layer's "
                                "routed experts over W MultiWorkerMirroredStrategy workers "
                                "(W divides the worker count and n_routed_experts; each worker "
                                "holds n_routed_experts / W, and the workers holding the same "
                                "experts are their data-parallel replicas) and moves tokens to "
                                "them by all-to-all within groups of W workers; 1 = every "
                                "worker holds every expert.")
    aux_loss_alpha: float = knob(0.0, "Weight of the sequence-wise expert balance loss "
                                 "(DeepSeek-V3: 1e-4).", resumable=True)
    router_z_loss_coef: float = knob(0.0, "Weight of the router z-loss "
                                     "(mean logsumexp(router logits)^2).", resumable=True)
    bias_update_speed: float = knob(0.001, "Aux-loss-free balancing (noaux_tc): after each "
                                    "step e_score_correction_bias += speed * sign(mean load - "
                                    "expert load), from the global load; 0 = off.",
                                    resumable=True)
    # mtp
    num_nextn_predict_layers: int = knob(0, "Multi-token prediction depth D: module k "
                                         "predicts the token k+1 ahead (0 = off).")
    mtp_loss_weight: float = knob(0.3, "Weight lambda of the MTP loss (averaged over the D "
                                  "modules).", resumable=True)
    # dropout (training only; stateless with explicit seeds, so remat recomputes the same masks)
    attention_dropout: float = knob(0.0, "Dropout rate on the attention probabilities.")
    hidden_dropout: float = knob(0.0, "Dropout rate on each attention and MLP output "
                                 "before its residual add.")

    # storage of the weights (set by `convert --convert.dtype / --convert.keep_quantized`)
    weight_dtype: str = knob("float32", "dtype of the model's float variables: float32, or "
                             "bfloat16 (half the memory and checkpoint; computes in "
                             "bfloat16; a --convert.dtype=bfloat16 conversion sets it; such "
                             "a base trains only with --train.finetuning_type=lora).",
                             choices=("float32", "bfloat16"))
    weight_quantization: str = knob("none", "How the projection kernels and routed experts "
                                    "are stored: none (float) or int8 (weight-only, one "
                                    "scale per output channel, dequantized inside the "
                                    "matmul; a keep-quantized conversion sets it; such a "
                                    "base trains only with --train.finetuning_type=lora).",
                                    choices=("none", "int8"))

    def __post_init__(self, *rope_flags):
        self._coerce_and_check_types()
        # Flat rope keys given (flags, config.json, HF conversion) override rope_scaling's.
        given = {f.name: v for f, v in zip(dataclasses.fields(RopeScaling), rope_flags)
                 if v is not None}
        if given:
            object.__setattr__(self, "rope_scaling", self.rope_scaling.replace(**given))
        r = self._require
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            r(getattr(self, name) > 0, f"--model.{name} must be > 0, got {getattr(self, name)}.")
        r(self.num_key_value_heads >= 0, "--model.num_key_value_heads must be >= 0 (0 = MHA).")
        r(self.head_dim >= 0, "--model.head_dim must be >= 0 (0 = hidden_size // heads).")
        if self.head_dim == 0:
            r(self.hidden_size % self.num_attention_heads == 0,
              f"--model.num_attention_heads={self.num_attention_heads} must divide "
              f"--model.hidden_size={self.hidden_size} (or set --model.head_dim).")
        r(self.num_attention_heads % self.resolved_kv_heads == 0,
          f"--model.num_key_value_heads={self.num_key_value_heads} must divide "
          f"--model.num_attention_heads={self.num_attention_heads}.")
        r(self.resolved_head_dim % 2 == 0,
          f"head dim {self.resolved_head_dim} must be even for rotary embeddings.")
        r(self.rms_norm_eps > 0, "--model.rms_norm_eps must be > 0.")
        r(self.rope_theta > 0, "--model.rope_theta must be > 0.")
        r(self.initializer_range > 0, "--model.initializer_range must be > 0.")
        for name in ("attention_dropout", "hidden_dropout"):
            r(0 <= getattr(self, name) < 1,
              f"--model.{name} must be in [0, 1), got {getattr(self, name)}.")
        self._check_mla()
        self._check_moe()
        check_v4(self)
        r(self.num_nextn_predict_layers >= 0, "--model.num_nextn_predict_layers must be >= 0.")
        r(self.mtp_loss_weight >= 0, "--model.mtp_loss_weight must be >= 0.")

    def _check_mla(self) -> None:
        r = self._require
        r(self.q_lora_rank >= 0, "--model.q_lora_rank must be >= 0 (0 = plain q_proj).")
        if self.uses_mla:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                r(getattr(self, name) > 0,
                  f"--model.{name} must be > 0 with MLA, got {getattr(self, name)}.")
            r(self.qk_rope_head_dim % 2 == 0,
              f"--model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE pairs).")
        if self.use_dsa:
            r(self.attention_type == "mla",
              f"--model.use_dsa needs --model.attention_type=mla (got "
              f"{self.attention_type}): the indexer selects tokens for MLA.")
            r(self.q_lora_rank > 0, "--model.use_dsa needs --model.q_lora_rank > 0: the "
                                    "indexer's queries come from the query latent.")
            check_indexer(self)
        if self.attention_type == "hybrid":
            r(self.sliding_window > 0, "--model.sliding_window must be > 0 for hybrid attention.")
            r(self.hybrid_global_weight >= 0 and self.hybrid_local_weight >= 0,
              "--model.hybrid_global_weight and --model.hybrid_local_weight must be >= 0.")

    def _check_moe(self) -> None:
        r = self._require
        e = self.n_routed_experts
        r(e >= 0, "--model.n_routed_experts must be >= 0 (0 = dense).")
        r(self.first_k_dense_replace >= 0, "--model.first_k_dense_replace must be >= 0.")
        r(self.moe_layer_freq >= 1, "--model.moe_layer_freq must be >= 1.")
        r(self.bias_update_speed >= 0, "--model.bias_update_speed must be >= 0.")
        r(self.aux_loss_alpha >= 0 and self.router_z_loss_coef >= 0,
          "--model.aux_loss_alpha and --model.router_z_loss_coef must be >= 0.")
        w = self.expert_parallel
        r(w >= 1, f"--model.expert_parallel={w} must be >= 1 (1 = off).")
        r(w == 1 or (e and e % w == 0),
          f"--model.expert_parallel={w} must divide --model.n_routed_experts={e}.")
        r(w == 1 or self.weight_quantization == "none",
          f"--model.expert_parallel={w} splits float experts: drop "
          f"--model.weight_quantization={self.weight_quantization}.")
        if not e:
            return
        k, g, tg = self.num_experts_per_tok, self.n_group, self.topk_group
        r(self.n_shared_experts >= 0, "--model.n_shared_experts must be >= 0.")
        r(self.moe_intermediate_size > 0, "--model.moe_intermediate_size must be > 0.")
        r(0 < k <= e, f"--model.num_experts_per_tok={k} must be in 1..n_routed_experts={e}.")
        r(g >= 1 and e % g == 0,
          f"--model.n_group={g} must divide --model.n_routed_experts={e}.")
        r(1 <= tg <= g, f"--model.topk_group={tg} must be in 1..n_group={g}.")
        if self.topk_method != "greedy":
            r(k <= tg * (e // g),
              f"--model.num_experts_per_tok={k} exceeds the {tg * (e // g)} experts in "
              f"--model.topk_group={tg} groups of {e // g}.")
        if self.topk_method == "noaux_tc" and g > 1:
            r(e // g >= 2, f"noaux_tc ranks groups by their top-2 scores: each of the "
                           f"--model.n_group={g} groups needs >= 2 of the {e} experts.")
        r(self.routed_scaling_factor > 0, "--model.routed_scaling_factor must be > 0.")

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        """v4: each layer's attention type (`layer_types`, or HF's default schedule)."""
        got, n = _split_list(self.layer_types), self.num_hidden_layers
        if got:
            return got
        alternate = tuple(V4_LAYER_TYPES[1] if i % 2 else V4_LAYER_TYPES[2]
                          for i in range(max(n - 2, 0)))
        return (V4_LAYER_TYPES[2],) * min(n, 2) + alternate

    def layer_type(self, layer_idx: int) -> str:
        """v4: the attention type of block `layer_idx`. MTP blocks (past the last layer)
        attend through the sliding window only, as in DeepSeek-V4's released config
        (`compress_ratios` ends with a 0 for its MTP layer)."""
        kinds = self.resolved_layer_types
        return kinds[layer_idx] if layer_idx < len(kinds) else V4_LAYER_TYPES[0]

    def mlp_layer_type(self, layer_idx: int) -> str:
        """The feed-forward kind of block `layer_idx` (dense, moe or hash_moe). MTP
        blocks are never hash-routed (DeepSeek-V4 hashes only its first layers)."""
        kinds = self.resolved_mlp_layer_types
        if layer_idx < len(kinds):
            return kinds[layer_idx]
        return "moe" if self.is_moe_layer(layer_idx) else "dense"

    @property
    def has_indexer(self) -> bool:
        """Lightning indexers to train: V3.2's DSA, or V4's CSA layers."""
        return self.use_dsa or (self.attention_type == "v4" and
                                "compressed_sparse_attention" in self.resolved_layer_types)

    @property
    def resolved_mlp_layer_types(self) -> tuple[str, ...]:
        """Each layer's feed-forward kind: dense, moe or hash_moe."""
        got = _split_list(self.mlp_layer_types)
        if got:
            return got
        return tuple("moe" if self.is_moe_layer(i) else "dense"
                     for i in range(self.num_hidden_layers))

    @property
    def uses_mla(self) -> bool:
        return self.attention_type == "mla" or (
            self.attention_type == "hybrid" and self.hybrid_base == "mla")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True if decoder block `layer_idx` has a DeepSeekMoE feed-forward layer."""
        if self.mlp_layer_types:
            return self.n_routed_experts > 0
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def resolved_rope_scaling(self) -> RopeScaling | None:
        """`rope_scaling` with original_max_position_embeddings resolved (0 ->
        max_position_embeddings), as the layers use it; None when unscaled."""
        s = self.rope_scaling
        if s.type == "none":
            return None
        return s.replace(original_max_position_embeddings=(
            s.original_max_position_embeddings or self.max_position_embeddings))

    @property
    def resolved_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


# ModelConfig.__post_init__ pairs its init-only rope keys with RopeScaling's fields.
if [n for n in inspect.signature(ModelConfig).parameters if n in ROPE_FLAGS] != \
        list(ROPE_FLAGS):
    raise TypeError("ModelConfig's init-only rope keys must follow RopeScaling's fields.")
# They are not attributes: reading one (`cfg.beta_fast`) is an AttributeError instead of
# the InitVar's None default; `cfg.rope_scaling.beta_fast` is the value.
for _name in ROPE_FLAGS:
    delattr(ModelConfig, _name)
