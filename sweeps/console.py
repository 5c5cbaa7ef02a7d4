"""The driver's console: everything Ray prints goes to a log file in the sweep folder; the terminal
shows dartsweep's own lines (a compact progress view per stage), and Ray's tables and worker lines only
at ``--verbose 2``.

Ray writes to the process's file descriptors from several places (Tune's tables, forwarded worker lines
with colour codes, its logging handlers, C++ code), so the capture is at the descriptor level: fds 1 and
2 are pointed into a pipe whose reader writes every line to the log (colour codes stripped) and passes
on what the terminal should see.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
OWN_PREFIXES = ("[dartsweep]", "dartsweep:")
LOG_FILE = "driver.log"


@contextlib.contextmanager
def captured_console(log_path: Path | None, verbose: int) -> Iterator[None]:
    """Within the block, fds 1 and 2 go to ``log_path`` (appended; None: no file) and, filtered by
    ``verbose``, to the terminal: dartsweep's own lines always, everything else at verbose 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    log = open(log_path, "a", encoding="utf-8") if log_path is not None else None  # noqa: SIM115

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", errors="replace")
                plain = ANSI.sub("", text)
                if log is not None:
                    log.write(plain)
                    log.flush()
                if verbose >= 2 or plain.startswith(OWN_PREFIXES):
                    os.write(saved_err, (text if verbose >= 2 and sys.__stderr__.isatty() else plain).encode())

    reader = threading.Thread(target=pump, name="dartsweep-console", daemon=True)
    reader.start()
    # Python-level writers too (Tune prints its tables with print()), also where sys.stdout is not fd 1
    # (a notebook, a test's capture)
    streams = sys.stdout, sys.stderr
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved_out, 1)  # the pipe's last write ends (fds 1 and 2) close: the reader sees its end
        os.dup2(saved_err, 2)
        reader.join(timeout=10)
        os.close(saved_out)
        os.close(saved_err)
        if log is not None:
            log.close()


def _trial_state(trial_dir: Path, epochs: int, metric: str) -> tuple[str, int, float]:
    """(finished | errored | running, epochs reported, latest metric) of a trial folder, from its files."""
    if (trial_dir / "error.txt").exists():
        return "errored", 0, math.nan
    try:
        text = (trial_dir / "result.json").read_text()
    except OSError:
        text = ""
    last: dict = {}
    for line in reversed(text.splitlines()):  # the last line may be half written: take the newest whole one
        try:
            last = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    done = int(last.get("epoch") or 0)
    value = last.get(metric)
    value = float(value) if isinstance(value, (int, float)) else math.nan
    if last.get("diverged"):
        return "errored", done, math.nan
    if not last:
        return "waiting", 0, math.nan
    return ("finished" if done >= epochs or last.get("stop_reason") else "running"), done, value


def progress_line(stage_dir: Path, kind: str, expected: int, epochs: int, metric: str, elapsed: float,
                  label: str | None = None) -> str:
    """One line on a running stage: trials finished / running / errored, best metric so far, elapsed time
    and an estimate of what is left (from the epochs done so far)."""
    states = [_trial_state(p, epochs, metric) for p in sorted(stage_dir.glob(f"{kind}_*")) if p.is_dir()]
    count = {s: sum(1 for st, _, _ in states if st == s) for s in ("finished", "running", "errored", "waiting")}
    best = max((v for _, _, v in states if not math.isnan(v)), default=math.nan)
    done_epochs = sum(min(e, epochs) for _, e, _ in states) + epochs * count["errored"]
    total = max(expected, len(states)) * epochs
    left = elapsed / done_epochs * (total - done_epochs) if done_epochs else math.nan
    text = (f"{label or kind}: {count['finished']}/{max(expected, len(states))} finished, {count['running']} running, "
            f"{count['errored']} errored")
    if count["waiting"]:
        text += f", {count['waiting']} waiting"
    if not math.isnan(best):
        text += f"; best {metric} {best:.2f}"
    text += f"; {_clock(elapsed)} elapsed"
    if not math.isnan(left):
        text += f", ~{_clock(left)} left"
    return text


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressView:
    """Prints :func:`progress_line` for a stage while it runs, then once at the end. On a terminal every
    ``every`` seconds (default 30) and whenever the counts change; in a log file (a batch job's) at most every
    ``every`` seconds (default 60), and at once when a trial finishes or fails: a long sweep's job log stays
    readable."""

    def __init__(self, stage_dir: Path, kind: str, expected: int, epochs: int, metric: str,
                 interactive: bool = True, every: float | None = None) -> None:
        self.args = (stage_dir, kind, expected, epochs, metric)
        self.label = stage_dir.name  # the stage, or an extension's part (eval-2)
        self.interactive = interactive
        self.every = every if every is not None else (30.0 if interactive else 60.0)
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dartsweep-progress", daemon=True)

    def _line(self) -> str:
        return progress_line(*self.args, elapsed=time.monotonic() - self.start, label=self.label)

    def _run(self) -> None:
        last_shown, last_counts, last_ended = time.monotonic(), None, (0, 0)
        while not self._stop.wait(min(2.0, self.every)):
            line = self._line()
            counts = line.split(";")[0]
            ended = _ended(counts)
            now = time.monotonic()
            changed = counts != last_counts if self.interactive else ended != last_ended
            if changed or now - last_shown >= self.every:
                print(f"[dartsweep] {line}", file=sys.stderr, flush=True)
                last_shown, last_counts, last_ended = now, counts, ended

    def __enter__(self) -> "ProgressView":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        print(f"[dartsweep] {self._line()}", file=sys.stderr, flush=True)


def _ended(counts: str) -> tuple[int, int]:
    """(finished, errored) from a progress line's counts."""
    finished = re.search(r"(\d+)/\d+ finished", counts)
    errored = re.search(r"(\d+) errored", counts)
    return int(finished.group(1)) if finished else 0, int(errored.group(1)) if errored else 0
