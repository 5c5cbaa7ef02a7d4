"""``dartsweep sweep run|resume|status``: thin CLI over ``sweeps.driver``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from sweeps.driver import data_summary, format_table, plan_summary, run_sweep, trial_table
    from sweeps.spec import load_sweep

    spec = load_sweep(args.sweep)
    if args.dry_run:
        rows = trial_table(spec)
        print(json.dumps(rows) if args.json else format_table(rows))
        print(f"{spec.name}: {data_summary(spec)}", file=sys.stderr)
        print(f"{spec.name}: {plan_summary(spec, rows)}; nothing launched", file=sys.stderr)
        return 0
    return _drive(lambda: run_sweep(spec, storage=args.storage, address=args.address, verbose=args.verbose,
                                    force=args.force))


def cmd_resume(args: argparse.Namespace) -> int:
    from sweeps.driver import resume_sweep

    return _drive(lambda: resume_sweep(args.dir, address=args.address, verbose=args.verbose, force=args.force))


EXIT_OK, EXIT_TRIALS_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _drive(run) -> int:
    """Run or resume a sweep; the exit code says how it ended: 0 every trial finished, 1 some trials errored
    or diverged (listed on stderr), 130 stopped by Ctrl-C with the rest saved for ``resume``."""
    from sweeps.driver import SweepInterrupted
    from sweeps.status import failed_trials

    try:
        path = run()
    except (SweepInterrupted, KeyboardInterrupt) as exc:
        print(f"dartsweep: interrupted: {exc}" if str(exc) else "dartsweep: interrupted; the sweep's state is saved",
              file=sys.stderr)
        return EXIT_INTERRUPTED
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
    return _drive(lambda: extend_sweep(args.dir, args.file, address=args.address, verbose=args.verbose,
                                       force=args.force))


def cmd_status(args: argparse.Namespace) -> int:
    from sweeps.status import sweep_status

    print(sweep_status(Path(args.dir), as_json=args.json))
    return 0


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
    p = sweep.add_parser("run", help="launch a sweep from a YAML file or a built-in name")
    p.add_argument("sweep", help="sweep YAML path or built-in name (quickstart, paper_table1, roadmap, f_sweep, "
                                 "optuna_pareto)")
    p.add_argument("--address", help="Ray cluster: auto | ray://HOST:PORT (default: an embedded local Ray)")
    p.add_argument("--storage", help="where sweep folders go: a local or shared path, or a cloud URI "
                                     "(s3://...); default from the file, else ./results")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trial table; train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the table as JSON")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="0 dartsweep's lines only, 1 (default) plus a progress line per stage, 2 plus Ray's own "
                        "tables and trial output (always in DIR/driver.log)")
    p.add_argument("--force", action="store_true", help="take the sweep's lock even from a live driver")
    p.set_defaults(func=cmd_run)
    p = sweep.add_parser("resume", help="continue unfinished and errored trials of a sweep")
    p.add_argument("dir")
    p.add_argument("--address")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--force", action="store_true", help="take the sweep's lock even from a live driver")
    p.set_defaults(func=cmd_resume)
    p = sweep.add_parser("extend", help="add grid points (op sets, F, seeds, genotypes, layers) to a finished sweep")
    p.add_argument("dir", help="the sweep folder")
    p.add_argument("file", help="a sweep file whose grid lists hold the values to add (the rest must match)")
    p.add_argument("--dry-run", action="store_true", help="print exactly the new trials; train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: the table as JSON")
    p.add_argument("--address")
    p.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--force", action="store_true", help="take the sweep's lock even from a live driver")
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
    p = sweep.add_parser("status", help="one line per trial: stage, state, epoch, latest metrics, error")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
