"""`--train.precision=auto` / `--train.jit_compile=auto`: the rules, the measurement, and
a resumed run that keeps the saved choice."""

import json

import pytest

from deepseek_tf.config import SECTIONS, Experiment, TrainConfig
from deepseek_tf.flags import reconcile
from deepseek_tf.train import autotune
from deepseek_tf.train.loop import train
from tests.helpers import tiny

quiet = lambda *_: None  # noqa: E731


@pytest.mark.parametrize("flags,gpus,expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, [], "mixed_bfloat16"),
    ({"avx512f", "amx_bf16", "amx_tile"}, [], "mixed_bfloat16"),
    ({"avx2", "avx512f"}, [], "float32"),
    (set(), [(8, 0), (9, 0)], "mixed_bfloat16"),
    ({"avx512_bf16"}, [(8, 6), (7, 5)], "float32"),  # the GPUs decide, and one is old
])
def test_precision_rule(flags, gpus, expected):
    choice, why = autotune.choose_precision(flags, gpus)
    assert choice == expected and why


def test_explicit_float16_without_a_gpu_gets_a_warning_that_names_the_way_out():
    warning = autotune.precision_warning("mixed_float16", [])
    assert "mixed_bfloat16" in warning and "--train.precision" in warning
    assert autotune.precision_warning("mixed_float16", [(8, 0)]) is None
    assert autotune.precision_warning("mixed_bfloat16", []) is None
    assert autotune.precision_warning("float32", []) is None


def test_cpu_flags_of_this_machine_are_read():
    assert "sse2" in autotune.cpu_flags() or not autotune.cpu_flags()


def test_jit_rule_keeps_the_faster():
    assert autotune.choose_jit({"xla": 0.1, "no_xla": 0.3})[0] is True
    use, why = autotune.choose_jit({"xla": 0.4, "no_xla": 0.2})
    assert use is False and "0.50x" in why


@pytest.mark.parametrize("jit", [False, True])
def test_the_timed_step_runs_the_backward_pass(jit):
    """`auto` times what it claims: the callable's result is the gradients' global norm,
    so the backward pass cannot be pruned from the uncompiled side. (It returned the loss
    alone: TensorFlow then dropped the backward from the uncompiled timing, and `auto`
    compared XLA's forward + backward with a forward, choosing no XLA at 2.5x.)"""
    import numpy as np
    import tensorflow as tf

    from deepseek_tf.model import DeepSeekCausalLM, token_losses
    from deepseek_tf.train.step import make_grad_fn

    model = DeepSeekCausalLM(tiny.model_config())
    tcfg = TrainConfig(batch_size=2)
    batch = autotune.random_batch(264, 1, 2, 16)
    model(batch["inputs"][0])
    norm = autotune.grad_norm_fn(make_grad_fn(model, 1, jit), tcfg, batch,
                                 tf.distribute.get_strategy())()
    with tf.GradientTape() as tape:
        logits = model(batch["inputs"][0], training=True)
        loss = tf.reduce_sum(token_losses(logits, batch["targets"][0])) / 32.0
    expected = float(tf.linalg.global_norm(tape.gradient(loss, model.trainable_variables)))
    assert norm > 0 and np.isclose(norm, expected, rtol=0.05), (norm, expected)


def test_jit_compile_accepts_old_bools_and_refuses_unresolved_auto():
    assert TrainConfig(jit_compile=True).jit_compile == "true"
    assert TrainConfig.from_dict({"jit_compile": False}).xla is False  # old config.json
    with pytest.raises(ValueError, match="not resolved"):
        TrainConfig(jit_compile="auto").xla


def test_given_auto_keeps_a_saved_choice():
    saved = Experiment(train=TrainConfig(jit_compile="false", precision="mixed_bfloat16",
                                         auto_decisions="precision: auto -> x"))
    given = {s: {} for s in SECTIONS if s != "train"}
    given["train"] = {"jit_compile": "auto", "precision": "auto", "steps": 7}
    out = reconcile(saved, given, "config.json")
    assert (out.train.jit_compile, out.train.precision, out.train.steps) == (
        "false", "mixed_bfloat16", 7)


def test_resumed_auto_run_keeps_the_saved_choice(stdlib_data, tmp_path, monkeypatch):
    """...and the first run's train step calls the grad function the timing traced and
    compiled (one trace in all: no second trace or XLA compilation of the model)."""
    from deepseek_tf.train import loop

    _, data_dir, _ = stdlib_data
    auto = {"precision": "auto", "jit_compile": "auto", "eval_every": 0, "log_every": 1}
    given, make_step = [], loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: given.append(
        k["grad_fn"]) or make_step(*a, **k))
    msgs = []
    train(tiny.experiment(data_dir, train={**auto, "steps": 2, "checkpoint_every": 2}),
          str(tmp_path), log=msgs.append)
    assert given[0] is not None and given[0].experimental_get_tracing_count() == 1
    saved = json.loads((tmp_path / "config.json").read_text())["train"]
    assert saved["precision"] in autotune.PRECISIONS
    assert saved["jit_compile"] in ("true", "false")
    notes = saved["auto_decisions"]
    assert "precision: auto -> " + saved["precision"] in notes
    assert "jit_compile: auto -> " + saved["jit_compile"] in notes and "ms with XLA" in notes
    assert any(m.startswith("jit_compile: auto -> ") for m in msgs)
    assert any(m.startswith("precision: auto -> ") for m in msgs)

    def no_second_decision(*a, **k):
        raise AssertionError("a resumed run decided again")

    monkeypatch.setattr(autotune, "grad_norm_fns", no_second_decision)
    monkeypatch.setattr(autotune, "resolve_precision", no_second_decision)
    msgs = []
    result = train(tiny.experiment(data_dir, train={**auto, "steps": 3}), str(tmp_path),
                   log=msgs.append)
    assert result["step"] == 3
    again = json.loads((tmp_path / "config.json").read_text())["train"]
    assert {k: again[k] for k in ("precision", "jit_compile", "auto_decisions")} == \
        {k: saved[k] for k in ("precision", "jit_compile", "auto_decisions")}
    assert any("auto settings kept from config.json" in m for m in msgs)


def test_profile_steps_write_a_trace_into_the_tensorboard_dir(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    msgs = []
    train(tiny.experiment(data_dir, train={"steps": 3, "profile_steps": "2,3",
                                           "eval_every": 0}), str(tmp_path), log=msgs.append)
    traces = list((tmp_path / "tensorboard").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert any("profiled steps 2-3" in m for m in msgs)
    # deepseek_tf.tools.profile_summary reads it without TensorBoard: the step's matmuls are there.
    from deepseek_tf.tools import profile_summary
    lines = profile_summary.summary(str(tmp_path), top=50)
    assert "2 step(s)" in lines[1]
    assert any("MatMul" in line or "Einsum" in line for line in lines[3:]), lines


@pytest.mark.parametrize("value", ["3", "0,2", "4,2", "a,b"])
def test_bad_profile_steps_are_refused(value):
    from deepseek_tf.errors import ConfigError

    with pytest.raises(ConfigError, match="profile_steps"):
        TrainConfig(profile_steps=value)
