"""--train.remat through the training loop: same training with and without, dropout on."""

import numpy as np

from deepseek_tf.train.loop import train
from tests.helpers import tiny
from tests.helpers.checkpoints import checkpoint_tensors

quiet = lambda *_: None  # noqa: E731


def test_block_remat_trains_like_no_remat_with_dropout(stdlib_data, tmp_path):
    _, data_dir, _ = stdlib_data
    model = {"attention_dropout": 0.1, "hidden_dropout": 0.1}
    runs = {}
    for remat in ("none", "block"):
        exp = tiny.experiment(data_dir, model=model, train={
            "steps": 3, "grad_accum_steps": 2, "batch_size": 2, "remat": remat,
            "eval_every": 0})
        runs[remat] = train(exp, str(tmp_path / remat), log=quiet)
    a, b = (checkpoint_tensors(str(tmp_path / r)) for r in ("none", "block"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(runs["block"]["train"]["loss"], runs["none"]["train"]["loss"],
                               rtol=1e-5)
