"""Run directories made without training: a random model saved the way `train`
saves one (config.json, checkpoints/, tokenizer/), for generation and export tests."""

from __future__ import annotations

import os

import tensorflow as tf

from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.model import DeepSeekCausalLM
from deepseek_tf.workdir import write_workdir
from tests.helpers import tiny

#: Model sections of every attention kind, for the cache and export tests.
FAMILIES = {
    "gqa": {},
    "hybrid": dict(attention_type="hybrid", hybrid_base="gqa", sliding_window=4),
    "mla": dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8),
    "hybrid_mla": dict(attention_type="hybrid", hybrid_base="mla", sliding_window=5,
                       q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8),
    # DeepSeek-V3 style: MLA + a dense first layer, then MoE with a shared expert.
    "mla_moe": dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                    n_group=2, topk_group=1),
    # DeepSeek-V3.2 style: mla_moe + DSA (each query attends to its 8 best tokens) and
    # DeepSeek's interleaved RoPE layout.
    "mla_dsa": dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
                    num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                    n_group=2, topk_group=1, rope_interleave=True, use_dsa=True,
                    index_topk=8, index_head_dim=8, index_n_heads=4),
    # DeepSeek-V4: sliding, CSA and HCA layers, hyper-connections, hash-routed MoE.
    "v4": tiny.V4,
}


def random_model(family: str = "gqa", seed: int = 0, **overrides) -> DeepSeekCausalLM:
    """A tiny model of `family` (see FAMILIES) with seeded random weights; larger init
    than training's so that logits are far from uniform and argmax has clear margins."""
    tf.keras.utils.set_random_seed(seed)
    cfg = tiny.model_config(initializer_range=0.2, **{**FAMILIES[family], **overrides})
    return DeepSeekCausalLM(cfg)


def make_workdir(path: str, family: str = "gqa", seed: int = 0, **overrides):
    """Writes a workdir holding a random `family` model; returns (path, model)."""
    model = random_model(family, seed, **overrides)
    exp = tiny.experiment(os.path.join(path, "data"), model=model.config.to_dict())
    return write_workdir(path, model, exp, ByteTokenizer()), model



def train_chat_run(path: str, template: str = "chatml", steps: int = 60,
                   answer: str = "ok") -> str:
    """A tiny SFT run (alpaca records "Hi <i>" -> `answer`, rendered with `template`)
    trained until it answers `answer` and then its end-of-turn marker; returns the workdir."""
    from deepseek_tf.data.prepare import prepare
    from deepseek_tf.train.loop import train
    from tests.helpers.corpora import write_jsonl

    quiet = lambda *_: None  # noqa: E731
    rows = [{"instruction": f"Hi {i}", "output": answer} for i in range(24)]
    data_dir = os.path.join(path, "data")
    os.makedirs(path, exist_ok=True)
    prepare(tiny.data_config(inputs=write_jsonl(os.path.join(path, "chat.jsonl"), rows),
                             format="alpaca", template=template, max_samples=0, seq_len=96),
            data_dir, log=quiet)
    exp = tiny.experiment(data_dir, data={"format": "alpaca", "template": template,
                                          "seq_len": 96},
                          optim={"learning_rate": 1e-2, "warmup_steps": 2},
                          train={"steps": steps, "eval_every": 0, "eval_steps": 1,
                                 "checkpoint_every": steps, "log_every": steps})
    workdir = os.path.join(path, "run")
    train(exp, workdir, log=quiet)
    return workdir
