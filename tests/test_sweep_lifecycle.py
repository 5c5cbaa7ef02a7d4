"""One owner per sweep, exit codes a job script can trust, Ctrl-C that keeps the rest of a sweep, a quiet
console (the CLI, in subprocesses, on an embedded Ray)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_helpers import epochs_of, sweep_file

pytestmark = pytest.mark.slow
EPOCHS = 12


def cli(*args):
    return [sys.executable, "-m", "nas.cli", "sweep", *args]


def started(stage: Path) -> list[Path]:
    return sorted(p for p in stage.glob("eval_*") if (p / "result.json").exists() and epochs_of(p))


def test_lock_sigint_resume_and_quiet_console(tmp_path):
    raw = sweep_file(tmp_path, "life", evaluation={"genotypes": ["DARTS_V2"], "layers": [1, 2], "seeds": [0, 1],
                                                   "epochs": EPOCHS, "max_steps_per_epoch": 25, "channels": 16,
                                                   "batch_size": 32})
    raw["max_concurrent_trials"] = 1
    file = tmp_path / "life.yaml"
    file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sweep, stage = tmp_path / "life", tmp_path / "life" / "eval"
    first = subprocess.Popen(cli("run", str(file), "--storage", str(tmp_path)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not started(stage) and first.poll() is None:
            time.sleep(0.2)
        assert started(stage), first.communicate()[1][-3000:]
        lock = json.loads((sweep / "driver.lock").read_text())
        assert lock["pid"] == first.pid
        # a second driver on the live sweep is refused at once, touching nothing
        before = {p: (p / "result.json").read_bytes() for p in started(stage)}
        second = subprocess.run(cli("resume", str(sweep)), capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 2, second.stderr
        assert f"is being run by another driver (pid {first.pid}" in second.stderr and "--force" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert json.loads((sweep / "driver.lock").read_text())["token"] == lock["token"]
        status = subprocess.run(cli("status", str(sweep)), capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and f"run by pid {first.pid}" in status.stdout.splitlines()[0]
        # Ctrl-C during the first trial: state saved, the stage not done, exit 130
        os.kill(first.pid, signal.SIGINT)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 130, err[-3000:]
        assert "interrupted" in err and "sweep resume" in err
        state = json.loads((sweep / "state.json").read_text())["stages"]
        assert state.get("eval") == "interrupted"
        assert not (sweep / "driver.lock").exists()  # released on the way out
        for p, content in before.items():  # the refused driver wrote nothing
            assert (p / "result.json").read_bytes()[:len(content)] == content
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # resume runs every trial that was unfinished or never started
    resume = subprocess.run(cli("resume", str(sweep)), capture_output=True, text=True, env=env, timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    status = subprocess.run(cli("status", str(sweep)), capture_output=True, text=True, timeout=60)
    assert status.stdout.strip().splitlines()[-1] == "trials: 4 finished", status.stdout
    # the console: dartsweep's lines and progress only, no Ray worker lines, no colour codes
    for text in (err, resume.stderr):
        assert "pid=" not in text and "\x1b[" not in text and "Trial status:" not in text
        assert all(line.startswith(("[dartsweep]", "dartsweep:")) for line in text.strip().splitlines()), text
    assert "eval: 4/4 finished, 0 running, 0 errored; best test_acc" in resume.stderr
    log = (sweep / "driver.log").read_text()  # Ray's own output, kept for debugging, colour codes stripped
    assert "Trial status:" in log and "started with configuration" in log and "\x1b[" not in log


def test_exit_code_1_names_the_failed_trials(tmp_path):
    raw = sweep_file(tmp_path, "bad", evaluation={"genotypes": ["DARTS_V2"], "layers": [1, 2], "epochs": 2,
                                                  "lr": 1.0e30, "grad_clip": 1.0e30})
    raw["eval"]["layers"] = [1]
    raw["eval"]["genotypes"] = ["DARTS_V2", "PIBCONV"]
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(cli("run", str(file), "--storage", str(tmp_path), "--verbose", "0"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "dartsweep: 2 trial(s) failed:" in proc.stderr and proc.stderr.count("DivergenceError") == 2
    assert proc.stdout.strip() == str(tmp_path / "bad")
    assert json.loads((tmp_path / "bad" / "state.json").read_text())["stages"]["eval"] == "done"


def test_optuna_study_lives_in_the_sweep_and_survives_a_driver_kill(tmp_path):
    optuna = pytest.importorskip("optuna")
    raw = sweep_file(tmp_path, "study", evaluation={
        "genotypes": ["DARTS_V2"], "layers": {"min": 1, "max": 3}, "epochs": 8, "max_steps_per_epoch": 40,
        "channels": 16, "batch_size": 32,
        "search_alg": {"type": "optuna", "num_samples": 4, "metric": "test_acc", "seed": 0}})
    raw["max_concurrent_trials"] = 1
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump(raw))
    sweep, stage = tmp_path / "study", tmp_path / "study" / "eval"
    driver = subprocess.Popen(cli("run", str(file), "--storage", str(tmp_path), "--verbose", "0"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            # a trial takes ~4 s: the two left cannot both finish in the 2.5 s before the kill
            done = [p for p in started(stage) if epochs_of(p)[-1:] == [8]]
            if len(done) >= 2 and len(started(stage)) > len(done):
                time.sleep(2.5)  # past one experiment-state save
                os.kill(driver.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        driver.wait(30)
        assert driver.returncode == -signal.SIGKILL, driver.stderr.read()[-2000:]
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    journal = sweep / "optuna-eval.journal"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    before = [t for t in optuna.load_study(study_name="study-eval", storage=storage).trials
              if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(before) >= 2
    resume = subprocess.run(cli("resume", str(sweep), "--verbose", "0"), capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    study = optuna.load_study(study_name="study-eval", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4  # num_samples, no more
    # the resumed study is the same one: the trials finished before the kill are in it, as they were
    assert [(t.number, t.params, t.values) for t in complete[:len(before)]] == \
        [(t.number, t.params, t.values) for t in before]
    configs = sorted(json.loads((p / "params.json").read_text())["layers"] for p in started(stage))
    assert sorted(t.params["layers"] for t in complete) == configs


def test_taking_over_a_dead_drivers_lock_stops_its_rays_leftovers():
    """What a killed driver's embedded Ray leaves behind, stood in for by sleeping processes: one naming the
    session on its command line (as its GCS and raylet do), one whose title says nothing but whose
    environment names the gone raylet (as its workers). Both are stopped; a bystander is not; another
    host's lock stops nothing here."""
    import socket

    from sweeps.lock import ray_processes, stop_orphaned_ray

    session = "session_2099-01-01_00-00-00_000000_1"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    named = subprocess.Popen(sleep + [f"--session-dir=/tmp/ray/{session}"])
    worker = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": str(gone.pid)})
    bystander = subprocess.Popen(sleep, env={**os.environ, "RAY_RAYLET_PID": f"{gone.pid}1"})
    try:
        time.sleep(0.5)  # let them exec
        assert sorted(ray_processes(session, gone.pid)) == sorted([named.pid, worker.pid])
        elsewhere = {"host": "another-host", "ray_session": session, "raylet_pid": gone.pid}
        assert stop_orphaned_ray(elsewhere, print) == 0 and named.poll() is None
        said = []
        holder = {"host": socket.gethostname(), "ray_session": session, "raylet_pid": gone.pid}
        assert stop_orphaned_ray(holder, said.append) == 2
        assert named.wait(5) == -signal.SIGKILL and worker.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
        assert said == [f"stopped 2 processes left by the gone driver's embedded Ray ({session})"]
    finally:
        for p in (named, worker, bystander):
            p.kill()
            p.wait()
