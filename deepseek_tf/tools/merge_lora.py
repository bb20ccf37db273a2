"""Merge a LoRA adapter into plain weights and write a new workdir.

    python -m deepseek_tf.tools.merge_lora --workdir=runs/sft-lora-tiny --output=runs/sft-merged
    python -m deepseek_tf.tools.merge_lora --base=runs/tiny --adapter=runs/sft-lora-tiny/adapter \
        --output=runs/sft-merged

The first form merges a LoRA run's latest checkpoint (base + adapters); the second
applies a saved adapter directory (adapter.safetensors + adapter_config.json) to the
weights of any workdir with the same model, taking the data settings (the chat
template) from the LoRA run that wrote it (`<run>/adapter`). The output is an ordinary
workdir (config.json with finetuning_type=full, checkpoints/ckpt-0 with the merged
weights, tokenizer/, and merge.json naming what was merged; an int8 base stays int8:
dequantize -> add the update -> requantize): generate, evaluate, export and --train.init_from take it as it is.
"""

import json
import os

from deepseek_tf.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()  # TF start-up and grappler/XLA log noise off (README)

from absl import flags  # noqa: E402

from deepseek_tf import flags as dflags  # noqa: E402
from deepseek_tf.errors import UserError  # noqa: E402


def define_flags():
    """The command line's flags (defined only when run as a command)."""
    flags.DEFINE_string("workdir", "", "A LoRA run to merge (its latest checkpoint).")
    flags.DEFINE_string("base", "", "With --adapter: the workdir whose weights the adapter "
                        "goes on.")
    flags.DEFINE_string("adapter", "", "An adapter directory (adapter.safetensors + "
                        "adapter_config.json), e.g. <lora run>/adapter.")
    flags.DEFINE_string("output", "", "The new workdir (must not exist yet).")


def merge(output: str, workdir: str = "", base: str = "", adapter: str = "", log=print) -> str:
    """Writes the merged workdir `output`; returns it. See the module doc."""
    import dataclasses

    from deepseek_tf.errors import UserError
    from deepseek_tf.lora import is_lora, load_adapter, merged_model
    from deepseek_tf.workdir import (load_experiment, load_run_tokenizer, load_workdir,
                                     write_workdir)
    from deepseek_tf.workdir_files import CONFIG_FILE, MERGE_FILE

    if bool(workdir) == bool(base and adapter):
        raise UserError("give --workdir=LORA_RUN, or --base=WORKDIR with --adapter=DIR.")
    if os.path.exists(output):
        raise UserError(f"--output={output} exists; choose a new directory.")
    model, exp = load_workdir(workdir or base)
    if adapter:
        if is_lora(model):
            model = merged_model(model)
        load_adapter(model, adapter)
        run = os.path.dirname(os.path.abspath(adapter))  # <lora run>/adapter
        if os.path.exists(os.path.join(run, CONFIG_FILE)):
            # The data, chat template and stage the adapter was trained with; the
            # architecture and tokenizer are the base's.
            exp = dataclasses.replace(load_experiment(run), model=exp.model,
                                      tokenizer=exp.tokenizer)
        else:
            log(f"note: no {CONFIG_FILE} beside {adapter} (its LoRA run): the chat template "
                f"stays the base's ({exp.data.template}); generate --template=... overrides it")
    elif not is_lora(model):
        raise UserError(f"{workdir} is not a LoRA run (finetuning_type="
                        f"{exp.train.finetuning_type}); nothing to merge.")
    plain = merged_model(model)
    tok = load_run_tokenizer(workdir or base, exp)
    exp = dataclasses.replace(exp, train=exp.train.replace(finetuning_type="full", init_from=""))
    os.makedirs(output)
    write_workdir(output, plain, exp, tok)
    with open(os.path.join(output, MERGE_FILE), "w") as f:
        json.dump({"from": os.path.abspath(workdir or base),
                   "adapter": os.path.abspath(adapter) if adapter else ""}, f, indent=2)
    log(f"wrote {output}: merged weights of {workdir or base}"
        + (f" + {adapter}" if adapter else ""))
    return output


def main(argv):
    F = flags.FLAGS
    merge(F.output, F.workdir, F.base, F.adapter)


def entry():
    """The console script `deepseek-tf-merge-lora`."""
    define_flags()
    dflags.run(main, required=("output",))


if __name__ == "__main__":
    entry()
