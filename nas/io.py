"""Atomic writes: results, checkpoints and genotypes are never seen half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import torch


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return _atomic(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_checkpoint_atomic(path: str | Path, state: dict[str, Any]) -> Path:
    return _atomic(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path | IO[bytes], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by this package, from a file or a buffer (weights_only: no code is
    unpickled)."""
    return torch.load(path, map_location=map_location, weights_only=True)
