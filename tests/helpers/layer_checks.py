"""One helper that every layer test goes through.

`check_layer` asserts the output shape and dtype, that `get_config` round-trips
through JSON (a layer rebuilt from its serialized config, given the same weights,
gives the same output), that `get_config` names every argument of `__init__` (so a
forgotten field fails even when the test uses its default), and that every
trainable weight receives a gradient (but those under `no_gradient` sub-layers,
e.g. an indexer that only its own loss trains). Layers that return a tuple are
checked on its first element; layers that return a dict on `output_key`.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import tensorflow as tf


def _first(out, output_key):
    if isinstance(out, dict):
        return out[output_key]
    return out[0] if isinstance(out, (tuple, list)) else out


def check_layer(layer, args: tuple, kwargs: dict | None = None, *, expected_shape,
                expected_dtype=tf.float32, atol: float = 1e-6, output_key: str | None = None,
                no_gradient: tuple[str, ...] = ()):
    kwargs = kwargs or {}
    with tf.GradientTape() as tape:
        out = layer(*args, **kwargs)
        first = _first(out, output_key)
        loss = tf.reduce_sum(tf.square(tf.cast(first, tf.float32)))
    assert tuple(first.shape) == tuple(expected_shape), (first.shape, expected_shape)
    assert first.dtype == expected_dtype, first.dtype
    assert np.all(np.isfinite(first.numpy()))

    if layer.trainable_weights:
        grads = tape.gradient(loss, layer.trainable_weights)
        missing = [w.path for w, g in zip(layer.trainable_weights, grads) if g is None
                   and not any(f"/{n}/" in w.path for n in no_gradient)]
        assert not missing, f"no gradient for {missing}"

    config = layer.get_config()
    params = [n for n, p in inspect.signature(type(layer).__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    forgotten = [n for n in params if n not in config]
    assert not forgotten, f"get_config() of {type(layer).__name__} forgets {forgotten}"
    config = json.loads(json.dumps(config))  # what a saved model stores
    clone = type(layer).from_config(config)
    clone(*args, **kwargs)  # build
    assert clone.get_config() == config
    assert len(clone.weights) == len(layer.weights)
    for dst, src in zip(clone.weights, layer.weights):
        dst.assign(src)
    clone_out = clone(*args, **kwargs)
    clone_first = _first(clone_out, output_key)
    np.testing.assert_allclose(clone_first.numpy(), first.numpy(), atol=atol)
    return out
