"""``dartsweep analyze`` and ``dartsweep gradcam``: thin CLI over the analysis library."""

from __future__ import annotations

import argparse


def cmd_analyze(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from analysis.report import analyze
    from sweeps.driver import SweepDir

    with tempfile.TemporaryDirectory(prefix="dartsweep-analyze-") as tmp:
        # a sweep in cloud storage is read through a local copy of everything but the weights; its analysis
        # goes to ./<name>-analysis unless --out says where
        sweeps = [SweepDir.at(d) for d in args.dir]
        dirs = [s.mirror(Path(tmp, str(i))) for i, s in enumerate(sweeps)]
        out = args.out
        if out is None and len(dirs) == 1 and not sweeps[0].is_local:
            out = Path.cwd() / f"{sweeps[0].name}-analysis"
        out, summary = analyze(dirs if len(dirs) > 1 else dirs[0], out, edge=args.edge, cost=args.cost)
        trials = Path(out, "trials.csv")
        text = trials.read_text()
        for sweep, copy in zip(sweeps, dirs):  # trial folders: where they are, not the temporary copy
            if not sweep.is_local:
                text = text.replace(str(copy), sweep.location.partition("?")[0])
        trials.write_text(text)
    print(summary)
    print(f"plots, tables and index.md in {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import tempfile
    import time
    from pathlib import Path

    from analysis.html_report import build_report
    from sweeps.driver import SweepDir

    start = time.perf_counter()
    sweeps = [SweepDir.at(d) for d in args.dir]
    out = args.out
    if out is None:  # beside the sweep; a sweep in cloud storage, or several: ./NAME-report.html
        out = (Path(sweeps[0].location) / "report.html" if len(sweeps) == 1 and sweeps[0].is_local
               else Path.cwd() / f"{'-'.join(s.name for s in sweeps)}-report.html")
    with tempfile.TemporaryDirectory(prefix="dartsweep-report-") as tmp:
        dirs = [s.mirror(Path(tmp, str(i))) for i, s in enumerate(sweeps)]
        path, info = build_report(dirs, out, title=", ".join(s.name for s in sweeps))
    print(f"{path} ({info['bytes'] / 2**20:.1f} MiB, {info['trials']} trials, {len(info['plots'])} plots; "
          f"{time.perf_counter() - start:.1f} s): open it in a browser, no network needed")
    return 0


def cmd_gradcam(args: argparse.Namespace) -> int:
    from analysis.gradcam import gradcam_grid

    indices = [int(i) for i in args.images.split(",") if i.strip()]
    labels = args.labels.split(",") if args.labels else None
    print(gradcam_grid(args.checkpoints, indices, args.out, labels))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="plots, tables and a Pareto summary from sweep folders (offline)")
    p.add_argument("dir", nargs="+", help="a sweep folder (or a copy of one); several are merged")
    p.add_argument("--out", help="where to write (default DIR/analysis; required with several DIRs)")
    p.add_argument("--edge", type=int, default=0, help="edge index for the alpha evolution plot (default 0)")
    p.add_argument("--cost", choices=("gmac", "params", "latency", "throughput"), default="gmac",
                   help="the cost of the printed Pareto set and index.md's (default gmac); every front is written")
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("report", help="one self-contained HTML page of a sweep (or several merged): plots, "
                       "tables, every trial")
    p.add_argument("dir", nargs="+", help="a sweep folder or URI; several are merged")
    p.add_argument("--out", help="the HTML file (default DIR/report.html; ./NAMES-report.html for a URI or "
                   "several sweeps)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("gradcam", help="GradCAM grid (paper Fig. 5) for eval checkpoints")
    p.add_argument("checkpoints", nargs="+", help="eval trial folders, checkpoint folders or state.pt files")
    p.add_argument("--images", default="0,1,2,3", help="comma-separated test image indices")
    p.add_argument("--labels", help="comma-separated row labels (default: genotype and layers)")
    p.add_argument("--out", default="gradcam.png")
    p.set_defaults(func=cmd_gradcam)
