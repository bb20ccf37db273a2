"""bench/common.py: each side of a comparison runs with its library's defaults, so the
runner never gives a side a thread-policy variable (they made torch 1.4-3x slower)."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "bench",
                                                                           "common.py"))
common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)
POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "KMP_BLOCKTIME": "0",
          "MKL_NUM_THREADS": "1", "GOMP_SPINCOUNT": "0", "TF_NUM_INTRAOP_THREADS": "1",
          "TF_NUM_INTEROP_THREADS": "1"}


def test_side_env_has_no_thread_policy(monkeypatch):
    for k, v in POLICY.items():
        monkeypatch.setenv(k, v)
    env = common.side_env()
    assert not [k for k in env if k in POLICY or re.match(r"(OMP|KMP|MKL|GOMP)_", k)]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == ROOT
    with pytest.raises(ValueError, match="OMP_WAIT_POLICY"):
        common.side_env({"OMP_WAIT_POLICY": "PASSIVE"})


def test_side_process_runs_with_defaults(monkeypatch, tmp_path):
    """The environment a side's process really sees (a script that reports it)."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    script = tmp_path / "side.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {os.path.join(ROOT, 'bench')!r})\n"
                      "from common import report\nreport(dict(os.environ))\n")
    env = common.run_side([str(script)])
    assert not [k for k in env if common.THREAD_POLICY.match(k)]


def test_no_bench_sets_thread_policy():
    """No bench script names a thread-policy variable (common.py only lists them)."""
    pattern = re.compile(r"\b((OMP|KMP|MKL|GOMP)_[A-Z_]+|TF_NUM_\w*THREADS)\b")
    for name in os.listdir(os.path.join(ROOT, "bench")):
        if name.endswith(".py") and name != "common.py":
            with open(os.path.join(ROOT, "bench", name)) as f:
                assert not pattern.search(f.read()), name


def test_stats_and_timing():
    assert common.stats([3.0, 1.0, 2.0, 10.0]) == (1.0, 2.5, 10.0)
    calls = []
    times = common.time_calls(lambda: calls.append(1), 3, warmup=2)
    assert len(times) == 3 and len(calls) == 5 and min(times) >= 0


def test_a_reference_side_refuses_a_bad_spec_in_one_line(tmp_path, capsys):
    """hf_train.py / hf_decode.py run by hand: a missing or broken spec file is argparse's
    one-line error (exit 2), not a traceback."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path in (str(tmp_path / "missing.json"), str(bad)):
        with pytest.raises(SystemExit) as e:
            common.reference_spec("doc", [f"--spec={path}"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"cannot read the spec {path}" in err and "--keep" in err, err
    good = tmp_path / "good.json"
    good.write_text('{"steps": 2}')
    assert common.reference_spec("doc", [f"--spec={good}"]) == {"steps": 2}
    edited = tmp_path / "edited.json"  # a setting the script does not have, by hand
    edited.write_text('{"settings": ["float32", "fp8"]}')
    with pytest.raises(SystemExit) as e:
        common.reference_spec("doc", [f"--spec={edited}"], ("float32", "bf16 autocast"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "settings this script does not have: 'fp8'; it has 'float32'" in err, err
    assert common.reference_spec("doc", [f"--spec={edited}"], ("fp8", "float32"))
    listed = tmp_path / "list.json"  # valid JSON, but not a spec
    listed.write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        common.reference_spec("doc", [f"--spec={listed}"], ("float32",))
    assert e.value.code == 2
    assert "is not a JSON object" in capsys.readouterr().err.strip().splitlines()[-1]
