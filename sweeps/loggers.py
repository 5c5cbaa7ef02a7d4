"""Ray Tune's JSON, CSV and TensorBoard trial loggers, with every epoch in every log exactly once.

When a trial starts again (a retry after an error, or a resumed sweep) Ray's file loggers copy the
trial's ``result.json`` / ``progress.csv`` from storage over the driver's own copy, but only for a trial
restored from a Tune checkpoint; dartsweep's trials restore from their own checkpoints, so these loggers
always bring the stored copy back when it is longer (else the resumed trial's reports would be synced over
the epochs before). The stored copy is only synced every few seconds, so a trial retried by the same
driver lost the epochs it had reported since the last sync (seen: a 4-epoch trial's result.json holding
only epochs 3 and 4). These loggers keep the driver's copy when it is at least as long as the stored one.

Each file then holds each epoch once, in order (:class:`_EpochsOnce`): epochs trained again after a
restore from an older checkpoint are not written twice, and the epochs a stopped driver never logged
(the one its trials had just checkpointed when SLURM signalled the whole job, seen in a requeue check;
or those a lagging sync lost) are written from the checkpoint's saved history when the trial's first
report after its restore, marked ``replayed``, comes in. TensorBoard's step is the epoch, and each trial
ends with an HParams session (its op set, F, layers, seed, ... and final accuracy, GMACs, latency).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

REPLAYED = "replayed"  # a trial's first report after a restore repeats its checkpoint's last epoch


def _stored_size(trial: Any, file_name: str) -> int:
    """Bytes of the trial's stored copy of ``file_name``; -1 when there is none or it cannot be read."""
    import pyarrow.fs

    try:
        info = trial.storage.storage_filesystem.get_file_info(Path(trial.storage.trial_fs_path, file_name).as_posix())
    except Exception:  # noqa: BLE001 - unreachable storage: Ray's own copy logic reports it
        return -1
    return info.size if info.type == pyarrow.fs.FileType.File else -1


class _KeepNewerLocalCopy:
    def _restore_from_remote(self, file_name: str, trial: Any) -> None:
        # Ray copies the stored file only for a trial it restores from a Tune checkpoint; dartsweep's trials
        # keep their own checkpoints (sweeps.checkpoints), so Tune restarts them "from scratch": without
        # this copy the driver's empty staging file would be synced over the stored epochs
        import pyarrow.fs

        local = Path(trial.local_path, file_name)
        if local.is_file() and local.stat().st_size >= _stored_size(trial, file_name):
            return  # the driver's copy already holds everything stored, and maybe more
        if _stored_size(trial, file_name) < 0:
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(Path(trial.storage.trial_fs_path, file_name).as_posix(), local.as_posix(),
                              source_filesystem=trial.storage.storage_filesystem)


    _FILE = ""  # the file this logger writes in the trial's folder


class _EpochsOnce:
    """Every epoch in the trial's log exactly once, in order, whatever interrupted it.

    A row whose epoch the file already holds is not written again (a trial restored from a checkpoint older
    than its last report trains those epochs again; the file keeps the first report of each). A report
    marked ``replayed`` (sweeps.trainables: the trial's first report after a restore repeats its checkpoint's
    last epoch) brings the epochs the file lacks up to it from the history saved in the trial's newest
    checkpoint: the epoch a driver had checkpointed but not logged when it was stopped, and any a lagging
    sync lost."""

    def _open(self, trial: Any) -> None:
        raise NotImplementedError

    def _is_open(self, trial: Any) -> bool:
        raise NotImplementedError

    def _read_last(self, trial: Any) -> int | None:
        raise NotImplementedError

    def log_trial_start(self, trial: Any) -> None:
        super().log_trial_start(trial)  # type: ignore[misc]
        self._last_epochs()[trial] = self._read_last(trial)

    def _last_epochs(self) -> dict:
        if not hasattr(self, "_last_epoch"):
            self._last_epoch: dict[Any, int | None] = {}
        return self._last_epoch

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        last_epochs = self._last_epochs()
        if not self._is_open(trial) or trial not in last_epochs:
            self._open(trial)
            last_epochs[trial] = self._read_last(trial)
        last = last_epochs[trial]
        rows = [result]
        if result.get(REPLAYED):
            base = {k: v for k, v in result.items() if k != REPLAYED}  # the row as first reported
            rows = [{**base, **row} for row in _saved_history(trial, base.get("epoch"))] or [base]
        for row in rows:
            epoch = row.get("epoch")
            if isinstance(epoch, (int, float)) and last is not None and epoch <= last:
                continue
            super().log_trial_result(iteration, trial, row)  # type: ignore[misc]
            if isinstance(epoch, (int, float)):
                last = int(epoch)
        last_epochs[trial] = last


def _saved_history(trial: Any, upto: Any) -> list[dict[str, Any]]:
    """The epochs (up to ``upto``) saved in the trial's newest complete checkpoint on storage."""
    from sweeps.checkpoints import TrialStore
    from sweeps.trainables import HISTORY_FILE

    try:
        newest = TrialStore.at(trial.storage.trial_fs_path, trial.storage.storage_filesystem).read_newest((HISTORY_FILE,))
        rows = json.loads(newest[1][HISTORY_FILE]) if newest is not None else []
    except Exception:  # noqa: BLE001 - unreadable: the replayed row alone is written
        return []
    limit = upto if isinstance(upto, (int, float)) else math.inf
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("epoch"), (int, float)) and r["epoch"] <= limit]


def _last_logged_epoch(path: Path) -> int | None:
    """The epoch of the last complete row of a ``result.json`` or ``progress.csv``; None when it has none."""
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(lines))
        values = [r.get("epoch") for r in rows]
    else:
        values = []
        for line in lines:
            try:
                values.append(json.loads(line).get("epoch"))
            except (json.JSONDecodeError, AttributeError):
                continue  # a half-written line
    for value in reversed(values):
        try:
            return int(float(value))
        except (TypeError, ValueError):
            continue
    return None


class JsonLogger(_EpochsOnce, _KeepNewerLocalCopy, JsonLoggerCallback):
    """``result.json`` writer: the driver's fresher copy kept when a trial restarts, every epoch once."""

    def _open(self, trial: Any) -> None:
        self.log_trial_start(trial)

    def _is_open(self, trial: Any) -> bool:
        return trial in self._trial_files

    def _read_last(self, trial: Any) -> int | None:
        return _last_logged_epoch(Path(trial.local_path, "result.json"))


class CSVLogger(_EpochsOnce, _KeepNewerLocalCopy, CSVLoggerCallback):
    """``progress.csv`` writer: the driver's fresher copy kept when a trial restarts, every epoch once."""

    def _open(self, trial: Any) -> None:
        self._setup_trial(trial)

    def _is_open(self, trial: Any) -> bool:
        return trial in self._trial_files

    def _read_last(self, trial: Any) -> int | None:
        return _last_logged_epoch(Path(trial.local_path, "progress.csv"))


# TensorBoard's HParams dashboard: what each trial was (hyperparameters) and how it ended (metrics)
HPARAMS = ("stage", "op_set", "genotype_id", "F", "layers", "seed", "cost_weight", "epochs")
HPARAM_METRICS = ("test_acc", "best_test_acc", "gmac", "params_m", "latency_ms", "throughput_img_s",
                  "valid_acc", "train_acc")
TAG = "ray/tune/"


class _EpochStep(TBXLoggerCallback):
    """Ray's TensorBoard writer steps by ``training_iteration`` (reports, which restart at 1 after a
    restore): here the step is the epoch."""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if isinstance(result.get("epoch"), (int, float)):
            result = {k: v for k, v in result.items() if k != "timesteps_total"}
            result["training_iteration"] = int(result["epoch"])
        super().log_trial_result(iteration, trial, result)


class TensorBoardLogger(_EpochsOnce, _EpochStep):
    """TensorBoard event files, one step per epoch (Ray's own logger counts reports, which restart at 1
    after a restore), every epoch once, and each trial's hyperparameters and final metrics for the HParams
    dashboard when it ends."""

    def _open(self, trial: Any) -> None:
        self.log_trial_start(trial)

    def _is_open(self, trial: Any) -> bool:
        return trial in self._trial_writer

    def _read_last(self, trial: Any) -> int | None:
        return _last_event_epoch(trial)

    def log_trial_start(self, trial: Any) -> None:
        super().log_trial_start(trial)
        self._hparams = getattr(self, "_hparams", {})

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        super().log_trial_result(iteration, trial, result)
        if not result.get(REPLAYED):
            self._hparams[trial] = result
        elif trial not in self._hparams:
            self._hparams[trial] = {k: v for k, v in result.items() if k != REPLAYED}

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        last = getattr(self, "_hparams", {}).pop(trial, None)
        if trial in self._trial_writer and last:
            _write_hparams(self._trial_writer[trial], last)
            self._trial_result[trial] = {}  # Ray's own hparams (the raw config) are not written
        super().log_trial_end(trial, failed)


def _hparam_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value)
    if isinstance(value, (int, float, str)):
        return value
    return None


def _write_hparams(writer: Any, result: dict) -> None:
    """The trial's HParams session: its hyperparameters (``HPARAMS``, None left out: TensorBoard has no
    null) and the metrics it ended with, as scalars of the same tags its epochs were written under."""
    from tensorboardX.summary import hparams

    params = {"epochs": (result.get("config") or {}).get("base", {}).get("epochs"), **result}
    hparam_dict = {k: _hparam_value(params.get(k)) for k in HPARAMS}
    hparam_dict = {k: v for k, v in hparam_dict.items() if v is not None}
    metric_dict = {TAG + k: float(result[k]) for k in HPARAM_METRICS
                   if isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)
                   and math.isfinite(result[k])}
    experiment, start, end = hparams(hparam_dict=hparam_dict, metric_dict=metric_dict)
    for summary in (experiment, start, end):
        writer.file_writer.add_summary(summary)
    writer.flush()


def _last_event_epoch(trial: Any) -> int | None:
    """The last epoch in the trial's TensorBoard event files: the driver's own and those on storage."""
    import tempfile

    import pyarrow.fs
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = [str(p) for p in Path(trial.local_path).glob("events.out.tfevents.*")]
    best: int | None = None
    with tempfile.TemporaryDirectory() as scratch:
        try:
            fs = trial.storage.storage_filesystem
            infos = fs.get_file_info(pyarrow.fs.FileSelector(trial.storage.trial_fs_path, allow_not_found=True))
            for info in infos:
                if info.type == pyarrow.fs.FileType.File and info.base_name.startswith("events.out.tfevents."):
                    if isinstance(fs, pyarrow.fs.LocalFileSystem):
                        files.append(info.path)
                    else:
                        local = Path(scratch, info.base_name)
                        with fs.open_input_stream(info.path) as stream:
                            local.write_bytes(stream.read())
                        files.append(str(local))
        except Exception:  # noqa: BLE001 - storage unreadable: the driver's own files still count
            pass
        for path in dict.fromkeys(files):
            try:
                for event in LegacyEventFileLoader(path).Load():
                    for value in event.summary.value:
                        if value.tag == TAG + "epoch":
                            best = max(best or 0, int(event.step))
            except Exception:  # noqa: BLE001 - a file being written: what was read counts
                continue
    return best
