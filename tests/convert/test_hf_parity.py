"""Parity with Hugging Face transformers, both ways.

One subprocess (torch + transformers; torch never enters this process) builds tiny
random HF models from configs, saves them with save_pretrained and dumps their
logits; we convert each and compare. Then we export (converted models and a natively
built one) and a second subprocess reloads the exports with from_pretrained.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from deepseek_tf.config import Experiment
from deepseek_tf.convert import convert_hf
from deepseek_tf.convert.safetensors_io import SafetensorsDir, write_safetensors
from deepseek_tf.errors import UserError
from deepseek_tf.export import export, load_workdir
from deepseek_tf.model import DeepSeekCausalLM
from tests.helpers import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE = os.path.join(ROOT, "tests", "convert", "hf_reference.py")
NAMES = ("deepseek_v3", "deepseek_v2", "llama", "qwen2", "deepseek_v3_yarn", "llama3_rope")
TOL = 1e-4
quiet = lambda *_: None  # noqa: E731


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _torch(*args):
    proc = subprocess.run([sys.executable, REFERENCE, *args], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout)


def build_reference(tmp_path_factory, names):
    """(dir of the tiny HF models `names`, their reference.npz as a dict)."""
    out = tmp_path_factory.mktemp("hf")
    _torch("build", str(out), *names)
    return out, dict(np.load(out / "reference.npz"))


def convert_references(hf_dir, names, tmp_path_factory) -> dict:
    """name -> (workdir, loaded model) of each tiny HF model in `hf_dir`, converted."""
    out = {}
    for name in names:
        wd = str(tmp_path_factory.mktemp(f"wd-{name}") / "wd")
        convert_hf(str(hf_dir / name), wd, Experiment(data=tiny.data_config()), log=quiet)
        out[name] = (wd, load_workdir(wd)[0])
    return out


def check_greedy(gen, prompts, expected, new: int) -> np.ndarray:
    """Our `Generator` gives transformers' greedy tokens `expected` for `prompts`, one
    prompt at a time and all as one left-padded batch. Returns the batch's right-padded
    input ids (B, T), for checking other runtimes on it."""
    for prompt, expect in zip(prompts, expected):
        ours, _ = gen.generate([prompt], [len(prompt)], max_new_tokens=new)
        assert ours.numpy()[0].tolist() == expect
    ids = np.zeros((len(prompts), max(len(p) for p in prompts)), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    batch, _ = gen.generate(ids, [len(p) for p in prompts], max_new_tokens=new)
    assert batch.numpy().tolist() == expected
    return ids


def left_padded_diff(model, tokens, expected, pad: int = 5) -> float:
    """Max |our logits - `expected`| over the real tokens of `tokens` with row 0
    left-padded by `pad` (hf_reference.padded_batch: token 0, positions from 0)."""
    padded = tokens.copy()
    padded[0, :pad] = 0
    seg = np.ones_like(padded)
    seg[0, :pad] = 0
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0)
    ours = model(tf.constant(padded, tf.int32), segment_ids=tf.constant(seg, tf.int32),
                 positions=tf.constant(pos, tf.int32)).numpy()
    return float(np.abs(ours - expected)[seg.astype(bool)].max())


def check_hf_exports_reload(reference, converted, names, architecture, tmp_path) -> None:
    """Exports each converted model to HF; transformers reloads every one with no
    missing, unexpected or misshapen tensor and reproduces the reference logits."""
    _, ref = reference
    for name in names:
        out = tmp_path / name
        export(converted[name][1], load_workdir(converted[name][0])[1], "hf", str(out),
               log=quiet)
        np.save(out / "tokens.npy", ref["tokens"])
        assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    _torch("reload", *(str(tmp_path / n) for n in names))
    for name in names:
        info = json.loads((tmp_path / name / "loading_info.json").read_text())
        assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys",
                                             "mismatched_keys")), info
        reloaded = np.load(tmp_path / name / "reloaded.npz")["logits"]
        assert float(np.abs(reloaded - ref[name]).max()) <= TOL, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return build_reference(tmp_path_factory, NAMES)


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """name -> (workdir, our float32 logits on the reference tokens)."""
    hf_dir, ref = reference
    exp = Experiment(data=tiny.data_config())
    out = {}
    for name in NAMES:
        wd = str(tmp_path_factory.mktemp(f"wd-{name}"))
        os.rmdir(wd)
        convert_hf(str(hf_dir / name), wd, exp, log=quiet)
        model, _ = load_workdir(wd)
        out[name] = (wd, model(tf.constant(ref["tokens"], tf.int32)).numpy())
    return out


@pytest.mark.parametrize("name", NAMES)
def test_converted_logits_match_transformers(reference, converted, name):
    _, ref = reference
    diff = float(np.abs(converted[name][1] - ref[name]).max())
    print(f"parity {name}: max-abs-diff {diff:.2e}")
    assert ref["tokens"].shape == (2, 20) and not np.array_equal(*ref["tokens"])
    assert diff <= TOL, diff


def test_converted_config_keeps_the_routing_details(converted):
    cfg = Experiment.load(os.path.join(converted["deepseek_v3"][0], "config.json")).model
    assert (cfg.attention_type, cfg.q_lora_rank, cfg.n_group, cfg.topk_group, cfg.topk_method,
            cfg.scoring_func, cfg.rope_interleave) == ("mla", 24, 4, 2, "noaux_tc", "sigmoid",
                                                       True)
    v2 = Experiment.load(os.path.join(converted["deepseek_v2"][0], "config.json")).model
    assert (v2.q_lora_rank, v2.scoring_func, v2.topk_method, v2.attention_bias) == (
        0, "softmax", "greedy", True)
    model, _ = load_workdir(converted["deepseek_v3"][0])
    assert all(float(tf.math.reduce_std(m.gate.e_score_correction_bias)) > 0
               for m in model.moe_layers)                      # the non-zero router bias


def _native_model():
    """A model built here (not converted): MLA + MoE + MTP, YaRN, rotate-half RoPE."""
    cfg = tiny.model_config(
        attention_type="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, moe_intermediate_size=16, n_group=4, topk_group=3,
        routed_scaling_factor=1.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
        rope_scaling_type="yarn", rope_scaling_factor=4.0, original_max_position_embeddings=32,
        mscale=1.0, mscale_all_dim=1.0, initializer_range=0.1, vocab_size=300)
    model = DeepSeekCausalLM(cfg)
    rng = np.random.default_rng(0)
    for m in model.moe_layers:
        m.gate.e_score_correction_bias.assign(rng.normal(size=8).astype(np.float32) * 0.2)
    return model, Experiment(model=cfg, data=tiny.data_config())


def test_hf_export_round_trip(reference, converted, tmp_path):
    """transformers reloads our exports (converted ones and a native one): same logits."""
    _, ref = reference
    tokens = ref["tokens"]
    ours = {}
    for name in NAMES[:-1]:
        model, exp = load_workdir(converted[name][0])
        export(model, exp, "hf", str(tmp_path / name), log=quiet)
        ours[name] = converted[name][1]
    # The last one through the CLI.
    proc = _cli("deepseek_tf.export", f"--workdir={converted[NAMES[-1]][0]}", "--format=hf",
                f"--output={tmp_path / NAMES[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours[NAMES[-1]] = converted[NAMES[-1]][1]
    native, exp = _native_model()
    export(native, exp, "hf", str(tmp_path / "native"), log=quiet)
    ours["native"] = native(tf.constant(tokens, tf.int32)).numpy()
    for name in ours:
        np.save(tmp_path / name / "tokens.npy", tokens)
    _torch("reload", *(str(tmp_path / n) for n in ours))
    for name, logits in ours.items():
        info = json.loads((tmp_path / name / "loading_info.json").read_text())
        assert not info["missing_keys"] and not info["mismatched_keys"], info
        extra = [k for k in info["unexpected_keys"] if not k.startswith("model.layers.2.")]
        assert not extra, extra               # only the native model's MTP layer (index 2)
        reloaded = np.load(tmp_path / name / "reloaded.npz")["logits"]
        diff = float(np.abs(reloaded - logits).max())
        print(f"export round trip {name}: max-abs-diff {diff:.2e}")
        assert diff <= TOL, (name, diff)
    hf_cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert hf_cfg["num_nextn_predict_layers"] == 1


def test_converted_workdir_continues_training_with_the_cli(converted, stdlib_data):
    _, data_dir, _ = stdlib_data
    wd = converted["qwen2"][0]
    proc = _cli("deepseek_tf.train", f"--workdir={wd}", f"--data.data_dir={data_dir}",
                "--data.seq_len=32", "--train.steps=2", "--train.batch_size=2",
                "--train.eval_every=0", "--train.eval_steps=1", "--train.log_every=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The streaming convert writes a run checkpoint at step 0 (fresh optimizer slots), so
    # the trainer starts from it either as weights only or as a resume at step 0.
    assert re.search(r"(initialised the model from|resumed from) \S*ckpt-0\b.* at step 0",
                     proc.stdout), proc.stdout[-2000:]
    assert tf.train.latest_checkpoint(os.path.join(wd, "checkpoints")).endswith("-2")
    # Trained now: the data/loop flags of that run are fixed like any other run's.
    proc = _cli("deepseek_tf.train", f"--workdir={wd}", "--data.seq_len=16")
    assert proc.returncode == 2 and "contradicts" in proc.stderr


def _copy_with(src, dst, drop=(), add=None, reshape=None):
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    t = SafetensorsDir(src)
    tensors = {n: np.array(t.load(n)) for n in t.names() if n not in drop}
    t.close()
    tensors.update(add or {})
    for n, shape in (reshape or {}).items():
        tensors[n] = np.zeros(shape, np.float32)
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return dst


@pytest.mark.parametrize("change,needle", [
    (dict(drop=["model.layers.1.mlp.experts.3.up_proj.weight"]),
     "missing tensor model.layers.1.mlp.experts.3.up_proj.weight"),
    (dict(add={"model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)}),
     "unexpected tensor model.layers.0.self_attn.rotary.inv_freq"),
    (dict(reshape={"model.layers.0.self_attn.kv_b_proj.weight": (80, 15)}),
     "tensor model.layers.0.self_attn.kv_b_proj.weight has shape [80, 15]"),
])
def test_bad_checkpoints_are_refused_naming_the_tensor(reference, tmp_path, change, needle):
    hf_dir, _ = reference
    src = _copy_with(str(hf_dir / "deepseek_v3"), str(tmp_path / "bad"), **change)
    with pytest.raises(UserError) as e:
        convert_hf(src, str(tmp_path / "wd"), Experiment(data=tiny.data_config()), log=quiet)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "wd" / "config.json").exists()


def test_cli_refuses_an_unknown_architecture_in_one_line(reference, tmp_path):
    hf_dir, _ = reference
    bad = shutil.copytree(hf_dir / "llama", tmp_path / "gpt")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    proc = _cli("deepseek_tf.convert", f"--hf_dir={bad}", f"--workdir={tmp_path / 'wd'}")
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "unsupported architecture GPT2LMHeadModel" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "wd").exists()


def test_convert_uses_and_export_ships_the_checkpoints_tokenizer(reference, tmp_path):
    from tests.helpers.corpora import DOCS, build_hf_tokenizer
    hf_dir, _ = reference
    src = shutil.copytree(hf_dir / "llama", tmp_path / "llama-tok")
    build_hf_tokenizer(str(src), DOCS, vocab_size=280)
    exp = convert_hf(str(src), str(tmp_path / "wd"), Experiment(data=tiny.data_config()),
                     log=quiet)
    assert (exp.tokenizer.type, exp.tokenizer.path) == ("hf", str(src))
    os.makedirs(tmp_path / "wd" / "tokenizer")
    shutil.copy(src / "tokenizer.json", tmp_path / "wd" / "tokenizer")  # as train leaves it
    model, exp = load_workdir(str(tmp_path / "wd"))
    export(model, exp, "hf", str(tmp_path / "out"), log=quiet, workdir=str(tmp_path / "wd"))
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


GEN_PROMPTS = [[1, 17, 42, 99, 250, 7], [3, 3, 140, 5, 288, 61, 12, 30, 44]]


@pytest.mark.parametrize("name", ["deepseek_v3", "llama"])
def test_greedy_generation_matches_transformers_generate(reference, converted, name):
    """Our cached decode (absorbed MLA, dropless MoE) gives exactly the tokens that
    transformers' own `generate` (its KV cache) gives, 32 new tokens per prompt."""
    from deepseek_tf.generate import Generator
    hf_dir, _ = reference
    np.save(hf_dir / name / "prompts.npy", np.array(GEN_PROMPTS, dtype=object),
            allow_pickle=True)
    _torch("generate", "32", str(hf_dir / name))
    theirs = np.load(hf_dir / name / "generated.npy")
    model, _ = load_workdir(converted[name][0])
    gen = Generator(model, max_length=48)
    for prompt, expect in zip(GEN_PROMPTS, theirs):
        ours, n = gen.generate([prompt], [len(prompt)], max_new_tokens=32)
        assert n.numpy()[0] == 32
        assert ours.numpy()[0].tolist() == expect.tolist(), name


def test_generate_cli_works_on_a_converted_workdir(converted, tmp_path):
    """`generate` on a convert-made workdir (no tokenizer/ dir: the byte tokenizer its
    config names), batch mode, against the in-process generator."""
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.generate import Generator
    wd = converted["llama"][0]
    prompts = ["Hello", "A longer prompt here"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    proc = _cli("deepseek_tf.generate", f"--workdir={wd}", f"--input_file={tmp_path / 'p.jsonl'}",
                f"--output_file={tmp_path / 'o.jsonl'}", "--max_new_tokens=12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    tok = ByteTokenizer()
    model, _ = load_workdir(wd)
    gen = Generator(model, max_length=64, stop_ids=(tok.eos_id,), pad_id=tok.pad_id)
    for prompt, row in zip(prompts, rows):
        ids = tok.encode(prompt, add_eos=False)
        out, n = gen.generate([ids], [len(ids)], max_new_tokens=12)
        expect = tok.decode([t for t in out.numpy()[0, :n[0]] if t < 256])
        assert row["prompt"] == prompt and row["completion"] == expect
        assert row["num_tokens"] == n.numpy()[0]
    assert "tokens/s" in proc.stderr
