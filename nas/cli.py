"""``dartsweep``: one command with subcommands; a thin layer over the nas, sweeps and analysis libraries.

Bad input prints one line (``dartsweep: error: ...``) and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from nas.errors import ConfigError

EXIT_USAGE = 2


def _progress_printer(label: str, total_epochs: int) -> tuple[Callable, Callable]:
    """(on_step, on_epoch-line) printers: a live step counter on terminals, one line per epoch always."""
    start = time.perf_counter()
    tty = sys.stderr.isatty()

    def on_step(step: int, steps: int) -> None:
        if tty:
            print(f"\r{label}: step {step}/{steps}", end="", file=sys.stderr, flush=True)

    def epoch_line(metrics: dict[str, Any], keys: Sequence[str]) -> None:
        done = metrics["epoch"]
        elapsed = time.perf_counter() - start
        eta = elapsed / max(done, 1) * (total_epochs - done)
        shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in keys if k in metrics)
        print(("\r" if tty else "") + f"{label}: epoch {done}/{total_epochs}  {shown}  "
              f"[{elapsed:.0f}s elapsed, ~{eta:.0f}s left]", file=sys.stderr, flush=True)

    return on_step, epoch_line


def _prepare_out(out: Path, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None; refuses to overwrite an existing run."""
    from nas.io import load_checkpoint

    ckpt = out / "checkpoint.pt"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder (it is created if missing)")
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"--resume: no checkpoint.pt in {out}; run without --resume to start")
        return load_checkpoint(ckpt)
    if ckpt.exists() or (out / "metrics.jsonl").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    return None


def _run_phase(phase: str, config: Any, out: Path, resume: bool, device: str) -> Any:
    from nas.io import save_checkpoint_atomic, write_json_atomic, write_text_atomic
    from nas.train import run_eval, run_search

    state = _prepare_out(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", {"phase": phase, **config.to_dict()})
    on_step, epoch_line = _progress_printer(phase, config.epochs)
    keys = ("train_loss", "train_acc", "valid_acc") if phase == "search" else ("train_loss", "train_acc", "test_acc")
    history: list[dict[str, Any]] = list(state["history"]) if state else []

    def on_epoch(metrics: dict[str, Any], make_checkpoint: Callable[[], dict[str, Any]]) -> None:
        history.append(metrics)
        save_checkpoint_atomic(out / "checkpoint.pt", make_checkpoint())
        write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
        if phase == "search":
            write_json_atomic(out / "genotype.json", metrics["genotype"])
        epoch_line(metrics, keys)

    run = run_search if phase == "search" else run_eval
    return run(config, device=device, resume=state, on_epoch=on_epoch, on_step=on_step)


def cmd_search(args: argparse.Namespace) -> int:
    from nas.config import SearchConfig

    op_set: Any = args.op_set
    if args.primitives:
        op_set = {"primitives": [p.strip() for p in args.primitives.split(",") if p.strip()],
                  "activation": args.activation or "relu", "norm": args.norm or "bn"}
    config = SearchConfig(op_set=op_set, bottleneck_ratio=args.F, dataset=args.dataset, data_dir=args.data_dir,
                          epochs=args.epochs, batch_size=args.batch_size, channels=args.channels,
                          layers=args.layers, nodes=args.nodes, order=args.order, seed=args.seed,
                          max_steps_per_epoch=args.max_steps_per_epoch, cost_metric=args.cost_metric,
                          cost_weight=args.cost_weight, cost_lut=args.cost_lut)
    if config.cost_lut is not None:  # the device too, before any work
        from nas.lut import check_search_compatible, read_lut
        from nas.train import resolve_device

        check_search_compatible(read_lut(config.cost_lut, "cost_lut:"), config.resolved_op_set(), config.channels,
                                config.layers, resolve_device(args.device).type)
    out = Path(args.out or f"runs/search-{config.resolved_op_set().id}-s{config.seed}")
    result = _run_phase("search", config, out, args.resume, args.device)
    print(json.dumps(result.genotype.to_dict()))
    print(f"genotype written to {out / 'genotype.json'}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nas.config import EvalConfig

    config = EvalConfig(genotype=args.genotype, layers=args.layers, dataset=args.dataset, data_dir=args.data_dir,
                        epochs=args.epochs, batch_size=args.batch_size, channels=args.channels,
                        auxiliary=not args.no_auxiliary, cutout=not args.no_cutout, drop_path=args.drop_path,
                        seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch)
    out = Path(args.out or f"runs/train-{config.resolved_genotype().id}-L{config.layers}-s{config.seed}")
    result = _run_phase("eval", config, out, args.resume, args.device)
    print(json.dumps({"test_acc": result.test_acc, "best_test_acc": result.best_test_acc, "out": str(out)}))
    return 0


def cmd_complexity(args: argparse.Namespace) -> int:
    from nas.complexity import complexity, effective_ratios, search_complexity

    if (args.genotype is None) == (args.op_set is None):
        raise ConfigError("complexity: give --genotype (an evaluation network) or --op-set (a search network)")
    if args.op_set is not None:  # the search network: every candidate op on every edge
        from nas.opsets import resolve_op_set

        item = resolve_op_set(args.op_set, args.F)
        layers, channels = args.layers or 8, args.channels or 16
        result, what = search_complexity(item, layers, channels), "search network"
    else:
        from nas.genotypes import load_genotype

        item = load_genotype(args.genotype)
        if args.F is not None:
            from sweeps.spec import genotype_for_trial

            item = genotype_for_trial(item.to_dict(), args.F)
        if args.layers is None:
            raise ConfigError("complexity: --layers is needed with --genotype (the evaluation layer count)")
        layers, channels = args.layers, args.channels or 36
        result, what = complexity(item, layers, channels=channels), "evaluation network"
    ratio = item.options.bottleneck_ratio if item.uses_bottleneck_ratio else None
    effective = {w: f for w, f in effective_ratios(ratio, channels, layers).items() if f != ratio} if ratio else {}
    if args.json:
        print(json.dumps({"genotype" if args.genotype else "op_set": item.id, "layers": layers, "channels": channels,
                          **result.to_dict(), "F": ratio,
                          "effective_F": {str(w): f for w, f in effective.items()}}))
    else:
        print(f"{item.id} {what} at {layers} layers (C={channels}): {result.params_m:.3f} M params, "
              f"{result.gmac:.3f} GMAC")
        if effective:
            print(f"  F {ratio:g} is C_inv/C = " + ", ".join(f"{f:.4g} at C={w}" for w, f in effective.items())
                  + " (C_inv = round(F C))")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    from nas.eval_network import EvalNetwork
    from nas.genotypes import load_genotype
    from nas.latency import measure_latency
    from nas.train import resolve_device

    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch: a comma-separated list of batch sizes, got {args.batch!r}") from None
    genotype = load_genotype(args.genotype)
    from nas.complexity import check_size

    check_size(args.layers, args.channels)
    device = resolve_device(args.device)
    model = EvalNetwork(genotype, args.channels, args.layers, 10, 3, auxiliary=False)
    result = measure_latency(model, (3, 32, 32), device, batches, repeats=args.repeats)
    if args.json:
        print(json.dumps({"genotype": genotype.id, "layers": args.layers, "channels": args.channels, **result}))
        return 0
    print(f"{genotype.id} at {args.layers} layers (C={args.channels}) on {result['device']}"
          f"{' bf16' if result['amp'] else ''}{' channels_last' if result['channels_last'] else ''}:")
    for batch, r in result["batches"].items():
        print(f"  batch {batch:>4}: {r['median_ms']:8.2f} ms median (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}, "
              f"IQR {r['iqr_ms']:.2f}; {r['repeats']} passes)")
    print(f"  {result['throughput_img_s']:.1f} images/s at batch {max(result['batches'])}")
    return 0


def cmd_lut(args: argparse.Namespace) -> int:
    from nas import lut as lut_lib

    def progress(msg: str) -> None:
        print(f"lut: {msg}", file=sys.stderr, flush=True)

    if args.lut_command == "build":
        from nas.complexity import check_size
        from nas.io import write_json_atomic
        from nas.opsets import resolve_op_set
        from nas.train import resolve_device

        check_size(args.layers, args.channels)
        op_set = resolve_op_set(args.op_set, args.F)
        table = lut_lib.build_lut(op_set, args.channels, args.layers, resolve_device(args.device), args.batch,
                                  image_size=args.image_size, progress=progress)
        table = lut_lib.calibrate(table, progress=progress)
        write_json_atomic(Path(args.out), table)
        print(f"{len(table['ops'])} op timings, the skeleton ({table['skeleton_ms']:.2f} ms) and scale "
              f"{table['scale']:.3f} for {op_set.id} at "
              f"C={args.channels}, {args.layers} layers on {table['device']}, batch {args.batch}: {args.out}")
        return 0
    table = lut_lib.read_lut(args.lut)
    if args.lut_command == "predict":
        from nas.genotypes import load_genotype

        genotype = load_genotype(args.genotype)
        lut_lib.check_compatible(table, genotype, args.channels, args.layers, args.device)
        print(json.dumps({"genotype": genotype.id, "predicted_ms": lut_lib.predict(table, genotype)}) if args.json
              else f"{genotype.id}: {lut_lib.predict(table, genotype):.2f} ms predicted ({table['device']}, "
                   f"batch {table['batch']})")
        return 0
    result = lut_lib.check(table, args.genotypes, args.seed, progress=progress)
    print(json.dumps(result) if args.json else
          f"{result['count']} random {table['op_set']} genotypes: Spearman {result['spearman']:.3f}, median "
          f"absolute error {100 * result['median_abs_error']:.1f} % "
          f"({100 * result['median_abs_error_at_build_speed']:.1f} % with predictions scaled to the machine's "
          f"speed now: its skeleton times {result['machine_speed']:.2f}x what it did when the table was built)")
    return 0


def cmd_genotypes(args: argparse.Namespace) -> int:
    from nas.genotypes import GENOTYPES
    from nas.opsets import OP_SETS
    from nas.registry import BUILTIN, DATASETS, OPS

    if args.json:
        print(json.dumps({"genotypes": {k: g.to_dict() for k, g in GENOTYPES.items()},
                          "op_sets": {k: o.to_dict() for k, o in OP_SETS.items()},
                          "ops": {k: {"source": e.source, "uses_bottleneck_ratio": e.uses_bottleneck_ratio,
                                      "pooling": e.pooling} for k, e in OPS.items()},
                          "datasets": {k: {"source": e.source, "shape": list(e.shape)} for k, e in DATASETS.items()}},
                         indent=2))
        return 0
    print("Ops:")
    for name, e in OPS.items():
        print(f"  {name:<16} {'' if e.source == BUILTIN else 'from ' + e.source}".rstrip())
    print("Datasets:")
    for name, d in DATASETS.items():
        print(f"  {name:<16} {d.in_channels} x {d.image_size} x {d.image_size}, {d.num_classes} classes"
              f"{'' if d.source == BUILTIN else '  from ' + d.source}")
    print("Built-in genotypes:")
    for name, g in GENOTYPES.items():
        ops = sorted(g.primitives)
        print(f"  {name:<10} {g.options.activation}/{g.options.norm} F={g.options.bottleneck_ratio:g}  ops: "
              f"{', '.join(ops)}")
    print("Op-set presets:")
    for name, o in OP_SETS.items():
        print(f"  {name:<16} {o.options.activation} ({o.options.activation_scope})/{o.options.norm} "
              f"F={o.options.bottleneck_ratio:g} stem={o.stem} pooling_bn={str(o.pooling_bn).lower()}  "
              f"{', '.join(o.primitives)}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    import torch

    from nas.data import load_dataset, nbytes
    from nas.registry import DATASETS

    name = args.dataset
    if name not in DATASETS and Path(name).expanduser().is_dir():
        from nas.image_folder import folder_spec

        name = folder_spec({"image_folder": name, "size": args.size, "channels": args.channels,
                            "test_fraction": args.test_fraction, "seed": args.seed}, Path.cwd()).name
    start = time.perf_counter()
    data = load_dataset(name, args.data_dir, download=False)
    seconds = time.perf_counter() - start
    names = data.class_names or tuple(str(i) for i in range(data.num_classes))
    counts = {split: torch.bincount(getattr(data, f"{split}_y"), minlength=data.num_classes).tolist()
              for split in ("train", "test")}
    report = {"dataset": name, "source": DATASETS.get(name).source, "classes": list(names),
              "shape": [data.in_channels, data.image_size, data.image_size], "train_images": len(data.train_y),
              "test_images": len(data.test_y), "per_class": counts, "bytes": nbytes(data),
              "mean": list(data.mean), "std": list(data.std), "load_s": round(seconds, 3)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{name}  ({report['source']})")
    print(f"  {data.num_classes} classes, images {data.in_channels} x {data.image_size} x {data.image_size} uint8; "
          f"{len(data.train_y)} training, {len(data.test_y)} test; {nbytes(data) / 2**20:.1f} MiB in memory; "
          f"loaded in {seconds:.2f} s")
    for i, cls in enumerate(names):
        print(f"  {cls:<20} train {counts['train'][i]:>7}  test {counts['test'][i]:>7}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from nas.data import download_dataset

    files = download_dataset(args.dataset, args.data_dir)
    folder = files[0].path.parent
    print(f"{args.dataset}: {len(files)} files in {folder}, each checked against torchvision's MD5")
    for f in files:
        print(f"  {f.md5}  {f.path.name}")
    print(f"sweep files reach it with `dataset: {args.dataset}` and `data_dir: {folder.parent}`", file=sys.stderr)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dartsweep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, epochs: int, batch: int) -> None:
        p.add_argument("--dataset", default="cifar10", help="cifar10 | cifar100 | digits (default cifar10)")
        p.add_argument("--data-dir", default="./data", help="where CIFAR is (or is downloaded to)")
        p.add_argument("--epochs", type=_positive_int, default=epochs)
        p.add_argument("--batch-size", type=_positive_int, default=batch)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--out", help="output folder (metrics.jsonl, checkpoint.pt, ...)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        p.add_argument("--max-steps-per-epoch", type=_positive_int, help="cap steps per epoch (smoke runs)")

    p = sub.add_parser("search", help="run one DARTS search (no Ray)")
    p.add_argument("--op-set", default="pibconv", help="preset: darts, darts_gelu, darts_gelu_ln, convnext, pibconv")
    p.add_argument("--primitives", help="comma-separated primitives: an explicit op set instead of --op-set")
    p.add_argument("--activation", choices=("relu", "gelu"), help="with --primitives")
    p.add_argument("--norm", choices=("bn", "ln"), help="with --primitives")
    p.add_argument("--F", type=float, help="bottleneck ratio F (overrides the op set's)")
    p.add_argument("--order", type=int, choices=(1, 2), default=2, help="DARTS order (default 2)")
    p.add_argument("--channels", type=_positive_int, default=16)
    p.add_argument("--layers", type=_positive_int, default=8)
    p.add_argument("--nodes", type=_positive_int, default=4)
    p.add_argument("--cost-weight", type=float, default=0.0,
                   help="lambda of the expected-cost term (cost-aware search; 0: plain DARTS)")
    p.add_argument("--cost-metric", choices=("gmac", "params", "latency"), default="gmac",
                   help="what the cost term counts (latency: from --cost-lut)")
    p.add_argument("--cost-lut", help="latency cost: a table from `dartsweep lut build` for this network and device")
    common(p, 50, 64)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("train", help="train a genotype at a layer count (evaluation phase, no Ray)")
    p.add_argument("--genotype", required=True, help="DARTS_V1 | DARTS_V2 | PIBCONV | path.json")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--channels", type=_positive_int, default=36)
    p.add_argument("--drop-path", type=float, default=0.2)
    p.add_argument("--no-auxiliary", action="store_true")
    p.add_argument("--no-cutout", action="store_true")
    common(p, 600, 96)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("complexity", help="params (M) and GMACs of an evaluation or a search network")
    p.add_argument("--genotype", help="an evaluation network: DARTS_V2 | PIBCONV | path.json")
    p.add_argument("--op-set", help="a search network: an op-set preset (pibconv, pibconv_released, ...)")
    p.add_argument("--F", type=float, help="bottleneck ratio F (overrides the genotype's or op set's)")
    p.add_argument("--layers", type=_positive_int, help="cells (required with --genotype; search default 8)")
    p.add_argument("--channels", type=_positive_int, help="initial channels (default 36 eval, 16 search)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_complexity)

    p = sub.add_parser("latency", help="measured forward latency of an evaluation network (eval mode)")
    p.add_argument("--genotype", required=True, help="DARTS_V2 | PIBCONV | path.json")
    p.add_argument("--layers", type=_positive_int, required=True)
    p.add_argument("--channels", type=_positive_int, default=36)
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--batch", default="1,256", help="batch sizes, comma-separated (default 1,256)")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed passes per batch size (>= 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_latency)

    lut = sub.add_parser("lut", help="per-op latency lookup table: build, predict, check").add_subparsers(
        dest="lut_command", required=True, metavar="ACTION")
    p = lut.add_parser("build", help="time every op of an op set at every position of a network")
    p.add_argument("--op-set", default="pibconv")
    p.add_argument("--F", type=float, help="bottleneck ratio F (overrides the op set's)")
    p.add_argument("--channels", type=_positive_int, default=36)
    p.add_argument("--layers", type=_positive_int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--image-size", type=_positive_int, default=32,
                   help="the network's input size (32: CIFAR; 8: digits)")
    p.add_argument("--out", default="lut.json")
    p.set_defaults(func=cmd_lut)
    p = lut.add_parser("predict", help="a genotype's latency from a LUT")
    p.add_argument("--lut", required=True)
    p.add_argument("--genotype", required=True)
    p.add_argument("--channels", type=_positive_int, help="refuse a LUT built for other channels")
    p.add_argument("--layers", type=_positive_int, help="refuse a LUT built for other layers")
    p.add_argument("--device", help="refuse a LUT built on another device type (cpu | cuda)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lut)
    p = lut.add_parser("check", help="predicted vs measured latency of random genotypes (Spearman, error)")
    p.add_argument("--lut", required=True)
    p.add_argument("--genotypes", type=_positive_int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lut)

    p = sub.add_parser("genotypes", help="list built-in genotypes and op-set presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_genotypes)

    data = sub.add_parser("data", help="fetch CIFAR on a machine with internet, or check any dataset").add_subparsers(
        dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("download", help="download CIFAR-10/100 (or check a copy), printing files and MD5s")
    p.add_argument("dataset", choices=("cifar10", "cifar100"))
    p.add_argument("--data-dir", default="./data", help="the folder to put it in (default ./data)")
    p.set_defaults(func=cmd_data_download)
    p = data.add_parser("check", help="load a dataset (a registered name or an image folder) and report its "
                                      "classes, image counts and bytes")
    p.add_argument("dataset", help="cifar10 | cifar100 | digits | a plugin's dataset | an image folder's path")
    p.add_argument("--data-dir", default="./data", help="where CIFAR is (default ./data)")
    p.add_argument("--size", type=_positive_int, default=32, help="image folder: side in pixels (default 32)")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="image folder: 3 RGB (default), 1 grey")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="image folder without train/ and test/: held-out fraction per class (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="image folder: the split's seed (default 0)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_check)

    for module in ("sweeps.cli", "analysis.cli", "nas.bench"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except (ImportError, AttributeError):
            continue
        register(sub)
    for path in PLUGIN_COMMANDS:
        _leaf(sub, path).add_argument(
            "--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
            help="import a plugin (a .py file or a module) that registers ops, op sets or datasets; repeatable")
    return parser


# The commands that build networks or load data by name, and so take --plugin (a sweep names its own).
PLUGIN_COMMANDS = (("search",), ("train",), ("complexity",), ("latency",), ("lut", "build"), ("lut", "predict"),
                   ("lut", "check"), ("genotypes",), ("bench",), ("data", "check"))


def _leaf(sub: argparse._SubParsersAction, path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = sub.choices[path[0]]
    for name in path[1:]:
        nested = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
        parser = nested.choices[name]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from nas.plugins import load_plugin

        for ref in getattr(args, "plugin", None) or []:
            load_plugin(ref)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"dartsweep: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dartsweep: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
