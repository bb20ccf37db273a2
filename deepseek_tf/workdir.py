"""Reading a run directory back: its config, model weights and tokenizer.

A workdir is what `train` or `convert` wrote: `config.json`, `checkpoints/`, and
`tokenizer/` (a trained run; a converted one names its tokenizer in config.json).
Generation, export and evaluation all start here.

`write_workdir` writes one without training (a merged LoRA run, a random model for tests
and benchmarks).

Example:
    >>> model, exp = load_workdir("runs/tiny")
    >>> tok = load_run_tokenizer("runs/tiny", exp)
"""

from __future__ import annotations

import os

from deepseek_tf.config import Experiment
from deepseek_tf.errors import UserError
from deepseek_tf.workdir_files import CHECKPOINT_DIR, CONFIG_FILE, TOKENIZER_DIR


def load_experiment(workdir: str) -> Experiment:
    """The workdir's resolved config (`config.json`), with one clear error if missing."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UserError(f"{workdir} has no config.json: not a deepseek_tf workdir "
                        f"(train or convert into it first).")
    return Experiment.load(path)


def load_workdir(workdir: str, checkpoint: str = ""):
    """(model with the latest (or given) checkpoint's weights, Experiment) of a workdir.

    A LoRA run's model comes with its adapters enabled (`lora.merged_model` folds them
    into plain weights)."""
    import tensorflow as tf

    from deepseek_tf.model import DeepSeekCausalLM

    exp = load_experiment(workdir)
    path = checkpoint or tf.train.latest_checkpoint(os.path.join(workdir, CHECKPOINT_DIR))
    if not path:
        raise UserError(f"{workdir}/checkpoints holds no checkpoint.")
    model = DeepSeekCausalLM(exp.model)
    if exp.train.finetuning_type == "lora":  # the checkpoint holds base + adapters
        from deepseek_tf.lora import apply_lora
        apply_lora(model, exp.lora, seed=exp.train.seed)
    restore_model(model, path)
    return model, exp


def restore_model(model, path: str, what: str = "") -> None:
    """Restores `model`'s weights from checkpoint `path` (optimizer state ignored); a
    missing or mismatched checkpoint is one `UserError` line, prefixed by `what`."""
    import tensorflow as tf

    restore_checkpoint(tf.train.Checkpoint(model=model), path, what=what, partial=True)


def restore_checkpoint(checkpoint, path: str, what: str = "", hint: str = "",
                       partial: bool = False) -> None:
    """Restores `checkpoint` (a `tf.train.Checkpoint`) from `path`, every object of it
    matched: the one restore with a clear error (workdirs, resumes, rollbacks).

    A missing, mismatched or damaged checkpoint raises one `UserError` line:
    `what` + "cannot restore PATH: <TF's first line>" + `hint`.

    Args:
      checkpoint: what to restore into.
      path: a checkpoint prefix (`.../ckpt-8`).
      what: prefix of the error (e.g. "--train.init_from: ").
      hint: end of the error (how to fix it).
      partial: the checkpoint may hold more than `checkpoint` tracks (no warning).
    """
    import tensorflow as tf

    try:
        status = checkpoint.restore(path)
        (status.expect_partial() if partial else status).assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what}cannot restore {path}: {first}{hint}") from e


def load_run_tokenizer(workdir: str, exp: Experiment):
    """The tokenizer a run used: `<workdir>/tokenizer/`, else the one config.json names
    (a converted HF workdir: its tokenizer.json; the byte tokenizer needs no files)."""
    from deepseek_tf.data.tokenizer import TOKENIZER_FILE, build_tokenizer, load_tokenizer

    saved = os.path.join(workdir, TOKENIZER_DIR)
    if os.path.exists(os.path.join(saved, TOKENIZER_FILE)):
        return load_tokenizer(saved)
    if exp.tokenizer.type == "byte" or exp.tokenizer.path:
        return build_tokenizer(exp.tokenizer)
    raise UserError(f"{workdir} has no tokenizer/ and config.json names no tokenizer file; "
                    f"train in that workdir first, or convert from a directory with a "
                    f"tokenizer.json.")


def write_workdir(path: str, model, exp: Experiment, tok) -> str:
    """Writes `model`'s weights as the step-0 checkpoint, `exp` as config.json and `tok`
    under tokenizer/, as `train` lays a run out; returns `path`."""
    import tensorflow as tf

    os.makedirs(path, exist_ok=True)
    exp.save(os.path.join(path, CONFIG_FILE))
    tok.save(os.path.join(path, TOKENIZER_DIR))
    step = tf.Variable(0, dtype=tf.int64)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model, step=step),
                               os.path.join(path, CHECKPOINT_DIR), max_to_keep=1).save(0)
    return path
