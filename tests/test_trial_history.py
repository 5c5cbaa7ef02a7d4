"""A trial's epoch history survives Ray's restarts: result.json lineage, checkpoint history, loggers."""

import json
import os
import shutil
import tempfile
import types
from pathlib import Path

import pyarrow.fs
import pytest

from analysis.frames import load_frames, trial_history
from sweeps import trainables
from sweeps.driver import eval_genotypes
from sweeps.checkpoints import TrialStore
from sweeps.loggers import CSVLogger, JsonLogger
from sweeps.spec import parse_sweep
from tests.ray_helpers import sweep_file


def write_results(trial_dir: Path, rows: list[dict]) -> None:
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_saved_history(trial_dir: Path, index: int, rows: list[dict], mtime: float) -> None:
    folder = trial_dir / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    (folder / "history.json").write_text(json.dumps(rows))
    os.utime(folder / "history.json", (mtime, mtime))


def test_history_follows_the_latest_attempt(tmp_path):
    # attempt 1 reported 1-4; it was restored from epoch 2's checkpoint and reported 3-5 again
    write_results(tmp_path, [{"epoch": e, "attempt": 1} for e in (1, 2, 3, 4)]
                  + [{"epoch": e, "attempt": 2} for e in (3, 4, 5)])
    rows = trial_history(tmp_path)
    assert [(r["epoch"], r["attempt"]) for r in rows] == [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]


def test_stale_epochs_past_the_restart_are_dropped(tmp_path):
    # attempt 1 reached epoch 6 past its last checkpoint (4); attempt 2 restarted at 5 and is at 5
    write_results(tmp_path, [{"epoch": e, "attempt": 1} for e in range(1, 7)] + [{"epoch": 5, "attempt": 2}])
    assert [(r["epoch"], r["attempt"]) for r in trial_history(tmp_path)] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]


def test_epochs_lost_from_result_json_come_from_the_newest_checkpoint(tmp_path):
    # a resumed trial whose result.json lost its first 14 epochs (seen after a driver SIGKILL)
    write_results(tmp_path, [{"epoch": 15, "acc": 15.0}])
    write_saved_history(tmp_path, 13, [{"epoch": e, "acc": -1.0} for e in range(1, 14)], mtime=1_000)
    write_saved_history(tmp_path, 14, [{"epoch": e, "acc": float(e)} for e in range(1, 15)], mtime=2_000)
    rows = trial_history(tmp_path)
    assert [r["epoch"] for r in rows] == list(range(1, 16))
    assert [r["acc"] for r in rows] == [float(e) for e in range(1, 16)]  # the newest checkpoint's, not -1


def test_checkpoint_history_never_runs_ahead_of_result_json(tmp_path):
    # restarted from scratch after an early kill: the old attempt's checkpoint (epoch 5) is still on disk
    write_results(tmp_path, [{"epoch": 1, "attempt": 2}, {"epoch": 2, "attempt": 2}])
    write_saved_history(tmp_path, 5, [{"epoch": e, "attempt": 1} for e in range(1, 6)], mtime=1_000)
    assert [(r["epoch"], r["attempt"]) for r in trial_history(tmp_path)] == [(1, 2), (2, 2)]


def test_truncated_result_json_and_damaged_history(tmp_path):
    (tmp_path / "result.json").write_text("")
    write_saved_history(tmp_path, 3, [{"epoch": e} for e in (1, 2, 3)], mtime=1_000)
    assert [r["epoch"] for r in trial_history(tmp_path)] == [1, 2, 3]  # all from the checkpoint
    write_results(tmp_path, [{"epoch": 1}, {"epoch": 2}])
    (tmp_path / "checkpoint_000003" / "history.json").write_text('[{"epoch": 1')
    assert [r["epoch"] for r in trial_history(tmp_path)] == [1, 2]  # damaged history adds nothing, no error


def test_a_report_being_written_is_not_corruption(tmp_path):
    write_results(tmp_path, [{"epoch": 1}, {"epoch": 2}])
    with open(tmp_path / "result.json", "a") as f:
        f.write('{"epoch": 3, "acc"')  # a live sweep: Ray is in the middle of writing epoch 3
    assert [r["epoch"] for r in trial_history(tmp_path)] == [1, 2]
    (tmp_path / "result.json").write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')  # damaged inside: an error
    with pytest.raises(json.JSONDecodeError):
        trial_history(tmp_path)


def test_trial_diverged_after_some_epochs(tmp_path):
    (tmp_path / "sweep.yaml").write_text("name: x\n")
    trial_dir = tmp_path / "search" / "search_darts_s0_a1b2c_00000"
    write_results(trial_dir, [{"epoch": 1, "valid_acc": 20.0, "diverged": False, "trial_id": "a1b2c_00000"},
                              {"epoch": 2, "valid_acc": 30.0, "diverged": False, "trial_id": "a1b2c_00000"},
                              {"epoch": 3, "diverged": True, "error": "DivergenceError: loss became nan",
                               "trial_id": "a1b2c_00000"}])
    (trial_dir / "params.json").write_text(json.dumps({"base": {"epochs": 5}, "op_set": "darts", "seed": 0}))
    trials, history = load_frames(tmp_path)
    row = trials.iloc[0]
    assert (row.status, row.epochs_done, row.final_acc, row.best_acc) == ("diverged", 2, 30.0, 30.0)
    assert row.error == "DivergenceError: loss became nan"
    assert list(history.epoch) == [1, 2, 3]


@pytest.fixture()
def eval_config(tmp_path):
    spec = parse_sweep(sweep_file(tmp_path, "h", evaluation={"genotypes": ["DARTS_V2"], "layers": [1],
                                                             "epochs": 3, "max_steps_per_epoch": 2}))
    return ({"base": spec.eval.base, "checkpoint_every": 1, "seed": 0, "genotype": "DARTS_V2", "layers": 1,
             "F": None}, eval_genotypes(spec, {}))


def test_trainable_saves_its_history_in_every_checkpoint_and_continues_it(eval_config, tmp_path, monkeypatch):
    from sweeps.checkpoints import TrialStore

    store = TrialStore.at(tmp_path / "trial")  # the trial's folder on the sweep's storage
    reports: list[dict] = []
    monkeypatch.setattr(trainables, "_trial_store", lambda: store)
    monkeypatch.setattr(trainables.tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(trainables.tune, "get_checkpoint", lambda: None)
    trainables.eval_trainable(*eval_config)
    assert [r["epoch"] for r in reports] == [1, 2, 3] and store.complete() == [2, 3]
    first = json.loads(store.read(3, "history.json"))
    assert [h["epoch"] for h in first] == [1, 2, 3] and all(h["genotype_id"] for h in first)

    # killed while epoch 3's checkpoint was written: epoch 2's is the newest complete one; epochs 1-2 come
    # back with it and only epoch 3 is trained again
    (tmp_path / "trial" / "checkpoints" / "epoch_000003" / "complete.json").unlink()
    reports.clear()
    trainables.eval_trainable(*eval_config)
    # the checkpoint's epoch first, replayed (for the driver's loggers), then epoch 3 trained again
    assert [(r["epoch"], r.get("replayed", False)) for r in reports] == [(2, True), (3, False)]
    again = json.loads(store.read(3, "history.json"))
    assert [h["epoch"] for h in again] == [1, 2, 3]
    assert again[:2] == first[:2]  # the restored epochs are the ones reported before, unchanged

    # finished, but started again (its driver died before it saw the end): nothing trains, the last epoch
    # is reported once more for Tune, marked so that the loggers do not write it twice
    reports.clear()
    trainables.eval_trainable(*eval_config)
    assert len(reports) == 1 and reports[0]["epoch"] == 3 and reports[0][trainables.REPLAYED] is True


def test_loggers_skip_a_replayed_report_only_when_their_file_holds_it(tmp_path):
    class Trial(types.SimpleNamespace):
        __hash__ = object.__hash__

    def new_trial(folder: Path) -> Trial:
        base = fake_trial(folder, tmp_path / "stored")
        trial = Trial(**vars(base), config={}, init_local_path=lambda: folder.mkdir(exist_ok=True))
        trial.checkpoint = None
        folder.mkdir(exist_ok=True)  # Ray creates the staging folder before the loggers start
        return trial

    # the driver saw the end: the replayed report is not written again, in either file
    seen = new_trial(tmp_path / "seen")
    loggers = [JsonLogger(), CSVLogger()]
    for logger in loggers:
        logger.log_trial_result(1, seen, {"epoch": 1, "acc": 0.5})
        logger.log_trial_result(1, seen, {"epoch": 1, "acc": 0.5, trainables.REPLAYED: True})
        logger.log_trial_end(seen)
    assert [r["epoch"] for r in trial_history(tmp_path / "seen")] == [1]
    assert (tmp_path / "seen" / "progress.csv").read_text().splitlines() == ["epoch,acc", "1,0.5"]

    # a driver killed while its worker trained epochs 2 and 3 on: the next driver's replayed end is written
    # (as first reported, without the mark), by a logger that starts with the replay, and epoch 2 comes
    # from the checkpoint's history
    killed = new_trial(tmp_path / "killed")
    for logger in [JsonLogger(), CSVLogger()]:
        logger.log_trial_result(1, killed, {"epoch": 1, "acc": 0.5})
        logger.log_trial_end(killed)
    history = [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.6}, {"epoch": 3, "acc": 0.7}]
    TrialStore.at(tmp_path / "killed").save(3, {"history.json": json.dumps(history).encode()})
    for logger in [JsonLogger(), CSVLogger()]:
        logger.log_trial_result(1, killed, {**history[-1], trainables.REPLAYED: True})
        logger.log_trial_end(killed)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "result.json").read_text().splitlines()]
    assert rows == [history[0], history[2]]
    assert (tmp_path / "killed" / "progress.csv").read_text().splitlines() == ["epoch,acc", "1,0.5", "3,0.7"]
    assert trial_history(tmp_path / "killed") == history


def fake_trial(local: Path, stored: Path) -> types.SimpleNamespace:
    storage = types.SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem(), trial_fs_path=str(stored))
    return types.SimpleNamespace(local_path=str(local), storage=storage, checkpoint=object())


def test_logger_keeps_the_drivers_newer_copy_on_restart(tmp_path):
    local, stored = tmp_path / "staging", tmp_path / "stored"
    write_results(local, [{"epoch": 1}, {"epoch": 2}])
    write_results(stored, [{"epoch": 1}])  # synced a few seconds before the retry
    JsonLogger()._restore_from_remote("result.json", fake_trial(local, stored))
    assert [r["epoch"] for r in trial_history(local)] == [1, 2]


def test_logger_takes_the_stored_copy_when_it_holds_more(tmp_path):
    local, stored = tmp_path / "staging", tmp_path / "stored"
    write_results(stored, [{"epoch": 1}, {"epoch": 2}])
    local.mkdir()  # Ray creates the staging folder before restoring into it
    fresh = fake_trial(local, stored)
    fresh.checkpoint = None  # no Tune checkpoint (dartsweep's trials keep their own): Ray itself would not copy
    JsonLogger()._restore_from_remote("result.json", fresh)  # a new driver: nothing local
    assert [r["epoch"] for r in trial_history(local)] == [1, 2]
    write_results(local, [{"epoch": 1}])
    JsonLogger()._restore_from_remote("result.json", fake_trial(local, stored))
    assert [r["epoch"] for r in trial_history(local)] == [1, 2]
