"""slurm/dartsweep.sbatch on a real SLURM (slurmctld + two slurmd + munged on localhost,
tests/slurm/cluster.sh): a job preempted mid-stage (``scontrol requeue``) and a two-node job warned of its
time limit (USR1) both come back and finish every trial, none trained again from scratch, nothing finished
touched."""

import datetime
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from analysis.frames import trial_history
from tests.ray_helpers import epochs_of, sweep_file
from tests.test_plugins_ray import HIDDEN_PLUGIN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
JOB = ROOT / "slurm" / "dartsweep.sbatch"
EPOCHS = 60
DARTSWEEP = str(Path(shutil.which("dartsweep", path=str(Path(os.sys.executable).parent)) or ""))


SUBMITTED: list[str] = []  # every job the tests submitted, for the teardowns to cancel


@pytest.fixture(scope="module")
def slurm():
    """SLURM_CONF of the localhost cluster, started here when it is not running (and stopped again after
    the module: nothing the tests started stays up as root); skips without SLURM (not installed, and no
    root to install it)."""
    start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        reason = f"no local SLURM: {start.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("DARTSWEEP_REQUIRE_SLURM"):  # CI (.ci/run): SLURM must be there
            pytest.fail(reason)
        pytest.skip(reason)
    lines = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True).stdout.splitlines()
    env = {**os.environ, **dict(line.removeprefix("export ").split("=", 1) for line in lines if "=" in line)}
    yield env
    if SUBMITTED:
        subprocess.run(["scancel", *SUBMITTED], env=env, capture_output=True, timeout=60)
    if "(started here)" in start.stderr:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


@pytest.fixture(autouse=True)
def cancel_jobs_left_running(request):
    """A test that fails mid-way leaves no job of its own running into the next one."""
    before = len(SUBMITTED)
    yield
    new = SUBMITTED[before:]
    if new and "slurm" in request.fixturenames:
        subprocess.run(["scancel", *new], env=request.getfixturevalue("slurm"), capture_output=True, timeout=60)


def scontrol_job(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return dict(part.split("=", 1) for part in out.split() if "=" in part)


def submit(tmp_path: Path, env: dict, name: str, checkpoint_every: int, nodes: int = 1,
           job_env: dict | None = None, plugin: Path | None = None) -> tuple[str, Path, Path]:
    """Submit a two-stage sweep (two search trials, two eval trials) as a job; with ``plugin``, the search's
    op set is that plugin's ``hidden_conv_3x3`` (and none)."""
    op_set = {"primitives": ["none", "hidden_conv_3x3"]} if plugin else "pibconv"  # every cell then uses it
    raw = sweep_file(tmp_path, name, search={"op_sets": [op_set], "F": [2.0], "seeds": [0, 1], "epochs": 3},
                     evaluation={"genotypes": ["searched"], "layers": [1], "seeds": [0], "epochs": EPOCHS,
                                 "checkpoint_every": checkpoint_every})
    if plugin:
        raw["plugins"] = [str(plugin)]
    file = tmp_path / f"{name}.yaml"
    file.write_text(yaml.safe_dump(raw))
    job, log = sbatch(tmp_path, env, {"DARTSWEEP_SWEEP": str(file), **(job_env or {})}, nodes)
    return job, tmp_path / name, log


def sbatch(tmp_path: Path, env: dict, job_env: dict, nodes: int = 1, log_name: str = "job.log") -> tuple[str, Path]:
    """Submit the job script with ``job_env`` over the defaults (this venv's dartsweep, storage tmp_path)."""
    log = tmp_path / log_name
    job_env = {**env, "DARTSWEEP_STORAGE": str(tmp_path), "DARTSWEEP": DARTSWEEP,
               "DARTSWEEP_ARGS": "--progress-every 5", **job_env}
    # two CPUs on one node; one a node on two, so that the two trials of a stage run one on each node
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--nodes={nodes}",
                          f"--cpus-per-task={2 // nodes}", str(JOB)],
                         capture_output=True, text=True, env=job_env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    SUBMITTED.append(job)
    return job, log


def wait_for(what, predicate, job: str, env: dict, log: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        state = scontrol_job(env, job)
        if state.get("JobState") == "PENDING" and "BeginTime" in state.get("Reason", "") \
                and _seconds_until(state.get("StartTime", "")) > 10:
            # a requeued job waits ~2 min before it may start again; a test need not, but not "now": slurmd
            # refuses a launch in the second its previous run's credential was revoked ("Job credential
            # revoked", the job then ends FAILED; seen in clean-clone runs)
            subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now+3"], env=env, capture_output=True)
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"timed out waiting for {what}; job {scontrol_job(env, job).get('JobState')}; log:\n"
                + (log.read_text()[-4000:] if log.exists() else "(none)"))


def _seconds_until(when: str) -> float:
    """Seconds from now to a time scontrol printed (the controller runs here, in this machine's zone)."""
    try:
        return datetime.datetime.fromisoformat(when).timestamp() - time.time()
    except ValueError:
        return 0.0


def eval_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in (sweep / "eval").glob("eval_*") if (p / "result.json").exists())


def finished_files(sweep: Path) -> dict[Path, bytes]:
    files = [*sweep.glob("search/search_*/result.json"), *sweep.glob("genotypes/*.json")]
    return {p: p.read_bytes() for p in files}


def ended(env: dict, job: str) -> bool:
    return scontrol_job(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def check_finished(sweep: Path, before: dict[Path, bytes], env: dict, job: str, log: Path) -> None:
    state = scontrol_job(env, job)
    text = log.read_text()
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, text[-4000:])
    assert int(state.get("Restarts", 0)) >= 1, state
    assert "(restart 1)" in text and "continuing the sweep there" in text
    for path, content in before.items():  # the finished search stage, byte for byte
        assert path.read_bytes() == content, path
    dirs = eval_dirs(sweep)
    assert len(dirs) == 2
    for d in dirs:
        epochs = epochs_of(d)
        assert epochs.count(1) == 1, (d.name, epochs)  # nothing trained again from scratch
        assert [r["epoch"] for r in trial_history(d)] == list(range(1, EPOCHS + 1)), d.name
    status = subprocess.run([os.sys.executable, "-m", "nas.cli", "sweep", "status", str(sweep)],
                            capture_output=True, text=True)
    assert "trials: 4 finished" in status.stdout, status.stdout


def test_preempted_job_requeues_and_finishes(tmp_path, slurm):
    """``scontrol requeue`` mid-eval: SLURM signals every process of the job (Ray's too) and puts it back
    in the queue; the job's second run continues every trial from its newest complete checkpoint."""
    # a checkpoint every 2 epochs: SIGTERM reaches the trials' workers too, so the driver's request to
    # checkpoint may come too late; what was saved must not be lost
    job, sweep, log = submit(tmp_path, slurm, "preempted", checkpoint_every=2)
    wait_for("two eval trials past epoch 5", lambda: len(eval_dirs(sweep)) == 2
             and all(len(epochs_of(d)) >= 5 for d in eval_dirs(sweep)), job, slurm, log)
    # the default ports (no DARTSWEEP_RAY_PORT here): all 100 below this machine's ephemeral range
    port = int(log.read_text().split("Ray head ")[1].split(",")[0].rsplit(":", 1)[1])
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert port + 99 < low or port > high, (port, low, high)
    before = finished_files(sweep)
    assert len(before) >= 4  # two search trials' results, their genotypes
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    wait_for("the requeued job to finish", lambda: ended(slurm, job), job, slurm, log, timeout=300)
    check_finished(sweep, before, slurm, job, log)


def test_time_limit_warning_checkpoints_and_requeues(tmp_path, slurm):
    """USR1 to the batch shell (what ``--signal=B:USR1@300`` sends before the time limit): the driver has
    every running trial checkpoint, exits 138, and the job requeues itself and finishes from there. The job
    has two nodes: Ray's head on the first, a worker on the second through srun, each trial on one of them."""
    # no periodic checkpoints: what the second run continues from is the checkpoint the signal asked for.
    # The two slurmd share this host: the worker's ports go 100 above the head's. The sweep's op is a plugin's,
    # in a folder the second node cannot see (tests/slurm/cluster.sh): only Ray's runtime_env takes it there
    folder = Path(slurm["DARTSWEEP_NODE1_ONLY"]) / tmp_path.name
    folder.mkdir(parents=True, exist_ok=True)
    imports = tmp_path / "imports.jsonl"
    plugin = folder / "hidden_ops.py"
    plugin.write_text(HIDDEN_PLUGIN.format(log=str(imports), path=str(plugin)))
    job, sweep, log = submit(tmp_path, slurm, "warned", checkpoint_every=1000, nodes=2,
                             job_env={"DARTSWEEP_RAY_PORT": "31000", "DARTSWEEP_RAY_WORKER_PORT": "31100"},
                             plugin=plugin)
    wait_for("two eval trials past epoch 5", lambda: len(eval_dirs(sweep)) == 2
             and all(len(epochs_of(d)) >= 5 for d in eval_dirs(sweep)), job, slurm, log)
    assert "on 2 node(s): dartsweep1 dartsweep2" in log.read_text()
    # one trial on each Ray node: a Ray of one node with one CPU would have run them one after the other
    assert len({trial_history(d)[-1]["node_id"] for d in eval_dirs(sweep)}) == 2
    before = finished_files(sweep)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_for("the job to requeue itself", lambda: "requeueing job" in log.read_text(), job, slurm, log, timeout=300)
    wait_for("the requeued job to finish", lambda: ended(slurm, job), job, slurm, log, timeout=300)
    text = log.read_text()
    assert "got USR1" in text and "driver exited 138" in text, text[-4000:]
    assert "every running trial has checkpointed" in text
    check_finished(sweep, before, slurm, job, log)
    # the plugin: imported on the node that cannot see its folder, where trials of both stages finished
    blind = {line["node"] for line in map(json.loads, imports.read_text().splitlines()) if not line["sees_folder"]}
    eval_nodes = {r["node_id"] for d in eval_dirs(sweep) for r in trial_history(d)}
    search_nodes = {json.loads(p.read_text().splitlines()[-1])["node_id"]
                    for p in sweep.glob("search/search_*/result.json")}
    # one blind worker node per run of the job (Ray starts anew after the requeue); each ran eval trials, the
    # first run's the search too
    assert len(blind) == 2 and None not in blind and blind <= eval_nodes, (blind, eval_nodes)
    assert len(blind & search_nodes) == 1, (blind, search_nodes)
    for entry in map(json.loads, (p.read_text() for p in (sweep / "genotypes").glob("g-*.json"))):
        assert entry["plugins"][0]["source"] == str(plugin)


FAKE_DRIVER = """#!/bin/bash
# stands in for dartsweep: says it runs, then exits 0 the moment USR1 comes (as a driver whose last trial
# finished just then would), so the job script's `wait` is interrupted by its trap after the driver ended
trap 'kill $sleeper 2>/dev/null; echo "fake driver: USR1, exiting 0" >&2; exit 0' USR1
echo "fake driver running (restart ${SLURM_RESTART_COUNT:-0}); args: $*" >&2
sleep 1000 & sleeper=$!
wait $sleeper
"""


def test_job_script_signals_before_and_after_the_driver_starts(tmp_path, slurm):
    """USR1 while Ray starts (no driver yet): the job exits 138 and requeues itself rather than dying. USR1
    to a driver that then exits 0: the job ends with the driver's own status, 0, not requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dartsweep"
    fake.write_text(FAKE_DRIVER)
    fake.chmod(0o755)
    (bin_dir / "ray").symlink_to(Path(DARTSWEEP).parent / "ray")
    (tmp_path / "xfile").write_text("")  # DARTSWEEP_ARGS' x* must reach the driver as it is, not globbed
    job, log = sbatch(tmp_path, slurm, {"DARTSWEEP_SWEEP": "quickstart", "DARTSWEEP": str(fake),
                                        "DARTSWEEP_RAY_PORT": "29000", "DARTSWEEP_ARGS": "--grace 9  x*"})
    wait_for("the job to start Ray", lambda: log.exists() and "(restart 0) on 1 node(s)" in log.read_text(),
             job, slurm, log, timeout=60)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_for("the second run's driver", lambda: "fake driver running (restart 1)" in log.read_text(), job, slurm,
             log, timeout=120)
    text = log.read_text()
    assert "got USR1 before the driver started" in text and "exiting 138 before the driver ran" in text, text
    assert "fake driver running (restart 0)" not in text  # the signal came first: no driver ran in run 1
    assert "args: sweep up quickstart --address=" in text and text.split("args: ")[1].split("\n")[0].endswith(
        "--grace 9 x*"), text
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    wait_for("the job to end", lambda: ended(slurm, job), job, slurm, log, timeout=60)
    text = log.read_text()
    state = scontrol_job(slurm, job)
    assert "fake driver: USR1, exiting 0" in text and "driver exited 0" in text, text[-3000:]
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", state
    assert state.get("Restarts") == "1" and text.count("requeueing job") == 1, state


def test_lock_of_a_killed_driver_is_taken_over_because_slurm_says_its_job_ended(tmp_path, slurm):
    """Job A's driver is SIGKILLed (its lock stays, naming job A) and job A ends; job B, a new submission
    of the same sweep, takes the lock because `scontrol show job A` says A no longer runs. The lock is made
    to look like another host's, with a fresh heartbeat, so neither the dead pid nor a stale heartbeat
    could be why."""
    raw = sweep_file(tmp_path, "locked", evaluation={"genotypes": ["DARTS_V2"], "layers": [1], "seeds": [0],
                                                     "epochs": 8})
    file = tmp_path / "locked.yaml"
    file.write_text(yaml.safe_dump(raw))
    lock = tmp_path / "locked" / "driver.lock"
    job_a, log_a = sbatch(tmp_path, slurm, {"DARTSWEEP_SWEEP": str(file), "DARTSWEEP_RAY_PORT": "29100"},
                          log_name="a.log")
    def holder_of(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # not there yet, or being written
            return {}

    wait_for("job A's driver to hold the lock", lambda: holder_of(lock).get("slurm_job_id") == job_a, job_a, slurm,
             log_a, timeout=120)
    holder = json.loads(lock.read_text())
    os.kill(holder["pid"], 9)
    wait_for("job A to end", lambda: ended(slurm, job_a), job_a, slurm, log_a, timeout=120)
    assert scontrol_job(slurm, job_a).get("JobState") == "FAILED" and lock.exists()
    holder = json.loads(lock.read_text())
    holder.update(host="a-node-elsewhere", heartbeat=time.time())
    lock.write_text(json.dumps(holder))
    job_b, log_b = sbatch(tmp_path, slurm, {"DARTSWEEP_SWEEP": str(file), "DARTSWEEP_RAY_PORT": "29200"},
                          log_name="b.log")
    wait_for("job B to end", lambda: ended(slurm, job_b), job_b, slurm, log_b, timeout=240)
    text = log_b.read_text()
    assert f"taking over the lock of a driver that is gone (pid {holder['pid']} on a-node-elsewhere, SLURM job " \
           f"{job_a}" in text, text[-3000:]
    assert scontrol_job(slurm, job_b).get("ExitCode") == "0:0", text[-3000:]
    assert not lock.exists() and [r["epoch"] for r in trial_history(eval_dirs(tmp_path / "locked")[0])] == \
        list(range(1, 9))


@pytest.mark.parametrize("env,message", [
    ({}, "SLURM_JOB_ID is not set: submit this script with sbatch"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}, "DARTSWEEP_SWEEP is not set"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "DARTSWEEP_SWEEP": "quickstart", "DARTSWEEP": "no-such-cmd"},
     "DARTSWEEP=no-such-cmd is not a command"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "DARTSWEEP_SWEEP": "quickstart", "DARTSWEEP": DARTSWEEP,
      "DARTSWEEP_RAY_WORKER_PORT": "80"}, "DARTSWEEP_RAY_WORKER_PORT=80: must be a port number between 1024"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "DARTSWEEP_SWEEP": "quickstart", "DARTSWEEP": DARTSWEEP,
      "SLURM_CONF": "<an empty file>"}, "scontrol show hostnames n1 gave no nodes"),
])
def test_job_script_misuse_is_one_line(env, message, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DARTSWEEP"))}
    empty = tmp_path / "slurm.conf"  # scontrol fails at once on it (a missing file has it retry for a minute)
    empty.write_text("")
    env = {k: str(empty) if v == "<an empty file>" else v for k, v in env.items()}
    run = subprocess.run(["bash", str(JOB)], capture_output=True, text=True, env={**base, **env}, timeout=30)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dartsweep.sbatch: {message}")
