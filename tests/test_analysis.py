import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from analysis.frames import TRIAL_COLUMNS, load_frames
from analysis.pareto import hypervolume, pareto_mask, ratio_curves
from analysis.report import analyze, table1
from nas.errors import ConfigError
from tests.ray_helpers import epochs_of, sweep_file

EPOCHS = 6


def test_pareto_mask_known_answer():
    acc = np.array([90, 80, 95, 85, 95, 70])
    cost = np.array([1.0, 0.5, 2.0, 1.5, 2.0, 0.5])
    # (85,1.5) is dominated by (90,1.0); (70,0.5) by (80,0.5); the tied (95,2.0) pair both stay
    assert pareto_mask(acc, cost).tolist() == [True, True, True, False, True, False]


def test_hypervolume_known_answer():
    acc, cost = np.array([90.0, 80.0, 95.0]), np.array([1.0, 0.5, 2.0])
    # staircase vs reference (0 %, 3.0): [0.5,1)x80 + [1,2)x90 + [2,3)x95
    assert hypervolume(acc, cost, (0.0, 3.0)) == pytest.approx(0.5 * 80 + 1 * 90 + 1 * 95)
    # dominated points and points beyond the reference add nothing
    assert hypervolume(np.append(acc, [85.0, 99.0]), np.append(cost, [1.5, 5.0]), (0.0, 3.0)) == \
        pytest.approx(225.0)
    assert hypervolume(acc, cost, (96.0, 3.0)) == 0.0


def test_accuracy_vs_F_averages_each_layer_count_and_F_and_needs_two_ratios(tmp_path):
    from analysis.plots import accuracy_vs_ratio

    rows = [{"stage": "eval", "status": "finished", "F": f, "layers": n, "final_acc": acc, "genotype_id": g}
            for g, f, n, acc in [("a", 2.0, 4, 90.0), ("a", 2.0, 4, 92.0), ("b", 3.0, 4, 93.0), ("a", 2.0, 8, 94.0),
                                 ("b", 3.0, 8, 95.0), ("DARTS_V2", float("nan"), 4, 99.0)]]
    rows.append({**rows[0], "status": "errored", "F": 9.0})
    trials = pd.DataFrame(rows)
    curves = ratio_curves(trials)
    assert curves[["layers", "F", "acc_mean", "n"]].values.tolist() == [[4, 2.0, 91.0, 2], [4, 3.0, 93.0, 1],
                                                                          [8, 2.0, 94.0, 1], [8, 3.0, 95.0, 1]]
    assert curves.acc_std.iloc[0] == pytest.approx(np.std([90.0, 92.0], ddof=1))
    paths = accuracy_vs_ratio(trials, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_F.png", "accuracy_vs_F.svg"]
    pixels = np.asarray(Image.open(paths[0]).convert("L"))
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.005
    # one finished F only (the errored 9.0 and F-less DARTS_V2 do not count): nothing to draw
    assert accuracy_vs_ratio(trials[trials.F != 3.0], tmp_path / "one") == []
    assert not (tmp_path / "one").exists()


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory):
    """A real sweep ending with finished, errored (F=1e12 cannot be allocated) and unfinished
    (driver SIGKILLed) trials."""
    tmp = tmp_path_factory.mktemp("analysis")
    raw = sweep_file(tmp, "mixed", evaluation={"genotypes": ["PIBCONV"], "F": [2.0, 1.0e12], "layers": [1, 2],
                                               "seeds": [0, 1, 2], "epochs": EPOCHS, "max_steps_per_epoch": 15},
                     max_failures=0)
    file = tmp / "mixed.yaml"
    file.write_text(yaml.safe_dump(raw))
    driver = subprocess.Popen([sys.executable, "-m", "nas.cli", "sweep", "run", str(file), "--storage", str(tmp),
                               "--verbose", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    stage = tmp / "mixed" / "eval"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            dirs = [d for d in stage.glob("eval_PIBCONV_L*") if (d / "result.json").exists()]  # F = 2, its own
            if any(epochs_of(d)[-1:] == [EPOCHS] for d in dirs) and len(list(stage.glob("eval_*/error.txt"))):
                time.sleep(2.5)  # past one experiment-state save; two more waves of F=2 trials are still to run
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the sweep ended before the kill: no unfinished trial to analyse"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tmp / "mixed"


@pytest.mark.slow
def test_frames_flag_errored_and_unfinished(mixed_sweep):
    trials, history = load_frames(mixed_sweep)
    assert list(trials.columns) == TRIAL_COLUMNS
    # every trial of the 2 x 2 x 3 grid once, under Ray's id, started or not (read without a running Ray)
    assert len(trials) == 12 and trials.trial_id.is_unique
    assert trials.trial_id.str.fullmatch(r"[0-9a-f]+_\d{5}").all(), trials.trial_id.tolist()
    statuses = set(trials.status)
    assert {"finished", "errored", "unfinished"} <= statuses, trials[["trial_id", "status", "epochs_done"]]
    errored = trials[trials.status == "errored"]
    assert (errored.F == 1.0e12).all() and errored.error.str.len().gt(0).all()
    finished = trials[trials.status == "finished"]
    assert (finished.epochs_done == EPOCHS).all() and finished.final_acc.between(0, 100).all()
    assert (finished.params_m > 0).all() and (finished.gmac > 0).all()
    unfinished = trials[trials.status == "unfinished"]
    assert len(unfinished) and (unfinished.epochs_done < EPOCHS).all()
    assert {"trial_id", "epoch", "test_acc"} <= set(history.columns)


@pytest.mark.slow
def test_analyze_writes_plots_tables_and_skips_corrupt_files(mixed_sweep, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mixed_sweep, copy)
    trials, _ = load_frames(copy)
    victim = Path(trials[trials.status == "finished"].trial_dir.iloc[0])
    (victim / "result.json").write_text('{"epoch": 1, "test_acc": 5\n{broken')
    with pytest.warns(UserWarning, match="skipped 1 trial"):
        trials2, _ = load_frames(copy)
    assert len(trials2) == len(trials) - 1
    with pytest.warns(UserWarning):
        out, summary = analyze(copy, tmp_path / "out")
    # only finished trials enter fronts and tables
    t1 = pd.read_csv(out / "table1.csv")
    finished = trials2[trials2.status == "finished"]
    expected = table1(trials2)
    assert len(t1) == len(expected) == finished.groupby(["genotype_id", "layers"]).ngroups
    for (_, a), (_, b) in zip(t1.iterrows(), expected.iterrows()):
        assert a["Test Acc. (%)"] == pytest.approx(b["Test Acc. (%)"]) and a["GMAC"] == pytest.approx(b["GMAC"])
    front = pd.read_csv(out / "pareto_gmac.csv")
    assert {t for ids in front.trial_ids for t in ids.split(";")} <= set(finished.trial_id)
    assert (front.seeds >= 1).all()
    paper = pd.read_csv(out / "table1_vs_paper.csv")  # the paper's rows, counted here even untrained
    published = paper.dropna(subset=["Paper acc (%)"])
    assert len(published) == 4 and (published["Seeds"] == 0).all() and published["Measured acc (%)"].isna().all()
    assert published["Δ GMAC"].abs().max() < 0.02 and "Table 1 beside the paper" in (out / "index.md").read_text()
    trained = paper[paper["Seeds"] > 0]  # PIBCONV at 1-2 layers: the paper's columns blank, the sweep's filled
    assert set(zip(trained.Genotype, trained["Eval. Layers"])) == \
        {("PIBCONV", int(n)) for n in finished[finished.genotype_id == "PIBCONV"].layers}
    assert trained["Paper acc (%)"].isna().all() and trained["Measured acc (%)"].notna().all()
    for stem in ("accuracy_vs_layers", "accuracy_vs_gmac", "accuracy_vs_params"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0
        pixels = np.asarray(Image.open(out / f"{stem}.png").convert("L"))
        assert pixels.std() > 5 and (pixels < 128).mean() > 0.005  # not blank
    assert (out / "cells").is_dir() and list((out / "cells").rglob("cell_normal.png"))
    assert "Pareto set" in summary and (out / "index.md").read_text().count(".png") >= 4


@pytest.mark.slow
def test_gradcam_grid_from_trial_folder(mixed_sweep, tmp_path):
    from analysis.gradcam import gradcam_grid

    trials, _ = load_frames(mixed_sweep)
    done = trials[trials.status == "finished"].trial_dir.tolist()[:2]
    out = gradcam_grid(done, [0, 1, 2], tmp_path / "gc.png")
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 200 and image.std() > 10


def test_analyze_rejects_non_sweep(tmp_path):
    with pytest.raises(ConfigError, match="not a sweep directory"):
        load_frames(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "analyze", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a sweep directory" in proc.stderr


def test_cells_of_f_variants_are_rebuilt_from_the_frozen_sweep_file(tmp_path):
    """An eval trial's genotype at another F is neither built in nor in genotypes/: analysis rebuilds it from
    sweep.yaml and the trial's params, as the trial did (the trials' configs name their genotype only)."""
    from analysis.frames import eval_stage_table
    from analysis.report import _genotype
    from nas.genotypes import PIBCONV

    raw = sweep_file(tmp_path, "fv", evaluation={"genotypes": ["PIBCONV"], "F": [3.0], "layers": [2]})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(raw))
    trial_dir = tmp_path / "eval" / "eval_PIBCONV_L2_F3_s0_x"
    trial_dir.mkdir(parents=True)
    (trial_dir / "params.json").write_text('{"genotype": "PIBCONV", "F": 3.0, "layers": 2, "seed": 0}')
    trials = pd.DataFrame({"genotype_id": ["PIBCONV-F3"], "stage": ["eval"], "trial_dir": [str(trial_dir)]})
    geno = _genotype(tmp_path, "PIBCONV-F3", trials, eval_stage_table(tmp_path))
    assert geno is not None and geno.id == "PIBCONV-F3" and geno.options.bottleneck_ratio == 3.0
    assert (geno.normal, geno.reduce) == (PIBCONV.normal, PIBCONV.reduce)
    # the same trial as a grid now writes it: F folded into the genotype id
    (trial_dir / "params.json").write_text('{"genotype": "PIBCONV-F3", "F": null, "layers": 2, "seed": 0}')
    assert _genotype(tmp_path, "PIBCONV-F3", trials, eval_stage_table(tmp_path)) == geno
    assert _genotype(tmp_path, "g-unknown", trials, eval_stage_table(tmp_path)) is None
    (tmp_path / "sweep.yaml").unlink()  # no frozen file (a partial copy): nothing to rebuild from
    assert _genotype(tmp_path, "PIBCONV-F3", trials, eval_stage_table(tmp_path)) is None


@pytest.mark.slow
def test_analyze_merges_sweeps_keeping_each_sweeps_trials(mixed_sweep, tmp_path):
    from nas.cli import main

    other = tmp_path / "again"
    shutil.copytree(mixed_sweep, other)  # the same networks, trained in a second sweep
    out = tmp_path / "merged"
    assert main(["analyze", str(mixed_sweep), str(other), "--out", str(out)]) == 0
    merged = pd.read_csv(out / "trials.csv")
    single, _ = load_frames(mixed_sweep)
    assert len(merged) == 2 * len(single) and set(merged.sweep) == {"mixed", "again"}
    t1 = pd.read_csv(out / "table1.csv")
    one = table1(single)
    assert len(t1) == 2 * len(one)  # kept apart, not averaged together
    assert set(t1.Genotype) == {f"{c} [{s}]" for c in one.Genotype for s in ("mixed", "again")}
    assert (out / "accuracy_vs_layers.png").is_file() and "mixed, again" in (out / "index.md").read_text()
    # eval trials measured their networks' latency: a latency front, latency vs GMAC, a Table 1 column
    assert (out / "accuracy_vs_latency.png").is_file() and (out / "latency_vs_gmac.png").is_file()
    assert (out / "pareto_latency_ms.csv").is_file() and (t1["Latency (ms)"] > 0).all()
    assert (out / "accuracy_vs_throughput.png").is_file() and (out / "pareto_ms_per_image.csv").is_file()
    capsys_free = main(["analyze", str(mixed_sweep), "--out", str(tmp_path / "lat"), "--cost", "latency"])
    assert capsys_free == 0 and "ms down" in (tmp_path / "lat" / "index.md").read_text()
    assert main(["analyze", str(mixed_sweep), str(other)]) == 2  # several sweeps need --out


def test_seeds_are_shown_as_spread_and_the_front_is_on_means():
    """Two networks whose single best seeds would both be on a per-trial front; on means, the one that is
    worse on average and costs more drops off. Table 1 says mean, std and how many seeds."""
    from analysis.pareto import network_means, pareto_set

    rows = []
    for gid, layers, gmac, accs in (("A", 2, 0.1, [90.0, 92.0, 94.0]), ("B", 3, 0.2, [95.0, 85.0, 86.0]),
                                    ("C", 4, 0.3, [93.0])):
        for seed, acc in enumerate(accs):
            rows.append({"stage": "eval", "status": "finished", "sweep": "s", "genotype_id": gid, "cell": gid,
                         "layers": layers, "seed": seed, "final_acc": acc, "params_m": 1.0, "gmac": gmac,
                         "trial_id": f"{gid}{seed}"})
    rows.append({**rows[0], "status": "errored", "final_acc": 0.0, "trial_id": "A9"})  # never counted
    trials = pd.DataFrame(rows)
    means = network_means(trials).set_index("genotype_id")
    assert means.loc["A", "final_acc"] == pytest.approx(92.0) and means.loc["A", "acc_std"] == pytest.approx(2.0)
    assert means.loc["A", "seeds"] == 3 and means.loc["A", "trial_ids"] == "A0;A1;A2"
    assert np.isnan(means.loc["C", "acc_std"]) and means.loc["C", "seeds"] == 1
    front = pareto_set(trials)
    assert list(front.genotype_id) == ["A", "C"]  # B's 95 % seed alone would have put it on the front
    t1 = table1(trials).set_index("Genotype")
    assert t1.loc["B", "Test Acc. (%)"] == pytest.approx(88.6667, abs=1e-3)
    assert t1.loc["B", "± std"] == pytest.approx(np.std([95.0, 85.0, 86.0], ddof=1)) and t1.loc["B", "Seeds"] == 3


def test_table1_beside_the_paper_matches_depths_and_leaves_unpublished_rows_blank():
    from analysis.paper import PAPER_TABLE1, beside_paper

    means = pd.DataFrame({"genotype_id": ["PIBCONV", "PIBCONV", "g-123"], "layers": [10, 3, 10],
                          "final_acc": [97.0, 90.0, 50.0], "acc_std": [0.2, np.nan, 1.0], "seeds": [3, 1, 2]})
    table = beside_paper(means).set_index(["Genotype", "Eval. Layers"])
    assert set(PAPER_TABLE1) <= set(table.index) and ("PIBCONV", 3) in table.index and len(table) == 5
    row = table.loc[("PIBCONV", 10)]
    assert row["Measured acc (%)"] == 97.0 and row["Seeds"] == 3 and row["Δ acc"] == pytest.approx(97.0 - 97.29)
    assert abs(row["Δ GMAC"]) < 0.01 and row["Paper params (M)"] == 3.02
    unpublished = table.loc[("PIBCONV", 3)]
    assert np.isnan(unpublished["Paper acc (%)"]) and unpublished["Measured acc (%)"] == 90.0
    assert unpublished["GMAC"] > 0 and table.loc[("DARTS_V2", 20)]["Seeds"] == 0  # counted, not trained
