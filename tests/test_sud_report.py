"""`python -m kfc_ref sud RUN_DIR` on a tiny trained run: files, JSON fields, dead maps counted,
and the shuffled-example baseline at the noise level for independent data."""
import json
import os

import numpy as np
import pytest

from kfc_ref.__main__ import main as cli
from kfc_ref.backend import to_numpy
from kfc_ref.experiments.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from kfc_ref.experiments.sud_report import load_run, read_run_config, sud_report
from kfc_ref.experiments.train import TrainConfig, train
from kfc_ref.theory.correlation import spatial_autocorrelation, spatial_crosscorrelation
from kfc_ref.theory.sud import derangement, field_sud, ring_profile

FIELDS = ("derivatives", "activations")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-iteration SGD run on digits whose conv1 map 0 is killed (weights 0, bias -1: its
    ReLU never fires) in both the last iterate and the averaged parameters."""
    out = str(tmp_path_factory.mktemp("runs") / "sgd")
    train(TrainConfig(data="digits", iters=3, out=out, quiet=True, seed=0))
    path = os.path.join(out, CHECKPOINT_NAME)
    arrays, meta = load_checkpoint(path)
    w = arrays["state/theta_bar/0"].copy()          # conv1 W_bar (16, 1 + 1*3*3)
    w[0] = 0.0
    w[0, 0] = -1.0
    arrays["state/theta_bar/0"] = w
    theta = arrays["theta"].copy()
    theta[:w.size] = w.ravel()                       # conv1 comes first in the flat vector
    arrays["theta"] = theta
    save_checkpoint(path, arrays, meta)
    return out


@pytest.mark.slow
def test_cli_writes_figures_and_summary(run_dir, tmp_path, capsys, device):
    out = str(tmp_path / "sud")
    assert cli(["sud", run_dir, "--examples", "60", "--max-offset", "3", "--maps", "0", "5",
                "--out", out, "--device", device]) == 0
    for name in ("sud_derivatives", "sud_activations", "sud_profile"):
        for ext in ("png", "pdf"):
            assert os.path.getsize(os.path.join(out, f"{name}.{ext}")) > 1000
    with open(os.path.join(out, "sud_summary.json")) as fh:
        summary = json.load(fh)
    assert summary["examples"] == 60 and summary["max_offset"] == 3
    assert [l["layer"] for l in summary["layers"]] == ["conv1", "conv2"]
    for layer in summary["layers"]:
        for field in FIELDS:
            s = layer[field]
            assert set(s) >= {"maps", "dead_maps", "dead_map_indices", "mean_abs_corr",
                              "mean_abs_corr_by_offset", "shuffled_baseline",
                              "shuffled_baseline_by_offset", "cross_map_mean_abs_offdiag",
                              "cross_map_shuffled_baseline"}
            assert len(s["mean_abs_corr_by_offset"]) == min(3, layer["output_shape"][1] - 1
                                                            if field == "derivatives" else
                                                            layer["input_shape"][1] - 1)
            assert 0 <= s["mean_abs_corr"] <= 1
    conv1, conv2 = summary["layers"]
    # The killed unit: conv1's derivative map 0 and conv2's input map 0 are dead, and nothing
    # else is (the other units fire on some of the 60 images).
    assert conv1["derivatives"]["dead_map_indices"] == [0]
    assert conv2["activations"]["dead_map_indices"] == [0]
    assert conv1["activations"]["dead_maps"] == 0
    assert "conv1" in capsys.readouterr().out


def test_dead_maps_are_excluded_from_the_averages(run_dir, device, to_xp):
    net, params, data, _ = load_run(run_dir, device)
    x = to_xp(data.x_test[:40])
    from kfc_ref.theory.sud import sud_analysis
    first = sud_analysis(net, params, x, np.random.default_rng(0), 2)[0].derivatives
    assert first.dead[0] and np.isnan(first.autocorr[0]).all()
    live = np.abs(first.autocorr[1:]).copy()
    live[:, 2, 2] = np.nan
    np.testing.assert_allclose(first.summary, np.nanmean(live), rtol=1e-5)


def test_shuffled_baseline_is_noise_for_independent_data(to_xp):
    """White-noise field: every example and location independent.  The baseline and the real
    statistic both sit at the noise level sqrt(2/pi) / sqrt(N (H - r)(W - r)); a spatially
    smoothed field is far above its baseline."""
    rng = np.random.default_rng(3)
    n, c, h, w = 200, 4, 10, 10
    white = rng.normal(size=(n, c, h, w))
    res = field_sud(to_xp(white), 3, derangement(n, rng))
    noise = np.sqrt(2 / np.pi) / np.sqrt(n * (h - 3) * (w - 3))   # largest ring's level
    assert res.baseline_summary < 2 * noise and res.summary < 2 * noise
    assert np.all(res.baseline_profile < 2 * noise)
    smooth = white + np.roll(white, 1, axis=2) + np.roll(white, 1, axis=3)
    res = field_sud(to_xp(smooth), 3, derangement(n, rng))
    assert res.profile[0] > 10 * res.baseline_profile[0]


@pytest.mark.host_only("derangement is a host permutation of example indices")
def test_derangement_has_no_fixed_point():
    for n in (2, 3, 17):
        p = derangement(n, np.random.default_rng(n))
        assert sorted(p) == list(range(n)) and np.all(p != np.arange(n))


def test_crosscorrelation_with_itself_is_the_autocorrelation(to_xp):
    f = to_xp(np.random.default_rng(0).normal(size=(5, 3, 6, 7)))
    np.testing.assert_allclose(to_numpy(spatial_crosscorrelation(f, f, 4)),
                               to_numpy(spatial_autocorrelation(f, 4)), rtol=1e-12, atol=1e-14)


@pytest.mark.host_only("ring_profile summarises host panels (field_sud reads them back first)")
def test_ring_profile_averages_rings_of_live_maps():
    a = np.zeros((2, 5, 5))
    a[0, 1:4, 1:4] = 0.5           # ring 1 of map 0
    a[0, 2, 2] = 1.0
    a[1] = np.nan                  # a NaN map is left out
    np.testing.assert_allclose(ring_profile(a), [0.5, 0.0])
    assert np.isnan(ring_profile(a, dead=[True, True])).all()


@pytest.mark.host_only("config.json reader")
def test_read_run_config_reads_what_train_recorded_and_names_a_foreign_key(run_dir, tmp_path):
    cfg = read_run_config(run_dir)
    with open(os.path.join(run_dir, "config.json")) as fh:
        record = json.load(fh)
    assert cfg["data"] == record["data"] and cfg["arch"] == record["arch"]
    assert cfg["seed"] == record["seed"] and cfg["dtype"] == record["dtype"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({**record, "new_setting": 1}))
    with pytest.raises(ValueError, match="unknown setting.*'new_setting'"):
        read_run_config(str(foreign))


@pytest.mark.host_only("CLI errors for a missing run folder and bad arguments")
def test_errors_are_one_line(tmp_path, capsys):
    assert cli(["sud", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    with pytest.raises(Exception, match="examples"):
        sud_report(str(tmp_path), examples=1)


@pytest.mark.slow
def test_history_recorded_during_training_is_drawn(run_dir, tmp_path, device, to_xp):
    """What train will do every k evaluations: record_sud_history on fixed images; a repeated
    iteration (after --resume) supersedes the earlier line; sud draws sud_history."""
    import shutil
    from kfc_ref.experiments.sud_report import read_sud_history, record_sud_history
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    net, params, data, _ = load_run(run, device)
    x = to_xp(data.x_test[:20])
    for it in (10, 20, 20):
        rec = record_sud_history(run, it, net, params, x, np.random.default_rng(it), 2)
    assert rec["layers"][0]["derivatives"]["dead_maps"] == 1
    history = read_sud_history(run)
    assert [h["iteration"] for h in history] == [10, 20]
    with open(os.path.join(run, "sud_history.jsonl"), "a") as fh:
        fh.write('{"iteration": 3')                     # a torn last line is skipped
    assert len(read_sud_history(run)) == 2
    assert cli(["sud", run, "--examples", "20", "--max-offset", "2", "--device", device]) == 0
    assert os.path.exists(os.path.join(run, "sud", "sud_history.png"))


@pytest.mark.slow
def test_train_records_the_sud_summary_every_k_evaluations_and_sud_plots_it(tmp_path, device):
    """``train --sud-every 2`` with an evaluation every 2 of 8 iterations (4 evaluations)
    records the SUD summary at the 2nd and 4th (iterations 4 and 8); ``sud`` draws it."""
    from kfc_ref.__main__ import main as cli
    from kfc_ref.experiments.sud_history import read_sud_history
    run = str(tmp_path / "run")
    assert cli(["train", "--data", "digits", "--arch", "small", "--iters", "8",
                "--eval-every", "2", "--sud-every", "2", "--max-train", "256",
                "--batch-size", "32", "--out", run, "--quiet", "--device", device]) == 0
    history = read_sud_history(run)
    assert [h["iteration"] for h in history] == [4, 8]
    layer = history[-1]["layers"][0]
    assert set(layer) >= {"layer", "derivatives", "activations"}
    assert cli(["sud", run, "--examples", "64", "--out", str(tmp_path / "sud"),
                "--device", device]) == 0
    assert os.path.exists(tmp_path / "sud" / "sud_history.png")
