"""SIGTERM and SIGUSR1 to a real driver: every running trial checkpoints, the driver exits 143 / 138 with the
lock released, and `dartsweep sweep up` continues each trial from that checkpoint, not from scratch."""

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
from sweeps.checkpoints import TrialStore
from tests.ray_helpers import epochs_of, sweep_file

pytestmark = pytest.mark.slow
EPOCHS = 60


def cli(*args):
    return [sys.executable, "-m", "nas.cli", *args]


def trial_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in (sweep / "eval").glob("eval_*") if (p / "result.json").exists())


def test_signal_checkpoints_every_trial_and_up_continues(tmp_path, signum=signal.SIGTERM, code=143):
    """SIGTERM here; SIGUSR1 (exit 138) goes the same way, end to end in tests/test_slurm.py."""
    # checkpoint_every far past the last epoch: the only checkpoints are the ones the signal asks for (and
    # the final one), so a trial that continues past epoch 1 after the restart continued from the signal's
    raw = sweep_file(tmp_path, "signalled", evaluation={"genotypes": ["PIBCONV"], "layers": [1, 2], "seeds": [0],
                                                        "epochs": EPOCHS, "checkpoint_every": 1000})
    file = tmp_path / "signalled.yaml"
    file.write_text(yaml.safe_dump(raw))
    sweep = tmp_path / "signalled"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    up = cli("sweep", "up", str(file), "--storage", str(tmp_path), "--verbose", "0")
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(up, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and driver.poll() is None:
                dirs = trial_dirs(sweep)
                if len(dirs) == 2 and all(len(epochs_of(d)) >= 5 for d in dirs):
                    break
                time.sleep(0.2)
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            # the precondition: both trials running past epoch 5, with no checkpoint yet (none is periodic)
            reached = {d: epochs_of(d)[-1] for d in trial_dirs(sweep)}
            assert len(reached) == 2 and all(5 <= e < EPOCHS for e in reached.values()), reached
            periodic = {d: TrialStore.at(d).newest() for d in reached}
            assert periodic == {d: None for d in reached}, periodic
            driver.send_signal(signum)
            driver.wait(120)
        finally:
            if driver.poll() is None:
                driver.kill()
    out = (tmp_path / "first.log").read_text()
    assert driver.returncode == code, out[-3000:]
    assert f"stopped by {signal.Signals(signum).name}" in out and f"(exit {code})" in out
    assert "every running trial has checkpointed" in out
    assert not (sweep / "driver.lock").exists() or json.loads((sweep / "driver.lock").read_text()).get("released")
    assert json.loads((sweep / "state.json").read_text())["stages"]["eval"] == "interrupted"
    saved = {}
    for d, epoch in reached.items():
        newest = TrialStore.at(d).newest()
        # the signal's checkpoint: there was none before it, and it holds at least the epoch reached then
        assert newest is not None and periodic[d] is None and epoch <= newest < EPOCHS, (d.name, epoch, newest)
        saved[d] = newest

    again = subprocess.run(up, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the sweep there" in again.stderr
    for d in trial_dirs(sweep):
        epochs = epochs_of(d)
        assert epochs.count(1) == 1, (d.name, epochs)  # never trained again from scratch
        resumed_at = next(e for prev, e in zip(epochs, epochs[1:]) if e <= prev) if sorted(epochs) != epochs \
            else epochs[epochs.index(saved[d]) + 1] if saved[d] in epochs else None
        assert resumed_at is None or resumed_at == saved[d] + 1, (d.name, saved[d], epochs)
        assert [r["epoch"] for r in trial_history(d)] == list(range(1, EPOCHS + 1))
    status = subprocess.run(cli("sweep", "status", str(sweep)), capture_output=True, text=True)
    assert "trials: 2 finished" in status.stdout and "core-hours spent" in status.stdout, status.stdout


def test_up_refuses_a_changed_file_and_keeps_a_finished_sweep(tmp_path):
    raw = sweep_file(tmp_path, "upped", evaluation={"genotypes": ["DARTS_V2"], "layers": [1], "seeds": [0],
                                                    "epochs": 2})
    file = tmp_path / "upped.yaml"
    file.write_text(yaml.safe_dump(raw))
    up = cli("sweep", "up", str(file), "--storage", str(tmp_path), "--verbose", "0")
    first = subprocess.run(up, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no sweep there yet; starting it" in first.stderr
    result = next((tmp_path / "upped" / "eval").glob("eval_*/result.json"))
    before = result.read_bytes()

    second = subprocess.run(up, capture_output=True, text=True, timeout=300)  # a requeued job: nothing to do
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing the sweep there" in second.stderr
    assert result.read_bytes() == before

    raw["eval"]["lr"] = 0.1  # a training setting differs from the frozen sweep: refused, nothing touched
    file.write_text(yaml.safe_dump(raw))
    changed = subprocess.run(up, capture_output=True, text=True, timeout=120)
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.lr" in lines[0], changed.stderr
    raw["eval"]["lr"] = 0.05
    raw["eval"]["layers"] = [1, 2]  # a grid value added: that is what `extend` is for
    file.write_text(yaml.safe_dump(raw))
    grown = subprocess.run(up, capture_output=True, text=True, timeout=120)
    assert grown.returncode == 2 and "eval.layers" in grown.stderr and "extend" in grown.stderr, grown.stderr
    assert result.read_bytes() == before


@pytest.mark.parametrize("args,message", [(["--grace", "soon"], "--grace"), (["--grace", "0"], "--grace"),
                                          (["--progress-every", "-5"], "--progress-every")])
def test_bad_signal_settings_are_one_line(tmp_path, args, message):
    run = subprocess.run(cli("sweep", "up", "quickstart", "--storage", str(tmp_path), *args),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "quickstart").exists()


def test_signals_during_cleanup_still_stop_ray_and_release_the_lock(tmp_path, monkeypatch):
    """SIGTERM twice while the driver stops Ray, once more while it releases the lock (a job's signals can
    come at any moment): the cleanup completes, Ray is stopped and the lock released. (The last one also
    checks that Ray's shutdown, which leaves SIGTERM at its default action, did not leave the driver to die.)"""
    import ray

    from sweeps import driver, lock as lock_module, stopping
    from sweeps.spec import parse_sweep

    spec = parse_sweep(sweep_file(tmp_path, "cleanup", evaluation={"genotypes": ["DARTS_V2"], "layers": [1],
                                                                   "seeds": [0], "epochs": 1}))
    monkeypatch.setattr(stopping, "REPEAT_S", 0.0)  # each signal a new one: the second would end the run now
    real_ray_stop, real_release = driver._ray_stop, lock_module.SweepLock.release
    sent = []

    def signal_me() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # delivered here, in the middle of the cleanup
        sent.append(signal.SIGTERM)

    def ray_stop_under_signals() -> None:
        signal_me()
        signal_me()
        real_ray_stop()

    def release_under_a_signal(self) -> None:
        signal_me()
        real_release(self)

    monkeypatch.setattr(driver, "_ray_stop", ray_stop_under_signals)
    monkeypatch.setattr(lock_module.SweepLock, "release", release_under_a_signal)
    said = []
    stop = stopping.GracefulStop(say=said.append)
    with stop.installed():
        location = driver.run_sweep(spec, storage=str(tmp_path), stop=stop, verbose=0)
    assert len(sent) == 3 and stop.signum == signal.SIGTERM
    assert not ray.is_initialized()
    assert not (Path(location) / "driver.lock").exists()
    assert sum("finishing the cleanup first" in s for s in said) == 3, said
