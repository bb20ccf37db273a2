"""TFLite export with a KV cache: `decode` and `prefill_<N>` signatures (LiteRT-LM).

The file follows the contract of Google's on-device LLM runtime, LiteRT-LM (and
runs in `ai_edge_litert`'s interpreter through its signature runners):

    prefill_<N>  tokens int32 [1, N], input_pos int32 [N], kv_cache_k_<i>,
                 kv_cache_v_<i> (every layer i)  ->  the caches, updated
    decode       tokens int32 [1, 1], input_pos int32 [1], the caches
                 ->  logits float32 [1, 1, vocab], the caches, updated

Every cache tensor is [1, heads, context, width] (the context on axis 2, where
the runtime reads it): GQA keys / values [1, K, C, head_dim]; MLA the compressed
latent [1, 1, C, kv_lora_rank] as `kv_cache_k_<i>` and the rotated RoPE key
[1, 1, C, qk_rope_head_dim] as `kv_cache_v_<i>` (absorbed decode), so the edge
cache is as small as the server's; DeepSeek-V4 the window keys [1, 1, C, head_dim]
as `k` and, side by side as `v`, its compressors' per-token projections (the
not-yet-compressed tail) and their compressed entries (entry w in row w; a
sliding-window layer: a [1, 1, C, 1] placeholder). The caller owns the cache tensors
and feeds each call's outputs to the next call.

Positions: a call's tokens go to cache slots input_pos[0] + j. A runtime pads a
short prefill chunk with token 0 at input_pos 0; those entries land in the slots
just after the real tokens (or beyond the context: no write), which the following
steps overwrite before any query can attend them, so padding never corrupts the
cache. Attention is masked by slot, never by cache contents (a runtime does not
zero the cache between sessions).

Only TFLite builtin ops are allowed: LiteRT runtimes ship no Flex (SELECT_TF_OPS)
delegate, so a graph that would need one is refused with the op names. MoE layers
use expert buffers of all the call's tokens (static shapes, still dropless).

Example:
    >>> path = export_tflite(model, exp, "out/tiny.tflite", context=256,
    ...                      prefill_lengths=(32,), quantize="int8")
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import tensorflow as tf

from deepseek_tf.errors import UserError

QUANTIZE = ("none", "fp16", "int8", "int4")
#: int4 block sizes (inputs per scale) LiteRT's quantizer offers; -1 = one per channel.
INT4_GROUPS = (32, 64, 128, 256, -1)


def cache_names(num_layers: int) -> list[str]:
    """The cache tensor names, in the model's (layer, k/v) order."""
    return [f"kv_cache_{kv}_{i}" for i in range(num_layers) for kv in ("k", "v")]


def edge_pair_shapes(shapes) -> tuple:
    """A layer's cache shapes as the contract's one K/V pair: GQA and MLA caches are
    pairs already; DeepSeek-V4's window keys are `k`, its compressors' per-token
    projections and entries side by side on the last axis are `v` (a sliding layer, which
    has none, gets a [1, 1, C, 1] placeholder)."""
    if len(shapes) == 2:
        return tuple(shapes)
    rest = shapes[1:] or [shapes[0][:3] + (1,)]
    return shapes[0], shapes[0][:3] + (sum(s[3] for s in rest),)


def pack_edge_pair(cache) -> tuple:
    """A layer's cache tensors as (k, v) (`edge_pair_shapes`)."""
    if len(cache) == 2:
        return tuple(cache)
    if len(cache) == 1:
        return cache[0], tf.zeros(tf.concat([tf.shape(cache[0])[:3], [1]], 0), cache[0].dtype)
    return cache[0], tf.concat(cache[1:], axis=-1)


def unpack_edge_pair(k, v, shapes) -> tuple:
    """The inverse of `pack_edge_pair` for a layer whose `cache_shape` is `shapes`."""
    if len(shapes) == 2:
        return k, v
    if len(shapes) == 1:
        return (k,)
    return (k, *tf.split(v, [s[3] for s in shapes[1:]], axis=-1))


class EdgeModule(tf.Module):
    """The exported module: the model's variables and the signature functions.

    Args:
      model: a built `DeepSeekCausalLM` (float32).
      context: the cache length C (prompt + generated tokens).
      prefill_lengths: one `prefill_<N>` signature per N.
      absorb: MLA decodes in latent space (the cache holds the latent).
    """

    def __init__(self, model, context: int, prefill_lengths=(32,), absorb: bool = True):
        super().__init__()
        self.model = model
        # The tf.Variables themselves: with only Keras 3 layers tracked the converter
        # leaves the weights out of the file.
        self.weights = [v.value for v in model.variables]
        self.context, self.absorb = int(context), absorb
        self.prefill_lengths = tuple(sorted({int(n) for n in prefill_lengths}))
        self.names = cache_names(len(model.blocks))
        self.layer_shapes = [block.self_attn.cache_shape(1, self.context)
                             for block in model.blocks]
        shapes = [s for layer in self.layer_shapes for s in edge_pair_shapes(layer)]
        self.cache_specs = [tf.TensorSpec(s, tf.float32, name=n)
                            for s, n in zip(shapes, self.names)]

    def step(self, tokens, input_pos, caches):
        """(logits (1, T, V), {name: updated cache}) for one call of the contract."""
        layers = tuple(unpack_edge_pair(k, v, shapes) for k, v, shapes in
                       zip(caches[0::2], caches[1::2], self.layer_shapes))
        logits, new = self.model.call_cached(tokens, layers, input_pos[0], absorb=self.absorb,
                                             static_moe=True)
        flat = [t for layer in new for t in pack_edge_pair(layer)]
        return logits, {n: tf.identity(t, name=n) for n, t in zip(self.names, flat)}

    def function(self, n: int, with_logits: bool):
        """The tf.function of `prefill_<n>` (or `decode`: n = 1 with logits)."""

        def signature(tokens, input_pos, *caches):
            logits, out = self.step(tokens, input_pos, list(caches))
            if with_logits:
                out["logits"] = tf.identity(logits, name="logits")
            return out

        return tf.function(signature, autograph=False, input_signature=[
            tf.TensorSpec([1, n], tf.int32, name="tokens"),
            tf.TensorSpec([n], tf.int32, name="input_pos"), *self.cache_specs])

    def signatures(self) -> dict:
        sigs = {f"prefill_{n}": self.function(n, with_logits=False)
                for n in self.prefill_lengths}
        sigs["decode"] = self.function(1, with_logits=True)
        return sigs


def convert(saved_model_dir: str, signature_keys, quantize: str = "none",
            group_size: int = 32) -> bytes:
    """The TFLite flatbuffer of a SavedModel's signatures, builtin ops only (int4: the
    float flatbuffer through `int4_weights`)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir,
                                                         signature_keys=list(signature_keys))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":  # dynamic-range: int8 weights, float activations
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    from deepseek_tf.quiet import quiet_stderr
    try:
        with quiet_stderr():  # the converter's C++ chatter; shown if it fails
            data = converter.convert()
    except Exception as e:  # ConverterError: name the ops that would need Flex
        text = str(e)
        if "Select TF ops" in text or "flex" in text.lower() or "not supported" in text:
            ops = sorted(set(_tf_ops_in(text)))
            raise UserError(
                "TFLite conversion needs ops outside the TFLite builtins (Flex / "
                f"SELECT_TF_OPS){': ' + ', '.join(ops) if ops else ''}; LiteRT runtimes do "
                "not ship Flex, so this model cannot go to an edge device as it is "
                "(report the op; it needs a builtin formulation).") from e
        raise
    flex = [op for op in op_names(data) if op.startswith("Flex") or op == "CUSTOM"]
    if flex:
        raise UserError(f"the converted model holds non-builtin ops {sorted(set(flex))}; "
                        f"LiteRT runtimes cannot run them.")
    return int4_weights(data, group_size) if quantize == "int4" else data


def _check_int4_group(group_size: int) -> None:
    if group_size not in INT4_GROUPS:
        raise UserError(f"--quantize=int4 --group_size={group_size}: TFLite int4 takes a "
                        f"group size of {', '.join(map(str, INT4_GROUPS))}.")


def int4_weights(data: bytes, group_size: int = 32) -> bytes:
    """`data` with 4-bit weights (LiteRT's own quantizer, `ai-edge-quantizer`): the
    constant weights of FULLY_CONNECTED ops (the projections, an untied output head) get
    int4 with one scale per `group_size` inputs (-1: per channel); activations stay float
    and are quantized on the fly by the runtime's kernels. The embedding's GATHER and the
    BATCH_MATMUL weights (MoE expert stacks, MLA's absorbed kv_b_proj) stay float."""
    _check_int4_group(group_size)
    try:
        from ai_edge_quantizer import qtyping, quantizer, recipe_manager
    except ImportError as e:
        raise UserError("TFLite --quantize=int4 needs ai-edge-quantizer: pip install "
                        "'deepseek_tf[edge]' (or ai-edge-quantizer==0.10.0).") from e
    granularity = (qtyping.QuantGranularity.CHANNELWISE if group_size == -1 else
                   qtyping.QuantGranularity(f"BLOCKWISE_{group_size}"))
    recipes = recipe_manager.RecipeManager()
    recipes.add_dynamic_config(regex=".*", num_bits=4, granularity=granularity,
                               operation_name=qtyping.TFLOperationName.ALL_SUPPORTED)
    from deepseek_tf.quiet import quiet_stderr
    refused = ""
    with quiet_stderr(), contextlib.redirect_stdout(io.StringIO()):  # progress, size report
        try:  # a refusal is caught inside, so that quiet_stderr does not replay the bars
            result = quantizer.Quantizer(bytearray(data), recipes.get_quantization_recipe()
                                         ).quantize()
        except ValueError as e:  # "Quantized dimension 352 ... not divisible by block size"
            refused = str(e).split("Error: ")[-1]
    if refused:
        raise UserError(f"--quantize=int4 --group_size={group_size}: LiteRT's quantizer "
                        f"refused: {refused} Pick a group size that divides every layer's "
                        f"input width, or -1 (one scale per channel).") from None
    return bytes(result.quantized_model)


def _tf_ops_in(text: str):
    import re
    for m in re.finditer(r"\btf\.([A-Z][A-Za-z0-9_]*)", text):
        yield "tf." + m.group(1)


def op_names(data: bytes) -> list[str]:
    """Names of the ops a TFLite flatbuffer uses (builtins by name, custom ops as
    'Flex...'/their custom code), read from its operator codes."""
    from tensorflow.lite.python import schema_py_generated as schema
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(data), 0))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if code.customCode:
            out.append(code.customCode.decode() if isinstance(code.customCode, bytes)
                       else str(code.customCode))
        else:
            out.append(names.get(builtin, str(builtin)))
    return out


def tflite_model(model, exp, max_length: int = 0, prefill_lengths=(32,),
                 quantize: str = "none", absorb: bool = True, log=print,
                 group_size: int = 32) -> tuple[bytes, int]:
    """(the `.tflite` flatbuffer, its context C) of `model` (see `export_tflite`)."""
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize={quantize!r}: choose one of {', '.join(QUANTIZE)}.")
    if quantize == "int4":
        _check_int4_group(group_size)
    context = max_length or min(exp.model.max_position_embeddings, 1024)
    lengths = tuple(sorted({int(n) for n in prefill_lengths}))
    if context < 2 or not lengths or min(lengths) < 1 or max(lengths) > context:
        raise UserError(f"prefill lengths {list(lengths)} must be in 1..context ({context}) "
                        f"and the context >= 2 (--max_length, --prefill_lengths).")
    if model.compute_dtype != "float32":
        raise UserError(f"TFLite export needs a float32 model (got {model.compute_dtype}); "
                        f"quantize with --quantize instead.")
    module = EdgeModule(model, context, lengths, absorb=absorb)
    sigs = module.signatures()
    log(f"converting to TFLite (context {context}, signatures {', '.join(sigs)}, "
        f"quantize={quantize}) ...")
    with tempfile.TemporaryDirectory() as tmp:
        tf.saved_model.save(module, tmp, signatures=sigs)
        return convert(tmp, sigs, quantize, group_size), context


def export_tflite(model, exp, output: str, log=print, workdir: str | None = None,
                  max_length: int = 0, prefill_lengths=(32,), quantize: str = "none",
                  absorb: bool = True, group_size: int = 32) -> str:
    """Writes the `.tflite` file `output`; returns its path.

    Args:
      model, exp: from `load_workdir` (float32 weights).
      max_length: the context C (cache length); 0 = min(max_position_embeddings, 1024).
      prefill_lengths: the `prefill_<N>` signatures (each N <= C).
      quantize: "none", "fp16" (float16 weights), "int8" (dynamic-range int8
        weights, float activations) or "int4" (`int4_weights`).
      group_size: int4: inputs per scale (32, 64, 128, 256; -1 = per channel).
    """
    del workdir
    data, _ = tflite_model(model, exp, max_length, prefill_lengths, quantize, absorb, log,
                           group_size)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "wb") as f:
        f.write(data)
    log(f"wrote TFLite {output} ({len(data) / 2**20:.2f} MiB, {len(data):,} bytes; "
        f"quantize={quantize}; builtin ops only: {len(set(op_names(data)))} kinds)")
    return output
