"""slurm/dartsweep.sbatch on a real SLURM (slurmctld + two slurmd + munged on localhost,
tests/slurm/cluster.sh): a job preempted mid-stage (``scontrol requeue``) and a two-node job warned of its
time limit (USR1) both come back and finish every trial, none trained again from scratch, nothing finished
touched."""

import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from analysis.frames import trial_history
from tests.ray_helpers import epochs_of, sweep_file, tensorboard_epochs
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
           job_env: dict | None = None, plugin: Path | None = None, epochs: int = EPOCHS) -> tuple[str, Path, Path]:
    """Submit a two-stage sweep (two search trials, two eval trials) as a job; with ``plugin``, the search's
    op set is that plugin's ``hidden_conv_3x3`` (and none)."""
    op_set = {"primitives": ["none", "hidden_conv_3x3"]} if plugin else "pibconv"  # every cell then uses it
    raw = sweep_file(tmp_path, name, search={"op_sets": [op_set], "F": [2.0], "seeds": [0, 1], "epochs": 3},
                     evaluation={"genotypes": ["searched"], "layers": [1], "seeds": [0], "epochs": epochs,
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


def check_finished(sweep: Path, before: dict[Path, bytes], env: dict, job: str, log: Path,
                   epochs: int = EPOCHS) -> None:
    state = scontrol_job(env, job)
    text = log.read_text()
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, text[-4000:])
    assert int(state.get("Restarts", 0)) >= 1, state
    assert "(restart 1)" in text and "continuing the sweep there" in text
    for path, content in before.items():  # the finished search stage, byte for byte
        assert path.read_bytes() == content, path
    dirs = eval_dirs(sweep)
    assert len(dirs) == 2
    every = list(range(1, epochs + 1))
    for d in dirs:
        # every epoch exactly once in each of Ray's logs (the one checkpointed when the job was stopped
        # too), so nothing was trained again from scratch either
        assert epochs_of(d) == every, (d.name, epochs_of(d))
        with open(d / "progress.csv") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == every, d.name
        assert tensorboard_epochs(d) == every, (d.name, tensorboard_epochs(d))
        assert [r["epoch"] for r in trial_history(d)] == every, d.name
    status = subprocess.run([os.sys.executable, "-m", "nas.cli", "sweep", "status", str(sweep)],
                            capture_output=True, text=True)
    assert "trials: 4 finished" in status.stdout, status.stdout


PROBE = ROOT / "tests" / "slurm" / "ray_probe.py"
PROBED_EPOCHS = 240
# the sweep's op (a plugin's): slowed down while the test holds it, so the trials still train when the
# outsider's probes are done, however long those take
HELD_PLUGIN = """import os, time
from torch import nn
from nas.registry import register_op


class Held(nn.Module):
    def __init__(self, c, stride, affine):
        super().__init__()
        self.op = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c, affine=affine))

    def forward(self, x):
        if os.path.exists({hold!r}):
            time.sleep(0.05)
        return self.op(x)


register_op("hidden_conv_3x3", lambda c, s, a, o: Held(c, s, a))
"""
OUTSIDER = "dartsweep-probe"
OUTSIDER_ROOT = Path("/opt/dartsweep-probe")  # its own copy of this Python and of this Ray, readable by it


@pytest.fixture(scope="module")
def outsider():
    """Another UNIX account on this machine, with a Python and Ray of its own of exactly this version (Ray
    refuses a driver of another Python patch level; the venv's own Python lives under /root, which that
    account cannot read): the command line that runs tests/slurm/ray_probe.py as that account."""
    import ray
    import sysconfig

    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd to make a second account")
    if subprocess.run(["id", OUTSIDER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--create-home", "--home-dir", f"/home/{OUTSIDER}", "--shell",
                        "/bin/bash", OUTSIDER], check=True, capture_output=True)
    stamp = OUTSIDER_ROOT / f"ray-{ray.__version__}-py-{sys.version.split()[0]}"
    python, lib = OUTSIDER_ROOT / "python" / "bin" / "python3", OUTSIDER_ROOT / "python" / "lib"
    if not stamp.exists():
        shutil.rmtree(OUTSIDER_ROOT, ignore_errors=True)
        prefix = Path(sys.base_prefix)
        (OUTSIDER_ROOT / "python").mkdir(parents=True)
        # the interpreter, its shared library and standard library (not its site-packages)
        subprocess.run(f"tar --exclude=./lib/python3.*/site-packages --exclude=./lib/python3.*/test "
                       f"--exclude=__pycache__ -cf - ./bin/python3* ./lib | tar -xf - -C {OUTSIDER_ROOT}/python",
                       shell=True, cwd=prefix, check=True)
        env = {**os.environ, "LD_LIBRARY_PATH": str(lib)}
        subprocess.run([str(python), "-m", "venv", str(OUTSIDER_ROOT / "venv")], env=env, check=True)
        out = subprocess.run([str(OUTSIDER_ROOT / "venv" / "bin" / "pip"), "install", "-q",
                              f"ray[default,client]=={ray.__version__}"], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            pytest.fail(f"could not install Ray {ray.__version__} for the second account: {out.stderr[-2000:]}")
        subprocess.run(["chmod", "-R", "a+rX", str(OUTSIDER_ROOT)], check=True)
        stamp.write_text("")
    home = Path(f"/home/{OUTSIDER}")
    own = home / "own_token"  # a token of the outsider's own making
    subprocess.run(["runuser", "-u", OUTSIDER, "--", "sh", "-c",
                    f"umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {own}"], check=True, cwd="/")
    probe = Path(tempfile.mkdtemp(prefix="dartsweep-probe-")) / "ray_probe.py"
    probe.parent.chmod(0o755)
    shutil.copy(PROBE, probe)
    probe.chmod(0o644)
    command = ["runuser", "-u", OUTSIDER, "--", "env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin",
               f"LD_LIBRARY_PATH={lib}", f"{OUTSIDER_ROOT}/venv/bin/python", str(probe)]
    yield command, str(own)
    shutil.rmtree(probe.parent, ignore_errors=True)


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return bool(out.strip())


def test_preempted_job_keeps_outsiders_out_requeues_and_finishes(tmp_path, slurm, outsider):
    """A two-node job under the job script: while it runs, another UNIX account tries its Ray as an outsider
    would (a driver, Ray Client, `ray job submit`; bare and with a token of its own) and gets nothing, and
    cannot read the job's token; the same probe does get into an unauthenticated Ray (the control). Then
    ``scontrol requeue`` mid-eval: SLURM signals every process of the job (Ray's too); the driver exits 143
    and releases its lock, and the job's second run, with a new token, continues every trial from its
    newest checkpoint, every epoch in every log exactly once."""
    command, own_token = outsider
    tokens = Path(tempfile.mkdtemp(prefix="dartsweep-tokens-"))
    tokens.chmod(0o755)  # others may look in: only the job's own folder and file modes keep them out
    token_dir = tokens / "job"
    # a checkpoint every 2 epochs: SIGTERM reaches the trials' workers too, so the driver's request to
    # checkpoint may come too late; what was saved must not be lost. The two slurmd share this host: the
    # worker's ports go elsewhere (above the ephemeral range), the head's are the default
    hold = tmp_path / "hold"
    plugin = tmp_path / "held_ops.py"
    plugin.write_text(HELD_PLUGIN.format(hold=str(hold)))
    job, sweep, log = submit(tmp_path, slurm, "preempted", checkpoint_every=2, nodes=2, plugin=plugin,
                             job_env={"DARTSWEEP_TOKEN_DIR": str(token_dir), "DARTSWEEP_RAY_WORKER_PORT": "61100"},
                             epochs=PROBED_EPOCHS)
    wait_for("the eval stage", lambda: len(eval_dirs(sweep)) == 2, job, slurm, log)
    hold.write_text("")  # the trials slow down (about 2 s an epoch) until the probes are done
    wait_for("two eval trials past epoch 5", lambda: all(len(epochs_of(d)) >= 5 for d in eval_dirs(sweep)),
             job, slurm, log)
    head = log.read_text().split("Ray head ")[1].split(",")[0]
    port = int(head.rsplit(":", 1)[1])
    # the default ports: all 100 below this machine's ephemeral range
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert port + 99 < low or port > high, (port, low, high)
    # the job's token: one file, its owner's only, in a private folder; on no command line
    files = list(token_dir.iterdir())
    assert [f.name.split(".")[:2] for f in files] == [[f"job-{job}", "0"]], files
    assert oct(token_dir.stat().st_mode & 0o777) == "0o700" and oct(files[0].stat().st_mode & 0o777) == "0o600"
    token = files[0].read_text()
    assert len(token) == 64
    assert token not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    for closed in (port + 7, 10001, 8265, port + 8):  # no Ray Client server, no dashboard
        assert not listening(closed), closed

    # the control: an unauthenticated Ray (as Ray 2.60 starts one when no token exists) lets the probe in
    control_port, client_port = 62000, 62007
    control_temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    control_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    control_env.pop("RAY_AUTH_TOKEN_PATH", None)
    control = subprocess.Popen([str(Path(DARTSWEEP).parent / "ray"), "start", "--head", "--block",
                                f"--port={control_port}", f"--ray-client-server-port={client_port}", "--num-cpus=1",
                                "--include-dashboard=false", f"--temp-dir={control_temp}", "--disable-usage-stats",
                                "--min-worker-port=62010", "--max-worker-port=62099"],
                               env=control_env, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    markers = {name: tmp_path / f"ran-{name}" for name in ("job", "control")}
    tmp_path.chmod(0o755)
    try:
        deadline = time.time() + 60
        while not listening(client_port) and time.time() < deadline:
            time.sleep(0.5)
        probes = {
            "job": subprocess.Popen([*command, head, str(markers["job"]), str(files[0]), own_token,
                                     str(port + 7), "10001", "--dashboard", "8265", str(port + 8)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"),
            "control": subprocess.Popen([*command, f"{head.rsplit(':', 1)[0]}:{control_port}", str(markers["control"]),
                                         str(files[0]), own_token, str(client_port)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")}
        said = {}
        for name, proc in probes.items():
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, (name, err[-3000:])
            said[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        os.killpg(control.pid, 15)
        try:
            control.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(control.pid, 9)
            control.wait(20)
        shutil.rmtree(control_temp, ignore_errors=True)
    print(json.dumps(said, indent=1))  # the note quotes what each try printed
    # the control: the outsider got in (through Ray Client, bare or with its own token: either is anyone's)
    assert any(t["in"] for t in said["control"].values()) and markers["control"].exists(), said["control"]
    assert len(said["job"]) == 11, said["job"]  # 5 ways in, bare and with a token; the token file
    assert not any(t["in"] for t in said["job"].values()), said["job"]
    assert not markers["job"].exists()  # nothing ran
    assert "Permission denied" in said["job"]["read token file"]["said"]

    hold.unlink()
    assert not any(epochs_of(d)[-1:] == [PROBED_EPOCHS] for d in eval_dirs(sweep))  # still training
    # across both nodes: one eval trial on the head's node, one on the srun worker's
    assert len({trial_history(d)[-1]["node_id"] for d in eval_dirs(sweep)}) == 2
    before = finished_files(sweep)
    assert len(before) >= 4  # two search trials' results, their genotypes
    seen: set[str] = set()

    def requeued_run_ended() -> bool:
        seen.update(p.name for p in token_dir.iterdir())
        return ended(slurm, job)

    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True)
    wait_for("the requeued job to finish", requeued_run_ended, job, slurm, log, timeout=300)
    check_finished(sweep, before, slurm, job, log, PROBED_EPOCHS)
    text = log.read_text()
    ours = "\n".join(line for line in text.splitlines() if "[dartsweep" in line or "dartsweep:" in line)
    # stopped by SLURM's SIGTERM: 143, not "trials errored"; the driver's own, or (where Ray's stopping
    # node took the driver with it first) the job script's, which then released the lock itself
    assert "driver exited 143" in text or "the run ends 143 as if the driver had" in text, ours
    assert "taking over the lock" not in text  # it released its lock: the second run had nothing to wait for
    assert any(name.startswith(f"job-{job}.1.") for name in seen), seen  # the second run's own token
    assert list(token_dir.iterdir()) == []  # each run removed its token
    for path in [log, *(p for p in sweep.rglob("*") if p.is_file())]:  # no trace of it anywhere
        assert token.encode() not in path.read_bytes(), path
    shutil.rmtree(tokens, ignore_errors=True)


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
    (bin_dir / "python").symlink_to(Path(DARTSWEEP).parent / "python")
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


SBATCH_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}  # as sbatch sets them
READY_ENV = {**SBATCH_ENV, "DARTSWEEP_SWEEP": "quickstart", "DARTSWEEP": DARTSWEEP}  # all it needs


@pytest.mark.parametrize("env,message", [
    ({}, "SLURM_JOB_ID is not set: submit this script with sbatch"),
    (SBATCH_ENV, "DARTSWEEP_SWEEP is not set"),
    ({**READY_ENV, "DARTSWEEP": "no-such-cmd"}, "DARTSWEEP=no-such-cmd is not a command"),
    ({**READY_ENV, "DARTSWEEP_RAY_WORKER_PORT": "80"},
     "DARTSWEEP_RAY_WORKER_PORT=80: must be a port number between 1024"),
    ({**READY_ENV, "SLURM_CONF": "<an empty file>"}, "scontrol show hostnames n1 gave no nodes"),
    ({**READY_ENV, "DARTSWEEP_DASHBOARD": "yes"}, "DARTSWEEP_DASHBOARD=yes: 1 starts Ray's dashboard"),
    ({**READY_ENV, "DARTSWEEP_DASHBOARD": "1"}, "DARTSWEEP_DASHBOARD=1 needs Ray's dashboard packages"),
])
def test_job_script_misuse_is_one_line(env, message, tmp_path):
    if env.get("DARTSWEEP_DASHBOARD") == "1":
        import ray._private.utils

        if not ray._private.utils.get_dashboard_dependency_error():
            pytest.skip("this venv has Ray's dashboard packages: the job would start it")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DARTSWEEP"))}
    empty = tmp_path / "slurm.conf"  # scontrol fails at once on it (a missing file has it retry for a minute)
    empty.write_text("")
    env = {k: str(empty) if v == "<an empty file>" else v for k, v in env.items()}
    run = subprocess.run(["bash", str(JOB)], capture_output=True, text=True, env={**base, **env}, timeout=30)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dartsweep.sbatch: {message}")
