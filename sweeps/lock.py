"""One driver per sweep: a lock file in the sweep folder naming its holder, refreshed while it runs.

``driver.lock`` holds host, pid, start time, a random token and a heartbeat refreshed every
:data:`HEARTBEAT_S` seconds. A second ``run``/``resume`` finds it and is refused while its holder lives:
on the same host, while the pid exists and the heartbeat is fresh; from another host, while the heartbeat
is younger than :data:`STALE_AFTER_S`; a holder that ran as a SLURM job is gone as soon as SLURM says that
run is over (:func:`slurm_job_gone`: a requeued job takes its own lock back on any host at once). A lock
whose holder is gone is taken over, with a message;
``--force`` takes it regardless. On a local or shared filesystem the lock is created with ``O_EXCL``
(atomic where the filesystem honours it: local disks, NFSv3+, Lustre); in S3 with a conditional write
(``If-None-Match: *``, through boto3, which ``pip install 'dartsweep[s3]'`` brings), exclusive too. Where
neither exists (GCS through pyarrow, or S3 without boto3) the lock is written, then read back to see who
won: two drivers starting within the same second can both pass there. Clocks of the hosts sharing a
sweep must agree to well under :data:`STALE_AFTER_S`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from nas.errors import ConfigError

LOCK_FILE = "driver.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_alive(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether the driver that wrote ``holder`` still runs (see the module docstring)."""
    age = (now or time.time()) - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return False
    if slurm_job_gone(holder):
        return False
    if holder.get("host") == socket.gethostname():
        return _pid_alive(int(holder.get("pid", -1)))
    return True


def slurm_job() -> dict[str, Any]:
    """This process's SLURM job and how often SLURM has restarted it (requeues), from SLURM's variables;
    {} outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    try:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        restarts = 0
    return {"slurm_job_id": job, "slurm_restart_count": restarts}


# SLURM job states in which a job's processes may still run (scontrol's JobState)
_SLURM_LIVE_STATES = {"RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING", "STOPPED", "SIGNALING", "STAGE_OUT"}


def slurm_job_gone(holder: dict[str, Any]) -> bool:
    """Whether the SLURM job run that wrote ``holder`` is known to be over: this process is a later run of
    the same job (SLURM runs one at a time, so a requeued job's previous run has ended, on whatever host),
    or ``scontrol`` says the job no longer runs or has been restarted since. False when unknown."""
    job, restarts = holder.get("slurm_job_id"), holder.get("slurm_restart_count")
    if not job or not isinstance(restarts, int):
        return False
    mine = slurm_job()
    if mine.get("slurm_job_id") == job:
        return mine["slurm_restart_count"] > restarts
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if out.returncode != 0:
        return "Invalid job id" in out.stderr  # purged from SLURM's memory: long over
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    state = fields.get("JobState", "")
    try:
        restarted = int(fields.get("Restarts", restarts)) > restarts
    except ValueError:
        restarted = False
    return bool(state) and (state not in _SLURM_LIVE_STATES or restarted)


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    age = (now or time.time()) - float(holder.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {started}, last heartbeat {age:.0f} s ago"


@dataclass
class SweepLock:
    """The held lock of one sweep (see :func:`acquire`); ``release()`` when the driver is done."""

    sweep: Any  # sweeps.driver.SweepDir
    owner: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _still_mine(self) -> bool:
        current = read_lock(self.sweep)
        return current is not None and current.get("token") == self.owner["token"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._still_mine():
                    print(f"[dartsweep] warning: another driver took over {self.sweep.location}", file=sys.stderr,
                          flush=True)
                    return
                self.owner["heartbeat"] = time.time()
                self.sweep.write_json(self.owner, LOCK_FILE)
            except Exception as exc:  # noqa: BLE001 - storage unreachable for a while: beat again later
                print(f"[dartsweep] warning: could not refresh {LOCK_FILE} ({type(exc).__name__}); retrying in "
                      f"{HEARTBEAT_S:g} s", file=sys.stderr, flush=True)

    def record_ray_session(self, session: str) -> None:
        """Note the embedded Ray this driver started (its session name and raylet), so that a driver taking
        over after this one is killed can stop what is left of it (:func:`stop_orphaned_ray`)."""
        self.owner["ray_session"] = session
        self.owner["raylet_pid"] = find_raylet(session)
        if self._still_mine():
            self.sweep.write_json(self.owner, LOCK_FILE)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="dartsweep-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._still_mine():
            self.sweep.remove(LOCK_FILE)


def read_lock(sweep: Any) -> dict[str, Any] | None:
    if not sweep.exists(LOCK_FILE):
        return None
    try:
        data = json.loads(sweep.read_text(LOCK_FILE))
    except (OSError, json.JSONDecodeError, FileNotFoundError):
        return None
    return data if isinstance(data, dict) else None


def _create_exclusive(sweep: Any, owner: dict[str, Any]) -> bool:
    """Create the lock file only if there is none; False when another driver's appeared first."""
    if not sweep.is_local:
        created = _create_if_absent_s3(sweep, json.dumps(owner, indent=2) + "\n")
        if created is not None:
            return created
        sweep.write_json(owner, LOCK_FILE)
        time.sleep(1.0)  # let a racing writer's object land, then see who won
        current = read_lock(sweep)
        return current is not None and current.get("token") == owner["token"]
    path = os.path.join(sweep.location, LOCK_FILE)
    os.makedirs(sweep.location, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(owner, indent=2) + "\n")
    return True


def s3_client_for(location: str) -> tuple[Any, str, str] | None:
    """(boto3 client, bucket, key prefix) for an ``s3://`` sweep location, configured as pyarrow reads the
    URI (``endpoint_override``, ``scheme``, ``region`` in its query, else ``AWS_ENDPOINT_URL`` and the
    standard AWS variables and files); None for other schemes or without boto3."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(location)
    if parts.scheme != "s3":
        return None
    try:
        import boto3
    except ImportError:
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=query.get("region") or None)
    return client, parts.netloc, parts.path.strip("/")


def _create_if_absent_s3(sweep: Any, body: str) -> bool | None:
    """Create the lock object only if there is none, with S3's conditional write (``If-None-Match: *``,
    AWS S3 since 2024, MinIO, moto): exclusive as ``O_EXCL`` is. None where it cannot be used (not S3, no
    boto3): the caller falls back to write-then-read-back."""
    found = s3_client_for(sweep.location)
    if found is None:
        return None
    client, bucket, prefix = found
    key = f"{prefix}/{LOCK_FILE}" if prefix else LOCK_FILE
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body.encode(), IfNoneMatch="*")
    except Exception as exc:  # noqa: BLE001 - botocore's ClientError; anything else: fall back
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            return False
        return None
    return True


def _note_lock(sweep: Any) -> None:
    """Tell the job script where this driver's lock is (``DARTSWEEP_LOCK_NOTE``, a file it names): when
    SLURM signals a whole job, Ray's node can stop and end the driver (its core worker exits when the
    raylet goes) before the driver releases the lock, and the script then removes it if it still names
    this pid. A local or shared folder only."""
    note = os.environ.get("DARTSWEEP_LOCK_NOTE")
    if note and sweep.is_local:
        try:
            with open(note, "w") as fh:
                fh.write(os.path.join(sweep.location, LOCK_FILE))
        except OSError:
            pass


def _proc_text(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()] if os.path.isdir("/proc") else []


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead process its parent has not reaped yet has no command line)."""
    stat = _proc_text(pid, "stat")
    return _pid_alive(pid) and not (stat and stat.rsplit(")", 1)[-1].split()[:1] == ["Z"])


def find_raylet(session: str) -> int | None:
    """The pid of this host's raylet of Ray session ``session``, if it runs."""
    for pid in _pids():
        cmdline = _proc_text(pid, "cmdline")
        if session in cmdline and cmdline.split(" ", 1)[0].endswith("/raylet"):
            return pid
    return None


def ray_processes(session: str, raylet_pid: int | None = None) -> list[int]:
    """This host's processes of Ray session ``session``: those whose command line names it (GCS, raylet,
    monitors) and the workers of its raylet (their titles are rewritten to ``ray::...``, but their
    environment keeps ``RAY_RAYLET_PID``; counted only while that pid is gone or still this session's)."""
    ours = raylet_pid is not None and (not _running(raylet_pid) or session in _proc_text(raylet_pid, "cmdline"))
    marker = f"RAY_RAYLET_PID={raylet_pid} "
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        if session in _proc_text(pid, "cmdline") or (ours and marker in _proc_text(pid, "environ") + " "):
            found.append(pid)
    return found


def stop_orphaned_ray(holder: dict[str, Any], say) -> int:
    """Kill what is left of the embedded Ray of a dead driver on this host: killed alone (``kill -9 PID``,
    the OOM killer), a driver leaves its Ray's workers training and writing into the sweep folder, racing
    the driver that resumes it. Returns how many processes were stopped."""
    import signal

    session = holder.get("ray_session")
    if not session or holder.get("host") != socket.gethostname():
        return 0
    raylet = holder.get("raylet_pid")
    pids = ray_processes(str(session), int(raylet) if isinstance(raylet, int) else None)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.time() + 10
    while pids and time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    if pids:
        say(f"stopped {len(pids)} processes left by the gone driver's embedded Ray ({session})")
    return len(pids)


def acquire(sweep: Any, force: bool = False, say=None) -> SweepLock:
    """Take the sweep's lock or raise ConfigError naming the live holder; ``say`` prints notices."""
    say = say or (lambda msg: print(f"[dartsweep] {msg}", file=sys.stderr, flush=True))
    now = time.time()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
             "token": secrets.token_hex(8), **slurm_job()}
    for _ in range(3):
        holder = read_lock(sweep)
        if holder is not None:
            if holder_alive(holder) and not force:
                raise ConfigError(f"{sweep.location} is being run by another driver ({describe(holder)}); wait "
                                  "for it to finish, or pass --force if it is gone")
            gone = not holder_alive(holder)
            say(f"taking over the lock of {'a driver that is gone' if gone else 'a live driver (--force)'}"
                f" ({describe(holder)})")
            if gone:
                stop_orphaned_ray(holder, say)
            sweep.remove(LOCK_FILE)
        if _create_exclusive(sweep, owner):
            lock = SweepLock(sweep, owner)
            lock.start_heartbeat()
            _note_lock(sweep)
            return lock
    raise ConfigError(f"{sweep.location}: another driver took the lock at the same moment; try again")
