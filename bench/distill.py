"""Logit distillation: a student with a teacher vs the same student alone, at equal steps.

    python bench/distill.py [--teacher=runs/tiny] [--steps=200] [--teacher_steps=400]
                            [--settings=1:0.5,2:0.5] [--loss=forward_kl] [--smoke]

On the embedded corpus (byte tokenizer): a teacher (`--teacher=WORKDIR`, e.g. the
quickstart's runs/tiny; by default, or if that directory does not exist yet, one is
trained there first: configs/tiny.flags' model, `--teacher_steps` steps), then the
student of configs/distill-tiny.flags (2 x 64) from the same seed, data order and step
count: `--train.stage=distill` once per `--settings` pair temperature:alpha (default
1:0.5, the preset's, and 2:0.5) and `--train.stage=pretrain` (the LM loss alone).
Prints each run's validation cross-entropy (nats per byte, the same validation
batches), perplexity, accuracy and wall time, then the difference. The distilled run
also pays the teacher's forward pass in every step. Figures only (no pass/fail); quote
them only from a quiet machine. `--smoke` uses tiny models, an untrained teacher and two
steps (for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (before TensorFlow)

from deepseek_tf.config import (DataConfig, DistillConfig, Experiment, ModelConfig,  # noqa: E402
                                OptimConfig, TrainConfig)

TEACHER = ModelConfig(vocab_size=320, hidden_size=128, intermediate_size=352,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)  # configs/tiny.flags
STUDENT = TEACHER.replace(hidden_size=64, intermediate_size=176, num_hidden_layers=2)
SMOKE_TEACHER = TEACHER.replace(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                max_position_embeddings=64)
SMOKE_STUDENT = SMOKE_TEACHER.replace(hidden_size=16, intermediate_size=32)


def experiment(model, data_dir, steps, seq_len, batch, eval_steps) -> Experiment:
    return Experiment(
        model=model, data=DataConfig(data_dir=data_dir, seq_len=seq_len),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=min(50, steps // 4)),
        train=TrainConfig(steps=steps, batch_size=batch, log_every=steps, eval_every=0,
                          eval_steps=eval_steps, checkpoint_every=steps))


def run(exp, workdir) -> tuple[dict, float]:
    """(eval metrics, seconds of the whole run: build, trace, steps, evaluation)."""
    from deepseek_tf.train.loop import train

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's step lines
        result = train(exp, workdir, log=lambda *_: None)
    return result["eval"], time.perf_counter() - t0


def random_teacher(model_cfg, exp, path) -> str:
    """--smoke: an untrained teacher workdir (random weights, byte tokenizer)."""
    from deepseek_tf.data.tokenizer.byte import ByteTokenizer
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.workdir import write_workdir

    return write_workdir(path, DeepSeekCausalLM(model_cfg), exp, ByteTokenizer())


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--teacher", default="", help="teacher workdir (default: train one)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--teacher_steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--eval_steps", type=int, default=20)
    p.add_argument("--settings", default="1:0.5,2:0.5",
                   help="comma-separated temperature:alpha pairs, one distilled run each")
    p.add_argument("--loss", default="forward_kl", help="--distill.loss of every run")
    a = common.start(p, argv)
    from deepseek_tf.data.prepare import prepare

    smoke = a.smoke
    steps, t_steps = (2, 0) if smoke else (a.steps, a.teacher_steps)
    seq, batch, evals = (32, 2, 1) if smoke else (a.seq_len, a.batch_size, a.eval_steps)
    teacher_cfg, student_cfg = (SMOKE_TEACHER, SMOKE_STUDENT) if smoke else (TEACHER, STUDENT)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        prepare(DataConfig(max_samples=40 if smoke else 0), data_dir, log=lambda *_: None)
        teacher = a.teacher
        if smoke and not teacher:
            teacher = random_teacher(teacher_cfg, experiment(teacher_cfg, data_dir, 1, seq,
                                                             batch, evals),
                                     os.path.join(tmp, "teacher"))
            print(f"teacher: {teacher_cfg.num_hidden_layers} x {teacher_cfg.hidden_size}, "
                  f"random weights (--smoke)")
        elif not teacher or not os.path.exists(teacher):
            teacher = teacher or os.path.join(tmp, "teacher")
            t_eval, t_sec = run(experiment(teacher_cfg, data_dir, t_steps, seq, batch, evals),
                                teacher)
            print(f"teacher: {teacher_cfg.num_hidden_layers} x {teacher_cfg.hidden_size}, "
                  f"{t_steps} steps in {t_sec:.1f}s; eval loss {t_eval['loss']:.4f}")
        else:
            print(f"teacher: {teacher}")
        base = experiment(student_cfg, data_dir, steps, seq, batch, evals)
        runs = {}
        for pair in a.settings.split(","):
            t, alpha = (float(v) for v in pair.split(":"))
            runs[f"teacher T={t:g} a={alpha:g}"] = dataclasses.replace(
                base, train=base.train.replace(stage="distill"), distill=DistillConfig(
                    teacher=teacher, temperature=t, alpha=alpha, loss=a.loss))
        runs["student alone"] = dataclasses.replace(base, train=base.train.replace(
            stage="pretrain"))
        print(f"student: {student_cfg.num_hidden_layers} x {student_cfg.hidden_size}, {steps} "
              f"steps of {batch} x {seq} tokens; validation: {evals} batches")
        print(f"{'run':<22} {'eval CE':>8} {'ppl':>8} {'accuracy':>9} {'seconds':>8}")
        out = {}
        for i, (name, exp) in enumerate(runs.items()):
            m, sec = run(exp, os.path.join(tmp, f"student{i}"))
            ce = m["lm_loss"] if "lm_loss" in m else m["loss"]
            out[name] = (ce, sec)
            print(f"{name:<22} {ce:>8.4f} {m['perplexity']:>8.2f} {m['accuracy']:>9.3f} "
                  f"{sec:>8.1f}")
        s, s_sec = out.pop("student alone")
        best = min(out, key=lambda k: out[k][0])
        d, d_sec = out[best]
        print(f"distillation ({best}): eval CE {d:.4f} vs {s:.4f} alone ({d - s:+.4f} "
              f"nats/byte) at {steps} steps; time {d_sec / s_sec:.2f}x")


if __name__ == "__main__":
    main()
