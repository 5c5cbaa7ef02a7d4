"""A real local Ray (2 CPUs): the two-stage pipeline end to end, retries, divergence."""

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_ray")]

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from analysis.frames import load_frames, trial_history  # noqa: E402
from analysis.report import table1  # noqa: E402
from nas.errors import ConfigError  # noqa: E402
from sweeps.driver import _param_space, resume_sweep, run_sweep  # noqa: E402
from sweeps.loggers import CSVLogger, JsonLogger, TensorBoardLogger  # noqa: E402
from sweeps.spec import parse_sweep  # noqa: E402
from sweeps.status import sweep_status  # noqa: E402
from tests.ray_helpers import epochs_of, module_ray, sweep_file, tensorboard_epochs, tensorboard_hparams  # noqa: E402,F401


def test_two_stage_sweep_end_to_end(tmp_path):
    raw = sweep_file(tmp_path, "e2e", search={"op_sets": ["pibconv"], "F": [2.0, 3.0], "epochs": 2},
                     evaluation={"genotypes": ["searched", "DARTS_V2"], "layers": [1, 2], "epochs": 2})
    path = Path(run_sweep(parse_sweep(raw), storage=str(tmp_path), verbose=0))
    assert json.loads((path / "state.json").read_text())["stages"] == {"search": "done", "eval": "done"}
    index = json.loads((path / "genotypes" / "index.json").read_text())
    assert 1 <= len(index) <= 2 and all((path / "genotypes" / f"{g}.json").is_file() for g in index)
    trials, history = load_frames(path)
    assert (trials.status == "finished").all()
    assert sorted(trials[trials.stage == "search"].F) == [2.0, 3.0]
    evals = trials[trials.stage == "eval"]
    assert len(evals) == 2 * (len(index) + 1)
    assert set(evals.genotype_id) == set(index) | {"DARTS_V2"}
    assert (evals.params_m > 0).all() and (evals.gmac > 0).all() and (evals.epochs_done == 2).all()
    # searched cells are hashes: tables and plots name them with the op set they were searched with
    searched = evals[evals.genotype_id.isin(index)]
    assert (searched.cell == searched.genotype_id + " (" + searched.op_set + ")").all()
    assert set(searched.op_set) == {index[g]["op_set"] for g in index} <= {"pibconv", "pibconv-F3"}
    assert set(evals[evals.genotype_id == "DARTS_V2"].cell) == {"DARTS_V2"}
    assert evals[evals.genotype_id == "DARTS_V2"].F.isna().all()  # its ops ignore F: no F to report
    assert set(table1(trials)["Genotype"]) == set(evals.cell)
    # a trial's config names its op set or genotype; the stage's table of them is not copied into every trial
    for stage, key, table, ids in (("eval", "genotype", "genotypes", set(index) | {"DARTS_V2"}),
                                   ("search", "op_set", "op_sets", {"pibconv", "pibconv-F3"})):
        for d in trials[trials.stage == stage].trial_dir:
            params = json.loads((Path(d) / "params.json").read_text())
            assert table not in params and params[key] in ids
            assert all(table not in json.loads(line)["config"] for line in (Path(d) / "result.json").open())
    assert {"train_loss", "test_acc", "epoch"} <= set(history.columns)
    # TensorBoard scalars land in every trial folder, one step per epoch, and an HParams session per trial,
    # read back with TensorBoard's own parsers of the plugin's data
    for row in trials.itertuples():
        assert tensorboard_epochs(Path(row.trial_dir)) == [1, 2]
        hparams, metrics = tensorboard_hparams(Path(row.trial_dir))
        assert hparams["stage"] == row.stage and hparams["op_set"] == row.op_set and hparams["seed"] == row.seed
        assert hparams["epochs"] == 2 and ("F" in hparams) == (row.F == row.F)  # no F where its ops ignore it
        if row.stage == "eval":
            assert hparams["genotype_id"] == row.genotype_id and hparams["layers"] == row.layers
            assert {"ray/tune/test_acc", "ray/tune/gmac", "ray/tune/params_m", "ray/tune/latency_ms"} <= metrics
        else:
            assert hparams["F"] == row.F and {"ray/tune/valid_acc", "ray/tune/train_acc"} <= metrics
    status = sweep_status(path)
    lines = status.splitlines()
    assert sum(" finished " in ln for ln in lines[1:-1]) == len(trials) and "search done, eval done" in lines[0]
    assert lines[-1] == f"trials: {len(trials)} finished"
    assert all(f" {c} L={int(n)} " in status for c, n in zip(evals.cell, evals.layers))
    # a resume of a finished sweep trains nothing and changes no result
    before = {d: (Path(d) / "result.json").read_bytes() for d in trials.trial_dir}
    resume_sweep(path, verbose=0)
    assert before == {d: (Path(d) / "result.json").read_bytes() for d in trials.trial_dir}


def flaky_eval_trainable(config, genotypes):
    """The real eval trainable, made to crash once after training epoch 3, before reporting it.

    (Crashing right after a report raced with the driver registering that report's checkpoint.)"""
    import sweeps.trainables as T

    marker = Path(config["marker"])
    real = T.tune.report

    def report(metrics, checkpoint=None):
        if metrics.get("epoch") == 3 and not marker.exists():
            marker.write_text("crashed")
            raise RuntimeError("injected failure in epoch 3")
        with open(f"{marker}.reported", "a") as log:  # every epoch reported, across attempts
            log.write(f"{metrics['epoch']}{'r' if metrics.get('replayed') else ''}\n")
        real(metrics, checkpoint=checkpoint)

    T.tune.report = report
    try:
        T.eval_trainable(config, genotypes)
    finally:
        T.tune.report = real


def test_trial_that_raises_is_retried_from_its_checkpoint(tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec = parse_sweep(sweep_file(tmp_path, "retry", evaluation={"genotypes": ["DARTS_V2"], "layers": [1],
                                                                 "epochs": 4}))
    genotypes = {"DARTS_V2": {"genotype": spec.eval.axes["genotypes"]["DARTS_V2"]}}
    space = {**_param_space(spec.eval, genotypes), "marker": str(tmp_path / "crashed")}
    trainable = tune.with_resources(tune.with_parameters(flaky_eval_trainable, genotypes=genotypes), {"cpu": 1})
    tuner = tune.Tuner(trainable, param_space=space,
                       run_config=tune.RunConfig(name="retry", storage_path=str(tmp_path), verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=2),
                                                 callbacks=[JsonLogger(), CSVLogger(), TensorBoardLogger()]))
    result = tuner.fit()[0]
    assert (tmp_path / "crashed").exists() and result.error is None
    reported = (tmp_path / "crashed.reported").read_text().split()
    # continued from its newest checkpoint, not restarted at 1: epoch 3's was complete on storage before the
    # report that crashed (a trial checkpoints, then reports), so the retry replayed it (marked, not trained
    # again: its row comes from the checkpoint's history) and went on with epoch 4
    assert reported == ["1", "2", "3r", "4"], reported
    # Ray's own logs hold every epoch once, in order: result.json, progress.csv, TensorBoard
    assert epochs_of(Path(result.path)) == [1, 2, 3, 4]
    with open(Path(result.path) / "progress.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]
    assert tensorboard_epochs(Path(result.path)) == [1, 2, 3, 4]
    assert [r["epoch"] for r in trial_history(result.path)] == [1, 2, 3, 4]


def test_diverging_trial_stops_with_clear_error_and_others_finish(tmp_path):
    # the search trial diverges (absurd learning rate); the eval stage still trains the named genotype
    raw = sweep_file(tmp_path, "nan", search={"op_sets": ["darts"], "epochs": 3, "lr": 1.0e30, "grad_clip": 1.0e30},
                     evaluation={"genotypes": ["searched", "DARTS_V2"], "layers": [1], "epochs": 2}, max_failures=3)
    path = Path(run_sweep(parse_sweep(raw), storage=str(tmp_path), verbose=0))
    trials, _ = load_frames(path)
    search = trials[trials.stage == "search"].iloc[0]
    assert search.status == "diverged" and "DivergenceError: loss became" in search.error
    assert epochs_of(Path(search.trial_dir)) == [1]  # diverged in epoch 1, reported once, never retried
    evals = trials[trials.stage == "eval"]
    assert list(evals.genotype_id) == ["DARTS_V2"] and list(evals.status) == ["finished"]
    status = sweep_status(path)
    assert "diverged" in status and "loss became" in status


def test_storage_uri_goes_through_pyarrow(tmp_path):
    """A URI storage (file:// takes the same pyarrow path as s3://) holds the whole sweep; resume works."""
    raw = sweep_file(tmp_path, "uri", evaluation={"genotypes": ["DARTS_V2"], "layers": [1], "epochs": 1})
    location = run_sweep(parse_sweep(raw), storage=f"file://{tmp_path}/bucket", verbose=0)
    assert location == f"file://{tmp_path}/bucket/uri"
    local = tmp_path / "bucket" / "uri"
    assert json.loads((local / "state.json").read_text())["stages"] == {"eval": "done"}
    assert yaml.safe_load((local / "sweep.yaml").read_text())["storage"] == f"file://{tmp_path}/bucket"
    trials, _ = load_frames(local)
    assert list(trials.status) == ["finished"]
    assert resume_sweep(location, verbose=0) == location
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(parse_sweep(raw), storage=f"file://{tmp_path}/bucket", verbose=0)


def test_overhead_command_reports_where_ray_time_goes_in_alternating_rounds():
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "overhead", "--trials", "1", "--epochs", "3",
                           "--checkpoint-every", "1", "--repeats", "3", "--json"], capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout is the JSON object alone
    assert out["trials"] == 1 and out["epochs"] == 3 and out["repeats"] == 3
    rounds = out["rounds"]
    assert len(rounds) == 3 and out["overhead_rounds"] == [r["overhead"] for r in rounds]
    assert out["overhead"] == sorted(out["overhead_rounds"])[1]  # the median of three
    median = next(r for r in rounds if r["overhead"] == out["overhead"])
    assert all(out[k] == v for k, v in median.items())
    # one in-process run between consecutive sweeps serves as the after of one round and the before of the next
    assert [r["sequential_after_s"] for r in rounds[:-1]] == [r["sequential_before_s"] for r in rounds[1:]]
    assert proc.stderr.count("[dartsweep] overhead: sweep") == 3
    for r in rounds:
        assert r["sweep_s"] > r["fixed_s"] > 0  # Ray's start-up is never free
        assert r["overhead"] == pytest.approx(r["sweep_s"] / r["sequential_s"] - 1)
        in_trials = (1 + r["in_trial_overhead"]) * r["sequential_s"]
        assert in_trials + r["fixed_s"] == pytest.approx(r["sweep_s"])
        # compared with the mean of the in-process runs before and after the sweep (cancels the machine's drift)
        assert r["sequential_s"] == pytest.approx((r["sequential_before_s"] + r["sequential_after_s"]) / 2)
        assert r["drift"] == pytest.approx(r["sequential_after_s"] / r["sequential_before_s"] - 1)
        assert r["trial_start_s"] > 0  # the first report also pays the trial's start-up
        assert r["reporting_s"] >= 0 and r["epochs_slowdown"] > -1
    bad = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "overhead", "--repeats", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--repeats" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
