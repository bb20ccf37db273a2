"""NaN gradients injected once, for recovery tests; in-process or as a trainer worker.

    NAN_AT_STEP=K python -m tests.helpers.nan_train <train flags>

is `python -m deepseek_tf.train` whose gradients are NaN at the K-th optimizer step
(counted over the whole run, resumes included), once: the flag that fires is outside
the checkpoint, so the step replayed after the rollback is clean. Launcher tests run it
with `--module=tests.helpers.nan_train`.
"""

import os

import tensorflow as tf

from deepseek_tf.train import loop


def nan_once_at(make_train_step, k: int):
    """`make_train_step` whose steps add NaN to the first gradient at optimizer step k.
    (Its flag variable is made with the step: a multi-worker strategy must come first.)"""

    def with_fault(model, optimizer, *args, **kwargs):
        armed = tf.Variable(True, trainable=False)

        def hook(grads, replica_id):
            fire = tf.logical_and(armed, tf.equal(optimizer.iterations, k - 1))
            armed.assign(tf.logical_and(armed, tf.logical_not(fire)))
            return [grads[0] + tf.where(fire, float("nan"), 0.0)] + list(grads[1:])
        return make_train_step(model, optimizer, *args, grad_hook=hook, **kwargs)

    return with_fault


if __name__ == "__main__":
    loop.make_train_step = nan_once_at(loop.make_train_step, int(os.environ["NAN_AT_STEP"]))
    from deepseek_tf.train.__main__ import entry
    entry()
