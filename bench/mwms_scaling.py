"""Tokens/s of MultiWorkerMirroredStrategy: 2 local workers (1 CPU each) vs 1 worker (1 CPU).

    python bench/mwms_scaling.py                 # prepares a small corpus, runs both
    python bench/mwms_scaling.py --steps=60 --hidden_size=384

Both runs go through `python -m deepseek_tf.launch --cpus_per_worker=1` with the same
per-replica batch (weak scaling: 2 workers train twice the tokens per step), so the
ratio of their tokens/s is the speed-up; the target is >= 1.6x. tokens/s is the chief's
logged rate over the log intervals after the first (which includes tracing), as
min / median / max; the best interval is the least disturbed by other processes.
On a shared machine both are noisy: re-run on a quiet one.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)


def run(num_workers: int, data_dir: str, workdir: str, args) -> list[float]:
    """The chief's logged tokens/s per log interval, the first (tracing) left out."""
    from deepseek_tf.train.logger import read_log

    common.launch_small_run(num_workers, data_dir, workdir, args, args.steps, (
        f"--train.jit_compile={'true' if args.jit_compile else 'false'}",))
    return [r["tokens_per_sec"] for r in read_log(workdir) if r["kind"] == "train"][1:]


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8, help="sequences per replica")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--jit_compile", action="store_true", help="XLA on (default off)")
    args = common.start(p, argv)
    if args.smoke:
        args.layers, args.hidden_size, args.seq_len, args.batch_size = 1, 64, 32, 2
        args.steps, args.log_every = 6, 2
    if os.cpu_count() < 2:
        sys.exit("error: needs at least 2 CPUs")
    from deepseek_tf.config import DataConfig
    from deepseek_tf.data.prepare import prepare

    tmp = tempfile.mkdtemp(prefix="mwms-bench-")
    data_dir = os.path.join(tmp, "data")
    try:
        prepare(DataConfig(seq_len=args.seq_len, max_samples=40 if args.smoke else 400,
                           val_size=10), data_dir, log=lambda *_: None)
        print(f"model: {args.layers} layers x {args.hidden_size}; {args.batch_size} x "
              f"{args.seq_len} tokens per replica; {args.steps} steps; XLA "
              f"{'on' if args.jit_compile else 'off'}; 1 CPU per worker", flush=True)
        rates = {f"{n} worker{'s' if n > 1 else ''}": run(n, data_dir, f"{tmp}/w{n}", args)
                 for n in (1, 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.print_stats("run", rates, "tokens/s per log interval")
    (one, two) = (common.stats(v) for v in rates.values())
    print(f"speed-up 2 vs 1 worker: median {two[1] / one[1]:.2f}x, best {two[2] / one[2]:.2f}x "
          f"(target >= 1.6x)")


if __name__ == "__main__":
    main()
