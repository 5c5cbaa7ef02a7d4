"""Stopping a sweep on a signal without losing training: what a job scheduler's warning (SLURM's
``--signal=B:USR1@300``), a preemption's SIGTERM or ``kill PID`` gets.

On SIGTERM or SIGUSR1 the driver asks every running trial to checkpoint at the end of its current epoch
(whatever ``checkpoint_every`` says), waits until each has (or ``grace_s`` runs out), then ends Ray Tune's
run the way Ctrl-C does (Tune saves the experiment), marks the stage interrupted, releases the sweep's
lock and exits with ``128 + signal`` (:data:`EXIT_CODES`: 143 for SIGTERM, 138 for SIGUSR1), which
``sweep up`` / ``resume`` continue. Outside a stage (loading data, between stages) it stops at once.
A second signal during the wait (more than 2 s after the first: SLURM signals every process of a job, and
a job script forwarding the signal delivers it twice) ends the run without waiting further.

When the trials cannot be reached at all (SLURM signalled every process of the job at once, Ray's
included: ``scontrol requeue``, a preemption), Ray is going away under the driver and saving through it
can hang past SLURM's KillWait, after which SIGKILL would leave the lock behind. When the trials' board
does not answer within :data:`REACH_S`, the driver gives the run until :data:`ABANDON_S` seconds after
the signal to end, then releases its lock and exits with the same code, the trials' own
checkpoints (written before each report) being what the next run continues from.

The request reaches the trials through a small named Ray actor (:class:`StopBoard`, no CPU), one per
sweep: each trial registers when it starts, asks once per epoch whether a checkpoint is wanted (about a
millisecond), and acknowledges once its checkpoint is complete on storage (``sweeps.checkpoints``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

NAMESPACE = "dartsweep"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGUSR1: 138}
DEFAULT_GRACE_S = 240.0
REPEAT_S = 2.0  # a signal this soon after the first is the same request
ABANDON_S = 6.0  # trials unreachable after a signal: exit this long after it (SLURM's KillWait: 30 s by default)
REACH_S = 3.0  # the board answers a healthy driver in milliseconds: no answer in this long, Ray is going away


class SweepSignalled(BaseException):
    """Raised where the driver was stopped by SIGTERM/SIGUSR1 outside a running stage (BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopBoard:
    """The driver's notice board for its trials (run as a named Ray actor): which trials run, whether a
    checkpoint is wanted, and which trials have written one since."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.running: dict[str, float] = {}
        self.acked: dict[str, int] = {}

    def reset(self) -> None:
        """A new driver's fresh start (the board of a killed driver can outlive it on a cluster)."""
        self.requested_at, self.running, self.acked = None, {}, {}

    def request(self) -> None:
        self.requested_at = time.time()

    def requested(self) -> bool:
        return self.requested_at is not None

    def started(self, trial_id: str) -> None:
        self.running[trial_id] = time.time()
        self.acked.pop(trial_id, None)

    def ended(self, trial_id: str) -> None:
        self.running.pop(trial_id, None)

    def ack(self, trial_id: str, epoch: int) -> None:
        self.acked[trial_id] = epoch

    def pending(self) -> list[str]:
        """Running trials that have not checkpointed since the request."""
        return sorted(t for t in self.running if t not in self.acked)


def board_name(sweep_location: str) -> str:
    """The board's actor name: one per sweep, so several sweeps can share a cluster."""
    return "stop-" + hashlib.sha1(sweep_location.encode()).hexdigest()[:12]


def start_board(name: str) -> Any:
    """Create the sweep's board actor in the connected Ray (or get the one a previous driver left)."""
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(StopBoard)
    board = actor.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
    ray.get(board.reset.remote(), timeout=60)
    return board


class TrialControl:
    """A trial's side of the board: registration, the per-epoch question, the acknowledgement. Every call
    is best effort: without the board (a trainable called outside a sweep, a driver that is gone) the trial
    trains on as if nothing was asked."""

    def __init__(self, name: str | None, trial_id: str) -> None:
        self.trial_id = trial_id
        self._board = None
        if name:
            with contextlib.suppress(Exception):
                import ray

                self._board = ray.get_actor(name, namespace=NAMESPACE)
                ray.get(self._board.started.remote(trial_id), timeout=10)

    def _call(self, method: str, *args: Any) -> Any:
        if self._board is None:
            return None
        import ray

        try:
            return ray.get(getattr(self._board, method).remote(*args), timeout=10)
        except Exception:  # noqa: BLE001 - the driver went away: nothing to tell it
            self._board = None
            return None

    def checkpoint_wanted(self) -> bool:
        return bool(self._call("requested"))

    def checkpointed(self, epoch: int) -> None:
        self._call("ack", self.trial_id, epoch)

    def ended(self) -> None:
        self._call("ended", self.trial_id)


class GracefulStop:
    """The driver's SIGTERM/SIGUSR1 handling (see the module docstring). The CLI installs it around a run;
    the driver re-installs it after ``ray.init`` (which sets a SIGTERM handler of its own) and wraps each
    Tune run in :meth:`stage`."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, say: Callable[[str], None] = print) -> None:
        self.grace_s = grace_s
        self.say = say
        self.signum: int | None = None
        self._first_at = 0.0
        self._event: threading.Event | None = None  # Tune's "experiment interrupted" event, while a stage runs
        self._board: Any = None
        self._in_stage = False
        self._draining = False
        self._sigint_fallback = False  # a Ray without the hook used here: end the run by SIGINT, as Ctrl-C
        self._previous: dict[int, Any] = {}
        self._finishing = 0  # inside finishing(): signals are noted, never raised
        self.lock: Any = None  # the sweep's lock (sweeps.lock.SweepLock), released if Ray is abandoned
        self._wakeup: int | None = None  # the write end of the signal wakeup pipe (_watch_signals)
        self._watched_at: float | None = None
        self._watched_signum: int | None = None
        self._abandoning = threading.Lock()

    # ------------------------------------------------------------------------------------- handlers
    def install(self) -> None:
        """Take SIGTERM and SIGUSR1 (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in SIGNALS:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)
        self._watch_signals()

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._previous.clear()
        if self._wakeup is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)

    def _watch_signals(self) -> None:
        """Learn of a signal the moment it comes, in a thread of our own: Python runs signal handlers in the
        main thread only, between bytecodes, and a main thread blocked in a call into a Ray that is going
        away (the whole job signalled) may not get there before SLURM's SIGKILL. The C-level handler writes
        each signal's number to a wakeup pipe, which this thread reads (:meth:`_watchdog`)."""
        if self._wakeup is None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wakeup = write
            threading.Thread(target=self._read_wakeups, args=(read,), name="dartsweep-signals", daemon=True).start()
        with contextlib.suppress(ValueError):  # not the main thread
            signal.set_wakeup_fd(self._wakeup, warn_on_full_buffer=False)

    def _read_wakeups(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            stops = [b for b in data if b in (int(signal.SIGTERM), int(signal.SIGUSR1))]
            if stops and self._watched_at is None:
                self._watched_at, self._watched_signum = time.monotonic(), stops[0]
                threading.Thread(target=self._watchdog, name="dartsweep-watchdog", daemon=True).start()

    def _watchdog(self) -> None:
        """After a signal: where the trials' board does not answer within :data:`REACH_S` (Ray is going
        away with the job), the run has until :data:`ABANDON_S` after the signal to end; then
        :meth:`_abandon`. A board that answers means a healthy Ray: the main thread's drain takes its time."""
        import ray

        board = self._board
        if board is None or not ray.is_initialized():
            return
        try:
            ray.get(board.pending.remote(), timeout=REACH_S)
            return
        except Exception:  # noqa: BLE001 - no answer: Ray is stopping too
            pass
        time.sleep(max(0.0, (self._watched_at or 0.0) + ABANDON_S - time.monotonic()))
        self._abandon()

    @contextlib.contextmanager
    def installed(self) -> Iterator["GracefulStop"]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()

    @property
    def exit_code(self) -> int | None:
        return EXIT_CODES.get(self.signum) if self.signum is not None else None

    def check(self) -> None:
        """Raise :class:`SweepSignalled` if a signal came (between stages: start nothing new)."""
        if self.signum is not None:
            raise SweepSignalled(self.signum)

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """Around the driver's cleanup (stopping Ray, releasing the lock): a signal that comes meanwhile is
        noted (for the exit code) but interrupts nothing, so the cleanup always completes. The handlers are
        set again on the way in: ``ray.shutdown()`` leaves SIGTERM at its default action in the C runtime
        (Python still reports its own handler), and a SIGTERM then would kill the driver mid-cleanup."""
        self.install()
        self._finishing += 1
        try:
            yield
        finally:
            self._finishing -= 1

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._finishing:
            if self.signum is None:
                self.signum, self._first_at = signum, time.monotonic()
            self.say(f"{name}: finishing the cleanup first (stopping Ray, releasing the sweep's lock)")
            return
        if self.signum is not None and time.monotonic() - self._first_at < REPEAT_S:
            return  # the same stop, delivered twice (SLURM signals every process; a job script forwards it)
        if self.signum is not None:  # a second signal: stop waiting
            if self._event is not None:
                self.say(f"{name} again: ending the run now, without waiting for checkpoints")
                self._event.set()
                return
            raise SweepSignalled(self.signum)
        self.signum, self._first_at = signum, time.monotonic()
        if not self._in_stage:
            self.say(f"{name}: stopping (no stage running)")
            raise SweepSignalled(signum)
        self.say(f"{name}: asking every running trial to checkpoint (waiting up to {self.grace_s:g} s), then "
                 "saving the experiment")
        self._start_drain()

    def _start_drain(self) -> None:
        if self._draining or (self._event is None and not self._sigint_fallback):
            return  # the event is not there yet: the drain starts when the stage's run sets it up
        self._draining = True
        threading.Thread(target=self._drain, name="dartsweep-drain", daemon=True).start()

    def _drain(self) -> None:
        import ray

        deadline = time.monotonic() + self.grace_s
        pending: list[str] = []
        try:
            if self._board is not None:
                ray.get(self._board.request.remote(), timeout=REACH_S)
                while time.monotonic() < deadline:
                    pending = ray.get(self._board.pending.remote(), timeout=10)
                    if not pending:
                        break
                    time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 - Ray going down under us: save what Tune has
            self.say(f"could not reach the trials ({type(exc).__name__}: Ray is stopping too); they continue "
                     f"from their last checkpoints; saving the experiment (until {ABANDON_S:g} s after the signal)")
            self._abandon_later()
        else:
            if pending:
                self.say(f"{len(pending)} trial(s) did not checkpoint within {self.grace_s:g} s; they continue "
                         "from their last checkpoint")
            else:
                self.say("every running trial has checkpointed; saving the experiment")
        if self._event is not None:
            self._event.set()
        elif self._sigint_fallback:
            os.kill(os.getpid(), signal.SIGINT)

    def _abandon_later(self) -> None:
        timer = threading.Timer(max(0.0, self._first_at + ABANDON_S - time.monotonic()), self._abandon)
        timer.daemon = True
        timer.start()

    def _abandon(self) -> None:
        """Exit now with the signal's code, the lock released: Ray did not let the run end in time."""
        if not self._abandoning.acquire(blocking=False):
            return
        code = self.exit_code or EXIT_CODES.get(signal.Signals(self._watched_signum or signal.SIGTERM), 143)
        self.say(f"Ray did not let the run end within {ABANDON_S:g} s of the signal; releasing the sweep's lock and exiting "
                 f"{code} (`dartsweep sweep up` continues every trial from its checkpoint)")
        if self.lock is not None:
            with contextlib.suppress(Exception):
                self.lock.release()
        import sys

        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    # ---------------------------------------------------------------------------------------- stage
    @contextlib.contextmanager
    def stage(self, board: Any) -> Iterator[None]:
        """Around ``Tuner.fit()``: a signal now drains the trials through ``board``, then sets Tune's own
        interrupt event. Tune installs its SIGINT/SIGUSR1 handlers when the run starts; SIGUSR1 is taken
        back right after, SIGINT (Ctrl-C) stays Tune's."""
        from ray.tune import tune as tune_module

        original = getattr(tune_module, "_setup_signal_catching", None)

        def setup() -> threading.Event:
            event = original()
            self._event = event
            self.install()  # SIGUSR1 back from Tune
            if self.signum is not None:
                self._start_drain()
            return event

        self._board, self._in_stage = board, True
        if original is not None:
            tune_module._setup_signal_catching = setup
        else:
            self._sigint_fallback = True
        try:
            yield
        finally:
            if original is not None:
                tune_module._setup_signal_catching = original
            self._board, self._event, self._in_stage, self._draining = None, None, False, False
            self._sigint_fallback = False
