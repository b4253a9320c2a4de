"""`train --distributed --resume`: a run started on 2 ranks and continued on 3 ends where one
uninterrupted process ends (float64 round-off), and rank 0 records the resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_distributed import MPI_MISSING, ROUND_OFF, mpiexec, relative_difference


@pytest.mark.slow
@pytest.mark.skipif(MPI_MISSING is not None, reason=str(MPI_MISSING))
def test_resume_on_another_rank_count_matches_one_uninterrupted_process(tmp_path):
    common = ["-m", "kfc_ref", "train", "--optimizer", "kfc-pre", "--data", "digits",
              "--batch-size", "32", "--eval-every", "3", "--dtype", "float64", "--quiet"]
    mpiexec(2, *common, "--distributed", "--iters", "6", "--out", str(tmp_path / "split"))
    mpiexec(3, "-m", "kfc_ref", "train", "--distributed", "--quiet", "--iters", "9",
            "--resume", str(tmp_path / "split"))
    mpiexec(1, *common, "--iters", "9", "--out", str(tmp_path / "whole"))
    a, b = (np.load(tmp_path / name / "checkpoint.npz")["theta"] for name in ("split", "whole"))
    assert relative_difference(a, b) < ROUND_OFF
    record = json.loads((tmp_path / "split" / "config.json").read_text())
    assert record["resumes"] == [{"at_iteration": 6, "changed": {"iters": [6, 9]}}]
    lines = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == [3, 6, 9]
