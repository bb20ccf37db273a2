"""The fused AdamW update equals Keras' AdamW (the reference), on one device and mirrored."""

import os

import keras
import numpy as np
import tensorflow as tf

from deepseek_tf.config import OptimConfig
from deepseek_tf.train.optimizer import AdamW, make_schedule


def _run(fused: bool, strategy=None, steps: int = 5, scale=None, premultiply: float = 1.0):
    """Weights, moments and iterations after `steps` updates with varying gradients
    (times `premultiply`; applied inside `scaled_gradients(scale)` if `scale`)."""
    strategy = strategy or tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    grads = [[rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")]
             for _ in range(steps)]
    with strategy.scope():
        w = keras.Variable(rng.normal(size=(3, 4)).astype("float32"), name="kernel")
        b = keras.Variable(rng.normal(size=(4,)).astype("float32"), name="bias")
        opt = AdamW(learning_rate=make_schedule(OptimConfig(learning_rate=0.05, warmup_steps=2),
                                                steps),
                    weight_decay=0.3, beta_1=0.9, beta_2=0.95, epsilon=1e-8, fused=fused)
        opt.exclude_from_weight_decay(var_list=[b])
        opt.build([w, b])

    def apply(gw, gb):
        if scale is None:
            return opt.apply_gradients([(gw, w), (gb, b)])
        with opt.scaled_gradients(tf.constant(scale)):
            opt.apply_gradients([(gw, w), (gb, b)])

    @tf.function
    def step(gw, gb):
        strategy.run(apply, args=(gw, gb))

    for gw, gb in grads:
        step(tf.constant(gw * premultiply), tf.constant(gb * premultiply))
    values = {"w": w, "b": b, "m_w": opt._momentums[0], "v_w": opt._velocities[0],
              "m_b": opt._momentums[1]}
    replicas = {k: [c.numpy() for c in strategy.experimental_local_results(v.value)]
                for k, v in values.items()}
    return replicas, int(opt.iterations.numpy())


def test_fused_update_equals_keras_adamw_with_decay_exclusions_and_schedule():
    fused, n_fused = _run(True)
    keras_ref, n_ref = _run(False)
    assert n_fused == n_ref == 5
    for k in keras_ref:
        np.testing.assert_allclose(fused[k][0], keras_ref[k][0], rtol=1e-5, atol=1e-6, err_msg=k)
    # Every step moved the weights (the comparison above is not between two no-ops).
    assert not np.allclose(fused["w"][0], _run(True, steps=1)[0]["w"][0])


def test_fused_update_keeps_mirrored_replicas_identical():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored, _ = _run(True, strategy)
    single, _ = _run(True)
    for k, (a, b) in mirrored.items():
        np.testing.assert_array_equal(a, b, err_msg=k)
        np.testing.assert_allclose(a, single[k][0], rtol=1e-6, atol=1e-7, err_msg=k)


def test_scaled_gradients_apply_the_scaled_gradient_fused_unfused_and_mirrored():
    """The step's clipping coefficient goes in through `scaled_gradients`; Keras' AdamW
    on pre-multiplied gradients is the reference."""
    keras_ref, _ = _run(False, premultiply=0.3)
    runs = {"fused": _run(True, scale=0.3)[0], "unfused": _run(False, scale=0.3)[0],
            "mirrored": _run(True, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                             scale=0.3)[0]}
    for name, got in runs.items():
        for k in keras_ref:
            for replica in got[k]:
                np.testing.assert_allclose(replica, keras_ref[k][0], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name} {k}")
    # The scale mattered: unscaled gradients give other moments.
    assert not np.allclose(_run(True)[0]["m_w"][0], keras_ref["m_w"][0])


def test_keras_pin_covers_the_private_members_the_fused_adamw_uses():
    """setup.py pins Keras to one minor release because the fused AdamW overrides
    private members; this fails when the installed Keras is not that release or when
    one of those members is gone (then re-check the fused path against Keras')."""
    import re

    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "setup.py")).read()
    pin = re.search(r'"keras==(\d+\.\d+)\.\*"', setup).group(1)
    assert keras.__version__.startswith(pin + "."), (keras.__version__, pin)
    opt = AdamW(learning_rate=1e-3)
    var = keras.Variable(np.ones((2, 2), np.float32))
    opt.build([var])
    for name in ("_get_variable_index", "_use_weight_decay", "_apply_weight_decay",
                 "_all_reduce_sum_gradients", "_momentums", "_velocities"):
        assert hasattr(opt, name), name
    assert opt._momentums[opt._get_variable_index(var)].shape == (2, 2)
