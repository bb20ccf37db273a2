"""Fine-tuning: init_from, LoRA (Keras enable_lora), freeze, merge for export, resume."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment, FreezeConfig, LoraConfig, TrainConfig
from deepseek_tf.errors import ConfigError
from deepseek_tf.flags import adopt_init_from
from deepseek_tf.lora import (ADAPTER_DIR, ADAPTER_FILE, adapter_weights, apply_lora,
                              merged_model)
from deepseek_tf.model import DeepSeekCausalLM, count_params
from deepseek_tf.train.finetune import prepare_model
from deepseek_tf.train.loop import train
from deepseek_tf.workdir import load_workdir
from tests.helpers import tiny
from tests.helpers.workdirs import make_workdir, random_model

quiet = lambda *_: None  # noqa: E731
IDS = tf.constant([[256, 5, 17, 99, 3, 200, 41]])


def _ckpt(workdir, prefix="model/"):
    """Checkpoint tensors by key. Trainable variables are stored under the optimizer's
    path (the shorter one), so with LoRA the model/ keys are exactly the base weights."""
    reader = tf.train.load_checkpoint(os.path.join(workdir, "checkpoints"))
    return {k: reader.get_tensor(k) for k in sorted(reader.get_variable_to_shape_map())
            if k.startswith(prefix) and not k.startswith(("data/", "save_counter", "_CHECK"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path, model = make_workdir(str(tmp_path_factory.mktemp("src")), "gqa", seed=3)
    return path, model


def _exp(data_dir, src, train=None, **sections):
    model = Experiment.load(os.path.join(src, "config.json")).model.to_dict()
    exp = tiny.experiment(data_dir, model=model, train={
        "steps": 6, "log_every": 1, "checkpoint_every": 3, "eval_every": 0,
        "init_from": src, **(train or {})})
    return dataclasses.replace(exp, **sections)


def test_init_from_reproduces_the_source_logits_at_step_0(source):
    src, model = source
    exp = tiny.experiment("x", model=model.config.to_dict(), train={"init_from": src})
    fresh = DeepSeekCausalLM(exp.model)
    prepare_model(fresh, exp, log=quiet)
    np.testing.assert_array_equal(fresh(IDS).numpy(), model(IDS).numpy())


def test_init_from_takes_the_model_config_and_refuses_contradicting_flags(source):
    src, model = source
    exp = Experiment(train=tiny.experiment("x").train.replace(init_from=src))
    given = {s: {} for s in ("model", "data", "tokenizer", "optim", "train")}
    assert adopt_init_from(exp, given).model == model.config
    given["model"] = {"aux_loss_alpha": 0.01}  # a training knob of the model: allowed
    assert adopt_init_from(exp, given).model.aux_loss_alpha == 0.01
    given["model"] = {"hidden_size": 64}
    with pytest.raises(ConfigError, match="contradicts --train.init_from"):
        adopt_init_from(exp, given)


def test_lora_on_mla_moe_adapts_projections_and_shared_experts_and_merges_exactly():
    model = random_model("mla_moe")
    _, total_before = count_params(model)
    rank, alpha = 2, 6.0  # scale alpha / r = 3: a merge that drops or squares it shows
    n = apply_lora(model, LoraConfig(rank=rank, alpha=alpha, targets="all"))
    names = {v.path.split("/")[-2] for v in model.trainable_variables}
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
            "up_proj", "down_proj"} == names
    assert any("shared_experts" in v.path for v in model.trainable_variables)
    assert all("lora_kernel_" in v.path for v in model.trainable_variables)
    assert n == 2 * 5 + 3 + 3  # attention x 2 layers, dense MLP, shared experts
    trainable, total = count_params(model)
    assert total == total_before + trainable
    for v in model.trainable_variables:  # non-zero adapters (B starts at zero)
        v.assign(tf.random.stateless_normal(v.shape, [1, 2]) * 0.05)
    plain = merged_model(model)
    assert not any("lora" in v.path for v in plain.variables)
    np.testing.assert_allclose(plain(IDS).numpy(), model(IDS).numpy(), atol=1e-5)
    # Each merged kernel against W + (alpha / r) A B from the raw variables, in numpy
    # (not through Keras' own merged `kernel` property, which merged_model uses).
    raw = {v.path.split("/", 1)[1]: v.numpy() for v in model.variables}
    merged = {v.path.split("/", 1)[1]: v.numpy() for v in plain.variables}
    adapted = [k[:-len("lora_kernel_a")] for k in raw if k.endswith("lora_kernel_a")]
    assert len(adapted) == n
    for p in adapted:
        want = raw[p + "kernel"] + (alpha / rank) * raw[p + "lora_kernel_a"] @ \
            raw[p + "lora_kernel_b"]
        np.testing.assert_allclose(merged[p + "kernel"], want, rtol=1e-5, atol=1e-6, err_msg=p)
    for k, v in merged.items():  # everything else copied as it was
        if k[:-len("kernel")] not in adapted:
            np.testing.assert_array_equal(v, raw[k], err_msg=k)


def test_unknown_lora_target_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown name"):
        apply_lora(random_model("gqa"), LoraConfig(targets="q_proj,wq"))
    with pytest.raises(ConfigError, match="matches no projection"):
        apply_lora(random_model("mla"), LoraConfig(targets="k_proj"))


def test_lora_run_keeps_the_base_saves_a_small_adapter_and_exports_merged(
        stdlib_data, source, tmp_path):
    _, data_dir, _ = stdlib_data
    src, model = source
    exp = _exp(data_dir, src, train={"finetuning_type": "lora", "steps": 4},
               lora=LoraConfig(rank=2, alpha=4.0, targets="q_proj,v_proj"))
    wd = str(tmp_path / "lora")
    msgs = []
    train(exp, wd, log=msgs.append)
    line = next(m for m in msgs if m.startswith("trainable params"))
    lora_params = 2 * ((32 * 2 + 2 * 32) + (32 * 2 + 2 * 16))  # (q + v) x 2 layers
    assert line.startswith(f"trainable params: {lora_params:,} ||"), line
    ckpt, base = _ckpt(wd), {k: v for k, v in _ckpt(src).items()}
    for k, v in base.items():  # every base weight bitwise unchanged
        np.testing.assert_array_equal(ckpt[k], v, err_msg=k)
    adapter = os.path.join(wd, ADAPTER_DIR, ADAPTER_FILE)
    model_bytes = sum(v.nbytes for v in base.values())
    assert os.path.getsize(adapter) < model_bytes / 10
    lora_model, lexp = load_workdir(wd)
    assert lexp.train.finetuning_type == "lora"
    adapters = adapter_weights(lora_model)
    assert len(adapters) == 8 and any(np.abs(v).max() > 0 for k, v in adapters.items()
                                      if k.endswith("lora_kernel_b"))
    plain = merged_model(lora_model)
    np.testing.assert_allclose(plain(IDS).numpy(), lora_model(IDS).numpy(), atol=1e-5)
    assert np.abs(plain(IDS).numpy() - model(IDS).numpy()).max() > 1e-6  # it learned

    from deepseek_tf.convert.safetensors_io import SafetensorsDir
    from deepseek_tf.export import export
    out = str(tmp_path / "hf")
    export(lora_model, lexp, "hf", out, log=quiet, workdir=wd)
    files = SafetensorsDir(out)
    tensors = {k: files.load(k) for k in files.names()}
    assert not any("lora" in k for k in tensors)
    q = plain.blocks[0].self_attn.q_proj.kernel.numpy()
    np.testing.assert_allclose(np.asarray(tensors["model.layers.0.self_attn.q_proj.weight"]),
                               q.T, atol=1e-6)


def test_lora_resume_is_bitwise_equal_to_an_uninterrupted_run(stdlib_data, source, tmp_path):
    _, data_dir, _ = stdlib_data
    src, _ = source
    lora = LoraConfig(rank=2, dropout=0.1, targets="all")
    full = _exp(data_dir, src, train={"finetuning_type": "lora"}, lora=lora)
    full = dataclasses.replace(full, optim=full.optim.replace(decay_steps=6))
    half = dataclasses.replace(full, train=full.train.replace(steps=3))
    a, b = str(tmp_path / "full"), str(tmp_path / "resumed")
    train(full, a, log=quiet)
    first, again = [], []
    train(half, b, log=first.append)
    train(full, b, log=again.append)
    # One true line each: the new run starts from init_from, the resumed one from its own
    # checkpoint (init_from is not loaded again).
    assert any(m.startswith("initialised the model weights from") for m in first)
    assert not any("init_from" in m for m in again), again
    assert any(m.startswith("resumed from") and "ckpt-3" in m for m in again)
    wa, wb = _ckpt(a, prefix=""), _ckpt(b, prefix="")  # base, adapters, optimizer slots
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    la, lb = adapter_weights(load_workdir(a)[0]), adapter_weights(load_workdir(b)[0])
    assert la.keys() == lb.keys() and len(la) == 2 * 2 * 7
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)


def test_freeze_trains_only_the_last_blocks_and_named_modules(stdlib_data, source, tmp_path):
    _, data_dir, _ = stdlib_data
    src, _ = source
    exp = _exp(data_dir, src, train={"finetuning_type": "freeze", "steps": 3},
               freeze=FreezeConfig(trainable_layers=1, modules="lm_head"))
    wd = str(tmp_path / "freeze")
    train(exp, wd, log=quiet)
    rel = lambda m: {v.path.split("/", 1)[1]: v.numpy() for v in m.variables}  # noqa: E731
    before, after = rel(load_workdir(src)[0]), rel(load_workdir(wd)[0])
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all("layers_1" in k or "lm_head" in k for k in changed), changed
    for k in before:  # frozen: bitwise unchanged
        if "layers_1" not in k and "lm_head" not in k:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    with pytest.raises(ConfigError, match="nothing to train"):
        from deepseek_tf.train.finetune import apply_freeze
        apply_freeze(random_model("gqa"), FreezeConfig(trainable_layers=0))


def test_sft_loss_ignores_masked_tokens():
    from deepseek_tf.train.objectives import token_loss

    model = random_model("gqa")
    t = 8
    inputs = tf.constant([[256, 10, 11, 12, 13, 14, 15, 16]])
    mask = tf.constant([[0, 0, 0, 1, 1, 1, 1, 1]], tf.float32)
    batch = {"inputs": inputs, "segment_ids": tf.ones([1, t], tf.int32),
             "positions": tf.range(t)[None], "loss_mask": mask,
             "targets": tf.constant([[10, 11, 12, 13, 14, 15, 16, 257]])}
    changed = dict(batch, targets=tf.constant([[99, 98, 97, 13, 14, 15, 16, 257]]))
    a, b = token_loss(model, batch, False)[0], token_loss(model, changed, False)[0]
    assert float(a) == float(b)
    answer_changed = dict(batch, targets=tf.constant([[10, 11, 12, 99, 14, 15, 16, 257]]))
    assert float(token_loss(model, answer_changed, False)[0]) != float(a)


def test_lora_dropout_acts_in_training_only():
    model = random_model("gqa")
    apply_lora(model, LoraConfig(rank=2, dropout=0.5, targets="all"))
    for v in model.trainable_variables:
        v.assign(tf.random.stateless_normal(v.shape, [5, 6]) * 0.2)
    a, b = model(IDS).numpy(), model(IDS).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(merged_model(model)(IDS).numpy(), a, atol=1e-5)
    assert np.abs(model(IDS, training=True).numpy() - a).max() > 1e-4


def test_lora_on_mla_moe_trains_only_adapters(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    src, _ = make_workdir(str(tmp_path / "src"), "mla_moe", seed=4)
    model_cfg = Experiment.load(os.path.join(src, "config.json")).model
    exp = tiny.experiment(data_dir, model={**model_cfg.to_dict(), "bias_update_speed": 0.0},
                          train={"steps": 2, "eval_every": 0, "init_from": src,
                                 "finetuning_type": "lora"})
    exp = dataclasses.replace(exp, lora=LoraConfig(rank=2, targets="all"))
    wd = str(tmp_path / "run")
    train(exp, wd, log=quiet)
    rel = lambda m: {v.path.split("/", 1)[1]: v.numpy() for v in m.variables}  # noqa: E731
    before, after = rel(load_workdir(src)[0]), rel(load_workdir(wd)[0])
    for k, v in before.items():  # routed experts, router, norms, MLA projections: unchanged
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in after.items() if k.endswith("lora_kernel_b"))


def test_saved_model_export_of_a_lora_model_serves_the_merged_weights(tmp_path):
    from deepseek_tf.export import export

    path, _ = make_workdir(str(tmp_path / "wd"), "mla", seed=6)
    model, exp = load_workdir(path)
    lora = LoraConfig(rank=2, targets="all")
    apply_lora(model, lora)
    for v in model.trainable_variables:
        v.assign(tf.random.stateless_normal(v.shape, [7, 8]) * 0.1)
    exp = dataclasses.replace(exp, lora=lora, train=exp.train.replace(finetuning_type="lora"))
    out = str(tmp_path / "sm" / "1")
    msgs = []
    export(model, exp, "saved_model", out, log=msgs.append, workdir=path, max_length=16,
           max_new_tokens=4)
    assert any("merging the LoRA adapters" in m for m in msgs)
    ids = IDS.numpy()
    got = tf.saved_model.load(out).signatures["score"](
        input_ids=tf.constant(ids), lengths=tf.constant([ids.shape[1]]))["log_probs"].numpy()
    logp = tf.nn.log_softmax(model(IDS)).numpy()[0]
    want = [0.0] + [logp[t - 1, ids[0, t]] for t in range(1, ids.shape[1])]
    np.testing.assert_allclose(got[0], want, atol=1e-4)


def test_train_cli_refuses_a_model_flag_that_contradicts_init_from(source, tmp_path):
    import subprocess
    import sys
    src, _ = source
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "deepseek_tf.train", f"--workdir={tmp_path}/r",
                          f"--train.init_from={src}", "--model.hidden_size=64"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: --model.hidden_size=64 contradicts --train.init_from=")
    assert not os.path.exists(f"{tmp_path}/r")


def test_lora_dropout_with_remat_is_refused():
    with pytest.raises(ConfigError, match="remat"):
        Experiment(train=TrainConfig(finetuning_type="lora", remat="block"),
                   lora=LoraConfig(dropout=0.1))
