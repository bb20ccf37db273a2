"""Tiny configs that keep the suite fast on a 2-core CPU."""

from deepseek_tf.config import DataConfig, Experiment, ModelConfig, OptimConfig, TrainConfig


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return ModelConfig(**{**base, **kw})


#: A tiny DeepSeek-V4 (`model_config(**V4)`): every attention type (sliding, CSA with
#: entries of 4, HCA with entries of 8), hash-routed then top-k MoE, 2 streams.
V4 = dict(attention_type="v4", num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
          qk_rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8, sliding_window=6,
          layer_types="sliding_attention,compressed_sparse_attention,"
                      "heavily_compressed_attention",
          compress_rate_csa=4, compress_rate_hca=8, index_n_heads=2, index_head_dim=8,
          index_topk=2, hc_mult=2, n_routed_experts=4, n_shared_experts=1,
          num_experts_per_tok=2, moe_intermediate_size=16, mlp_layer_types="hash_moe,moe,moe",
          scoring_func="sqrtsoftplus", swiglu_limit=10.0, routed_scaling_factor=1.5)


def data_config(**kw) -> DataConfig:
    base = dict(seq_len=32, max_samples=40, val_size=4, shard_size_mb=0.1,
                shuffle_buffer=64, cycle_length=2)
    return DataConfig(**{**base, **kw})


def experiment(data_dir: str, **sections) -> Experiment:
    """A tiny experiment on prepared data; `sections` maps section -> overrides."""
    return Experiment(
        model=model_config(**sections.get("model", {})),
        data=data_config(data_dir=data_dir, **sections.get("data", {})),
        optim=OptimConfig(**{"learning_rate": 3e-3, "warmup_steps": 2, **sections.get("optim", {})}),
        train=TrainConfig(**{"steps": 8, "batch_size": 4, "log_every": 2, "eval_every": 4,
                             "eval_steps": 2, "checkpoint_every": 4,
                             **sections.get("train", {})}))


def nondeterministic():
    """A context in which TF op determinism is off (training turns it on for the whole
    process): graphs traced inside draw unseeded sampling seeds from the OS."""
    import contextlib

    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    @contextlib.contextmanager
    def scope():
        was = tf_config.is_op_determinism_enabled()
        tf_config.disable_op_determinism()  # not in the public API
        try:
            yield
        finally:
            if was:
                tf.config.experimental.enable_op_determinism()

    return scope()


def fine_tuning(src: str, inputs: str, **sections) -> Experiment:
    """A tiny experiment that starts from workdir `src` (`--train.init_from`, its model)
    on the JSON records in `inputs` (plain template, 4 held out); `sections` as in
    `experiment`, merged over these defaults."""
    import os

    model = Experiment.load(os.path.join(src, "config.json")).model.to_dict()
    data = {"inputs": str(inputs), "template": "plain", "val_size": 4, "seq_len": 32,
            **sections.get("data", {})}
    optim = {"learning_rate": 1e-2, "warmup_steps": 0, **sections.get("optim", {})}
    train = {"log_every": 1, "eval_every": 0, "init_from": src, **sections.get("train", {})}
    return experiment("", model=model, data=data, optim=optim, train=train)
