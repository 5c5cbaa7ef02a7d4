"""Ray Tune's JSON and CSV trial loggers, without losing epochs when a trial is retried.

When a trial starts again (a retry after an error, or a resumed sweep) Ray's file loggers copy the
trial's ``result.json`` / ``progress.csv`` from storage over the driver's own copy, but only for a trial
restored from a Tune checkpoint; dartsweep's trials restore from their own checkpoints, so these loggers
always bring the stored copy back when it is longer (else the resumed trial's reports would be synced over
the epochs before). The stored copy is
only synced every few seconds, so a trial retried by the same driver lost the epochs it had reported
since the last sync (seen: a 4-epoch trial's result.json holding only epochs 3 and 4). These loggers
keep the driver's copy when it is at least as long as the stored one.

A trial that finished unseen by its driver (killed while the worker trained on) reports its end again,
marked ``replayed``: written where the file lacks that epoch, skipped where it holds it (finished trials'
files stay byte-identical).

A driver killed during a sync can still leave a truncated stored copy behind; ``analysis`` fills the
missing epochs from the history saved in each checkpoint (see ``sweeps.trainables``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback


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

    def _open(self, trial: Any) -> None:
        raise NotImplementedError

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if result.get("replayed"):  # sweeps.trainables.REPLAYED: the end of a trial that had finished
            # written only when the file does not hold that epoch yet: a driver killed while its worker
            # trained on never saw the last epochs, which then exist only in the trial's checkpoints
            if trial not in self._trial_files:  # type: ignore[attr-defined]
                self._open(trial)
            last = _last_logged_epoch(Path(trial.local_path, self._FILE))
            if last is not None and result.get("epoch") is not None and last >= result["epoch"]:
                return
            result = {k: v for k, v in result.items() if k != "replayed"}  # the row as first reported
        super().log_trial_result(iteration, trial, result)  # type: ignore[misc]


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


class JsonLogger(_KeepNewerLocalCopy, JsonLoggerCallback):
    """``result.json`` writer that keeps the driver's fresher copy when a trial restarts."""

    _FILE = "result.json"

    def _open(self, trial: Any) -> None:
        self.log_trial_start(trial)


class CSVLogger(_KeepNewerLocalCopy, CSVLoggerCallback):
    """``progress.csv`` writer that keeps the driver's fresher copy when a trial restarts."""

    _FILE = "progress.csv"

    def _open(self, trial: Any) -> None:
        self._setup_trial(trial)
