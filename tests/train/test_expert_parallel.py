"""Expert parallelism (`--model.expert_parallel`, train/expert_parallel.py) on 2 local CPU
workers (the layer also on 4) through the launcher.

- The layer: a `DeepSeekMoE` with `expert_parallel=W` (experts split over W = 2 and 4
  workers, tokens moved by all-to-all) equals the replicated layer (every worker all E
  experts, gradients all-reduced), dropless and with a capacity that drops pairs
  (tests/helpers/expert_parallel_check.py, one launcher run per W).
- Training: a tiny DeepSeek-V3-style model (MLA, MoE) trained 4 steps with
  expert_parallel=2 and replicated (module fixture `runs`, one launcher run each): losses
  and the final weights (the experts gathered from the workers' checkpoints by
  `load_workdir`) equal within 1e-5; each worker checkpoints half the experts; a resume
  from step 2 ends bitwise equal; one worker and XLA are refused in one line (ZeRO
  combines: tests/train/test_expert_parallel_zero.py);
  `init_from` and the Hugging Face export gather every expert.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest

from deepseek_tf.errors import ConfigError, UserError
from deepseek_tf.train.logger import read_log
from deepseek_tf.train import memory
from deepseek_tf.train.loop import train
from deepseek_tf.workdir import load_experiment, load_workdir
from tests.helpers import tiny
from tests.helpers.checkpoints import (assert_resume_refused, assert_runs_equal,
                                      checkpoint_tensors, rewind, run_weights,
                                      train_losses)
from tests.helpers.launcher import Launcher, train_flags, weights_sha
from tests.helpers.workdirs import FAMILIES

WORKERS = 2
STEPS = 4
NAN_AT = 3  # both runs roll back from a NaN at step 3 to ckpt-2 and go on
TIMEOUT = 300  # seconds for one 2-worker run on a busy 2-core machine
BUDGET = "1.25MiB"  # one worker's estimate: replicated 1.26 MiB, expert_parallel=2 1.17
MOE = FAMILIES["mla_moe"]  # DeepSeek-V3 style: MLA, a dense first layer, 8 experts
quiet = lambda *_: None  # noqa: E731


def _launch(*args, flags=(), nan_at=0, workers=WORKERS):
    """A launcher run of `workers` workers; `nan_at`: the trainer's gradients are NaN at
    that optimizer step (once), which rolls every worker back to the last checkpoint
    (tests/helpers/nan_train)."""
    module = ["--module=tests.helpers.nan_train"] if nan_at else []
    launcher = Launcher(f"--num_workers={workers}", f"--timeout={TIMEOUT}", *module, *args,
                        "--", *flags, env={"NAN_AT_STEP": str(nan_at)})
    code = launcher.finish(TIMEOUT + 60)
    output = launcher.text()
    assert code == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def layer_checks():
    """{world: {(capacity factor, worker): the worker's check line}}: one launcher run of
    `world` workers each, made on first use."""
    done = {}

    def get(world):
        if world not in done:
            output = _launch("--module=tests.helpers.expert_parallel_check", workers=world)
            rows = [json.loads(m) for m in re.findall(r"expert parallel check: (\{.*\})$",
                                                      output, re.M)]
            assert len(rows) == 2 * world, output[-4000:]
            done[world] = {(r["factor"], r["rank"]): r for r in rows}
        return done[world]

    return get


@pytest.fixture(params=[2, 4], ids=lambda w: f"W{w}")
def world(request):
    return request.param


@pytest.fixture
def checks(layer_checks, world):
    return layer_checks(world)


@pytest.mark.parametrize("factor", [0.0, 0.75])
def test_layer_equals_replicated_moe(checks, world, factor):
    """W = 2 and 4 workers (1/W of the experts each): loss, outputs, expert, router,
    shared-expert and input gradients equal the replicated layer's."""
    for rank in range(world):
        r = checks[(factor, rank)]
        assert abs(r["loss_ep"] - r["loss_ref"]) <= 1e-6, r
        assert r["y"] <= 1e-5, r
        assert r["expert_grads"] <= 1e-5 and r["expert_grad_scale"] > 1e-2, r
        assert r["other_grads"] <= 1e-5 and r["other_grad_scale"] > 1e-2, r  # router, shared
        assert r["token_grads"] <= 1e-5, r  # the backward all-to-alls return each row home
        assert r["dropped_ep"] == r["dropped_ref"], r
    assert len({checks[(factor, rank)]["loss_ep"] for rank in range(world)}) == 1


def test_layer_capacity_drops_alike(checks):
    """Factor 0.75 overflows some experts (the comparison covers dropping); 0 drops none."""
    assert checks[(0.75, 0)]["dropped_ep"] > 0
    assert checks[(0.0, 0)]["dropped_ep"] == 0


def test_layer_holds_its_share(checks, world):
    """Under the strategy's scope: 1/W of the expert stacks, as plain variables; the
    router and the shared expert mirrored."""
    for rank in range(world):
        r = checks[(0.0, rank)]
        assert r["expert_elements"] * world == r["stack_elements"], r
        assert not r["experts_mirrored"] and r["others_mirrored"], r


def _experiment(data_dir, expert_parallel):
    return tiny.experiment(data_dir, data={"shuffle_buffer": 0},
                           model={**MOE, "expert_parallel": expert_parallel},
                           train={"steps": STEPS, "batch_size": 2, "log_every": 1,
                                  "eval_every": STEPS, "checkpoint_every": 2,
                                  # expert parallel: auto picks XLA off (tested)
                                  "jit_compile": "auto" if expert_parallel > 1 else "false"})


@pytest.fixture(scope="module")
def runs(one_shard_data, tmp_path_factory):
    """{expert_parallel: (workdir, launcher output)} of the 2-worker runs, made on first use."""
    root, done = tmp_path_factory.mktemp("expert-parallel"), {}

    def get(ep):
        if ep not in done:
            workdir = str(root / f"ep{ep}")
            exp = _experiment(one_shard_data, ep)
            if ep > 1:  # it fits a budget the replicated model exceeds (tested)
                exp = dataclasses.replace(exp, train=exp.train.replace(memory_budget=BUDGET))
            done[ep] = workdir, _launch(flags=train_flags(exp, workdir), nan_at=NAN_AT)
        return done[ep]

    return get


def test_training_equals_replicated_moe(runs):
    """4 steps (clipping, the router's bias update on the global load, capacity drops, NaN
    gradients at step 3 that roll every worker back to its step-2 checkpoint: experts and
    moments included): losses and final weights equal the replicated MoE's within 1e-5."""
    replicated, _ = runs(1)
    workdir, output = runs(2)
    for d in (replicated, workdir):
        assert [r["step"] for r in read_log(d) if r["kind"] == "recovery"] == [2]
    for w in range(WORKERS):
        assert re.search(rf"^\[worker {w}\] expert parallel over 2 workers: this worker holds "
                         rf"6,144 of 12,288 routed-expert weights", output, re.M), output[-3000:]
    assert re.search(r"moe max/mean load [\d.]+, dropped [1-9]", output)  # drops happen
    assert re.search(r"^\[worker 0\] jit_compile: auto -> false: expert parallelism's "
                     r"all-to-alls run outside XLA$", output, re.M), output[-3000:]
    assert_runs_equal(workdir, replicated, STEPS, atol=1e-5)
    norms = [r["grad_norm"] for r in read_log(workdir) if r["kind"] == "train"]
    assert max(norms) > 1.0  # clipping (--optim.clip_norm=1) engaged
    a = run_weights(replicated)
    bias = [k for k in a if k.endswith("e_score_correction_bias")]
    assert bias and all(np.abs(a[k]).max() > 0 for k in bias)  # the bias moved, alike


def test_each_worker_checkpoints_half_the_experts(runs):
    """Measured in the checkpoints: each worker's experts (and their two moments) are half
    of the replicated run's expert stacks."""
    replicated, _ = runs(1)
    workdir, _ = runs(2)
    stacks = sum(v.size for k, v in run_weights(replicated).items()
                 if k.endswith(("gate_up_proj", "down_proj")))
    for w in range(WORKERS):
        path = os.path.join(workdir, "checkpoints", f"data-worker-{w}", f"ckpt-{STEPS}")
        mine = checkpoint_tensors(path, ("experts/",))
        for part in ("experts", "m", "v"):
            held = sum(t.size for k, t in mine.items() if k.startswith(f"experts/{part}/"))
            assert held * WORKERS == stacks, (part, held, stacks)


def test_resumes_bitwise(runs, one_shard_data, tmp_path):
    """The run rewound to its step-2 checkpoint and resumed (its NaN at step 3 and
    rollback included) ends bitwise equal: the mirrored weights and each worker's
    experts."""
    straight, output = runs(2)
    workdir = rewind(straight, str(tmp_path / "resumed"), 2)
    resumed = _launch(flags=train_flags(_experiment(one_shard_data, 2), workdir),
                      nan_at=NAN_AT)
    for w in range(WORKERS):
        assert re.search(rf"^\[worker {w}\] resumed from .*ckpt-2 at step 2$", resumed, re.M)
        assert weights_sha(resumed, w) == weights_sha(output, w)
        own = rf"^\[worker {w}\] this worker's expert weights sha256: (\w+)$"
        assert re.findall(own, resumed, re.M) == re.findall(own, output, re.M) != []
    assert train_losses(workdir) == train_losses(straight)


def test_another_worker_count_is_refused(runs, tmp_path):
    """The run resumed by one process: refused in one line, its checkpoints left alone."""
    assert_resume_refused(runs(2)[0], str(tmp_path / "one"),
                          r"--model.expert_parallel=2 places the experts on groups of 2 workers, and "
                          r"this run has 1 worker\(s\)")


def test_xla_is_refused(one_shard_data, tmp_path):
    exp = _experiment(one_shard_data, 2)
    with pytest.raises(UserError, match=re.escape("--train.jit_compile=false")):
        train(dataclasses.replace(exp, train=exp.train.replace(jit_compile="true")),
              str(tmp_path), log=quiet)


def test_config_refuses_what_cannot_split():
    with pytest.raises(ConfigError, match=r"--model.expert_parallel=3 must divide "
                       r"--model.n_routed_experts=8"):
        tiny.model_config(**MOE, expert_parallel=3)


def test_init_from_gathers_into_a_one_process_run(runs, tmp_path):
    """`--train.init_from` an expert-parallel run with `--model.expert_parallel=1` (the
    flag allowed: a placement, not the architecture): every worker's experts, gathered."""
    from deepseek_tf.config import Experiment
    from deepseek_tf.flags import adopt_init_from
    from deepseek_tf.model import DeepSeekCausalLM
    from deepseek_tf.train.finetune import load_init_weights

    workdir, _ = runs(2)
    given = {s: {} for s in ("model", "data", "tokenizer", "optim", "train")}
    given["model"] = {"expert_parallel": 1}  # the placement may change, not the model
    start = Experiment(train=load_experiment(workdir).train.replace(init_from=workdir))
    exp = adopt_init_from(start, given)
    assert exp.model == load_experiment(workdir).model.replace(expert_parallel=1)
    model = DeepSeekCausalLM(exp.model)
    load_init_weights(model, workdir, log=quiet)
    want = run_weights(workdir)
    got = {v.path.split("/", 1)[-1]: v.numpy() for v in model.weights}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    stack = got["layers_1/mlp/gate_up_proj"]
    assert stack.shape[0] == 8 and not np.array_equal(stack[:4], stack[4:])


def test_hf_export_gathers_every_expert(runs, tmp_path):
    """`export --format=hf` of the expert-parallel run writes every expert
    (`mlp.experts.<e>.*`), equal to the replicated run's export within 1e-5."""
    from safetensors.numpy import load_file

    from deepseek_tf.export import export

    tensors = []
    for ep in (1, 2):
        model, exp = load_workdir(runs(ep)[0])
        assert exp.model.expert_parallel == 1  # gathered into one model
        out = tmp_path / f"hf{ep}"
        export(model, exp, "hf", str(out), log=quiet)
        found = {}
        for f in out.glob("*.safetensors"):
            found.update(load_file(str(f)))
        tensors.append(found)
    a, b = tensors
    assert a.keys() == b.keys()
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(8)} <= b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)


def test_memory_budget_refuses_replicated_and_expert_parallel_fits(runs, one_shard_data,
                                                                  tmp_path):
    """--train.memory_budget: the replicated MoE's estimate exceeds it: refused in one
    line that names the estimate, the budget and what fits, before any checkpoint; the
    expert_parallel=2 run of the same model (module fixture) fits it and trains. Its
    memory block equals what a worker held: the mirrored weights and its half of the
    experts; gradients and AdamW moments of the trainable ones (the router biases are
    not trained)."""
    replicated = _experiment(one_shard_data, 1)
    exp = dataclasses.replace(replicated, train=replicated.train.replace(memory_budget=BUDGET))
    workdir = tmp_path / "replicated"
    with pytest.raises(UserError, match=r"^--train.memory_budget=1.25MiB: one worker needs an "
                       r"estimated 1.26 MiB \(parameters .*\), more than the budget of 1.25 "
                       r"MiB; what would fit: --model.expert_parallel=2 on 2 workers"):
        train(exp, str(workdir), log=quiet)
    assert not (workdir / "checkpoints").exists()
    ep_dir, output = runs(2)
    assert re.search(r"^\[worker 0\] memory per worker \(estimate, alike on each of 2 "
                     r"workers\):$", output, re.M), output[-3000:]
    est = next(r for r in read_log(ep_dir) if r["kind"] == "memory")
    full = run_weights(ep_dir)  # every expert, gathered
    stacks = sum(v.size for k, v in full.items() if k.endswith(("gate_up_proj", "down_proj")))
    frozen = sum(v.size for k, v in full.items() if k.endswith("e_score_correction_bias"))
    held = sum(v.size for v in full.values()) - stacks // WORKERS
    assert est["parameters"] == 4 * held
    assert est["gradients"] == 4 * (held - frozen)
    path = os.path.join(ep_dir, "checkpoints", "data-worker-0", f"ckpt-{STEPS}")
    moments = [t for k, t in checkpoint_tensors(ep_dir).items()
               if k.startswith("optimizer/_variables/") and t.dtype == np.float32]
    moments += [t for k, t in checkpoint_tensors(path, ("experts/",)).items()
                if k.startswith(("experts/m/", "experts/v/"))]
    assert est["optimizer"] == sum(t.nbytes for t in moments) == 8 * (held - frozen)
    assert est["total"] <= 1.25 * 2**20 < memory.estimate(replicated, WORKERS).total
