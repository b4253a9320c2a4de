"""benchmarks/gpu_acceptance.py cannot rot: its dry run executes every step on the CPU with
tiny sizes and must write one summary.json (all steps ok) and one log.txt."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["cupy", "suite", "check_float64", "check_float32", "train_equivalence", "resume",
         "bench", "linalg"]


@pytest.mark.host_only("drives subprocesses; the GPU run is the script itself")
@pytest.mark.slow
def test_acceptance_dry_run_writes_one_small_folder(tmp_path):
    out = tmp_path / "gpu_acceptance"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["failed"] == [] and all(s["status"] == "ok" for s in summary["steps"])
    assert all(summary["steps"][4][name]["ok"] for name in ("sgd", "kfc-pre", "kfac"))
    assert summary["steps"][5]["identical"] is True


@pytest.mark.host_only("drives subprocesses")
def test_a_failed_step_makes_the_exit_code_non_zero(tmp_path, monkeypatch):
    """Negative control: a step that raises is recorded as failed, later steps still run,
    and main() returns 1."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_acceptance as ga
    monkeypatch.setattr(ga, "step_check", lambda rec, device, dtype: 1 / 0)
    for name in ("step_suite", "step_train", "step_resume", "step_bench"):
        monkeypatch.setattr(ga, name, lambda rec, *a: {"fake": True})
    assert ga.main(["--dry-run", "--out", str(tmp_path / "o")]) == 1
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["failed"] == ["check_float64", "check_float32"]
    assert summary["steps"][-1]["name"] == "linalg" and summary["steps"][-1]["status"] == "ok"
