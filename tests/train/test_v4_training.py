"""DeepSeek-V4 training: the tiny V4 (every attention type, hash and top-k MoE,
hyper-connections) trains with the indexers of its CSA layers on their KL (V3.2's
sparse stage), the hash tables frozen, and then through V3.2's dense warm-up stage;
the shipped preset builds every layer type; LoRA DPO on a tiny V4."""

import dataclasses
import os
import sys

import numpy as np
import tensorflow as tf

from deepseek_tf import flags as dflags
from deepseek_tf.config import DPOConfig
from deepseek_tf.generate import Generator
from deepseek_tf.model import DeepSeekCausalLM, token_losses
from deepseek_tf.train.logger import read_log
from deepseek_tf.train.loop import train
from deepseek_tf.workdir import load_workdir
from tests.helpers import tiny
from tests.helpers.corpora import write_jsonl
from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
quiet = lambda *_: None  # noqa: E731


def _weights(model):
    return {v.path.split("/", 1)[1]: v.numpy() for v in model.variables}


def test_tiny_v4_trains_indexer_on_its_kl_and_keeps_hash_tables(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    workdir = str(tmp_path / "run")
    exp = tiny.experiment(data_dir, model=tiny.V4, train={
        "steps": 3, "log_every": 1, "eval_every": 0, "checkpoint_every": 3,
        "jit_compile": "false"})
    before = _weights(DeepSeekCausalLM(exp.model))  # same seed: the run's initial weights
    train(exp, workdir, log=quiet)
    records = [r for r in read_log(workdir) if r["kind"] == "train"]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    assert all(np.isfinite(r["indexer_loss"]) for r in records)
    after = _weights(load_workdir(workdir)[0])
    tables = [k for k in after if k.endswith("tid2eid")]
    indexer = [k for k in after if "/indexer/" in k or "/index_compressor/" in k]
    assert len(tables) == 1 and len(indexer) == 6, (tables, indexer)
    np.testing.assert_array_equal(before[tables[0]], after[tables[0]])
    assert any(not np.array_equal(before[k], after[k]) for k in indexer)
    # The trained model generates from its KV cache (greedy = argmax of the uncached
    # forward, token by token).
    model, _ = load_workdir(workdir)
    ids, _ = Generator(model, 32).generate([[5, 6, 7, 8, 9]], [5], max_new_tokens=12)
    seq = [5, 6, 7, 8, 9]
    for _ in range(12):
        seq.append(int(np.argmax(model(tf.constant([seq], tf.int32)).numpy()[0, -1])))
    assert ids.numpy()[0].tolist() == seq[5:]
    # The dense warm-up stage from that run: CSA layers read every complete entry,
    # only the indexers (with their compressors) train, and their KL falls.
    warm = str(tmp_path / "warm")
    train(tiny.experiment(data_dir, model=tiny.V4, optim={"learning_rate": 1e-2}, train={
        "steps": 10, "log_every": 1, "eval_every": 0, "jit_compile": "false",
        "dsa_stage": "dense_warmup", "init_from": workdir}), warm, log=quiet)
    warmed = _weights(load_workdir(warm)[0])
    for k in after:
        if k in indexer:
            assert not np.array_equal(after[k], warmed[k]), k
        else:
            np.testing.assert_array_equal(after[k], warmed[k], err_msg=k)
    kl = [r["indexer_loss"] for r in read_log(warm) if r["kind"] == "train"]
    assert np.mean(kl[-3:]) < np.mean(kl[:3]), kl


def test_lm_loss_never_reaches_the_indexer_and_kl_only_reaches_it():
    model = DeepSeekCausalLM(tiny.model_config(**tiny.V4))
    tokens = tf.constant(np.random.default_rng(0).integers(0, 256, (2, 20)), tf.int32)
    with tf.GradientTape(persistent=True) as tape:
        logits, aux = model(tokens, training=True, return_aux=True)
        lm = tf.reduce_mean(token_losses(logits[:, :-1], tokens[:, 1:]))
        kl = tf.reduce_sum(aux["indexer_kl"])
    indexer = [v for v in model.trainable_variables
               if "/indexer/" in v.path or "/index_compressor/" in v.path]
    main = [v for v in model.trainable_variables if all(v is not i for i in indexer)]
    assert all(g is None for g in tape.gradient(lm, indexer))
    assert all(g is None for g in tape.gradient(kl, main))
    assert sum(float(tf.norm(g)) for g in tape.gradient(kl, indexer)) > 0
    assert all(g is not None for g in tape.gradient(lm, main))


def test_preset_has_every_layer_type_and_both_moe_kinds():
    from absl import flags
    fv = flags.FlagValues()
    dflags.define_flags(flag_values=fv)
    fv([sys.argv[0], f"--flagfile={os.path.join(ROOT, 'configs', 'deepseek-v4-tiny.flags')}"])
    cfg = dflags.experiment_from_flags(fv).model
    assert set(cfg.resolved_layer_types) == {
        "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert set(cfg.resolved_mlp_layer_types) == {"hash_moe", "moe"}
    assert cfg.hc_mult == 4 and cfg.swiglu_limit > 0


def test_lora_dpo_on_v4_trains_adapters_only_and_starts_at_zero_margin(tmp_path):
    """DPO with LoRA on a tiny V4 (hyper-connections, hash and top-k MoE) through the
    one Runner: policy == reference at the first step (rewards exactly 0), the margin
    grows, and only adapters change (the base, hash tables included, stays bitwise)."""
    src, base = make_workdir(str(tmp_path / "src"), "v4", seed=2)
    rows = [{"instruction": f"Q{i}", "chosen": "yes", "rejected": "no"} for i in range(12)]
    exp = tiny.fine_tuning(src, write_jsonl(tmp_path / "pairs.jsonl", rows),
                           train={"steps": 4, "batch_size": 2, "checkpoint_every": 4,
                                  "stage": "dpo", "finetuning_type": "lora",
                                  "jit_compile": "false"})
    exp = dataclasses.replace(exp, dpo=DPOConfig(beta=0.5))
    wd = str(tmp_path / "dpo")
    train(exp, wd, log=quiet)
    records = [r for r in read_log(wd) if r["kind"] == "train"]
    assert records[0]["rewards/margin"] == 0.0 and records[0]["rewards/chosen"] == 0.0
    assert records[-1]["rewards/margin"] > 0, [r["rewards/margin"] for r in records]
    assert os.path.exists(os.path.join(wd, "adapter", "adapter.safetensors"))
    before = _weights(base)
    model = load_workdir(wd)[0]
    raw = {v.path.split("/", 1)[1]: v.numpy() for v in model.variables}
    for k, v in before.items():
        np.testing.assert_array_equal(raw[k], v, err_msg=k)
    assert any("lora" in k for k in raw)
