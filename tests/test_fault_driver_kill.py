"""The driver SIGKILLed mid-sweep, alone, several times; `dartsweep sweep up` finishes it; finished trials
stay untouched. (A whole allocation ended at once, driver and Ray together, is the SLURM preemption test's:
tests/test_slurm.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from analysis.frames import trial_history
from sweeps.lock import ray_processes
from tests.ray_helpers import epochs_of, sweep_file

pytestmark = pytest.mark.slow
EPOCHS = 15
STEPS = 25  # C 16, batch 32: ~0.25 s an epoch on 2 cores; the later trials far outlast the wait before the kill


def cli(*args):
    return [sys.executable, "-m", "nas.cli", *args]


def trial_dirs(stage_dir: Path) -> list[Path]:
    return sorted(p for p in stage_dir.glob("eval_*") if (p / "result.json").exists())


def _finished(stage: Path) -> dict[Path, bytes]:
    return {d: (d / "result.json").read_bytes() for d in trial_dirs(stage) if epochs_of(d)[-1:] == [EPOCHS]}


def test_driver_killed_then_up_finishes(tmp_path, rounds=3):
    """The driver SIGKILLed alone (``kill -9 PID``) mid-stage, ``rounds`` times over, each time after one more
    trial finished: its trial worker may train on for a moment and write checkpoints after the driver's
    last experiment snapshot (the race that made Ray Tune's own checkpoints unrecoverable; whether it
    happens depends on how fast Ray kills the dead job's workers, so the test cannot force it), and
    dartsweep's trials restore from their newest complete checkpoint on storage. ``sweep up`` continues
    each time; at the end every trial holds every epoch once and no trial that had finished was touched."""
    # DARTS_V2 has no op that uses F: the F list is folded away (2 per seed, not 4), and the resumed grid's F
    # comes from Ray's restored sample_from
    # one trial at a time, and more trials than kill rounds can use up: killed alone, a driver leaves its
    # worker training for a few seconds, which can finish one more trial before the next driver stops it
    seeds = [0, 1] if rounds == 1 else [0, 1, 2, 3]
    raw = sweep_file(tmp_path, "killed", evaluation={"genotypes": ["DARTS_V2"], "layers": [1, 2], "seeds": seeds,
                                                     "F": [2.0, 3.0], "epochs": EPOCHS, "max_steps_per_epoch": STEPS,
                                                     "channels": 16, "batch_size": 32})
    raw["max_concurrent_trials"] = 1
    file = tmp_path / "killed.yaml"
    file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stage = tmp_path / "killed" / "eval"
    finished: dict[Path, bytes] = {}
    up = cli("sweep", "up", str(file), "--storage", str(tmp_path), "--verbose", "0")
    for round_ in range(rounds):
        log = open(tmp_path / f"run{round_}.log", "w")
        driver = subprocess.Popen(up, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 180
            while time.time() < deadline and driver.poll() is None:
                done = _finished(stage)
                running = [d for d in trial_dirs(stage) if d not in done]
                if len(done) > len(finished) and running:
                    time.sleep(2.5)  # past one experiment-state save (TUNE_GLOBAL_CHECKPOINT_S=2)
                    now = _finished(stage)
                    for d, content in finished.items():
                        assert now[d] == content, f"round {round_}: {d.name} changed after it had finished"
                    finished = now
                    os.kill(driver.pid, signal.SIGKILL)
                    break
                time.sleep(0.2)
            driver.wait(30)
            assert driver.returncode == -signal.SIGKILL, f"round {round_}: the sweep ended before the kill: " + \
                (tmp_path / f"run{round_}.log").read_text()[-3000:]
            state = json.loads((tmp_path / "killed" / "state.json").read_text())
            assert state["stages"].get("eval") != "done"
            holder = json.loads((tmp_path / "killed" / "driver.lock").read_text())
            session, raylet = holder.get("ray_session"), holder.get("raylet_pid")
            assert session and session.startswith("session_") and raylet  # the driver recorded its embedded Ray
        finally:
            if driver.poll() is None:
                driver.kill()
            log.close()
    assert len(finished) >= rounds
    resume = subprocess.run(up, capture_output=True, text=True, env=env, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "taking over the lock of a driver that is gone" in resume.stderr  # the killed driver's lock
    # the workers outlive the driver by a second or two: gone by now, on their own or stopped by the
    # resumed driver (tests/test_sweep_lifecycle.py stops stand-ins deterministically)
    assert not ray_processes(session, raylet)
    dirs = trial_dirs(stage)
    status = subprocess.run(cli("sweep", "status", str(tmp_path / "killed")), capture_output=True, text=True)
    assert len(dirs) == 2 * len(seeds), status.stdout
    for d in dirs:  # every epoch once, in order, as analysis reads it (result.json alone can lose some)
        epochs = [r["epoch"] for r in trial_history(d)]
        assert epochs == list(range(1, EPOCHS + 1)), (d.name, epochs, epochs_of(d), status.stdout,
                                                      resume.stderr[-4000:])
    for d, content in finished.items():
        assert (d / "result.json").read_bytes() == content  # finished trials untouched
    assert status.returncode == 0 and f"trials: {len(dirs)} finished" in status.stdout
    assert all(json.loads((d / "params.json").read_text())["F"] is None for d in dirs)
