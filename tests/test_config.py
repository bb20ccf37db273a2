"""Config validation, dict round trip, flags and flagfiles, workdir reconciliation."""

import dataclasses
import glob
import os

import pytest
from absl import flags

from deepseek_tf import config as cfg
from deepseek_tf import flags as dflags
from deepseek_tf.errors import ConfigError, UserError
from tests.helpers import tiny


def test_defaults_validate_and_round_trip():
    exp = cfg.Experiment()
    assert cfg.Experiment.from_dict(exp.to_dict()) == exp
    assert cfg.Experiment.from_dict(__import__("json").loads(exp.to_json())) == exp


@pytest.mark.parametrize("section,kw,needle", [
    ("model", dict(hidden_size=100, num_attention_heads=8), "must divide"),
    ("model", dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads=3"),
    ("model", dict(hidden_size=0), "hidden_size must be > 0"),
    ("model", dict(hidden_act="relu"), "not one of"),
    ("model", dict(hidden_size=1.5), "wrong type"),
    ("model", dict(tie_word_embeddings=1), "wrong type"),
    ("data", dict(seq_len=1), "seq_len"),
    ("data", dict(val_size=2.5), "val_size"),
    ("optim", dict(learning_rate=0.0), "learning_rate"),
    ("optim", dict(min_lr_ratio=2.0), "min_lr_ratio"),
    ("train", dict(steps=0), "steps"),
    ("train", dict(grad_accum_steps=0), "grad_accum_steps"),
    ("data", dict(dedup_threshold=1.5), "dedup_threshold"),
    ("data", dict(drop_regex="(unclosed"), "not a valid regex"),
    ("data", dict(seq_len=64, cutoff_len=100), "cutoff_len=100"),
    ("data", dict(seq_len=64, stride=64), "stride"),
    ("data", dict(min_chars=10, max_chars=5), "max_chars"),
    ("data", dict(num_proc=0), "num_proc"),
    ("data", dict(format="csv"), "not one of"),
    ("tokenizer", dict(type="hf"), "--tokenizer.path"),
    ("tokenizer", dict(type="sentencepiece", vocab_size=100), "vocab_size"),
    ("model", dict(n_routed_experts=8, n_group=3), "n_group=3 must divide"),
    ("model", dict(n_routed_experts=8, n_group=4, topk_group=5), "topk_group=5"),
    ("model", dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3),
     "num_experts_per_tok=3 exceeds the 2 experts"),
    ("model", dict(n_routed_experts=4, n_group=4, topk_group=2, num_experts_per_tok=2),
     "needs >= 2"),
    ("model", dict(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    ("model", dict(attention_type="mla", qk_rope_head_dim=5), "qk_rope_head_dim=5"),
    ("model", dict(attention_type="mla", kv_lora_rank=0), "kv_lora_rank must be > 0"),
    ("model", dict(rope_scaling_type="yarn", rope_scaling_factor=0.5), "rope_scaling_factor"),
    ("model", dict(attention_type="hybrid", sliding_window=0), "sliding_window"),
    ("model", dict(scoring_func="relu"), "not one of"),
    ("model", dict(use_dsa=True, q_lora_rank=8), "needs --model.attention_type=mla"),
    ("model", dict(use_dsa=True, attention_type="mla", q_lora_rank=0), "q_lora_rank > 0"),
    # DeepSeek-V4 (tiny.V4 is valid; one field broken at a time)
    ("model", dict(tiny.V4, layer_types="sliding_attention"), "has 1 entries but "
     "--model.num_hidden_layers=3"),
    ("model", dict(tiny.V4, layer_types="sliding_attention,full_attention,sliding_attention"),
     "unknown full_attention"),
    ("model", dict(tiny.V4, mlp_layer_types="moe,dense,moe"), "unknown dense"),
    ("model", dict(tiny.V4, compress_rate_csa=0), "compress_rate_csa must be > 0"),
    ("model", dict(tiny.V4, compress_rate_hca=-1), "compress_rate_hca must be > 0"),
    ("model", dict(tiny.V4, hc_mult=0), "needs --model.hc_mult >= 1"),
    ("model", dict(hc_mult=-1), "hc_mult must be >= 0"),
    ("model", dict(tiny.V4, index_topk=0), "index_topk must be > 0"),
    ("model", dict(tiny.V4, num_key_value_heads=2), "num_key_value_heads=1"),
    ("model", dict(tiny.V4, o_groups=3), "o_groups=3 must divide"),
    ("model", dict(tiny.V4, qk_rope_head_dim=32), "qk_rope_head_dim=32 must be even"),
    ("model", dict(tiny.V4, swiglu_limit=-1.0), "swiglu_limit must be >= 0"),
    ("model", dict(layer_types=",".join(["sliding_attention"] * 4)), "needs "
     "--model.attention_type=v4"),
    ("model", dict(mlp_layer_types="hash_moe,moe,moe,moe"), "needs MoE"),
])
def test_bad_values_raise_one_clear_line(section, kw, needle):
    with pytest.raises(ConfigError) as e:
        cfg.SECTIONS[section](**kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_int_is_accepted_for_float_and_unknown_keys_raise():
    assert cfg.OptimConfig(learning_rate=1).learning_rate == 1.0
    with pytest.raises(ConfigError, match="unknown model config key"):
        cfg.ModelConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(ConfigError, match="unknown config section"):
        cfg.Experiment.from_dict({"modle": {}})


def test_cross_section_validation():
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        cfg.Experiment(model=cfg.ModelConfig(max_position_embeddings=64),
                       data=cfg.DataConfig(seq_len=128))


def test_save_load_round_trip(tmp_path):
    exp = cfg.Experiment(train=cfg.TrainConfig(steps=7))
    path = str(tmp_path / "config.json")
    exp.save(path)
    assert cfg.Experiment.load(path) == exp
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read config"):
        cfg.Experiment.load(str(tmp_path / "bad.json"))


def _fresh_flags():
    fv = flags.FlagValues()
    dflags.define_flags(flag_values=fv)
    return fv


def test_every_field_has_a_flag_with_help():
    fv = _fresh_flags()
    for section, f, _ in cfg.iter_fields():
        name = f"{section}.{f.name}"
        assert name in fv, name
        assert fv[name].help and fv[name].default == f.default


PRESETS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "*.flags")))


@pytest.fixture(scope="module")
def preset_flags():
    return _fresh_flags()  # defined once (~0.5 s); reset to the defaults before each parse


@pytest.mark.parametrize("preset", PRESETS, ids=os.path.basename)
def test_every_preset_parses_into_a_valid_experiment(preset_flags, preset):
    """Each shipped flagfile uses only defined flags, with values the configs accept,
    and names its own workdir."""
    fv = preset_flags
    fv.unparse_flags()
    fv(["prog", f"--flagfile={preset}"])
    dflags.experiment_from_flags(fv)  # validates every section; raises ConfigError
    assert fv.workdir, f"{preset} sets no --workdir"


def test_flags_and_flagfile_round_trip(tmp_path):
    flagfile = tmp_path / "p.flags"
    flagfile.write_text("# comment\n--model.hidden_size=64\n--model.num_attention_heads=4\n"
                        "--train.steps=5\n--model.tie_word_embeddings=true\n")
    fv = _fresh_flags()
    fv(["prog", f"--flagfile={flagfile}", "--train.steps=9", "--optim.learning_rate=0.01"])
    exp = dflags.experiment_from_flags(fv)
    assert exp.model.hidden_size == 64 and exp.model.tie_word_embeddings
    assert exp.train.steps == 9  # the command line wins over the flagfile
    assert exp.optim.learning_rate == 0.01
    assert dflags.given_overrides(fv)["model"] == {
        "hidden_size": 64, "num_attention_heads": 4, "tie_word_embeddings": True}
    # A flagfile written from a config reads back to the same config.
    lines = [f"--{s}.{k}={v}" for s, d in exp.to_dict().items() if s != "version"
             for k, v in d.items()]
    (tmp_path / "all.flags").write_text("\n".join(lines) + "\n")
    fv2 = _fresh_flags()
    fv2(["prog", f"--flagfile={tmp_path / 'all.flags'}"])
    assert dflags.experiment_from_flags(fv2) == exp


def test_reconcile_with_saved_workdir_config(tmp_path):
    saved = cfg.Experiment(train=cfg.TrainConfig(steps=10))
    given = {s: {} for s in cfg.SECTIONS}
    assert dflags.reconcile(saved, given, "x") == saved
    given["train"] = {"steps": 20}  # resumable: continue the run longer
    assert dflags.reconcile(saved, given, "x").train.steps == 20
    given["model"] = {"hidden_size": saved.model.hidden_size}  # same value: fine
    dflags.reconcile(saved, given, "x")
    given["model"] = {"hidden_size": 512}
    with pytest.raises(ConfigError, match="contradicts x"):
        dflags.reconcile(saved, given, "x")


def test_resumable_fields_are_loop_knobs_only():
    resumable = {f"{s}.{f.name}" for s, f, _ in cfg.iter_fields() if f.metadata["resumable"]}
    assert "train.steps" in resumable
    assert not any(name.startswith(("data.", "optim.")) for name in resumable)
    # Model knobs that change no variable: loss weights and MoE buffer capacities
    # (DeepSeek-V3 lowers its MTP loss weight mid-run).
    assert {n for n in resumable if n.startswith("model.")} == {
        "model.capacity_factor", "model.inference_capacity_factor", "model.aux_loss_alpha",
        "model.router_z_loss_coef", "model.bias_update_speed", "model.mtp_loss_weight",
        "model.indexer_loss_weight"}
    assert all(dataclasses.is_dataclass(c) for c in cfg.SECTIONS.values())


def test_data_output_dir_is_an_alias_of_data_dir():
    fv = _fresh_flags()
    fv(["prog", "--data.output_dir=/tmp/prepared", "--data.inputs=a.jsonl,b/"])
    exp = dflags.experiment_from_flags(fv)
    assert exp.data.data_dir == "/tmp/prepared"
    assert exp.data.input_list == ("a.jsonl", "b/")
    assert dflags.given_overrides(fv)["data"]["data_dir"] == "/tmp/prepared"


def test_configs_saved_before_the_tokenizer_section_still_load():
    old = cfg.Experiment().to_dict()
    del old["tokenizer"]
    old["data"] = {k: v for k, v in old["data"].items() if k != "max_samples"}
    old["data"].update(tokenizer="byte", max_documents=7)
    exp = cfg.Experiment.from_dict(old)
    assert exp.tokenizer.type == "byte" and exp.data.max_samples == 7


def test_every_data_field_has_a_stage_and_the_prepared_settings_keep_their_keys():
    """The fingerprint of prepared data (metadata.json) must keep its keys, or every
    existing prepared directory would be refused as 'prepared with other settings'."""
    for f in dataclasses.fields(cfg.DataConfig):
        assert f.metadata["stage"] in cfg.DATA_STAGES, f.name
    text = cfg.DataConfig()
    assert sorted(text.prepared_settings()) == sorted((
        "format", "text_field", "text_extensions", "max_samples", "normalize",
        "replace_regex", "replacement", "drop_regex", "min_chars", "max_chars",
        "dedup_exact", "dedup_threshold", "dedup_ngram", "dedup_num_perm", "val_size",
        "shard_size_mb"))
    sft = cfg.DataConfig(format="alpaca", seq_len=64)
    assert sft.prepared_settings() == {
        **{k: v for k, v in sft.to_dict().items() if k in text.prepared_settings()},
        "template": "deepseek3", "train_on_prompt": False, "mask_history": False,
        "cutoff_len": 64}
    assert set(text.pipeline_settings()) == {"seq_len", "packing", "stride", "augment",
                                             "mask_rate", "mask_span", "shuffle_buffer",
                                             "cycle_length"}
    # Changing a pipeline field leaves the prepared settings (and so the data) alone.
    assert text.replace(seq_len=64, shuffle_buffer=0).prepared_settings() == \
        text.prepared_settings()


def test_rope_scaling_is_one_typed_dataclass_with_flat_flags_and_keys():
    m = cfg.ModelConfig(rope_scaling_type="yarn", rope_scaling_factor=4.0,
                        original_max_position_embeddings=32, mscale_all_dim=1.0)
    assert m.rope_scaling == cfg.RopeScaling(type="yarn", factor=4.0,
                                             original_max_position_embeddings=32,
                                             mscale_all_dim=1.0)
    assert cfg.ModelConfig(rope_scaling=m.rope_scaling) == m
    # config.json keeps the flat keys, in and out
    d = m.to_dict()
    assert "rope_scaling" not in d
    assert {k: d[k] for k in ("rope_scaling_type", "rope_scaling_factor", "beta_fast",
                              "rope_attention_factor")} == {
        "rope_scaling_type": "yarn", "rope_scaling_factor": 4.0, "beta_fast": 32.0,
        "rope_attention_factor": 0.0}
    assert cfg.ModelConfig.from_dict(d) == m
    assert m.replace(beta_fast=16.0).rope_scaling.beta_fast == 16.0
    assert m.replace(hidden_size=128).rope_scaling == m.rope_scaling
    # flags: one per knob, flat names
    flat = {f.name for s, f, _ in cfg.iter_fields() if s == "model"}
    assert set(cfg.ROPE_FLAGS) <= flat and "rope_scaling" not in flat
    # resolved for the layers: original_max_position_embeddings 0 -> max positions
    r = cfg.ModelConfig(rope_scaling_type="llama3", rope_scaling_factor=8.0,
                        max_position_embeddings=512).resolved_rope_scaling
    assert r.original_max_position_embeddings == 512 and r.type == "llama3"
    assert cfg.ModelConfig().resolved_rope_scaling is None
    assert cfg.RopeScaling.coerce(r.to_dict()) == r  # a layer's get_config round trip
    with pytest.raises(ConfigError, match="--model.beta_fast must be >"):
        cfg.ModelConfig(rope_scaling_type="yarn", beta_fast=1.0, beta_slow=2.0)
