"""bench/convert_memory.py --smoke: the converter's peak RSS, measured in a child
process, stays within 2 x the largest shard + a fixed overhead."""

import json
import os
import subprocess
import sys

from tests.convert.test_hf_parity import ROOT, _env


def test_convert_memory_smoke(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "convert_memory.py"),
                           "--smoke", f"--dir={tmp_path}"], capture_output=True, text=True,
                          env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["total_mb"] > 2 * result["largest_mb"]  # several shards
    assert result["peak_mb"] - result["baseline_mb"] <= result["bound_mb"]
    assert (tmp_path / "wd" / "config.json").exists()
