"""Ray Tune's JSON and CSV trial loggers, without losing epochs when a trial is retried.

When a trial starts again (a retry after an error, or a resumed sweep) Ray's file loggers copy the
trial's ``result.json`` / ``progress.csv`` from storage over the driver's own copy. The stored copy is
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
        local = Path(trial.local_path, file_name)
        if local.is_file() and local.stat().st_size >= _stored_size(trial, file_name):
            return  # the driver's copy already holds everything stored, and maybe more
        super()._restore_from_remote(file_name, trial)  # type: ignore[misc]


class JsonLogger(_KeepNewerLocalCopy, JsonLoggerCallback):
    """``result.json`` writer that keeps the driver's fresher copy when a trial restarts."""


class CSVLogger(_KeepNewerLocalCopy, CSVLoggerCallback):
    """``progress.csv`` writer that keeps the driver's fresher copy when a trial restarts."""
