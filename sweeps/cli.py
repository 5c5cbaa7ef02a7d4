"""``dartsweep sweep run|resume|status``: thin CLI over ``sweeps.driver``."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.driver import run_sweep
    from sweeps.spec import load_sweep

    spec = load_sweep(args.sweep)
    if args.dry_run:
        return _dry_run(spec, args)
    return _drive(args, lambda **kw: run_sweep(spec, storage=args.storage, address=args.address, **kw))


def _dry_run(spec, args: argparse.Namespace) -> int:
    from sweeps.driver import data_summary, format_table, plan_summary, trial_table
    from sweeps.estimate import estimate_report

    rows = trial_table(spec)
    print(json.dumps(rows) if args.json else format_table(rows))
    print(f"{spec.name}: {data_summary(spec)}", file=sys.stderr)
    print(f"{spec.name}: {plan_summary(spec, rows)}; nothing launched", file=sys.stderr)
    for line in estimate_report(spec, rows, device=args.device, table=args.step_times,
                                progress=lambda msg: print(f"[dartsweep] {msg}", file=sys.stderr, flush=True)):
        print(f"{spec.name}: {line}", file=sys.stderr)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from sweeps.driver import resume_sweep

    return _drive(args, lambda **kw: resume_sweep(args.dir, address=args.address, **kw))


def cmd_up(args: argparse.Namespace) -> int:
    from sweeps.driver import up_sweep
    from sweeps.spec import load_sweep

    if args.dry_run:
        return _dry_run(load_sweep(args.sweep), args)
    return _drive(args, lambda **kw: up_sweep(args.sweep, storage=args.storage, address=args.address, **kw))


EXIT_OK, EXIT_TRIALS_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _drive(args: argparse.Namespace, run) -> int:
    """Run, resume or extend a sweep; the exit code says how it ended: 0 every trial finished, 1 some trials
    errored or diverged (listed on stderr), 130 stopped by Ctrl-C, 143 / 138 stopped by SIGTERM / SIGUSR1
    (``sweeps.stopping``), with the rest saved for ``up`` / ``resume``."""
    from sweeps.driver import SweepInterrupted
    from sweeps.status import failed_trials
    from sweeps.stopping import GracefulStop, SweepSignalled

    def say(msg: str) -> None:
        print(f"[dartsweep] {msg}", file=sys.stderr, flush=True)

    stop = GracefulStop(grace_s=args.grace, say=say)
    with stop.installed():
        try:
            path = run(verbose=args.verbose, force=args.force, stop=stop, progress_every=args.progress_every,
                       accept_plugin_change=args.accept_plugin_change)
        except (SweepInterrupted, KeyboardInterrupt, SweepSignalled) as exc:
            if stop.exit_code is not None:
                name = signal.Signals(stop.signum).name
                print(f"dartsweep: stopped by {name}; the sweep's state is saved; `dartsweep sweep up` or "
                      f"`sweep resume` continues it (exit {stop.exit_code})", file=sys.stderr)
                return stop.exit_code
            print(f"dartsweep: interrupted: {exc}" if str(exc) else "dartsweep: interrupted; the sweep's state is "
                  "saved", file=sys.stderr)
            return EXIT_INTERRUPTED
    if stop.exit_code is not None:  # the signal came as the last trials finished: the sweep is complete
        print(f"dartsweep: {signal.Signals(stop.signum).name} came as the sweep finished", file=sys.stderr)
    print(path)
    failed = failed_trials(path)
    if failed:
        print(f"dartsweep: {len(failed)} trial(s) failed:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return EXIT_TRIALS_FAILED
    return EXIT_OK


def cmd_extend(args: argparse.Namespace) -> int:
    from sweeps.driver import SweepDir, extend_sweep, format_table
    from sweeps.extend import plan, prepare_extension

    if args.dry_run:
        sweep = SweepDir.at(args.dir)
        old, union = prepare_extension(sweep, args.file)
        rows = plan(sweep, old, union)
        print(json.dumps(rows) if args.json else format_table(rows))
        print(f"{union.name}: {len(rows)} new trial row(s); nothing launched", file=sys.stderr)
        return 0
    return _drive(args, lambda **kw: extend_sweep(args.dir, args.file, address=args.address, **kw))


def cmd_steps(args: argparse.Namespace) -> int:
    import torch

    from sweeps.estimate import _gmac, time_networks, write_table
    from sweeps.spec import load_sweep

    spec = load_sweep(args.sweep)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("dartsweep: --device cuda: this machine has no CUDA device; run `sweep steps` on a GPU node",
              file=sys.stderr)
        return 2
    networks = time_networks(spec, args.device, progress=lambda msg: print(f"[dartsweep] {msg}", file=sys.stderr,
                                                                            flush=True))
    for n in networks:
        n.gmac = _gmac(n)
        print(f"{n.kind:<6} {n.label:<28} {n.trials:>4} trial(s)  {n.gmac:8.4f} GMAC  step {n.timing['step_s']:.4g} s"
              f"  eval {1e3 * n.timing['image_s']:.4g} ms/image")
    write_table(args.out, networks, args.device)
    print(f"dartsweep: step times of {len(networks)} network(s) on {args.device} written to {args.out}; pass "
          f"`--dry-run --step-times {args.out}` to estimate the sweep's device-hours elsewhere", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from sweeps.status import sweep_status

    print(sweep_status(args.dir, as_json=args.json))
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _driver_options(p: argparse.ArgumentParser) -> None:
    """What every command that drives a sweep takes."""
    from sweeps.stopping import DEFAULT_GRACE_S

    p.add_argument("--address", help="Ray cluster: auto | HOST:PORT | ray://HOST:PORT (default: an embedded "
                                     "local Ray)")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="0 dartsweep's lines only, 1 (default) plus a progress line per stage, 2 plus Ray's own "
                        "tables and trial output (always in DIR/driver.log)")
    p.add_argument("--force", action="store_true", help="take the sweep's lock even from a live driver")
    p.add_argument("--accept-plugin-change", action="store_true",
                   help="continue a sweep although a plugin file changed since it was frozen (recorded in the "
                        "sweep's driver.log and sweep.yaml)")
    p.add_argument("--grace", type=_seconds, default=DEFAULT_GRACE_S,
                   help=f"on SIGTERM/SIGUSR1: seconds to wait for running trials to checkpoint before saving and "
                        f"exiting 143/138 (default {DEFAULT_GRACE_S:g})")
    p.add_argument("--progress-every", type=_seconds, default=None,
                   help="seconds between progress lines (default 30 on a terminal, 60 in a log file; a trial "
                        "finishing or failing is always reported)")


def _estimate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="validate, print the trial table and the estimated "
                                                          "device-hours; train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the table as JSON")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="with --dry-run: measure step times on this device (default: the trials' device, when "
                        "this machine has it)")
    p.add_argument("--step-times", metavar="TABLE",
                   help="with --dry-run: step times from `dartsweep bench steps` on the cluster's GPU")


def _has_cuda() -> bool:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def cmd_overhead(args: argparse.Namespace) -> int:
    from sweeps.overhead import measure_overhead

    def progress(msg: str) -> None:
        print(f"[dartsweep] overhead: {msg}", file=sys.stderr, flush=True)

    # with --json, stdout carries the JSON object only (Ray Tune prints its experiment table there)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = measure_overhead(args.trials, args.epochs, args.cpus, args.checkpoint_every, args.repeats,
                                  progress=progress)
    if args.json:
        print(json.dumps(result))
        return 0
    if result["repeats"] > 1:
        print(f"{result['repeats']} rounds, overhead per round: "
              + ", ".join(f"{100 * o:+.1f} %" for o in result["overhead_rounds"]) + "; the median round:")
    print(f"{result['trials']} trials of ~{result['mean_trial_s']:.1f} s: in-process one after another "
          f"{result['sequential_s']:.1f} s (mean of {result['sequential_before_s']:.1f} s before and "
          f"{result['sequential_after_s']:.1f} s after the sweep: the machine drifted "
          f"{100 * result['drift']:+.1f} %), as a Ray Tune sweep {result['sweep_s']:.1f} s "
          f"(overhead {100 * result['overhead']:+.1f} %, Ray start-up included; checkpoint every "
          f"{result['checkpoint_every']} epochs)\n"
          f"  of which once per sweep (Ray and Tune start-up, first worker, shutdown): {result['fixed_s']:.1f} s; "
          f"inside the trials: {100 * result['in_trial_overhead']:+.1f} % (starting trials "
          f"{result['trial_start_s']:.1f} s, reporting and checkpointing {result['reporting_s']:.1f} s, "
          f"epochs {100 * result['epochs_slowdown']:+.1f} % against in-process)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser("sweep", help="launch, resume or inspect a Ray Tune sweep").add_subparsers(
        dest="sweep_command", required=True, metavar="ACTION")
    names = "sweep YAML path or built-in name (quickstart, paper_table1, roadmap, f_sweep, optuna_pareto, cost_aware)"
    storage = ("where sweep folders go: a local or shared path, or a cloud URI (s3://...); default from the file, "
               "else ./results")
    for action, func, text in (("up", cmd_up, "run the sweep, or continue it if its folder exists (what job "
                                                  "scripts call)"),
                               ("run", cmd_run, "launch a sweep from a YAML file or a built-in name")):
        p = sweep.add_parser(action, help=text)
        p.add_argument("sweep", help=names)
        p.add_argument("--storage", help=storage)
        _driver_options(p)
        _estimate_options(p)
        p.set_defaults(func=func)
    p = sweep.add_parser("resume", help="continue unfinished and errored trials of a sweep")
    p.add_argument("dir")
    _driver_options(p)
    p.set_defaults(func=cmd_resume)
    p = sweep.add_parser("extend", help="add grid points (op sets, F, seeds, genotypes, layers) to a finished sweep")
    p.add_argument("dir", help="the sweep folder")
    p.add_argument("file", help="a sweep file whose grid lists hold the values to add (the rest must match)")
    p.add_argument("--dry-run", action="store_true", help="print exactly the new trials; train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the table as JSON")
    _driver_options(p)
    p.set_defaults(func=cmd_extend)
    p = sweep.add_parser("overhead", help="measure Ray Tune's wall-time overhead on tiny trials")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=90, help="epochs per trial (90: about 20 s on 2 cores)")
    p.add_argument("--checkpoint-every", type=int, default=10, help="epochs between trial checkpoints")
    p.add_argument("--cpus", type=int, help="threads per trial (default: all)")
    p.add_argument("--repeats", type=int, default=1,
                   help="sweeps, alternating with in-process runs; the median round is reported (default 1)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_overhead)
    p = sweep.add_parser("steps", help="time one training step of every distinct network of a sweep on this "
                                       "machine (a table for `--dry-run --step-times`)")
    p.add_argument("sweep", help=names)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--out", required=True, metavar="TABLE", help="the JSON table to write")
    p.set_defaults(func=cmd_steps)
    p = sweep.add_parser("status", help="one line per trial: stage, state, epoch, latest metrics, error")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
