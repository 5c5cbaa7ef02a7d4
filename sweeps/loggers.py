"""Ray Tune's JSON and CSV trial loggers, without losing epochs when a trial is retried.

When a trial starts again (a retry after an error, or a resumed sweep) Ray's file loggers copy the
trial's ``result.json`` / ``progress.csv`` from storage over the driver's own copy, but only for a trial
restored from a Tune checkpoint; dartsweep's trials restore from their own checkpoints, so these loggers
always bring the stored copy back when it is longer (else the resumed trial's reports would be synced over
the epochs before). The stored copy is
only synced every few seconds, so a trial retried by the same driver lost the epochs it had reported
since the last sync (seen: a 4-epoch trial's result.json holding only epochs 3 and 4). These loggers
keep the driver's copy when it is at least as long as the stored one.

A driver killed during a sync can still leave a truncated stored copy behind; ``analysis`` fills the
missing epochs from the history saved in each checkpoint (see ``sweeps.trainables``).
"""

from __future__ import annotations

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


    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        if result.get("replayed"):  # sweeps.trainables.REPLAYED: already in the file
            return
        super().log_trial_result(iteration, trial, result)  # type: ignore[misc]


class JsonLogger(_KeepNewerLocalCopy, JsonLoggerCallback):
    """``result.json`` writer that keeps the driver's fresher copy when a trial restarts."""


class CSVLogger(_KeepNewerLocalCopy, CSVLoggerCallback):
    """``progress.csv`` writer that keeps the driver's fresher copy when a trial restarts."""
