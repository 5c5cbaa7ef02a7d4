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


@pytest.fixture(scope="module")
def slurm():
    """SLURM_CONF of the localhost cluster, started here when it is not running; skips without SLURM (not
    installed, and no root to install it)."""
    start = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if start.returncode != 0:
        reason = f"no local SLURM: {start.stderr.strip().splitlines()[-1:]}"
        if os.environ.get("DARTSWEEP_REQUIRE_SLURM"):  # CI (.ci/run): SLURM must be there
            pytest.fail(reason)
        pytest.skip(reason)
    lines = subprocess.run(["bash", str(CLUSTER), "env"], capture_output=True, text=True).stdout.splitlines()
    yield {**os.environ, **dict(line.removeprefix("export ").split("=", 1) for line in lines if "=" in line)}


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
    log = tmp_path / "job.log"
    job_env = {**env, "DARTSWEEP_SWEEP": str(file), "DARTSWEEP_STORAGE": str(tmp_path),
               "DARTSWEEP": DARTSWEEP,
               "DARTSWEEP_ARGS": "--progress-every 5", **(job_env or {})}
    # two CPUs on one node; one a node on two, so that the two trials of a stage run one on each node
    out = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--nodes={nodes}",
                          f"--cpus-per-task={2 // nodes}", str(JOB)],
                         capture_output=True, text=True, env=job_env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0], tmp_path / name, log


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
