"""GPTQ's error feedback (`deepseek_tf.gptq`) against the GPTQ paper's update written out
column by column in numpy."""

import keras
import numpy as np
from keras.src.quantizers.gptq import GPTQ
from keras.src.quantizers.gptq_config import GPTQConfig

from deepseek_tf.gptq import cholesky_updates
from tests.helpers.quantized import dequantized

IN, OUT = 40, 24


def _quantized(x, kernel, group_size=-1):
    """A Dense layer with `kernel`, quantized by the GPTQ class in force on inputs `x`;
    (the kernel it stores (in, out), the Hessian it saw)."""
    from keras.src.quantizers import gptq_core
    layer = keras.layers.Dense(OUT, use_bias=False)
    layer.build((None, IN))
    layer.kernel.assign(kernel)
    config = GPTQConfig(dataset=[np.zeros(4, np.int32)], tokenizer=object(), weight_bits=4,
                        group_size=group_size, activation_order=True)
    layer.quantize("gptq", config=config)
    gptq = gptq_core.GPTQ(layer, config)
    gptq.update_hessian_with_batch(x)
    hessian = np.asarray(gptq.hessian, np.float64)
    gptq.quantize_and_correct_layer()
    return dequantized(layer)[0], hessian


def _paper_gptq(kernel, hessian, damping=0.01):
    """GPTQ as the paper states it (its eq. 3), one column at a time in activation order
    with one 4-bit scale per output channel: each column's rounding error goes to the
    columns not yet quantized through the inverse Hessian of those columns, which is
    updated after every column. Returns the quantized kernel (in, out)."""
    diagonal = np.diag(hessian) + damping * np.mean(np.diag(hessian))
    h = hessian.copy()
    np.fill_diagonal(h, diagonal)
    order = np.argsort(-diagonal, kind="stable")
    w = kernel.T.astype(np.float64)[:, order]                         # (out, in)
    scale = (w.max(1) - w.min(1)) / 15
    zero = np.round(-w.min(1) / scale)
    inverse = np.linalg.inv(h[order][:, order])
    q = np.zeros_like(w)
    for c in range(IN):
        q[:, c] = (np.clip(np.round(w[:, c] / scale + zero), 0, 15) - zero) * scale
        error = (w[:, c] - q[:, c]) / inverse[c, c]
        w[:, c + 1:] -= np.outer(error, inverse[c, c + 1:])
        inverse = inverse - np.outer(inverse[:, c], inverse[c]) / inverse[c, c]
    out = np.empty_like(q)
    out[:, order] = q
    return out.T


def test_the_cholesky_updates_are_the_papers_and_keras_dense_inverse_is_not():
    """Correlated inputs (a Hessian far from diagonal): the stored kernel equals the
    paper's column-by-column GPTQ, with an output error well below round-to-nearest's;
    Keras 3.15's own update (rows of the dense inverse) differs and leaves more error."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(512, IN)) @ (np.eye(IN) + 0.5 * rng.normal(size=(IN, IN)))
         ).astype(np.float32)                                              # (N, in)
    kernel = rng.normal(0, 0.1, (IN, OUT)).astype(np.float32)              # (in, out)
    with cholesky_updates():
        ours, hessian = _quantized(x, kernel)
    keras_own, _ = _quantized(x, kernel)
    paper = _paper_gptq(kernel, hessian)
    np.testing.assert_allclose(ours, paper, atol=1e-6)

    def output_error(w):
        return float(np.sum((x @ (w - kernel)) ** 2))
    lo, hi = kernel.min(0), kernel.max(0)
    scale, zero = (hi - lo) / 15, np.round(-lo / ((hi - lo) / 15))
    rtn = (np.clip(np.round(kernel / scale + zero), 0, 15) - zero) * scale
    errors = {k: output_error(w) for k, w in (("rtn", rtn), ("ours", ours),
                                              ("keras", keras_own))}
    print(errors)
    assert not np.allclose(keras_own, paper, atol=1e-6)
    assert errors["ours"] < 0.6 * errors["rtn"] and errors["ours"] < errors["keras"], errors
    from keras.src.quantizers import gptq_core
    assert gptq_core.GPTQ is GPTQ                            # Keras' own class is back
