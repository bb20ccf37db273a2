"""The local launcher with stand-in workers (no TensorFlow): TF_CONFIG, failure, timeout,
SIGTERM and Ctrl-C all end with every worker and every worker's child gone."""

import re
import signal
import subprocess
import sys

import pytest

from deepseek_tf import exit_codes
from tests.helpers.launcher import ENV, ROOT, Launcher


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def _fake(n, *worker_args, launcher_args=()):
    return Launcher(f"--num_workers={n}", "--module=tests.helpers.fake_worker", *launcher_args,
                    "--", *worker_args)


def test_a_failing_worker_stops_every_worker_and_its_children():
    launcher = _fake(3, "1", "3")  # worker 1 exits with code 3, the others would sleep
    launcher.wait_for(r"child \d+$", count=3)
    assert launcher.finish() == 3
    text = "\n".join(launcher.lines)
    assert ("[launch] error: worker 1 failed with exit code 3; stopping all workers; run the "
            "same command again to resume from the last checkpoint") in text
    for i in range(3):
        assert f"[worker {i}] index {i} child" in text
    ports = re.findall(r"\[launch\] worker \d: pid \d+, 127\.0\.0\.1:(\d+)", text)
    assert len(set(ports)) == 3
    assert not any(_alive(pid) for pid in launcher.children())


def test_timeout_kills_every_worker():
    launcher = _fake(2, "-1", "0", launcher_args=("--timeout=3",))
    assert launcher.finish() == exit_codes.TIMEOUT
    assert len(launcher.children()) == 2
    assert not any(_alive(pid) for pid in launcher.children())


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, exit_codes.PREEMPTED),
                                      (signal.SIGINT, exit_codes.INTERRUPTED)])
def test_sigterm_is_forwarded_as_preemption_and_ctrl_c_stops_all(sig, code):
    launcher = _fake(2, "-1", "0")
    launcher.wait_for(r"child \d+$", count=2)
    launcher.proc.send_signal(sig)
    assert launcher.finish() == code
    assert not any(_alive(pid) for pid in launcher.children())


def test_ctrl_c_stops_all_even_when_the_launcher_inherited_sigint_ignored():
    """A launcher started in the background of a non-interactive shell (or by a test
    runner's worker) inherits SIGINT ignored; it used to hang on Ctrl-C."""
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        launcher = _fake(2, "-1", "0")  # inherits SIG_IGN
    finally:
        signal.signal(signal.SIGINT, ignored)
    launcher.wait_for(r"child \d+$", count=2)
    launcher.proc.send_signal(signal.SIGINT)
    assert launcher.finish() == exit_codes.INTERRUPTED
    assert not any(_alive(pid) for pid in launcher.children())


def test_usage_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "deepseek_tf.launch", "--num_workers=0"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: --num_workers must be >= 1" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "deepseek_tf.launch", "--help"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "42 preempted" in proc.stdout


def test_each_worker_gets_its_own_gpus():
    from deepseek_tf.launch import assign_gpus, visible_gpus

    assert assign_gpus([], 2) == [None, None]                       # CPU: env untouched
    assert assign_gpus(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert assign_gpus(["0", "1", "2"], 2) == ["0", "1"]             # leftover unused
    assert assign_gpus(["4", "7"], 3) == ["4", "7", "4"]             # fewer GPUs: shared
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
