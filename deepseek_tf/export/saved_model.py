"""SavedModel for TF Serving: text, chat and id generation plus scoring, batch-first.

Signatures (every input and output has a leading batch dimension B, so TF
Serving's request batching can merge requests):

    serving_default  prompt string [B] (+ optional max_new_tokens, temperature,
                     top_k, top_p, seed, each [B] or [1]) -> text string [B],
                     num_tokens int32 [B]. The tokenizer runs in the graph
                     (byte and SentencePiece). A run that trained on conversations
                     (SFT, DPO) renders the prompt as one user turn of its chat
                     template; other runs take it as raw text after BOS.
    chat             (runs with a chat template) roles string [B, M], contents
                     string [B, M], num_messages int32 [B] (+ the same options)
                     -> reply string [B], num_tokens int32 [B]; the template is
                     rendered in the graph (export/chat.py explains the inputs)
    generate_ids     input_ids int32 [B, T] right-padded, lengths int32 [B]
                     (+ the same options) -> output_ids int32 [B, N],
                     output_lengths int32 [B] (a stop token is included)
    score            input_ids, lengths -> log_probs float32 [B, T] (entry t:
                     log p(ids[t] | ids[:t]); 0 at t = 0 and past the length),
                     total_log_prob float32 [B]
    *_no_xla         (an export with XLA decoding) serving_default, chat and
                     generate_ids again, decoding without XLA: the same tokens, for
                     a model server run without --xla_cpu_compilation_enabled

Generation stops at the run's chat profile (`generate.text.chat_profile`): EOS
and the template's end-of-turn marker, matched as a token sequence when the
tokenizer spells it with several tokens (`<|im_end|>` in bytes); replies and texts
leave the stop out. The sampling options have defaults stored in the SignatureDef
(greedy, the export's --max_new_tokens, seed -1 = a fresh seed drawn per request in
the graph), so a request may leave them out; a [1] value is broadcast to the batch. Bad requests fail inside the graph with
INVALID_ARGUMENT and a message that says what to change. An HF tokenizer.json
cannot run in a TF graph: such exports keep `generate_ids` and `score` only.

Example:
    >>> export_saved_model(model, exp, "models/deepseek/1", workdir="runs/tiny")
    >>> sm = tf.saved_model.load("models/deepseek/1")
    >>> sm.signatures["serving_default"](prompt=tf.constant(["Once"]))["text"]
"""

from __future__ import annotations

import os

import tensorflow as tf

from deepseek_tf.errors import UserError
from deepseek_tf.generate.decode import (IDS_SPECS, SAMPLING_SPECS, SERVING_MAX_NEW_TOKENS,
                                         generate_ids, score_ids, stop_suffix)
from deepseek_tf.generate.text import ChatProfile
from deepseek_tf.quantize import HEAD_DEFAULT, quantize_run

#: With XLA decoding, the generating signatures again without XLA get this suffix.
NO_XLA_SUFFIX = "_no_xla"


def _rows(x, b):
    """A [B] or [1] option as [B] (INVALID_ARGUMENT otherwise)."""
    check = tf.debugging.assert_equal(
        tf.logical_or(tf.equal(tf.shape(x)[0], b), tf.equal(tf.shape(x)[0], 1)), True,
        message="each sampling option needs one value per prompt (or a single value)")
    with tf.control_dependencies([check]):
        return tf.broadcast_to(x, [b])


class ServingModule(tf.Module):
    """The exported module: the model's variables, the in-graph tokenizer, and the
    signature functions (see the module docstring).

    Args:
      model: a built `DeepSeekCausalLM`.
      tok: the run's tokenizer (Python side).
      max_length: the static cache length (prompt + new tokens).
      max_new_tokens: the default of the `max_new_tokens` input.
      profile: the run's `ChatProfile` (template and stops; default: plain text, EOS).
      absorb: MLA decodes in latent space.
      jit_compile: the decode loop compiled with XLA (TF Serving then needs
        `--xla_cpu_compilation_enabled=true`, as serving/Dockerfile sets); the
        generating signatures are then also exported without XLA as `<name>_no_xla`.
      prefill_jit: with `jit_compile`, the widest prompt prefilled with XLA (0 = none;
        see `generate_ids`).
    """

    def __init__(self, model, tok, max_length: int, max_new_tokens: int,
                 profile: ChatProfile | None = None, absorb=True, jit_compile=False,
                 prefill_jit: int = 0):
        super().__init__()
        self.jit_compile = bool(jit_compile)
        self.prefill_jit = int(prefill_jit) if self.jit_compile else 0
        self.model = model
        # The tf.Variables themselves, not Keras' wrappers: with only those tracked, a
        # session-based loader (TF Serving, saved_model_cli run) finds no restored value.
        self.weights = [v.value for v in model.variables]
        self.max_length, self.absorb = int(max_length), absorb
        self.profile = profile or ChatProfile.of(tok, None)
        self.stops, self.pad_id = self.profile.stops, int(tok.pad_id)
        self.bos_id, self.eos_id = int(tok.bos_id), int(tok.eos_id)
        try:
            self.tf_tokenizer = tok.tf_tokenizer()
        except UserError:
            self.tf_tokenizer = None
        self.renderer = None
        if self.tf_tokenizer is not None and self.profile.template is not None:
            from deepseek_tf.export.chat import ChatRenderer
            self.renderer = ChatRenderer(self.profile.template, tok, self.tf_tokenizer)
        default = min(int(max_new_tokens), self.max_length - 1)
        self.defaults = dict(max_new_tokens=tf.constant([default]),
                             temperature=tf.constant([0.0]), top_k=tf.constant([0]),
                             top_p=tf.constant([1.0]), seed=tf.constant([-1]))

    def _generate(self, input_ids, lengths, options, jit: bool):
        b = tf.shape(input_ids)[0]
        rows = [_rows(options[k], b) for k in SAMPLING_SPECS]
        return generate_ids(self.model, input_ids, lengths, *rows, max_length=self.max_length,
                            stop_ids=self.stops, pad_id=self.pad_id, absorb=self.absorb,
                            jit_compile=jit, prefill_jit=self.prefill_jit if jit else 0)

    def generate_ids_fn(self, jit: bool):
        d = self.defaults

        def generate_ids_signature(input_ids, lengths, max_new_tokens=d["max_new_tokens"],
                                   temperature=d["temperature"], top_k=d["top_k"],
                                   top_p=d["top_p"], seed=d["seed"]):
            ids, n = self._generate(input_ids, lengths, dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed), jit)
            return {"output_ids": ids, "output_lengths": n}

        return tf.function(generate_ids_signature, autograph=False, input_signature=[
            *IDS_SPECS.values(), *SAMPLING_SPECS.values()])

    def score_fn(self):
        def score_signature(input_ids, lengths):
            log_probs, total = score_ids(self.model, input_ids, lengths)
            return {"log_probs": log_probs, "total_log_prob": total}

        return tf.function(score_signature, input_signature=list(IDS_SPECS.values()),
                           autograph=False)

    def _text(self, out, n):
        """Generated ids -> text: up to each row's length, without a trailing stop and
        without special ids."""
        keep = tf.sequence_mask(n - stop_suffix(out, n, self.stops), tf.shape(out)[1])
        for special in {self.bos_id, self.eos_id, self.pad_id} - {-1}:
            keep = tf.logical_and(keep, tf.not_equal(out, special))
        return tf.reshape(self.tf_tokenizer.detokenize(tf.ragged.boolean_mask(out, keep)), [-1])

    def _prompt_ids(self, prompt):
        """Prompts -> (right-padded ids, lengths): one user turn of the chat template, or
        raw text after BOS."""
        if self.renderer is not None:
            b = tf.shape(prompt)[0]
            return self.renderer(tf.fill([b, 1], "user"), prompt[:, tf.newaxis],
                                 tf.ones([b], tf.int32))
        ids = tf.cast(self.tf_tokenizer.tokenize(prompt), tf.int32)           # ragged (B, None)
        if self.bos_id >= 0:
            bos = tf.fill([tf.shape(prompt)[0], 1], self.bos_id)
            ids = tf.concat([tf.RaggedTensor.from_tensor(bos), ids], axis=1)
        lengths = tf.cast(ids.row_lengths(), tf.int32)
        check = tf.debugging.assert_greater_equal(lengths, 1, message=(
            "a prompt is empty; send at least one character"))
        with tf.control_dependencies([check]):
            return ids.to_tensor(0), tf.identity(lengths)

    def text_fn(self, jit: bool):
        d = self.defaults

        def text_signature(prompt, max_new_tokens=d["max_new_tokens"],
                           temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"],
                           seed=d["seed"]):
            dense, lengths = self._prompt_ids(prompt)
            out, n = self._generate(dense, lengths, dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed), jit)
            return {"text": self._text(out, n), "num_tokens": n}

        return tf.function(text_signature, autograph=False, input_signature=[
            tf.TensorSpec([None], tf.string, name="prompt"), *SAMPLING_SPECS.values()])

    def chat_fn(self, jit: bool):
        d = self.defaults

        def chat_signature(roles, contents, num_messages, max_new_tokens=d["max_new_tokens"],
                           temperature=d["temperature"], top_k=d["top_k"], top_p=d["top_p"],
                           seed=d["seed"]):
            dense, lengths = self.renderer(roles, contents, num_messages)
            out, n = self._generate(dense, lengths, dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=seed), jit)
            return {"reply": self._text(out, n), "num_tokens": n}

        return tf.function(chat_signature, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.string, name="roles"),
            tf.TensorSpec([None, None], tf.string, name="contents"),
            tf.TensorSpec([None], tf.int32, name="num_messages"), *SAMPLING_SPECS.values()])

    def _generation_signatures(self, jit: bool) -> dict:
        sigs = {"generate_ids": self.generate_ids_fn(jit)}
        sigs["serving_default"] = self.text_fn(jit) if self.tf_tokenizer is not None \
            else sigs["generate_ids"]
        if self.renderer is not None:
            sigs["chat"] = self.chat_fn(jit)
        return sigs

    def signatures(self) -> dict:
        """The signatures; with XLA decoding, each generating one again without XLA
        under `<name>_no_xla`, for a model server that runs without XLA:CPU."""
        sigs = {**self._generation_signatures(self.jit_compile), "score": self.score_fn()}
        if self.jit_compile:
            sigs.update({f"{k}{NO_XLA_SUFFIX}": v
                         for k, v in self._generation_signatures(False).items()})
        return sigs


def export_saved_model(model, exp, output: str, log=print, workdir: str | None = None,
                       max_length: int = 0, max_new_tokens: int = SERVING_MAX_NEW_TOKENS,
                       quantize: str = "none", jit_compile="false", tokenizer=None,
                       group_size: int = 128, calibration_data: str = "",
                       calibration_samples: int = 256, quantize_head: str = HEAD_DEFAULT,
                       prefill_jit: int = 0) -> str:
    """Writes the SavedModel to `output` (e.g. MODEL_BASE/NAME/VERSION).

    Args:
      model, exp: from `load_workdir`.
      output: the version directory to write; must not exist yet.
      workdir: the run directory, for its tokenizer (or pass `tokenizer`).
      max_length: cache length; 0 = the model's max_position_embeddings.
      max_new_tokens: the signatures' default.
      quantize: "none", "int8", "int4", "gptq" or "awq": Keras' own weight quantization
        of the dense projections and embeddings (`deepseek_tf/quantize.py` lists what
        stays float).
      group_size: 4-bit modes: inputs per scale (-1 = per output channel).
      calibration_data: gptq/awq: a JSONL/text file or a prepared data directory;
        "" = the run's own prepared data (`--data.data_dir` of its config).
      calibration_samples: gptq/awq: windows of the run's sequence length to use.
      quantize_head: 4-bit modes: the untied output head and the embedding, "none"
        (float), "int8" or "int4" (`deepseek_tf.quantize.HEAD_MODES`).
      jit_compile: "true" = an XLA-compiled decode loop (several times faster for small
        models; the server must allow XLA: `--xla_cpu_compilation_enabled=true`, or
        call the `*_no_xla` signatures),
        "false", or "auto" = time decoding both ways on this machine (the export's, so
        serve on similar hardware) and keep the faster, then the same for the prefill
        (`pick_prefill`); bools are accepted.
      prefill_jit: with jit_compile "true": the widest prompt prefilled with XLA (0 =
        none; see `generate_ids`); "auto" picks it.
    """
    from deepseek_tf.autojit import jit_value
    from deepseek_tf.generate.text import chat_profile
    from deepseek_tf.workdir import load_run_tokenizer

    if os.path.exists(os.path.join(output, "saved_model.pb")):
        raise UserError(f"{output} already holds a SavedModel; TF Serving versions are "
                        f"immutable: write a new version directory (e.g. .../2).")
    max_length = max_length or exp.model.max_position_embeddings
    if max_length < 2:
        raise UserError(f"--max_length={max_length} leaves no room to generate; use >= 2.")
    tok = tokenizer or load_run_tokenizer(workdir, exp)
    model = quantize_run(model, exp, tok, quantize, group_size, calibration_data,
                         calibration_samples, min(exp.data.seq_len, max_length),
                         workdir=workdir or "", head=quantize_head)
    profile = chat_profile(exp, tok)
    jit = jit_value(jit_compile)
    if jit == "auto":
        from deepseek_tf.generate.run import pick_generator
        picked = pick_generator(model, max_length, profile.stops, tok.pad_id, log=log)
        jit, prefill_jit = ("true" if picked.jit_compile else "false"), picked.prefill_jit
    jit_compile = jit == "true"
    module = ServingModule(model, tok, max_length, max_new_tokens, profile,
                           jit_compile=jit_compile, prefill_jit=prefill_jit)
    if module.tf_tokenizer is None:
        log(f"note: the {tok.name} tokenizer cannot run inside a TensorFlow graph, so "
            f"serving_default takes token ids (same as generate_ids) and there is no chat "
            f"signature; tokenize on the client (e.g. with the `tokenizers` package and this "
            f"run's tokenizer.json).")
    signatures = module.signatures()
    tf.saved_model.save(module, output, signatures=signatures)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(output) for f in fs)
    template = profile.template.name if profile.template else "none"
    log(f"wrote SavedModel {output} ({size / 2**20:.1f} MiB; cache {max_length} tokens; "
        f"signatures: {', '.join(sorted(signatures))}; chat template {template}, stops "
        f"{[list(s) for s in profile.stops]}"
        + (f"; XLA decode: serve with --xla_cpu_compilation_enabled=true, or call the "
           f"*{NO_XLA_SUFFIX} signatures on a server without it" if jit_compile else "")
        + ")")
    return output
