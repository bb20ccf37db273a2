"""4-bit weights with Keras' quantizers: the SavedModel's size, its log-probs against
float, saved_model_cli, GPTQ/AWQ against round-to-nearest, bad input."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.data.shards import read_metadata
from deepseek_tf.errors import UserError
from deepseek_tf.export import export
from deepseek_tf.quantize import quantize_run
from deepseek_tf.scoring import score_tokens
from deepseek_tf.workdir import load_experiment, load_run_tokenizer, load_workdir
from tests.export.test_saved_model import MAX_LENGTH, PROMPT, _saved_model_cli_run
from tests.helpers.corpora import read_split
from tests.helpers.workdirs import make_workdir

quiet = lambda *_: None  # noqa: E731


def _variables_size(path):
    return os.path.getsize(os.path.join(path, "variables", "variables.data-00000-of-00001"))


def test_int4_saved_model_is_under_a_fifth_and_runs_in_saved_model_cli(tmp_path):
    """A dense model (every projection and the untied embedding and head quantized,
    group size 128): variables <= 0.2x float32; `saved_model_cli run` (a session loader,
    as TF Serving's) decodes. Its weights are random N(0, 0.2) (no outliers, large
    logits), so the log-prob tolerance is checked on a trained run below."""
    size = dict(hidden_size=128, intermediate_size=256)
    sizes = {}
    for mode in ("none", "int4"):
        workdir, model = make_workdir(str(tmp_path / f"run_{mode}"), "gqa", **size)
        path = str(tmp_path / mode)
        export(model, load_experiment(workdir), "saved_model", path, log=quiet,
               workdir=workdir, max_length=MAX_LENGTH, quantize=mode)
        sizes[mode] = _variables_size(path)
    assert sizes["int4"] <= 0.2 * sizes["none"], sizes
    run = _saved_model_cli_run(path, tmp_path, PROMPT[:3], 5)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "output_lengths" in run.stdout and "[5]" in run.stdout


def _validation_loss(model, data_dir, seq_len=32):
    """Mean next-token NLL over the validation split, cut in windows of `seq_len`."""
    docs = np.concatenate([ids for ids, _ in read_split(data_dir, read_metadata(data_dir),
                                                         "validation")])
    n = docs.size // seq_len
    ids = tf.constant(docs[:n * seq_len].reshape(n, seq_len).astype(np.int32))
    log_probs, _ = score_tokens(model, ids)
    return float(-tf.reduce_sum(log_probs) / (n * (seq_len - 1)))


def test_gptq_and_awq_beat_round_to_nearest_and_the_4bit_saved_model_is_close(
        trained_moe_run, tmp_path):
    """On the trained MLA + MoE run (calibrated on its own train split, scored on its
    validation split, group size 16): GPTQ and AWQ lose less than plain int4 (on the
    same float model they start from: no Keras calibration => identical to int4). The
    AWQ SavedModel's per-token log-probs stay within 0.1 nats of the float model's."""
    exp = load_experiment(trained_moe_run)
    losses = {}
    for mode in ("none", "int4", "gptq", "awq"):
        model, _ = load_workdir(trained_moe_run)
        if mode == "none":
            reference = model
        quantize_run(model, exp, load_run_tokenizer(trained_moe_run, exp), mode, 16,
                     calibration_samples=16)
        losses[mode] = _validation_loss(model, exp.data.data_dir)
    print(losses)
    path = str(tmp_path / "awq")
    export(model, exp, "saved_model", path, log=quiet, workdir=trained_moe_run,
           max_length=MAX_LENGTH, quantize="none")              # already quantized: awq
    ids = tf.constant([PROMPT])
    served = tf.saved_model.load(path).signatures["score"](
        input_ids=ids, lengths=tf.constant([len(PROMPT)]))["log_probs"].numpy()
    float_scores = score_tokens(reference, ids)[0].numpy()
    np.testing.assert_allclose(served, float_scores, atol=0.1)
    assert not np.array_equal(served, float_scores)
    assert losses["int4"] > losses["none"], losses
    assert losses["gptq"] < losses["int4"], losses
    assert losses["awq"] < losses["int4"], losses


def test_bad_group_size_and_missing_calibration_data_are_refused(tmp_path):
    workdir, model = make_workdir(str(tmp_path / "run"), "gqa")     # hidden 32, no data
    exp, tok = load_experiment(workdir), load_run_tokenizer(workdir, load_experiment(workdir))
    with pytest.raises(UserError, match="--group_size=48 does not divide the input width"):
        quantize_run(model, exp, tok, "int4", 48)
    with pytest.raises(UserError, match="--quantize=gptq needs calibration data"):
        quantize_run(model, dataclasses.replace(exp, data=exp.data.replace(data_dir="")), tok,
                     "gptq", 16)
    with pytest.raises(UserError, match="--calibration_data=.*no such file"):
        quantize_run(model, exp, tok, "awq", 16, calibration_data=str(tmp_path / "nope"))
    short = tmp_path / "short.txt"
    short.write_text("hi\n")
    with pytest.raises(UserError, match="fewer than one window"):
        quantize_run(model, exp, tok, "awq", 16, calibration_data=str(short))
