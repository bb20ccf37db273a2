"""Tokens/s of MultiWorkerMirroredStrategy: 2 local workers (1 CPU each) vs 1 worker (1 CPU).

    python bench/mwms_scaling.py                 # prepares a small corpus, runs both
    python bench/mwms_scaling.py --steps=60 --hidden_size=384

Both runs go through `python -m deepseek_tf.launch --cpus_per_worker=1` with the same
per-replica batch (weak scaling: 2 workers train twice the tokens per step), so the
ratio of their tokens/s is the speed-up; the target is >= 1.6x. tokens/s is the chief's
logged rate over the log intervals after the first (which includes tracing); the
best interval is the least disturbed by other processes, the median is shown too.
On a shared machine both are noisy: re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run(num_workers: int, data_dir: str, workdir: str, args) -> tuple[float, float]:
    from deepseek_tf.train.logger import read_log

    flags = [f"--workdir={workdir}", f"--data.data_dir={data_dir}",
             f"--data.seq_len={args.seq_len}", "--model.vocab_size=320",
             f"--model.hidden_size={args.hidden_size}",
             f"--model.intermediate_size={args.hidden_size * 11 // 4}",
             f"--model.num_hidden_layers={args.layers}", "--model.num_attention_heads=4",
             f"--model.max_position_embeddings={args.seq_len}",
             f"--train.steps={args.steps}", f"--train.batch_size={args.batch_size}",
             f"--train.log_every={args.log_every}", f"--train.eval_every={args.steps}",
             "--train.eval_steps=1", f"--train.checkpoint_every={args.steps}",
             f"--train.jit_compile={args.jit_compile}"]
    cmd = [sys.executable, "-m", "deepseek_tf.launch", f"--num_workers={num_workers}",
           "--cpus_per_worker=1", "--timeout=3600", "--", *flags]
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rates = [r["tokens_per_sec"] for r in read_log(workdir) if r["kind"] == "train"][1:]
    return max(rates), statistics.median(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per replica")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--jit_compile", action="store_true")
    args = p.parse_args()
    from common import cpu_summary
    print(f"machine: {cpu_summary()}")
    if os.cpu_count() < 2:
        sys.exit("needs at least 2 CPUs")
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.prepare import prepare

    tmp = tempfile.mkdtemp(prefix="mwms-bench-")
    data_dir = os.path.join(tmp, "data")
    prepare(DataConfig(seq_len=args.seq_len, max_samples=400, val_size=10), data_dir,
            log=lambda *_: None)
    print(f"model: {args.layers} layers x {args.hidden_size}; {args.batch_size} x "
          f"{args.seq_len} tokens per replica; {args.steps} steps; XLA "
          f"{'on' if args.jit_compile else 'off'}; 1 CPU per worker", flush=True)
    rates = {}
    for n in (1, 2):
        rates[n] = run(n, data_dir, os.path.join(tmp, f"w{n}"), args)
        print(f"{n} worker{'s' if n > 1 else ' '}: best {rates[n][0]:8,.0f} tokens/s, median "
              f"{rates[n][1]:8,.0f} tokens/s", flush=True)
    print(f"speed-up 2 vs 1 worker: best {rates[2][0] / rates[1][0]:.2f}x, median "
          f"{rates[2][1] / rates[1][1]:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
