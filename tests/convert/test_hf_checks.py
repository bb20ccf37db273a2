"""config.json checks before anything is built, and data defaults that fit the model."""

import json

import pytest

from deepseek_tf.config import Experiment
from deepseek_tf.convert import convert_hf
from deepseek_tf.convert.hf_checks import COMMON, MLA, MOE, check_hf_config
from deepseek_tf.convert.hf_config import hf_config_from_model, model_config_from_hf
from deepseek_tf.errors import ConfigError, UserError
from tests.helpers import tiny, v4_released
from tests.train.test_cli import _error_lines, run

quiet = lambda *_: None  # noqa: E731
LLAMA = hf_config_from_model(tiny.model_config())
V3_MOE = hf_config_from_model(tiny.model_config(
    attention_type="mla", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))


def _refusal(hf: dict) -> str:
    with pytest.raises(UserError) as e:
        model_config_from_hf(hf)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("base,field", [(LLAMA, f) for f in COMMON] +
                         [(V3_MOE, f) for f in COMMON + MLA + MOE])
def test_each_missing_required_field_is_named(base, field):
    for hf in ({k: v for k, v in base.items() if k != field}, {**base, field: None}):
        missing = _refusal(hf).split("missing ", 1)[1].split(".")[0].split(";")[0]
        assert missing.split(", ") == [field]


def test_every_problem_is_named_in_one_line():
    msg = _refusal({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                    "hidden_size": "64", "hidden_act": "relu", "mlp_bias": True})
    assert msg.startswith("config.json: missing vocab_size, intermediate_size, "
                          "num_hidden_layers, num_attention_heads, max_position_embeddings; "
                          "not a positive integer: hidden_size='64'; unsupported "
                          "hidden_act='relu'"), msg
    assert "mlp_bias=true" in msg
    check_hf_config(LLAMA, "LlamaForCausalLM")  # a complete config passes
    check_hf_config(V3_MOE, "DeepseekV3ForCausalLM")


@pytest.mark.parametrize("hf", [v4_released.FLASH, v4_released.PRO])
def test_released_v4_config_keeps_the_yarn_of_compressed_layers(hf):
    # DeepSeek's config.json has the compressed layers' YaRN in the legacy `rope_scaling`
    # key; transformers' DeepseekV4Config reads it as rope_parameters["compress"]: yarn,
    # factor 16 from 65536, betas 32 / 1, attention_factor 1.0 (sliding layers: plain).
    cfg, notes = model_config_from_hf(hf)
    assert cfg.rope_scaling.to_dict() == dict(
        type="yarn", factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0,
        beta_slow=1.0, mscale=0.0, mscale_all_dim=0.0, attention_factor=1.0,
        low_freq_factor=1.0, high_freq_factor=4.0)
    assert (cfg.rope_theta, cfg.compress_rope_theta, notes) == (10000.0, 160000.0, [])
    # ... and the nested rope_parameters transformers saves give the same model.
    saved = {k: v for k, v in hf.items() if k != "rope_scaling"}
    saved["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": 10000.0},
                                "compress": {**hf["rope_scaling"], "rope_type": "yarn",
                                             "rope_theta": 160000.0, "attention_factor": 1.0}}
    assert model_config_from_hf(saved)[0] == cfg


def test_cli_names_every_missing_field_and_writes_nothing(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(
        {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}))
    proc = run("deepseek_tf.convert", f"--hf_dir={hf_dir}", f"--workdir={tmp_path / 'w'}")
    errors = _error_lines(proc)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "num_attention_heads" in errors[0] and "kv_lora_rank" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def short_llama(tmp_path_factory):
    """An HF Llama directory whose model has 64 positions (< the default seq_len 256)."""
    from deepseek_tf.export import export
    from deepseek_tf.model import DeepSeekCausalLM

    exp = Experiment(model=tiny.model_config(max_position_embeddings=64),
                     data=tiny.data_config())
    out = str(tmp_path_factory.mktemp("hf") / "llama64")
    export(DeepSeekCausalLM(exp.model), exp, "hf", out, log=quiet)
    return out


def test_small_max_position_embeddings_converts_with_a_fitting_seq_len(short_llama, tmp_path):
    exp = convert_hf(short_llama, str(tmp_path / "w"), Experiment(), log=quiet)
    assert exp.model.max_position_embeddings == 64 and exp.data.seq_len == 64
    assert Experiment.load(str(tmp_path / "w" / "config.json")).data.seq_len == 64
    with pytest.raises(ConfigError, match="seq_len=128 exceeds"):  # a given value is kept
        convert_hf(short_llama, str(tmp_path / "w2"), Experiment(data=tiny.data_config(
            seq_len=128)), log=quiet, explicit_data=("seq_len",))


def test_cli_converts_a_small_model_without_data_flags(short_llama, tmp_path):
    proc = run("deepseek_tf.convert", f"--hf_dir={short_llama}", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "seq_len defaults to the model's max_position_embeddings 64" in proc.stdout
    assert Experiment.load(str(tmp_path / "w" / "config.json")).data.seq_len == 64
