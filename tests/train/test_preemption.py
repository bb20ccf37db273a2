"""SIGTERM during training: a checkpoint is saved, and the restarted run continues bitwise.

(The multi-worker case, SIGTERM to one of two workers, is in test_multiworker.py.)
"""

import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf import exit_codes
from deepseek_tf.train.loop import train
from deepseek_tf.train.preemption import Preempted
from tests.helpers import tiny
from tests.helpers.checkpoints import checkpoint_tensors, tf_warnings

quiet = lambda *_: None  # noqa: E731


def test_sigterm_saves_a_checkpoint_and_the_restart_resumes_bitwise(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    exp = tiny.experiment(data_dir, train={"steps": 5, "checkpoint_every": 100,
                                           "eval_every": 0, "log_every": 1})
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    reference = train(exp, full, log=quiet)

    def sigterm_when_armed(msg):  # the watcher is installed before this line is logged
        if msg.startswith("preemption:"):
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as caught, tf_warnings() as warnings:
        train(exp, cut, log=sigterm_when_armed)
    assert not [w for w in warnings if "deprecated" in w], warnings  # TF's total_run_calls
    assert caught.value.exit_code == exit_codes.PREEMPTED == 42
    saved = caught.value.step
    assert 0 < saved < 5
    assert tf.train.latest_checkpoint(os.path.join(cut, "checkpoints")).endswith(f"-{saved}")
    assert signal.getsignal(signal.SIGTERM) is before  # our handler is gone again

    msgs = []
    resumed = train(exp, cut, log=msgs.append)
    assert any(f"at step {saved}" in m for m in msgs), msgs
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    a, b = checkpoint_tensors(full), checkpoint_tensors(cut)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
