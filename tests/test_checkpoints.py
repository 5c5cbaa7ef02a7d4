"""dartsweep's own trial checkpoints, the SLURM side of the lock, and the progress line's cadence in a log."""

import json
import os
import time

import pytest

from sweeps.checkpoints import CHECKPOINT_DIR, MARKER, TrialStore, epoch_folder, newest_history, newest_state_file
from sweeps.lock import holder_alive, slurm_job, slurm_job_gone


def files(epoch: int) -> dict[str, bytes]:
    return {"state.pt": f"state {epoch}".encode() * 100, "history.json": json.dumps([{"epoch": epoch}]).encode()}


def test_newest_complete_checkpoint_wins_and_two_are_kept(tmp_path):
    store = TrialStore.at(tmp_path)
    assert store.newest() is None and newest_history(tmp_path) is None and newest_state_file(tmp_path) is None
    for epoch in (1, 2, 3):
        store.save(epoch, files(epoch))
    assert store.complete() == [2, 3] and store.newest() == 3
    assert store.read(3, "state.pt") == files(3)["state.pt"]
    assert newest_history(tmp_path) == [{"epoch": 3}]
    assert newest_state_file(tmp_path) == tmp_path / CHECKPOINT_DIR / "epoch_000003" / "state.pt"
    assert not [p for p in (tmp_path / CHECKPOINT_DIR).iterdir() if p.name.startswith(".")]  # no leftovers


@pytest.mark.parametrize("damage", ["no_marker", "short_file", "bad_marker", "temp_folder"])
def test_a_checkpoint_cut_off_anywhere_is_not_taken(tmp_path, damage):
    """Whatever a kill leaves of the newest checkpoint, the one before it is what a trial restores."""
    store = TrialStore.at(tmp_path)
    store.save(4, files(4))
    folder = tmp_path / CHECKPOINT_DIR / epoch_folder(5)
    if damage == "temp_folder":  # killed before the rename: the folder has a temporary name
        folder = tmp_path / CHECKPOINT_DIR / ".epoch_000005.abcd.tmp"
    folder.mkdir()
    for name, data in files(5).items():
        (folder / name).write_bytes(data)
    marker = {"epoch": 5, "files": {n: len(d) for n, d in files(5).items()}}
    if damage == "short_file":  # the state written only in part, the marker already there (a remote store)
        (folder / MARKER).write_text(json.dumps(marker))
        (folder / "state.pt").write_bytes(files(5)["state.pt"][:10])
    elif damage == "bad_marker":
        (folder / MARKER).write_text('{"epoch": 5, "fil')
    elif damage == "temp_folder":
        (folder / MARKER).write_text(json.dumps(marker))
    assert store.newest() == 4
    store.save(5, files(5))  # the epoch trained again: a complete checkpoint replaces the damaged one
    assert store.newest() == 5 and store.read(5, "state.pt") == files(5)["state.pt"]


def test_a_repeated_epoch_replaces_the_old_checkpoint(tmp_path):
    store = TrialStore.at(tmp_path)
    store.save(2, files(2))
    store.save(2, {**files(2), "state.pt": b"again"})
    assert store.complete() == [2] and store.read(2, "state.pt") == b"again"


def test_remote_store_writes_the_marker_last(tmp_path):
    """A pyarrow filesystem (cloud storage's interface, here a local one behind a SubTreeFileSystem):
    no rename, so completeness is the marker and every file at its recorded size."""
    import pyarrow.fs as pafs

    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = TrialStore.at("trial", fs)
    assert store.fs is not None
    for epoch in (1, 2, 3):
        store.save(epoch, files(epoch))
    assert store.complete() == [2, 3] and store.read(3, "history.json") == files(3)["history.json"]
    (tmp_path / "trial" / CHECKPOINT_DIR / "epoch_000003" / "state.pt").write_bytes(b"cut")
    assert store.newest() == 2


def test_slurm_requeue_frees_the_lock_of_the_previous_run(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert slurm_job() == {"slurm_job_id": "4242", "slurm_restart_count": 1}
    fresh = {"host": "another-node", "pid": 1, "heartbeat": time.time()}
    previous_run = {**fresh, "slurm_job_id": "4242", "slurm_restart_count": 0}
    assert slurm_job_gone(previous_run) and not holder_alive(previous_run)  # a fresh heartbeat, yet gone
    assert not slurm_job_gone({**previous_run, "slurm_restart_count": 1})  # this very run
    assert holder_alive(fresh)  # no SLURM in the holder: the heartbeat decides
    monkeypatch.delenv("SLURM_JOB_ID")
    assert slurm_job() == {}


def test_progress_in_a_log_file_only_on_trials_ending_or_every_interval(tmp_path, capsys):
    from sweeps.console import ProgressView, progress_line

    stage = tmp_path / "eval"
    trial = stage / "eval_x_00000"
    trial.mkdir(parents=True)
    (trial / "result.json").write_text(json.dumps({"epoch": 1, "test_acc": 50.0}) + "\n")
    with ProgressView(stage, "eval", 1, 3, "test_acc", interactive=False, every=60):
        time.sleep(2.5)  # an epoch reported: not a line of its own in a log
        assert capsys.readouterr().err == ""
        with open(trial / "result.json", "a") as fh:  # a half-written line is read as not there yet
            fh.write('{"epoch": 2, "test_acc": 6')
        # the newest whole line counts: epoch 1 running at 50 % (a parser that gave up on the cut line
        # would say waiting, with no best value)
        line = progress_line(stage, "eval", 1, 3, "test_acc", elapsed=10)
        assert line.startswith("eval: 0/1 finished, 1 running, 0 errored; best test_acc 50.00"), line
        time.sleep(2.3)
        assert capsys.readouterr().err == ""
        with open(trial / "result.json", "a") as fh:
            fh.write('0.0}\n' + json.dumps({"epoch": 3, "test_acc": 70.0}) + "\n")
        time.sleep(2.5)  # the trial finished: a line at once, well before the 60 s interval
        assert "eval: 1/1 finished, 0 running, 0 errored; best test_acc 70.00" in capsys.readouterr().err


def _write_epochs(path: str, epochs: int, queue) -> None:
    """One attempt of a trial: a checkpoint per epoch (an orphaned worker and its replacement run the same
    trial, each writing and pruning the same folder)."""
    try:
        store = TrialStore.at(path)
        for epoch in range(1, epochs + 1):
            store.save(epoch, files(epoch))
        queue.put(("ok", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def _read_newest(path: str, until: float, queue) -> None:
    try:
        store, reads = TrialStore.at(path), 0
        while time.time() < until:
            newest = store.read_newest(("state.pt", "history.json"))
            if newest is not None:
                epoch, read = newest
                assert read == files(epoch), epoch  # whole, and the files of the epoch it names
                reads += 1
        queue.put(("ok", reads))
    except BaseException as exc:  # noqa: BLE001
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def test_two_attempts_of_one_trial_write_and_prune_at_once(tmp_path):
    """Two writers of the same epochs into one trial folder, and a reader restoring from it meanwhile: no
    rename hits a folder the other moved, no read hits one the other pruned; the newest stays complete."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    epochs = 150
    procs = [ctx.Process(target=_write_epochs, args=(str(tmp_path), epochs, queue)) for _ in range(2)]
    procs.append(ctx.Process(target=_read_newest, args=(str(tmp_path), time.time() + 4, queue)))
    for p in procs:
        p.start()
    outcomes = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert [o for o in outcomes if o[0] == "error"] == []
    assert max(o[1] or 0 for o in outcomes) > 10  # the reader did read while the writers wrote
    store = TrialStore.at(tmp_path)
    assert store.newest() == epochs and store.read(epochs, "state.pt") == files(epochs)["state.pt"]
    assert store.complete()[-1] == epochs and len(store.complete()) <= 3


def test_a_trial_that_cannot_reach_its_storage_fails_rather_than_checkpointing_nothing(monkeypatch):
    """Outside Tune, Ray's context says there is no storage: no trial store. Inside, an error from Ray's
    context API (a changed Ray, storage unreachable) is the trial's error, never a silent "no checkpoints"."""
    from ray import tune

    from sweeps import trainables

    assert trainables._trial_store() is None and trainables._trial_id() == ""

    class Broken:
        def get_storage(self):
            raise RuntimeError("storage context unavailable")

    monkeypatch.setattr(tune, "get_context", lambda: Broken())
    with pytest.raises(RuntimeError, match="storage context unavailable"):
        trainables._trial_store()
