"""Trial checkpoints that dartsweep owns, so that no kill, at any moment, loses one.

Ray Tune 2.60 deletes a trial's old checkpoints on the driver (``num_to_keep``) and restores a trial from
the checkpoint its last experiment snapshot names; the snapshot lags the trial by seconds, so after a kill
that checkpoint can be gone, and the trial fails with "Could not recover from checkpoint as it does not
exist on storage anymore" (ray-project/ray#30073; Ray's fallback to the newest checkpoint was removed).
So a trial writes its own checkpoints into its folder on the sweep's storage and finds the newest
complete one itself when it starts, whatever Tune's snapshot says:

- ``<trial folder>/checkpoints/epoch_000012/`` holds ``state.pt``, ``history.json``, ``genotype.json``
  (search) and, written last, ``complete.json`` (the epoch and every file's size);
- on a local or shared filesystem the folder is written under a temporary name and renamed into place
  (atomic), the marker inside it; in cloud storage (no rename) the marker object is written last;
- a checkpoint counts only with its marker and every file at its recorded size; older ones are removed
  only after a newer one is complete, keeping :data:`KEEP`.

The driver never registers these with Tune (``tune.report`` carries metrics only), so Tune's snapshot can
never name a checkpoint that is gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

CHECKPOINT_DIR = "checkpoints"
MARKER = "complete.json"
KEEP = 2
_NAME = re.compile(r"^epoch_(\d{6,})$")


def epoch_folder(epoch: int) -> str:
    return f"epoch_{epoch:06d}"


@dataclass(frozen=True)
class TrialStore:
    """A trial's folder on the sweep's storage: a local or shared path (``fs`` None) or a path on a pyarrow
    filesystem (cloud storage, as Ray's ``StorageContext`` gives it)."""

    path: str
    fs: Any = None  # pyarrow.fs.FileSystem; None: the local filesystem (atomic renames)

    @staticmethod
    def at(path: str | Path, fs: Any = None) -> "TrialStore":
        import pyarrow.fs as pafs

        if fs is None or isinstance(fs, pafs.LocalFileSystem):
            return TrialStore(str(path))
        return TrialStore(str(path), fs)

    @property
    def root(self) -> str:
        return f"{self.path}/{CHECKPOINT_DIR}"

    # ------------------------------------------------------------------------------------------ listing
    def _names(self) -> list[str]:
        if self.fs is None:
            try:
                return os.listdir(self.root)
            except FileNotFoundError:
                return []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return [i.base_name for i in infos if i.type == pafs.FileType.Directory]

    def _read(self, *parts: str) -> bytes:
        path = "/".join([self.root, *parts])
        if self.fs is None:
            return Path(path).read_bytes()
        with self.fs.open_input_stream(path) as fh:
            return fh.read()

    def _size(self, *parts: str) -> int:
        path = "/".join([self.root, *parts])
        if self.fs is None:
            try:
                return os.path.getsize(path)
            except OSError:
                return -1
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else -1

    def complete(self) -> list[int]:
        """Epochs of the complete checkpoints, oldest first."""
        epochs = []
        for name in self._names():
            match = _NAME.match(name)
            if not match:
                continue
            try:
                marker = json.loads(self._read(name, MARKER))
            except (OSError, ValueError):
                continue  # being written, or cut off: not a checkpoint
            files = marker.get("files", {}) if isinstance(marker, dict) else {}
            if files and all(self._size(name, f) == size for f, size in files.items()):
                epochs.append(int(match.group(1)))
        return sorted(epochs)

    def newest(self) -> int | None:
        """The epoch of the newest complete checkpoint, None when there is none."""
        epochs = self.complete()
        return epochs[-1] if epochs else None

    def read(self, epoch: int, name: str) -> bytes:
        return self._read(epoch_folder(epoch), name)

    def read_newest(self, names: tuple[str, ...], attempts: int = 10) -> tuple[int, dict[str, bytes]] | None:
        """(epoch, files) of the newest complete checkpoint, None when there is none. Another attempt of
        this trial (an orphaned worker still training) may prune or replace that folder between the listing
        and the reading: then the listing is taken again."""
        for attempt in range(attempts):
            epoch = self.newest()
            if epoch is None:
                return None
            try:
                return epoch, {name: self.read(epoch, name) for name in names}
            except (FileNotFoundError, NotADirectoryError):
                if attempt == attempts - 1:
                    raise
        return None

    # ------------------------------------------------------------------------------------------ writing
    def save(self, epoch: int, files: Mapping[str, bytes], keep: int = KEEP) -> str:
        """Write a complete checkpoint of ``epoch`` (a new one replaces one of the same epoch left by an
        earlier attempt), then remove all but the newest ``keep``. Returns its folder."""
        name = epoch_folder(epoch)
        marker = json.dumps({"epoch": epoch, "files": {f: len(b) for f, b in files.items()}}).encode()
        if self.fs is None:
            final = self._save_local(name, files, marker)
        else:
            final = self._save_remote(name, files, marker)
        self.prune(keep)
        return final

    def _save_local(self, name: str, files: Mapping[str, bytes], marker: bytes) -> str:
        os.makedirs(self.root, exist_ok=True)
        tmp = os.path.join(self.root, f".{name}.{secrets.token_hex(4)}.tmp")
        os.mkdir(tmp)
        try:
            for fname, data in [*files.items(), (MARKER, marker)]:
                with open(os.path.join(tmp, fname), "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            final = os.path.join(self.root, name)
            # Another attempt of this trial (the orphaned worker of a killed driver) may write the same epoch
            # at the same moment: each step below tolerates the other's, and if its copy lands in between
            # every time, that complete checkpoint of this epoch stands and this one is dropped.
            for _ in range(10):
                if os.path.exists(final):  # an earlier attempt's checkpoint of this epoch: set it aside first
                    old = os.path.join(self.root, f".{name}.{secrets.token_hex(4)}.old")
                    try:
                        os.rename(final, old)
                    except FileNotFoundError:  # the other attempt set it aside first
                        pass
                    else:
                        shutil.rmtree(old, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _save_remote(self, name: str, files: Mapping[str, bytes], marker: bytes) -> str:
        final = f"{self.root}/{name}"
        self.fs.create_dir(final, recursive=True)
        try:  # an earlier attempt's marker goes first, so its folder never looks complete with new files
            self.fs.delete_file(f"{final}/{MARKER}")
        except (FileNotFoundError, OSError):
            pass
        for fname, data in [*files.items(), (MARKER, marker)]:
            with self.fs.open_output_stream(f"{final}/{fname}") as fh:
                fh.write(data)
        return final

    def prune(self, keep: int = KEEP) -> None:
        """Remove complete checkpoints beyond the newest ``keep``, and leftovers of interrupted writes."""
        epochs = self.complete()
        doomed = [epoch_folder(e) for e in epochs[:-keep]] if keep > 0 else []
        if self.fs is None:
            for name in self._names():
                if name.endswith((".tmp", ".old")) and name.startswith("."):
                    path = os.path.join(self.root, name)
                    if name.endswith(".old") or _older_than(path, 3600):  # another writer's may be live
                        shutil.rmtree(path, ignore_errors=True)
            for name in doomed:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            return
        for name in doomed:
            try:
                self.fs.delete_dir(f"{self.root}/{name}")
            except (FileNotFoundError, OSError):
                pass


def _older_than(path: str, seconds: float) -> bool:
    import time

    try:
        return time.time() - os.path.getmtime(path) > seconds
    except OSError:
        return False


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def newest_history(trial_dir: str | Path) -> list[dict[str, Any]] | None:
    """The reported epochs saved in a trial folder's newest checkpoint: dartsweep's own
    (``checkpoints/epoch_*``), else Ray Tune's (``checkpoint_*``, sweeps written before this release);
    None when there is none or it cannot be read."""
    trial_dir = Path(trial_dir)
    store = TrialStore.at(trial_dir)
    epoch = store.newest()
    try:
        if epoch is not None:
            data = json.loads(store.read(epoch, "history.json"))
        else:
            saved = sorted(trial_dir.glob("checkpoint_*/history.json"), key=lambda p: p.stat().st_mtime)
            if not saved:
                return None
            data = json.loads(saved[-1].read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else None


def newest_state_file(trial_dir: str | Path) -> Path | None:
    """``state.pt`` of a trial folder's newest checkpoint (own, else Ray Tune's), None when there is none."""
    trial_dir = Path(trial_dir)
    epoch = TrialStore.at(trial_dir).newest()
    if epoch is not None:
        return trial_dir / CHECKPOINT_DIR / epoch_folder(epoch) / "state.pt"
    found = sorted(trial_dir.glob("checkpoint_*/state.pt"))
    return found[-1] if found else None
