"""Analytic parameter counts: equal to the built model's, and DeepSeek's published sizes."""

import os
import subprocess
import sys

import pytest

from deepseek_tf import flags as dflags
from deepseek_tf.convert.hf_config import model_config_from_hf
from deepseek_tf.model import DeepSeekCausalLM, count_params
from deepseek_tf.params import count_parameters, flops_per_token
from tests.helpers import tiny, v4_released

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLA = dict(attention_type="mla", q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
           qk_rope_head_dim=4, v_head_dim=6)
MOE = dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
           moe_intermediate_size=12, n_group=4, topk_group=2, first_k_dense_replace=1)


@pytest.mark.parametrize("kw", [
    {}, dict(attention_bias=True, tie_word_embeddings=True), dict(MLA), dict(MLA, q_lora_rank=0,
    attention_bias=True), dict(MLA, **MOE, num_nextn_predict_layers=2),
    dict(MOE, topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
         moe_layer_freq=2, num_hidden_layers=3, first_k_dense_replace=0),
    dict(MLA, **MOE, use_dsa=True, index_topk=4, index_head_dim=8, index_n_heads=2,
         num_nextn_predict_layers=1),
    dict(tiny.V4, scoring_func="sqrtsoftplus"),
    dict(tiny.V4, num_nextn_predict_layers=2),
])
def test_analytic_count_equals_the_built_model(kw):
    cfg = tiny.model_config(**kw)
    p = count_parameters(cfg)
    assert p["total"] + p["mtp_total"] == count_params(DeepSeekCausalLM(cfg))[1]
    assert p["active"] <= p["total"] and flops_per_token(cfg, 32) > 6 * p["active"] - 1e9


def _preset(name):
    from absl import flags
    fv = flags.FlagValues()
    dflags.define_flags(flag_values=fv)
    fv([sys.argv[0], f"--flagfile={os.path.join(ROOT, 'configs', name)}"])
    return dflags.experiment_from_flags(fv).model


def test_deepseek_presets_have_the_published_sizes():
    v3 = count_parameters(_preset("deepseek-v3-671b.flags"))
    assert abs(v3["total"] / 1e9 - 671) < 1 and abs(v3["active"] / 1e9 - 37) < 1
    # V3.2: "685B" on its model card counts the MTP module's own copies of the embedding
    # and head (2 x 0.93B), which ours shares.
    v32 = count_parameters(_preset("deepseek-v32.flags"))
    with_mtp = v32["total"] + v32["mtp_total"] + 2 * v32["embedding"]
    assert abs(with_mtp / 1e9 - 685) < 1 and abs(v32["active"] / 1e9 - 38.4) < 0.1
    lite = count_parameters(_preset("deepseek-v2-lite.flags"))
    assert abs(lite["total"] / 1e9 - 15.7) < 0.1
    assert abs((lite["active"] - lite["embedding"]) / 1e9 - 2.4) < 0.1


@pytest.mark.parametrize("name,released,total,mtp,card_total,card_unit,card_active", [
    # transformers' DeepseekV4ForCausalLM: 284,332,230,231 parameters + 2,337,280 buffers
    # (tid2eid of the 3 hash-routed layers, the other layers' router correction biases).
    ("deepseek-v4-flash.flags", v4_released.FLASH, 284_334_567_511, 6_610_048_891,
     284e9, 1e9, 13e9),
    # 1,572,997,179,491 + 2,349,312; the card's "1.6T" is 1.57T rounded.
    ("deepseek-v4-pro.flags", v4_released.PRO, 1_572_999_528_803, 25_840_145_979,
     1.6e12, 1e11, 49e9),
], ids=["flash", "pro"])
def test_deepseek_v4_presets_are_the_released_shapes_and_sizes(name, released, total, mtp,
                                                                card_total, card_unit,
                                                                card_active):
    cfg = _preset(name)
    # What convert reads from the released config.json and its one MTP layer (mscale is
    # unused: the attention factor is given).
    assert cfg == model_config_from_hf(released)[0].replace(mscale=1.0,
                                                           num_nextn_predict_layers=1)
    p = count_parameters(cfg)
    # The card counts no MTP (its count is the formula the built tiny V4 MTP checks).
    assert p["total"] == total and p["mtp_total"] == mtp
    assert round(p["total"] / card_unit) * card_unit == card_total
    # The card's active count is without the embedding lookup (13.27B -> 13B, 48.85B ->
    # 49B; with it, 13.80B and 49.78B would round to 14B and 50B).
    assert round((p["active"] - p["embedding"]) / 1e9) == card_active / 1e9
    assert round(p["active"] / 1e9) == card_active / 1e9 + 1


@pytest.mark.parametrize("flag,needle", [
    ("--model.index_topk=0", "--model.index_topk must be > 0"),
    ("--model.index_head_dim=8", "--model.index_head_dim=8 must be >= "
                                 "--model.qk_rope_head_dim=16"),
    ("--model.attention_type=gqa", "--model.use_dsa needs --model.attention_type=mla"),
    ("v4:--model.layer_types=sliding_attention,sliding_attention", "has 2 entries"),
    ("v4:--model.mlp_layer_types=moe,moe,moe,hash", "unknown hash"),
    ("v4:--model.compress_rate_hca=0", "--model.compress_rate_hca must be > 0"),
    ("v4:--model.hc_mult=0", "needs --model.hc_mult >= 1"),
    ("v4:--model.index_topk=-3", "--model.index_topk must be > 0"),
])
def test_bad_dsa_and_v4_settings_are_one_line_exit_2(flag, needle):
    preset = "deepseek-v32-tiny.flags"
    if flag.startswith("v4:"):
        preset, flag = "deepseek-v4-tiny.flags", flag[3:]
    proc = subprocess.run([sys.executable, "-m", "deepseek_tf.params",
                           f"--flagfile=configs/{preset}", flag],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_params_cli_prints_without_allocating():
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "deepseek_tf.params",
                           "--flagfile=configs/deepseek-v3-671b.flags"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "671.03B" in proc.stdout and "37.55B" in proc.stdout
    code = ("import sys\nsys.argv = ['params', '--flagfile=configs/deepseek-v3-tiny.flags']\n"
            "import deepseek_tf.params as p\ntry:\n    p.entry()\nexcept SystemExit:\n    pass\n"
            "print('tensorflow imported:', 'tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)
    assert "1.84M" in proc.stdout and "tensorflow imported: False" in proc.stdout, proc.stdout


def test_params_cli_prints_total_and_active_of_the_v4_presets():
    for name, total, active in (("flash", "284.33B", "13.80B; 13.27B without the embedding"),
                                ("pro", "1.57T", "49.78B; 48.85B without the embedding")):
        proc = subprocess.run([sys.executable, "-m", "deepseek_tf.params",
                               f"--flagfile=configs/deepseek-v4-{name}.flags"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("total parameters:") and f"({total})" in lines[0], lines
        assert lines[1].startswith("active per token:") and f"({active})" in lines[1], lines


def test_attention_flops_count_the_keys_each_query_attends():
    """Per block and token 6 x heads x (qk + v width) x keys, hand-counted: dense T;
    DSA its top-k (+ 6 x the indexer's width x T); V4 the window plus the compressed
    entries it reads (tiny.V4: window 6, CSA m = 4 top-2 + indexer 2 x 8, HCA m' = 8)."""
    def grow(kw, t0, t1):
        cfg = tiny.model_config(**kw)
        return cfg, flops_per_token(cfg, t1) - flops_per_token(cfg, t0)

    cfg, d = grow(MLA, 32, 64)
    h, qkv = cfg.num_attention_heads, 8 + 4 + cfg.v_head_dim
    assert d == 6 * cfg.num_hidden_layers * h * qkv * 32
    cfg, d = grow(dict(MLA, use_dsa=True, index_topk=4, index_head_dim=8, index_n_heads=2),
                  32, 64)
    assert d == 6 * cfg.num_hidden_layers * 16 * 32  # top-4 of both: only the indexer grows
    cfg, d = grow(tiny.V4, 32, 64)
    # T 32 -> 64: CSA 8 -> 16 entries (top-2 of both; its indexer scores 8 more), HCA 4 -> 8.
    assert d == 6 * (cfg.num_attention_heads * 2 * 16 * 4 + 16 * 8)
