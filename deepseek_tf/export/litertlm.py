"""`.litertlm` bundles for Google's LiteRT-LM on-device runtime.

A bundle holds three sections, written with the `litert-lm-builder` package:

    LlmMetadata   start token (BOS), stop tokens (the run's chat profile: EOS and the
                  template's end-of-turn marker, as a token sequence when the
                  tokenizer spells it with several tokens), max_num_tokens (the
                  context), a generic model type, and the chat template as Jinja
                  when the run trained on conversations (SFT data or DPO pairs)
    tokenizer     the run's SentencePiece model, or its HF tokenizer.json; the
                  byte tokenizer is written as an equivalent tokenizer.json
                  (`byte_tokenizer_json`)
    TFLiteModel   the PREFILL_DECODE model of `export/tflite.py`

Run it with `litert-lm run model.litertlm --no-template --prompt "..."` or the
`litert_lm` Python API (`Engine(path, backend=Backend.CPU())`). The runtime puts
the start token before the prompt itself.

Example:
    >>> export_litertlm(model, exp, "out/tiny.litertlm", workdir="runs/tiny")
"""

from __future__ import annotations

import json
import os
import tempfile

from deepseek_tf.errors import UserError
from deepseek_tf.export.tflite import tflite_model


def byte_tokenizer_json(tok) -> str:
    """An HF tokenizer.json that encodes exactly like the byte tokenizer: a BPE with
    no merges over the ByteLevel alphabet (byte b -> id b) and BOS/EOS/PAD as added
    special tokens at their ids, so every UTF-8 byte sequence round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; bytes_to_unicode order:
    chars = _bytes_to_unicode()
    assert set(chars.values()) == set(alphabet)
    vocab = {chars[b]: b for b in range(256)}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False,
                                                trim_offsets=False)
    hf.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False,
                                    trim_offsets=False)
    specials = sorted((i, n) for i, n in ((tok.bos_id, "<bos>"), (tok.eos_id, "<eos>"),
                                          (tok.pad_id, "<pad>")) if i >= 0)
    from tokenizers import AddedToken
    for i, name in specials:
        if i != hf.get_vocab_size():
            raise UserError(f"byte tokenizer special id {i} is not contiguous after the bytes.")
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
    return hf.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel uses)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def jinja_template(template) -> str:
    """A chat `Template` as the Jinja prompt template LiteRT-LM renders (HF-style
    `messages` with role/content). BOS is left out: the runtime adds it."""

    def fmt(spec: str) -> str:
        spec = spec.replace("{bos}", "").replace("{eos}", "{{ eos_token }}")
        parts = spec.split("{content}")
        return "{{ content }}".join(_literal(p) for p in parts)

    return (
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] | map(attribute='text') | join('')"
        " -%}{%- endif -%}"
        "{%- if message['role'] == 'system' -%}" + fmt(template.system) +
        "{%- elif message['role'] == 'user' -%}"
        "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' -%}"
        + _literal(template.separator) + "{%- endif -%}" + fmt(template.user) +
        "{%- elif message['role'] == 'assistant' -%}" + fmt(template.assistant) +
        "{%- endif -%}{%- endfor -%}")


def _literal(text: str) -> str:
    """Literal text inside a Jinja template (a string expression: no escaping issues)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _metadata_text(tok, stops, context: int, jinja: str | None) -> str:
    from google.protobuf import text_format
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    msg = llm_metadata_pb2.LlmMetadata()
    if tok.bos_id >= 0:
        msg.start_token.token_ids.ids.append(int(tok.bos_id))
    for seq in stops:  # a TokenIds entry may hold a multi-token stop sequence
        msg.stop_tokens.add().token_ids.ids.extend(int(i) for i in seq)
    msg.max_num_tokens = int(context)
    msg.llm_model_type.generic_model.SetInParent()
    if jinja:
        msg.jinja_prompt_template = jinja
    return text_format.MessageToString(msg, as_utf8=True)


def export_litertlm(model, exp, output: str, log=print, workdir: str | None = None,
                    max_length: int = 0, prefill_lengths=(32,), quantize: str = "none",
                    tokenizer=None, absorb: bool = True, group_size: int = 32) -> str:
    """Writes the `.litertlm` bundle `output` (see the module docstring); returns it.

    Args as `export_tflite`, plus the run `workdir` (for its tokenizer) or `tokenizer`.
    """
    try:
        from litert_lm_builder import litertlm_builder as lb
    except ImportError as e:
        raise UserError("--format=litertlm needs the litert-lm-builder package: pip install "
                        "'deepseek_tf[edge]' (or litert-lm-builder==0.18.1).") from e
    from deepseek_tf.generate.text import chat_profile
    from deepseek_tf.workdir import load_run_tokenizer

    tok = tokenizer or load_run_tokenizer(workdir, exp)
    profile = chat_profile(exp, tok)
    template, stops = profile.template, profile.stops
    data, context = tflite_model(model, exp, max_length, prefill_lengths, quantize, absorb,
                                 log, group_size)
    with tempfile.TemporaryDirectory() as tmp:  # only the bundle is kept
        model_path = os.path.join(tmp, "model.tflite")
        with open(model_path, "wb") as f:
            f.write(data)
        builder = lb.LitertLmFileBuilder()
        meta = os.path.join(tmp, "llm_metadata.pbtxt")
        with open(meta, "w", encoding="utf-8") as f:
            f.write(_metadata_text(tok, stops, context,
                                   jinja_template(template) if template else None))
        builder.add_llm_metadata(meta, supports_thinking=bool(template and template.think),
                                 supports_function_calling=False)
        kind = lb.TfLiteModelType.PREFILL_DECODE
        if tok.name == "sentencepiece":
            (name, data), = tok.files().items()
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            builder.add_sentencepiece_tokenizer(path)
        else:
            path = os.path.join(tmp, "tokenizer.json")
            with open(path, "w", encoding="utf-8") as f:
                if tok.name == "byte":
                    f.write(byte_tokenizer_json(tok))
                else:
                    f.write(next(iter(tok.files().values())).decode("utf-8"))
            builder.add_hf_tokenizer(path)
        builder.add_tflite_model(model_path, kind, prefer_activation_type="fp32")
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "wb") as f:
            builder.build(f)
    size = os.path.getsize(output)
    log(f"wrote LiteRT-LM bundle {output} ({size / 2**20:.2f} MiB, {size:,} bytes; "
        f"{tok.name} tokenizer, context {context}, stop tokens {[list(s) for s in stops]}"
        f"{', chat template ' + template.name if template else ''})")
    return output
