"""absl flags generated from the config dataclasses, and the workdir contract.

Every config field becomes a flag `--<section>.<field>` (e.g. `--model.hidden_size`),
with the field's help text and default. Presets are absl flagfiles
(`--flagfile=configs/tiny.flags`); flags given later on the command line win.

The resolved config is saved as `<workdir>/config.json`. A later run in the same
workdir reads it back: flags that are not given keep the saved values, and a
given flag that contradicts the saved value is an error, except for fields marked
`resumable` (e.g. `--train.steps`, to continue a run).

Example (in an entry point):
    define_flags()
    def main(argv):
        exp = resolve_experiment(FLAGS, workdir(FLAGS))
    run(main)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Iterable

from absl import app, flags

from deepseek_tf import config as cfg
from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.workdir_files import (CHECKPOINT_DIR, CONFIG_FILE, CONVERT_FILE,
                                       METADATA_FILE, prepared_data_dir)

FLAGS = flags.FLAGS
# Extra flag names for existing fields: --data.output_dir reads naturally for prepare.
ALIASES = {"data.output_dir": "data.data_dir"}


def _flag_name(section: str, field_name: str) -> str:
    return f"{section}.{field_name}"


def define_flags(sections: Iterable[str] = tuple(cfg.SECTIONS),
                 flag_values: flags.FlagValues = FLAGS,
                 workdir_help: str = "Run directory: config.json, checkpoints, logs, "
                                     "TensorBoard events, plots.") -> None:
    """Defines `--workdir` and one flag per config field of `sections`."""
    sections = tuple(sections)
    if "workdir" not in flag_values:
        flags.DEFINE_string("workdir", "runs/default", workdir_help, flag_values=flag_values)
    for section, f, t in cfg.iter_fields():
        if section not in sections:
            continue
        name = _flag_name(section, f.name)
        if name in flag_values:
            continue
        help_text = f.metadata["help"]
        if f.metadata.get("resumable"):
            help_text += " (May change when resuming.)"
        kw = dict(flag_values=flag_values)
        if f.metadata.get("choices"):
            flags.DEFINE_enum(name, f.default, list(f.metadata["choices"]), help_text, **kw)
        elif t is bool:
            flags.DEFINE_bool(name, f.default, help_text, **kw)
        elif t is int:
            flags.DEFINE_integer(name, f.default, help_text, **kw)
        elif t is float:
            flags.DEFINE_float(name, f.default, help_text, **kw)
        else:
            flags.DEFINE_string(name, f.default, help_text, **kw)
    for alias, original in ALIASES.items():
        if original in flag_values and alias not in flag_values:
            flags.DEFINE_alias(alias, original, flag_values=flag_values)


def define_jit_compile(default: str, help_text: str,
                       flag_values: flags.FlagValues = FLAGS) -> None:
    """`--jit_compile=auto|true|false` of generate, evaluate and export: the same choices
    and parser as the generated `--train.jit_compile` (deepseek_tf.autojit)."""
    from deepseek_tf.autojit import JIT_CHOICES

    caller = sys._getframe(1).f_globals.get("__name__", "")  # its --help lists the flag
    flags.DEFINE_enum("jit_compile", default, list(JIT_CHOICES), help_text,
                      case_sensitive=False, flag_values=flag_values,
                      module_name=sys.argv[0] if caller == "__main__" else caller)


def define_quantize(help_text: str = "", choices=None) -> None:
    """`--quantize` (default: the modes of `deepseek_tf.quantize`) with `--group_size`,
    `--calibration_data` and `--calibration_samples` of export, generate and evaluate."""
    from deepseek_tf.quantize import HEAD_DEFAULT, HEAD_MODES, MODES

    caller = sys._getframe(1).f_globals.get("__name__", "")
    module = sys.argv[0] if caller == "__main__" else caller
    flags.DEFINE_enum("quantize", "none", list(choices or MODES), help_text or (
        "Quantize the loaded weights in memory first with Keras, as export "
        "--format=saved_model does: int8, int4 (4-bit round-to-nearest per --group_size), "
        "gptq or awq (4-bit, calibrated on --calibration_data; awq's per-channel "
        "scales searched on each decoder block's output); kv_b_proj, a tied "
        "embedding, norms, routers and MoE expert stacks stay float."), module_name=module)
    flags.DEFINE_integer("group_size", 128, "int4/gptq/awq: input channels per 4-bit scale; "
                         "a layer whose input width it does not divide gets a narrower last "
                         "group (tflite/litertlm int4 needs a divisor); -1 = one scale per "
                         "output channel (gptq: only for inputs up to 128 wide).",
                         lower_bound=-1, module_name=module)
    flags.DEFINE_string("calibration_data", "", "gptq/awq: a JSONL/text file or a prepared "
                        "data directory to calibrate on (JSONL: each record's text, or an "
                        "alpaca/sharegpt/prompt record in the run's --data.template); empty = "
                        "the run's own prepared data (its --data.data_dir, else "
                        "WORKDIR/data).", module_name=module)
    flags.DEFINE_integer("calibration_samples", 256, "gptq/awq: calibration windows (each "
                         "the run's --data.seq_len tokens).", lower_bound=1,
                         module_name=module)
    flags.DEFINE_enum("quantize_head", HEAD_DEFAULT, list(HEAD_MODES), "int4/gptq/awq: the "
                      "untied output head and the embedding, outside the decoder blocks: "
                      "none = float (as AutoGPTQ, AutoAWQ and llm-compressor leave them), "
                      "int8 per channel, or int4 like the blocks.", module_name=module)


def quantize_options(flag_values=FLAGS) -> dict | None:
    """The `define_quantize` flags as `quantize_run` keyword arguments (None: none)."""
    if flag_values.quantize == "none":
        return None
    return dict(mode=flag_values.quantize, group_size=flag_values.group_size,
                calibration_data=flag_values.calibration_data,
                calibration_samples=flag_values.calibration_samples,
                head=flag_values.quantize_head)


def _section_values(flag_values, section: str, only_present: bool) -> dict:
    out = {}
    for key, _, _ in cfg.SECTIONS[section].flag_fields():
        name = _flag_name(section, key)
        if name in flag_values and (flag_values[name].present or not only_present):
            out[key] = flag_values[name].value
    return out


def experiment_from_flags(flag_values: flags.FlagValues = FLAGS) -> cfg.Experiment:
    """Builds (and so validates) an Experiment from flag values."""
    return cfg.Experiment(**{
        s: cls.from_dict(_section_values(flag_values, s, only_present=False))
        for s, cls in cfg.SECTIONS.items()})


def given_overrides(flag_values: flags.FlagValues = FLAGS) -> dict[str, dict]:
    """The flags given on the command line or in a flagfile, per section."""
    return {s: _section_values(flag_values, s, only_present=True) for s in cfg.SECTIONS}


def reconcile(saved: cfg.Experiment, given: dict[str, dict], path: str) -> cfg.Experiment:
    """Applies given flags to a saved config; contradictions are errors.

    Args:
      saved: the experiment read from an existing workdir.
      given: {section: {field: value}} of the flags the user gave.
      path: the saved config's path, for the error message.
    """
    sections = {}
    for s, cls in cfg.SECTIONS.items():
        sec = getattr(saved, s)
        values = sec.to_dict()
        changes = {}
        for key, f, _ in cls.flag_fields():
            if key not in given[s]:
                continue
            new, old = given[s][key], values[key]
            if new == "auto" and "auto" in (f.metadata.get("choices") or ()):
                continue  # the run resolved "auto" once (config.json): keep its choice
            if new == old or (isinstance(old, float) and float(new) == old):
                continue
            if not f.metadata.get("resumable"):
                raise ConfigError(
                    f"--{s}.{key}={new!r} contradicts {path}, which has {old!r}; "
                    f"use a new --workdir, or drop the flag to continue that run.")
            changes[key] = new
        sections[s] = sec.replace(**changes) if changes else sec
    return cfg.Experiment(**sections)


def fresh_conversion(workdir: str) -> bool:
    """True for a workdir written by `deepseek_tf.convert` that has not trained yet
    (its latest checkpoint is still the converted ckpt-0)."""
    index = os.path.join(workdir, CHECKPOINT_DIR, "checkpoint")
    if not os.path.exists(os.path.join(workdir, CONVERT_FILE)) or not os.path.exists(index):
        return False
    with open(index) as f:
        first = f.readline()  # model_checkpoint_path: "ckpt-N"
    return first.strip().endswith('ckpt-0"')


def resolve_experiment(flag_values: flags.FlagValues = FLAGS,
                       workdir: str | None = None) -> cfg.Experiment:
    """The experiment of this run: flags, reconciled with `<workdir>/config.json`.

    In a freshly converted workdir only the model section is fixed (the weights
    define it); given data, optimizer and loop flags replace the saved values.
    """
    exp = experiment_from_flags(flag_values)  # validates the flags even when resuming
    given = given_overrides(flag_values)
    path = os.path.join(workdir, CONFIG_FILE) if workdir else ""
    if path and os.path.exists(path):
        saved = cfg.Experiment.load(path)
        if fresh_conversion(workdir):
            saved = cfg.Experiment(model=saved.model, **{
                s: getattr(saved, s).replace(**given[s]) for s in cfg.SECTIONS
                if s != "model"})
        exp = reconcile(saved, given, path)
    elif exp.train.init_from:
        exp = adopt_init_from(exp, given)
    return adopt_prepared_data(exp, given, workdir or "")


#: The data fields that say what the prepared samples are; `train` takes them from the
#: prepared directory's metadata.json, so config.json (and generate / evaluate, which
#: read the chat template there) match the data.
PREPARED_SAMPLE_FIELDS = ("format", "template")


def adopt_prepared_data(exp: cfg.Experiment, given: dict[str, dict],
                        workdir: str) -> cfg.Experiment:
    """The run's data format and chat template from its prepared data, if prepared.

    A given flag that contradicts the prepared data is an error; so is a
    `--data.data_dir` that does not exist when there is nothing to prepare into it
    (no `--data.inputs`): the embedded corpus is only the default directory's fallback.
    """
    data = exp.data
    data_dir = prepared_data_dir(data.data_dir, workdir)
    meta_path = os.path.join(data_dir, METADATA_FILE)
    if not os.path.exists(meta_path):
        if data.data_dir and not data.inputs and not os.path.exists(data.data_dir):
            raise UserError(
                f"--data.data_dir={data.data_dir} does not exist; give the directory "
                f"prepare wrote (--data.output_dir), or --data.inputs=FILES to prepare into it.")
        return exp
    try:
        with open(meta_path, encoding="utf-8") as f:
            settings = json.load(f)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return exp  # train reports an unreadable metadata.json in its own words
    changes = {}
    for key in PREPARED_SAMPLE_FIELDS:
        if key not in settings:  # template: only SFT data records one
            continue
        prepared, value = settings[key], given["data"].get(key, getattr(data, key))
        if key in given["data"] and value != prepared:
            raise ConfigError(
                f"--data.{key}={value!r} contradicts {meta_path}, prepared with "
                f"{prepared!r}; drop the flag, or prepare the data again into a new "
                f"--data.output_dir.")
        if getattr(data, key) != prepared:
            changes[key] = prepared
    return dataclasses.replace(exp, data=data.replace(**changes)) if changes else exp


def adopt_init_from(exp: cfg.Experiment, given: dict[str, dict]) -> cfg.Experiment:
    """A new run that starts from `--train.init_from=WORKDIR`: the model section (and
    the tokenizer) come from that workdir; a given flag that contradicts them is an error.
    """
    src = exp.train.init_from
    path = os.path.join(src, CONFIG_FILE)
    if not os.path.exists(path):
        raise UserError(f"--train.init_from={src} has no {CONFIG_FILE}: not a deepseek_tf "
                        f"workdir (train or convert into it first).")
    source = cfg.Experiment.load(path)
    tok = source.tokenizer
    for name in ("tokenizer.model", "tokenizer.json"):  # a trained run's own tokenizer file
        f = os.path.join(src, "tokenizer", name)
        if os.path.exists(f) and tok.type != "byte":
            tok = tok.replace(path=os.path.abspath(f))
    # Training knobs of the model section (loss weights, capacity factors, router bias
    # speed: the fields marked resumable) and the experts' placement (expert_parallel:
    # the weights are gathered, train/finetune.py) may be set; the architecture may not.
    loose = {k for k, f, _ in cfg.ModelConfig.flag_fields() if f.metadata["resumable"]}
    loose.add("expert_parallel")
    model = source.model.replace(**{k: v for k, v in given["model"].items() if k in loose})
    for s, fixed in (("model", model), ("tokenizer", tok)):
        values = fixed.to_dict()
        for name, value in given[s].items():
            old = values[name]
            if value != old and not (isinstance(old, float) and float(value) == old) and \
                    not (s == "tokenizer" and name == "path"):
                raise ConfigError(
                    f"--{s}.{name}={value!r} contradicts --train.init_from={src}, whose "
                    f"config.json has {old!r}; drop the flag (the model comes from there).")
    data = exp.data
    if "seq_len" not in given["data"] and data.seq_len > model.max_position_embeddings:
        data = data.replace(seq_len=model.max_position_embeddings)
    return dataclasses.replace(exp, model=model, tokenizer=tok, data=data)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flags parser for `app.run`: a bad flag is one line and exit status 2."""
    try:
        return FLAGS(argv)
    except SystemExit as e:  # absl exits 1 after printing --help; help is not a failure
        helps = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
        if e.code == 1 and any(a in helps for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        message = str(e).removeprefix("ERROR:: ")  # absl's own prefix (a missing flagfile)
        print(f"error: {message}. See --help for the valid flags.", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[list[str]], int | None], required: Iterable[str] = ()) -> None:
    """Runs an entry point: positional arguments, an empty `required` flag and user errors
    become one line on stderr and exit status 2."""

    def wrapped(argv):
        try:
            if len(argv) > 1:
                raise UserError(f"unexpected arguments {argv[1:]}; flags look like "
                                f"--name=value (see --help).")
            for name in required:
                if not FLAGS[name].value:
                    raise UserError(f"--{name} is required (see --help).")
            return main(argv)
        except (ConfigError, UserError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    from absl import logging
    logging.set_verbosity(logging.WARNING)  # TF's checkpoint INFO chatter
    app.run(wrapped, flags_parser=parse_flags)
