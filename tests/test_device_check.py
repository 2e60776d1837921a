"""scripts/gpu_check.sh, the one command run where a GPU is lent, runs end to end on a CPU at a tiny shape,
so that it is known to work before device time is spent on it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--shape", "tiny",
                           "--tokens", "4", "--rounds", "1", "--out", str(out)],
                          env={"PY": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    rows = {r["what"]: r for r in result["speed"]}
    assert set(rows) == {"generate", "exits off", "static:20", "static:12"}
    assert rows["exits off"]["identical_to_generate"] is True
