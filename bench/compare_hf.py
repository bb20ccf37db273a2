"""Our train step against transformers' DeepseekV3ForCausalLM, same model and batch.

    python bench/compare_hf.py [--rounds=5] [--steps_per_round=2]

The issue-3 config (bench/train_throughput.py: MLA + 16 routed experts, 8 x 256 tokens).
Ours: the trainer's step (`make_train_step`: forward, backward, clipping, AdamW, router
bias update) in every precision (float32, mixed_bfloat16, mixed_float16) x XLA on/off.
Theirs: torch forward, cross entropy, backward, clipping, torch AdamW, in float32 and with
bfloat16 autocast, in a torch subprocess (torch and TF never share a process) that stays
alive: the two sides run alternately, round after round, so that machine noise hits both
alike. Only one side computes at a time (the other waits on a pipe).
A setting whose warm step is > 8x the fastest warm step is timed once, not in the rounds
(XLA's float16 on CPU takes minutes). Prints tokens/s per setting, each side's best, the
ratio, the CPU flags, and what the trainer's `auto` settings would pick here.
The torch worker runs with OMP_WAIT_POLICY=PASSIVE (unless set): with spinning OpenMP
threads, torch's step ran ~18x slower whenever anything else used the 2 cores (here: the
TF process between its steps), which made the transformers rows meaningless.
torch and transformers are bench/test extras (`pip install -e .[bench]`, BUILD.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the torch side (a subprocess; never imports TensorFlow) ----

def torch_worker() -> None:
    """Reads commands from stdin: `setup <json>`, `run <mode> <steps>`; answers on stdout."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = opt = inputs = targets = None
    vocab = 0

    def step(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "setup":
            spec = json.loads(arg)
            torch.manual_seed(0)
            hf = dict(spec["hf_config"])
            hf.pop("architectures", None)
            model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf)).train()
            vocab = hf["vocab_size"]
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
            batch = np.load(spec["batch"])
            inputs = torch.from_numpy(batch["inputs"]).long()
            targets = torch.from_numpy(batch["targets"]).long()
            losses = [step(False), step(True)]  # warm both paths
            print(json.dumps({"ok": True, "losses": losses,
                              "params": sum(p.numel() for p in model.parameters()),
                              "torch": torch.__version__}), flush=True)
        elif cmd == "run":
            mode, steps = arg.split()
            times = []
            for _ in range(int(steps)):
                t0 = time.perf_counter()
                step(mode == "bf16_autocast")
                times.append(time.perf_counter() - t0)
            print(json.dumps({"seconds": times}), flush=True)
        elif cmd == "quit":
            return


class TorchSide:
    def __init__(self, hf_config: dict, batch_path: str):
        # Passive OpenMP waiting: spinning threads (torch's default) lose 10-20x as soon as
        # anything else runs on a 2-core machine (measured with bench/hf_decode.py).
        env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--torch_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.info = self._ask(f"setup {json.dumps({'hf_config': hf_config, 'batch': batch_path})}")

    def _ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError("the torch worker died (see its stderr above)")
        return json.loads(out)

    def runner(self, mode: str):
        return lambda steps: self._ask(f"run {mode} {steps}")["seconds"]

    def close(self):
        try:
            self._ask_quit()
        finally:
            self.proc.wait(timeout=30)

    def _ask_quit(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()


# ---- our side, and the alternation ----

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps_per_round", type=int, default=2)
    p.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        return torch_worker()

    sys.path.insert(0, HERE)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow's first import
    import numpy as np
    import tensorflow as tf
    from common import batches, cpu_summary, trainer_choice, train_step_runner
    from train_throughput import BATCH, CONFIG, SEQ

    from deepseek_tf.convert.hf_config import hf_config_from_model

    hf_cfg = hf_config_from_model(CONFIG.replace(rope_interleave=True))  # V3 export layout
    hf_cfg.update(dtype="float32", aux_loss_alpha=0.0, num_nextn_predict_layers=0)
    tokens = BATCH * SEQ
    it = batches(BATCH, SEQ, CONFIG.vocab_size)  # the same batch for both sides
    b = next(it)
    tmp = tempfile.mkdtemp()
    batch_path = os.path.join(tmp, "batch.npz")
    np.savez(batch_path, inputs=b["inputs"].numpy()[0], targets=b["targets"].numpy()[0])

    print(f"machine: {cpu_summary()}")
    print(f"TensorFlow {tf.__version__}; config: issue-3 benchmark (train_throughput.py), "
          f"batch {BATCH} x {SEQ} = {tokens:,} tokens")
    torch_side = TorchSide(hf_cfg, batch_path)
    print(f"torch {torch_side.info['torch']}: DeepseekV3ForCausalLM with "
          f"{torch_side.info['params']:,} parameters")

    runners, warm = {}, {}
    for mode in ("float32", "bf16_autocast"):
        runners[("transformers", mode)] = torch_side.runner(mode)
    for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
        for jit in (False, True):
            run = train_step_runner(CONFIG, BATCH, SEQ, jit, precision, it=it)

            def many(steps, run=run):
                out = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    run()
                    out.append(time.perf_counter() - t0)
                return out
            runners[("deepseek_tf", f"{precision}{' +XLA' if jit else ''}")] = many
    for key, run in runners.items():  # compile / warm up, and find the very slow settings
        run(1)
        warm[key] = min(run(1))
    fastest = min(warm.values())
    slow = {k for k, v in warm.items() if v > 8 * fastest}
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for key, run in runners.items():
            if key not in slow:
                times[key] += run(args.steps_per_round)
    for k in slow:
        times[k] = [warm[k]]
    torch_side.close()

    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"\n{'side':13s} {'setting':22s} {'ms/step':>9s} {'tokens/s':>10s}")
    for (side, mode), v in tps.items():
        note = "  (timed once: > 8x slower)" if (side, mode) in slow else ""
        print(f"{side:13s} {mode:22s} {tokens / v * 1e3:9.1f} {v:10,.0f}{note}")
    best = {s: max(((v, m) for (side, m), v in tps.items() if side == s)) for s in
            ("deepseek_tf", "transformers")}
    ours, theirs = best["deepseek_tf"], best["transformers"]
    print(f"\nbest: deepseek_tf {ours[0]:,.0f} tokens/s ({ours[1]}), transformers "
          f"{theirs[0]:,.0f} tokens/s ({theirs[1]}): ratio {ours[0] / theirs[0]:.2f}x")
    f32 = tps[("deepseek_tf", "float32")]
    bf16 = tps[("deepseek_tf", "mixed_bfloat16")]
    print(f"ours, mixed_bfloat16 / float32 (no XLA): {bf16 / f32:.2f}x")
    prec, jit, why = trainer_choice(CONFIG, BATCH, SEQ)
    print(f"the trainer's auto settings here: {prec}{' +XLA' if jit else ''} ({why})")


if __name__ == "__main__":
    main()
