"""Names of the files and directories a run keeps in its workdir.

A workdir (`--workdir`) holds what `train`, `prepare` and `convert` write, and what
generation, export and evaluation read back. This module imports nothing.
"""

#: The resolved experiment config (`Experiment.save`); a later run reads it back.
CONFIG_FILE = "config.json"
#: Written by `convert`: where the weights came from (its presence marks a converted workdir).
CONVERT_FILE = "convert.json"
#: Written by `tools/merge_lora`: the LoRA run (or base + adapter) it merged, so that
#: `export --quantize=fp8` finds the block size of the conversion the weights came from.
MERGE_FILE = "merge.json"
#: Checkpoints (`tf.train.CheckpointManager`); `best/` inside holds the best one.
CHECKPOINT_DIR = "checkpoints"
#: The tokenizer a trained run used (copied from the prepared data).
TOKENIZER_DIR = "tokenizer"
#: Default prepared-data directory when `--data.data_dir` is empty.
DATA_DIR = "data"


def prepared_data_dir(data_dir: str, workdir: str) -> str:
    """A run's prepared data: `--data.data_dir`, else `DATA_DIR` inside its workdir
    (where training on the embedded corpus prepares it)."""
    import os
    return data_dir or os.path.join(workdir, DATA_DIR)


#: In a prepared-data directory: its settings, splits and shards (written last by prepare).
METADATA_FILE = "metadata.json"
#: TensorBoard event files and profiler traces.
TENSORBOARD_DIR = "tensorboard"
#: One JSON line per logged step / evaluation.
LOG_FILE = "log.jsonl"
#: The loss curve drawn at the end of a run.
PLOT_FILE = "loss.svg"
