"""XLA's persistent compilation cache (deepseek_tf/xla_cache.py): where it goes, how it is
switched off, how it is tidied, and that a second `generate` with XLA loads the first
one's programs from it instead of compiling them again (TensorFlow's own cache, run for
real in the command's processes)."""

import os
import subprocess
import sys

import pytest

from deepseek_tf import xla_cache
from tests.helpers.workdirs import make_workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_directory_is_per_tensorflow_version_and_cpu(tmp_path):
    key = xla_cache.machine_key()
    assert key.startswith("tf2.20") and len(key.split("-")[-1]) == 12
    assert xla_cache.cache_dir({"DEEPSEEK_TF_XLA_CACHE": str(tmp_path)}) == str(tmp_path / key)
    assert xla_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(
        tmp_path / "deepseek_tf" / "xla" / key)
    for off in ("off", "0", "OFF"):
        assert xla_cache.cache_dir({"DEEPSEEK_TF_XLA_CACHE": off}) is None
    other = tmp_path / "cpuinfo"
    other.write_text("model name\t: Some CPU\nflags\t\t: fpu sse2 avx2\n")
    assert xla_cache.machine_key(str(other)) != xla_cache.machine_key(str(tmp_path / "none"))
    assert xla_cache.machine_key(xla_flags="--xla_cpu_use_thunk_runtime=false") != key
    assert xla_cache.cache_dir({"DEEPSEEK_TF_XLA_CACHE": str(tmp_path),
                                "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}) != str(tmp_path / key)


def test_enable_sets_tf_xla_flags_unless_off_or_set_by_the_user(tmp_path):
    env = {"DEEPSEEK_TF_XLA_CACHE": str(tmp_path), "TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}
    directory = xla_cache.enable_xla_cache(env)
    assert os.path.isdir(directory) and directory.startswith(str(tmp_path))
    assert env["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 {xla_cache.FLAG}={directory}"
    own = {"TF_XLA_FLAGS": f"{xla_cache.FLAG}=/elsewhere"}
    assert xla_cache.enable_xla_cache(own) is None and own["TF_XLA_FLAGS"].endswith("/elsewhere")
    off = {"DEEPSEEK_TF_XLA_CACHE": "off"}
    assert xla_cache.enable_xla_cache(off) is None and "TF_XLA_FLAGS" not in off


def test_an_unknown_tensorflow_version_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setattr(xla_cache, "_TF_DISTRIBUTIONS", ("no-such-distribution",))
    env = {"DEEPSEEK_TF_XLA_CACHE": str(tmp_path)}
    assert xla_cache.cache_dir(env) is None and xla_cache.enable_xla_cache(env) is None
    assert "TF_XLA_FLAGS" not in env and not os.listdir(tmp_path)


def test_an_unusable_directory_is_named_in_one_warning_and_the_run_goes_on(tmp_path,
                                                                           capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {"DEEPSEEK_TF_XLA_CACHE": str(blocker / "xla")}
    assert xla_cache.enable_xla_cache(env) is None and "TF_XLA_FLAGS" not in env
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: DEEPSEEK_TF_XLA_CACHE: cannot use ")
    assert str(blocker) in err and "DEEPSEEK_TF_XLA_CACHE=off" in err


def _message(fields) -> bytes:
    """A protobuf message of length-delimited fields {number: bytes}."""
    out = b""
    for number, value in fields.items():
        out += bytes([number << 3 | 2, len(value)]) + value
    return out


def test_tidy_deletes_damaged_entries_stale_temporaries_and_the_oldest_beyond_the_limit(
        tmp_path):
    good = _message({1: b"key", 2: b"hlo" * 20, 3: b"x" * 60})
    files = {"old.pb": good, "new.pb": good, "cut.pb": good[:-5], "junk.pb": b"garbage\n",
             "empty.pb": b"", "stale.pbvm-1.tmp": b"", "writing.pbvm-2.tmp": b""}
    for i, (name, data) in enumerate(files.items()):
        (tmp_path / name).write_bytes(data)
        os.utime(tmp_path / name, (1000.0 + i, 1000.0 + i))
    os.utime(tmp_path / "writing.pbvm-2.tmp", (9000.0, 9000.0))  # a writer at work
    xla_cache.tidy(str(tmp_path), max_bytes=10 * len(good), now=9100.0)
    assert sorted(os.listdir(tmp_path)) == ["new.pb", "old.pb", "writing.pbvm-2.tmp"]
    xla_cache.tidy(str(tmp_path), max_bytes=len(good) + 1, now=9100.0)
    assert sorted(os.listdir(tmp_path)) == ["new.pb", "writing.pbvm-2.tmp"]


def _entries(directory):
    return {n: os.stat(os.path.join(directory, n)).st_mtime_ns
            for n in os.listdir(directory) if n.endswith(".pb")}


@pytest.mark.parametrize("damage", [False, True])
def test_a_second_generate_loads_the_programs_the_first_compiled(tmp_path, damage):
    """The second run loads every entry (none is rewritten: TensorFlow writes an entry
    only after compiling it) and prints the same tokens; a damaged entry is deleted at
    start-up and compiled again instead of failing the run."""
    path, _ = make_workdir(str(tmp_path / "run"), "mla_moe")
    env = {**os.environ, "PYTHONPATH": ROOT, "DEEPSEEK_TF_XLA_CACHE": str(tmp_path / "xla")}
    env.pop("TF_XLA_FLAGS", None)  # the test run's own cache directory

    def generate():
        proc = subprocess.run([sys.executable, "-m", "deepseek_tf.generate", f"--workdir={path}",
                               "--prompt=Once upon", "--max_new_tokens=8", "--jit_compile=true"],
                              capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    first = generate()
    directory = xla_cache.cache_dir(env)
    compiled = _entries(directory)
    assert compiled, os.listdir(directory)
    if damage:
        victim = sorted(compiled)[0]
        with open(os.path.join(directory, victim), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
    assert generate() == first
    again = _entries(directory)
    assert sorted(again) == sorted(compiled)
    changed = sorted(n for n in compiled if again[n] != compiled[n])
    assert changed == ([victim] if damage else []), changed
