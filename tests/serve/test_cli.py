"""`python -m deepseek_tf.serve` as a user starts it: it serves a run over HTTP until
stopped, and bad flags give one `error:` line and exit status 2."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():  # as a user's shell: no TF_CPP_MIN_LOG_LEVEL (the entry point sets it)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def run(*args, timeout=300):
    env = _env()
    return subprocess.run([sys.executable, "-m", "deepseek_tf.serve", *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("serve-cli") / "run"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serves_a_run_until_stopped(workdir, tmp_path):
    port = free_port()
    env = _env()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "deepseek_tf.serve", f"--workdir={workdir}",
                             f"--port={port}", "--jit_compile=false", "--model_name=tiny"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while True:
            try:
                health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    open(tmp_path / "serve.log").read()[-2000:]
                time.sleep(0.5)
        assert health["model"] == "tiny"
        req = urllib.request.Request(url + "/v1/completions", headers={
            "Content-Type": "application/json"}, data=json.dumps(
                {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "temperature": 0}).encode())
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    log.seek(0)
    text = log.read()
    assert "serving 'tiny' on http://127.0.0.1:" in text and "Traceback" not in text, text


@pytest.mark.parametrize("args,needle", [
    (["--port=abc"], "port"),
    (["--max_batch=0"], "max_batch"),
    ([], "--workdir is required"),
    (["--workdir=/no/such/run"], "no config.json"),
    (["--max_length=4096"], "--max_length=4096 must be in [2, 128]"),
])
def test_bad_flags_give_one_line_and_exit_2(workdir, args, needle):
    if args and args[0].startswith("--max_length"):
        args = [f"--workdir={workdir}", *args, f"--port={free_port()}"]
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines


def test_help_names_the_endpoints():
    proc = run("--help")
    assert proc.returncode == 0
    for needle in ("/v1/chat/completions", "/v1/completions", "/generate", "--max_batch",
                   "--request_timeout"):
        assert needle in proc.stdout
