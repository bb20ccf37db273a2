"""Weight quantization: size, decode speed and quality for none / int8 / int4 / gptq / awq.

    python bench/quantize.py [--workdir=runs/tiny] [--group_size=128] [--quantize_head=int8]
                             [--demo_run=runs/sft-lora-tiny
                              --demo_data=data/sft-demo/heldout.jsonl] [--smoke]

The model of `--workdir` (default: configs/tiny.flags' model trained here for
`--train_steps` steps on the embedded corpus) is loaded once per mode and quantized in
memory by `deepseek_tf.quantize.quantize_run` (what `export --quantize=MODE` does;
gptq/awq calibrate on `--calibration_samples` windows of the run's train split). Per
mode it prints:
  size       the SavedModel's variables file (MiB) and its ratio to float32
  decode     ms/token of the SavedModel's `generate_ids` (greedy, batch 1, no XLA):
             (time of --new_tokens tokens - time of 1) / (--new_tokens - 1); min /
             median / max over --repeats rounds
  val loss   mean next-token cross-entropy (nats per token) on the run's validation
             split, cut in windows of the run's sequence length (at most 64 windows)
  vs int4    gptq/awq: their val loss minus int4's, mean over the windows +- its
             standard error (window by window, so the noise of 64 windows shows)
  KL         mean KL(float || mode) of the next-token distributions on those windows
             (nats per token): what GPTQ and AWQ minimise, and finer than the loss,
             whose differences at this size are as large as the rounding's noise
  demo EM    with `--demo_run` (e.g. `make demo`'s LoRA run): exact match of greedy
             answers to `--demo_data` (`evaluate` with --quantize; first --demo_samples);
             gptq/awq: one figure per `--demo_calibration` count of calibration windows
             (the first N of the demo run's data; capped at what it holds: `make demo`'s
             has 190 windows of 256 tokens). The calibration is deterministic: the same
             count gives the same figure in every run.
4-bit modes keep the untied output head and the embedding in `--quantize_head`
(none = float, int8, int4; export's default).
Figures only; quote them from a quiet machine. `--smoke`: a 2-step model, 2 windows.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

MODES = ("none", "int8", "int4", "gptq", "awq")
from deepseek_tf.quantize import HEAD_DEFAULT, HEAD_MODES  # noqa: E402


def trained_run(path: str, steps: int, smoke: bool) -> str:
    """configs/tiny.flags' model trained `steps` steps on the embedded corpus, at `path`."""
    import contextlib
    import dataclasses
    import io

    from deepseek_tf.config import TrainConfig
    from deepseek_tf.flags import experiment_from_flags
    from deepseek_tf.train.loop import train
    exp = experiment_from_flags(common.flag_values(
        [f"--flagfile={os.path.join(common.ROOT, 'configs', 'tiny.flags')}"]))
    data = exp.data.replace(data_dir=os.path.join(path, "data"))
    if smoke:
        data = data.replace(max_samples=40, seq_len=32)
        exp = dataclasses.replace(exp, model=exp.model.replace(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    exp = dataclasses.replace(exp, data=data, train=TrainConfig(
        steps=steps, batch_size=2 if smoke else 16, log_every=steps, eval_every=0,
        checkpoint_every=steps, jit_compile="false"))
    run = os.path.join(path, "run")
    with contextlib.redirect_stdout(io.StringIO()):
        train(exp, run, log=lambda *_: None)
    return run


def validation_windows(exp, windows: int, workdir: str):
    """The run's validation split cut in windows of its sequence length, at most
    `windows` of them: (N, T) int32."""
    import numpy as np
    import tensorflow as tf

    from deepseek_tf.data.pipeline import documents
    from deepseek_tf.data.shards import read_metadata, shard_paths
    from deepseek_tf.workdir_files import prepared_data_dir
    data_dir = prepared_data_dir(exp.data.data_dir, workdir)
    meta = read_metadata(data_dir)
    docs = documents(shard_paths(data_dir, meta, "validation"), meta["token_dtype"],
                     shuffle_seed=None, cycle_length=1, repeat=False)
    flat = np.concatenate([t.numpy() for t, _ in docs])
    t = exp.data.seq_len
    n = min(windows, flat.size // t)
    return tf.constant(flat[:n * t].reshape(n, t).astype(np.int32))


def validation_losses(model, ids):
    """Mean next-token NLL of each window of `ids` (N, T): (N,)."""
    import tensorflow as tf

    from deepseek_tf.scoring import score_tokens
    log_probs, _ = score_tokens(model, ids)                # (N, T), 0 at the first token
    return -tf.reduce_mean(log_probs[:, 1:], -1).numpy()


def kl_to(reference, model, ids, chunk: int = 8) -> float:
    """Mean KL(reference || model) of the next-token distributions over `ids` (N, T)."""
    import tensorflow as tf
    total = 0.0
    for i in range(0, int(ids.shape[0]), chunk):
        p, q = (tf.nn.log_softmax(tf.cast(m(ids[i:i + chunk]), tf.float32))
                for m in (reference, model))                        # (n, T, V)
        total += float(tf.reduce_sum(tf.exp(p) * (p - q)))
    return total / float(ids.shape[0] * ids.shape[1])


def decode_ms(path: str, new: int, repeats: int) -> tuple[float, float, float]:
    """(min, median, max) over `repeats` rounds of one decode step's ms: a round times
    `new` tokens and 1 token, one after the other."""
    import tensorflow as tf
    sig = tf.saved_model.load(path).signatures["generate_ids"]
    prompt = tf.constant([[256, 84, 104, 101, 32]])

    def run(k):
        return lambda: sig(input_ids=prompt, lengths=tf.constant([5]),
                           max_new_tokens=tf.constant([k]), temperature=tf.constant([0.0]),
                           top_k=tf.constant([0]), top_p=tf.constant([1.0]),
                           seed=tf.constant([0]))["output_ids"].numpy()
    run(1)(), run(new)()                                               # trace, warm up
    rounds = []
    for _ in range(repeats):
        one, many = common.time_calls(run(1), 1)[0], common.time_calls(run(new), 1)[0]
        rounds.append(1e3 * (many - one) / (new - 1))
    return common.stats(rounds)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--workdir", default="", help="a trained run (default: train one here)")
    p.add_argument("--train_steps", type=int, default=300)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--quantize_head", choices=HEAD_MODES, default=HEAD_DEFAULT)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--demo_run", default="")
    p.add_argument("--demo_data", default=os.path.join("data", "sft-demo", "heldout.jsonl"))
    p.add_argument("--demo_samples", type=int, default=200)
    p.add_argument("--demo_calibration", default="16,32,256",
                   help="gptq/awq demo EM: comma-separated calibration window counts")
    a = common.start(p, argv)
    for flag, path in (("--workdir", a.workdir), ("--demo_run", a.demo_run),
                       ("--demo_data", a.demo_data if a.demo_run else "")):
        if path and not os.path.exists(path):
            p.error(f"{flag}={path}: no such file or directory")
    from deepseek_tf.evaluate import evaluate_workdir
    from deepseek_tf.export import export
    from deepseek_tf.quantize import quantize_run
    from deepseek_tf.workdir import load_run_tokenizer, load_workdir

    quiet = lambda *_: None  # noqa: E731
    modes = ("none", "int4", "awq") if a.smoke else MODES
    samples, windows, new = (2, 2, 3) if a.smoke else (a.calibration_samples, 64, a.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = a.workdir or trained_run(tmp, 2 if a.smoke else a.train_steps, a.smoke)
        group = 24 if a.smoke else a.group_size      # smoke: 32 wide, a narrower last group
        print(f"model: {workdir if a.workdir else 'configs/tiny.flags trained here'}; "
              f"group size {group}; gptq/awq on {samples} calibration windows; "
              f"head and embedding of the 4-bit modes: {a.quantize_head}")
        header = (f"{'mode':<6} {'MiB':>7} {'x fp32':>7} {'ms/token min/med/max':>21} "
                  f"{'val loss':>9} {'vs int4':>17} {'KL':>9}")
        if a.demo_run:
            header += f" {'demo EM':>8} (gptq/awq: {a.demo_calibration} windows)"
        print(header)
        base = rtn = reference = ids = None
        for mode in modes:
            model, exp = load_workdir(workdir)
            tok = load_run_tokenizer(workdir, exp)
            model = quantize_run(model, exp, tok, mode, group, calibration_samples=samples,
                                 workdir=workdir, head=a.quantize_head)
            ids = validation_windows(exp, windows, workdir) if ids is None else ids
            losses = validation_losses(model, ids)
            reference = model if reference is None else reference   # "none" comes first
            kl = kl_to(reference, model, ids)
            rtn = losses if mode == "int4" else rtn
            diff = ""
            if mode in ("gptq", "awq") and rtn is not None:
                d = losses - rtn
                diff = f"{d.mean():+.4f} +- {d.std(ddof=1) / len(d) ** 0.5:.4f}"
            path = os.path.join(tmp, f"sm_{mode}")
            export(model, exp, "saved_model", path, log=quiet, workdir=workdir,
                   max_length=64)          # already quantized in memory
            size = os.path.getsize(os.path.join(path, "variables",
                                                "variables.data-00000-of-00001"))
            base = base or size
            ms = "/".join(f"{v:.2f}" for v in decode_ms(path, new, a.repeats))
            row = (f"{mode:<6} {size / 2 ** 20:>7.2f} {size / base:>7.2f} {ms:>21} "
                   f"{losses.mean():>9.4f} {diff:>17} {kl:>9.2e}")
            if a.demo_run:
                counts = ([int(n) for n in a.demo_calibration.split(",")]
                          if mode in ("gptq", "awq") else [0])
                scores = []
                for n in counts:
                    q = None if mode == "none" else dict(mode=mode, group_size=group,
                                                         calibration_samples=n or samples,
                                                         head=a.quantize_head)
                    result = evaluate_workdir(a.demo_run, [a.demo_data],
                                              max_samples=a.demo_samples, log=quiet,
                                              output=os.path.join(tmp, f"eval_{mode}.json"),
                                              quantize=q)
                    scores.append(f"{result['metrics']['exact_match']:.1f}%")
                row += f" {'/'.join(scores):>8}"
            print(row.rstrip())


if __name__ == "__main__":
    main()
