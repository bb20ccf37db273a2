"""`.litertlm` bundles run by Google's LiteRT-LM Engine (the `litert-lm-api` wheel,
installed by the `edge` extra): the quickstart-sized model, a DeepSeek-V3-style
model (MLA + MoE with a shared expert), a DeepSeek-V3.2-style one (+ sparse
attention) and a DeepSeek-V4-style one (sliding, compressed sparse and heavily
compressed attention, hyper-connections, hash-routed MoE) generate greedily exactly the
tokens of our decode loop (`Generator`, whose tokens the SavedModel, TFLite and
transformers tests compare with theirs)."""

import pytest

from deepseek_tf.data.templates import TEMPLATES
from deepseek_tf.data.tokenizer.byte import ByteTokenizer
from deepseek_tf.export import export
from deepseek_tf.export.litertlm import byte_tokenizer_json, jinja_template
from deepseek_tf.generate import Generator
from deepseek_tf.workdir import load_experiment
from tests.helpers.workdirs import make_workdir

litert_lm = pytest.importorskip("litert_lm", reason="pip install 'deepseek_tf[edge]'")
# The engine's runtime logs INFO lines (DestroyAccelerator) at process exit, into make
# test's output; errors still show.
litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
tokenizers = pytest.importorskip("tokenizers")

CONTEXT = 128
NEW = 40
PROMPT = "The quick brown fox"
#: configs/tiny.flags' model (the quickstart), with random weights.
QUICKSTART = dict(vocab_size=320, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
MODELS = {"quickstart": ("gqa", QUICKSTART), "deepseek_v3_style": ("mla_moe", {}),
          "deepseek_v32_style": ("mla_dsa", {}), "deepseek_v4_style": ("v4", {})}
quiet = lambda *_: None  # noqa: E731


def test_byte_tokenizer_json_encodes_exactly_like_the_byte_tokenizer():
    tok = ByteTokenizer()
    hf = tokenizers.Tokenizer.from_str(byte_tokenizer_json(tok))
    for text in ["The quick", " lead and trail ", "tab\there\r\nCRLF", "héllo 😀", "nul\x00"]:
        ids = hf.encode(text).ids
        assert ids == tok.encode(text, add_bos=False, add_eos=False).tolist()
        assert hf.decode(ids) == text
    assert [hf.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")] == [256, 257, 258]


def test_chat_template_renders_like_ours():
    import jinja2
    t = TEMPLATES["chatml"]
    text = jinja2.Template(jinja_template(t)).render(
        messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                  {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
        eos_token="</s>")
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                    "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """name -> (.litertlm path, the decode loop's greedy ids after PROMPT)."""
    tok = ByteTokenizer()
    ids = tok.encode(PROMPT, add_bos=True, add_eos=False)
    out = {}
    for name, (family, overrides) in MODELS.items():
        root = tmp_path_factory.mktemp(name)
        workdir, model = make_workdir(str(root / "run"), family, **overrides)
        exp = load_experiment(workdir)
        path = export(model, exp, "litertlm", str(root / f"{name}.litertlm"), log=quiet,
                      workdir=workdir, max_length=CONTEXT, prefill_lengths=(8, 32))
        gen = Generator(model, CONTEXT, stop_ids=(257,), pad_id=258)
        got, lengths = gen.generate([ids], [len(ids)], max_new_tokens=NEW)
        out[name] = (path, got.numpy()[0, :int(lengths[0])].tolist())
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_litert_lm_engine_generates_the_decode_loops_tokens(bundles, name):
    path, want = bundles[name]
    assert len(want) >= 32 and 257 not in want[:-1]
    engine = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(), max_num_tokens=CONTEXT,
                              activation_data_type=litert_lm.ActivationDataType.FLOAT32)
    session = engine.create_session(apply_prompt_template=False, max_output_tokens=NEW)
    session.run_prefill([PROMPT])   # the engine adds BOS and feeds prefill_32/8 + decode
    text = session.run_decode().texts[0]
    # Our tokens spelled by the same tokenizer.json the bundle holds (specials included),
    # up to (not including) a stop token, which the engine does not print.
    hf = tokenizers.Tokenizer.from_str(byte_tokenizer_json(ByteTokenizer()))
    shown = want[:-1] if want[-1] == 257 else want
    assert text == hf.decode(shown, skip_special_tokens=False)


def test_metadata_takes_the_runs_chat_profile_with_multi_token_stops():
    """A ChatML run (SFT or DPO) stops at `<|im_end|>`, which the byte tokenizer spells
    with 10 tokens: LlmMetadata holds it as one multi-token stop sequence."""
    import dataclasses

    from google.protobuf import text_format
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    from deepseek_tf.export.litertlm import _metadata_text
    from deepseek_tf.generate.text import chat_profile
    from tests.helpers import tiny

    tok = ByteTokenizer()
    exp = tiny.experiment("x", data={"template": "chatml"})
    exp = dataclasses.replace(exp, train=exp.train.replace(stage="dpo"))
    profile = chat_profile(exp, tok)
    msg = text_format.Parse(_metadata_text(tok, profile.stops, 128, jinja_template(
        profile.template)), llm_metadata_pb2.LlmMetadata())
    stops = [list(s.token_ids.ids) for s in msg.stop_tokens]
    assert stops == [[257], tok.encode("<|im_end|>", add_bos=False, add_eos=False).tolist()]
    assert "<|im_start|>" in msg.jinja_prompt_template
