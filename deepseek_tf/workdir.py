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

import dataclasses
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
    world = exp.model.expert_parallel
    if world > 1:  # one model holding every worker's experts
        exp = dataclasses.replace(exp, model=exp.model.replace(expert_parallel=1))
    model = DeepSeekCausalLM(exp.model)
    if exp.train.finetuning_type == "lora":  # the checkpoint holds base + adapters
        from deepseek_tf.lora import apply_lora
        apply_lora(model, exp.lora, seed=exp.train.seed)
    if world > 1:
        _restore_gathering_experts(model, path, world)
    else:
        restore_model(model, path)
    return model, exp


def _restore_gathering_experts(model, path: str, world: int) -> None:
    """Restores an expert-parallel run's checkpoint `path` into `model` (built with every
    expert): worker i's experts come from its own checkpoint of the same step
    (`checkpoints/data-worker-<i>/`, `experts/experts/<j>`: its j-th expert stack in the
    model's order), the rest from the chief's (whose expert stacks hold only worker 0's
    rows, and are restored into stand-ins of that shape)."""
    import tensorflow as tf

    from deepseek_tf.layers.moe import DeepSeekMoE

    layers = [m for m in model._flatten_layers() if isinstance(m, DeepSeekMoE)]
    names = ("gate_up_proj", "down_proj")
    full = {(id(m), n): getattr(m, n) for m in layers for n in names}
    for m in layers:  # the chief's checkpoint holds (E / W, ...) stacks
        for n in names:
            shape = (m.num_experts // world, *getattr(m, n).shape[1:])
            object.__setattr__(m, n, tf.Variable(tf.zeros(shape), name=n))
            m._track_trackable(getattr(m, n), n, overwrite=True)
    try:
        restore_model(model, path)
    finally:
        for m in layers:
            for n in names:
                object.__setattr__(m, n, full[(id(m), n)])
                m._track_trackable(full[(id(m), n)], n, overwrite=True)
    stacks = [v for v in model.trainable_variables
              if any(v is w for w in full.values())]          # the model's order
    step = os.path.basename(path)
    parts = []
    for i in range(world):
        mine = os.path.join(os.path.dirname(path), f"data-worker-{i}", step)
        try:
            reader = tf.train.load_checkpoint(mine)
            parts.append([reader.get_tensor(f"experts/experts/{j}/.ATTRIBUTES/VARIABLE_VALUE")
                          for j in range(len(stacks))])
        except (tf.errors.OpError, ValueError) as e:
            raise UserError(f"expert-parallel run: cannot read worker {i}'s experts from "
                            f"{mine} ({str(e).strip().splitlines()[0]}): every worker's "
                            f"checkpoints/data-worker-<i>/ must be there.") from e
    for j, var in enumerate(stacks):
        var.assign(tf.concat([p[j] for p in parts], axis=0))  # worker i: rows [i L, (i+1) L)


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
