"""Sweep directories to tidy pandas frames, offline (no Ray cluster, nothing written).

``trials_frame(dir)``: one row per trial. Columns:

==================  =====================================================================================
stage               ``search`` or ``eval``
trial_id            Ray Tune trial id
status              ``finished`` | ``errored`` | ``diverged`` | ``unfinished`` (running, pending or cut off)
ray_status          Ray Tune's own status (TERMINATED, ERROR, RUNNING, PENDING; '' when unknown)
op_set              op set id (``pibconv``, ``pibconv-F2.5``, ``custom-...``)
F                   bottleneck ratio (NaN when the ops do not use one)
cost_weight         lambda of a cost-aware search (search trials, and eval trials of their cells); else NaN
genotype_id         eval: the trained genotype's id; search: the derived genotype's id at the last epoch
cell                the genotype's name for tables and plots: a named genotype's id (``PIBCONV``), an
                    unnamed one's hash followed by its op set (``g-ae04bd0a (pibconv-F3)``)
layers, seed        eval layer count (NaN for search) and the trial's seed
epochs_done         last epoch reported; ``epochs_total``: epochs configured
final_acc           search: valid_acc at the last epoch; eval: test_acc at the last epoch (percent)
best_acc            the best of the same over all epochs
params_m, gmac      eval: parameters (M, auxiliary head excluded) and GMACs of the trained network
latency_ms          eval: median forward latency at batch 1 on the trial's device (``nas.latency``)
throughput_img_s    eval: forward images/s at the training batch size; ``device``: where measured
wall_time_s         seconds of training reported (sum of epoch times)
error               first line of the error (error.txt, or the divergence message), or why the trial
                    stopped early (the scheduler, or the search's own criteria)
stop_reason         search: why it stopped itself (``settled: ...`` / ``collapsed: ...``), else ''
epochs_saved        search stopped early: epochs configured minus epochs run; ``hours_saved``: those at
                    the trial's mean epoch time (device-hours times its device share)
trial_dir           the trial's folder
==================  =====================================================================================

``history_frame(dir)``: one row per (trial, epoch) with every scalar metric reported.

``trial_history(trial_dir)``: one trial's reported epochs as dicts (what both frames are built from).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from nas.errors import ConfigError
from sweeps.checkpoints import newest_history
from sweeps.spec import ratio_of, stage_epochs

TRIAL_COLUMNS = ["stage", "trial_id", "status", "ray_status", "op_set", "F", "genotype_id", "cell", "cost_weight",
                 "layers", "seed",
                 "epochs_done", "epochs_total", "final_acc", "best_acc", "params_m", "gmac", "latency_ms",
                 "throughput_img_s", "device", "wall_time_s", "error", "stop_reason", "epochs_saved", "hours_saved",
                 "trial_dir"]


def cell_label(genotype_id: Any, op_set: Any, cost_weight: Any = None) -> Any:
    """How tables and plots name a genotype: searched cells are hashes (``g-ae04bd0a``), which say nothing
    on their own, so they carry the op set they were searched with (for an F sweep, the F) and, from a
    cost-aware search, its lambda (``g-ae04bd0a (pibconv, lambda 0.5)``)."""
    if isinstance(genotype_id, str) and genotype_id.startswith("g-") and isinstance(op_set, str) and op_set:
        lam = f", lambda {cost_weight:g}" if isinstance(cost_weight, (int, float)) and cost_weight == cost_weight \
            else ""
        return f"{genotype_id} ({op_set}{lam})"
    return genotype_id


def _epoch(row: dict[str, Any]) -> Any:
    return row.get("epoch", row.get("training_iteration"))


def trial_history(trial_dir: str | Path) -> list[dict[str, Any]]:
    """Every epoch a trial reported on the line that led to its latest result, in order.

    result.json (JSON lines) is read in the order written; a report whose epoch is not past the one
    before starts a new attempt (a restore from a checkpoint), so the earlier attempt's reports from
    that epoch on are dropped. Epochs result.json lacks (Ray can lose them when a trial restarts, or
    a killed driver can leave it truncated) are filled from the history saved in the newest
    checkpoint, up to the last epoch result.json holds.
    """
    trial_dir = Path(trial_dir)
    rows: list[dict[str, Any]] = []
    results = trial_dir / "result.json"
    text = results.read_text() if results.exists() else ""
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()  # a report Ray is writing right now (a live sweep): not corrupt, just not there yet
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        while rows and _epoch(row) is not None and _epoch(rows[-1]) is not None and _epoch(rows[-1]) >= _epoch(row):
            rows.pop()
        rows.append(row)
    saved_rows = newest_history(trial_dir)  # a damaged checkpoint history adds nothing; result.json still counts
    if not saved_rows:
        return rows
    have = {_epoch(r) for r in rows}
    last = max((e for e in have if e is not None), default=math.inf)
    lost = [r for r in saved_rows if r.get("epoch") not in have and r.get("epoch", 0) <= last]
    return sorted(rows + lost, key=lambda r: (_epoch(r) is None, _epoch(r) or 0)) if lost else rows


def _ray_statuses(stage_dir: Path) -> dict[str, tuple[str, str, dict]]:
    """trial_id -> (Ray status, error message, config) from the experiment state, when readable."""
    try:
        from ray.tune import ExperimentAnalysis

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = ExperimentAnalysis(str(stage_dir))
        # not Trial.local_path: it asserts that Ray is running (the error text is read from error.txt instead)
        return {t.trial_id: (t.status, (getattr(t, "error_message", None) or "") if t.status == "ERROR" else "",
                             {**t.config, **t.config.get("point", {})}) for t in analysis.trials}
    except Exception:  # noqa: BLE001 - a copied or partial folder: fall back to the files
        return {}


def _first_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "Exception" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "")[:300]


def eval_stage_table(sweep_dir: Path) -> dict[str, Any]:
    """The eval stage's genotype table (id -> entry), as the driver gave it to the trials, rebuilt from the
    frozen sweep file and the searched genotypes; {} if unreadable."""
    from sweeps.driver import SweepDir, eval_genotypes, read_searched
    from sweeps.spec import eval_table

    from nas.genotypes import Genotype

    try:
        spec = SweepDir.at(sweep_dir).load_spec(plugins="optional")
        searched = read_searched(sweep_dir)
        for entry in searched.values():  # a first-release sweep's files lack the form keys
            entry["genotype"] = Genotype.from_dict(entry["genotype"], spec.first_release).to_dict()
    except (ConfigError, OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return eval_table(spec.eval, eval_genotypes(spec, searched)) if spec.eval is not None else {}


def _first_release(root: Path) -> bool:
    """Whether the sweep in ``root`` was written by dartsweep's first release (its sweep.yaml has no format)."""
    import yaml

    try:
        raw = yaml.safe_load((root / "sweep.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "format" not in raw


def _rename_first_release(trials: list[dict], history: list[dict], table: dict[str, Any]) -> None:
    """Give a first-release sweep's trials today's ids for the networks they trained (``PIBCONV`` ->
    ``PIBCONV-gelu_all``, ``pibconv`` -> ``pibconv-gelu_all-pool_bn``): its reports used the first
    release's ids, which today name other networks."""
    from nas.genotypes import Genotype
    from nas.opsets import first_release_op_set_id

    genotype_ids = {}
    for key, entry in table.items():
        try:
            genotype_ids[key] = Genotype.from_dict(entry["genotype"], True).id
        except (ConfigError, KeyError, TypeError):
            continue
    for row in trials + history:
        if isinstance(row.get("op_set"), str):
            row["op_set"] = first_release_op_set_id(row["op_set"])
        if row.get("stage") == "eval" and isinstance(row.get("genotype_id"), str):
            row["genotype_id"] = genotype_ids.get(row["genotype_id"], row["genotype_id"])
        if "cell" in row:
            row["cell"] = cell_label(row["genotype_id"], row["op_set"], row.get("cost_weight"))


def _ratio(reported: Any, genotype_id: Any, table: dict[str, Any]) -> float:
    """A trial's F: NaN where its genotype's ops ignore F (trials before this release reported DARTS_V2's
    unused 2.0); else as reported or configured (a sampler's draw), else its genotype's (a folded grid's
    trial that never reported)."""
    own = _num(ratio_of(table[genotype_id])) if genotype_id in table else None
    value = _num(reported)
    if own is not None and (math.isnan(own) or math.isnan(value)):
        return own
    return value


def _stage_rows(stage: str, stage_dir: Path, skipped: list[str], table: dict[str, Any],
                first_release: bool = False) -> tuple[list[dict], list[dict]]:
    statuses = _ray_statuses(stage_dir)
    trials, history = [], []
    for trial_dir in sorted(p for p in stage_dir.iterdir() if p.is_dir() and (p / "params.json").exists()):
        folder_id = "_".join(trial_dir.name.rsplit("_", 2)[-2:])  # trial folders end in Ray's trial id
        try:
            params = json.loads((trial_dir / "params.json").read_text())
            params = {**params, **params.get("point", {})}  # an extension part's grid point
            results = trial_history(trial_dir)
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            skipped.append(str(trial_dir))
            statuses.pop(folder_id, None)  # skipped, not listed again as never started
            continue
        last = results[-1] if results else {}
        trial_id = last.get("trial_id") or folder_id
        ray_status, ray_error, _ = statuses.pop(trial_id, ("", "", {}))
        error_file = trial_dir / "error.txt"
        epochs_total = stage_epochs(stage, params.get("base", {}))
        metric = "valid_acc" if stage == "search" else "test_acc"
        accs = [r[metric] for r in results if isinstance(r.get(metric), (int, float))]
        epochs_done = max((int(r.get("epoch") or 0) for r in results if not r.get("diverged")), default=0)
        if last.get("diverged"):
            status, error = "diverged", last.get("error", "diverged")
        elif ray_status == "ERROR" or (not ray_status and error_file.exists()):
            status = "errored"
            error = _first_error_line(ray_error or (error_file.read_text() if error_file.exists() else ""))
        elif last.get("epoch") == epochs_total:  # every epoch reported (a killed driver's saved state lags)
            status, error = "finished", ""
        elif last.get("stop_reason"):  # a search that stopped itself (nas.train.search_stop_reason)
            status, error = "finished", f"stopped early: {last['stop_reason']}"
        elif ray_status == "TERMINATED":  # stopped early by the scheduler
            status, error = "finished", "stopped early by the scheduler"
        else:
            status, error = "unfinished", ""
        wall = sum(r.get("epoch_time_s", 0.0) or 0.0 for r in results)
        saved = max(epochs_total - epochs_done, 0) if last.get("stop_reason") else 0
        genotype = last.get("genotype_id")
        if genotype is None and isinstance(last.get("genotype"), dict):
            from nas.genotypes import Genotype

            genotype = Genotype.from_dict(last["genotype"], first_release).id
        genotype, op_set = genotype or params.get("genotype"), last.get("op_set", params.get("op_set"))
        trials.append({
            "stage": stage, "trial_id": trial_id, "status": status, "ray_status": ray_status,
            "op_set": op_set, "F": _ratio(last.get("F", params.get("F")), params.get("genotype"), table),
            "genotype_id": genotype, "cell": cell_label(genotype, op_set, last.get("cost_weight")),
            "cost_weight": _num(last.get("cost_weight", params.get("cost_weight"))),
            "layers": _num(last.get("layers", params.get("layers"))),
            "seed": _num(last.get("seed", params.get("seed"))), "epochs_done": epochs_done,
            "epochs_total": epochs_total, "final_acc": accs[-1] if accs else math.nan,
            "best_acc": max(accs) if accs else math.nan, "params_m": _num(last.get("params_m")),
            "gmac": _num(last.get("gmac")), "latency_ms": _num(last.get("latency_ms")),
            "throughput_img_s": _num(last.get("throughput_img_s")), "device": last.get("device", ""),
            "wall_time_s": wall, "error": error, "stop_reason": last.get("stop_reason") or "",
            "epochs_saved": saved, "hours_saved": saved * wall / max(epochs_done, 1) / 3600,
            "trial_dir": str(trial_dir),
        })
        for r in results:
            history.append({"stage": stage, "trial_id": trial_id, **{k: v for k, v in r.items()
                                                                     if isinstance(v, (int, float, str, type(None)))
                                                                     and k != "trial_id"}})
    for trial_id, (ray_status, _, config) in statuses.items():  # known to Ray, never started: no folder yet
        epochs_total = stage_epochs(stage, config.get("base", {}))
        trials.append({
            "stage": stage, "trial_id": trial_id, "status": "unfinished", "ray_status": ray_status,
            "op_set": config.get("op_set"), "F": _ratio(config.get("F"), config.get("genotype"), table),
            "genotype_id": config.get("genotype"),
            "cell": cell_label(config.get("genotype"), config.get("op_set")),
            "cost_weight": _num(config.get("cost_weight")), "layers": _num(config.get("layers")),
            "seed": _num(config.get("seed")), "epochs_done": 0,
            "epochs_total": epochs_total, "final_acc": math.nan, "best_acc": math.nan, "params_m": math.nan,
            "gmac": math.nan, "latency_ms": math.nan, "throughput_img_s": math.nan, "device": "",
            "wall_time_s": 0.0, "error": "", "trial_dir": "",
        })
    return trials, history


def _part_order(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1]) if "-" in path.name else 0


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _plugin_names(root: Path) -> None:
    """Make the op, preset and dataset names of the sweep's plugins known (their code where importable,
    else placeholders: tables and plots need the names only)."""
    from sweeps.spec import sweep_plugins

    try:
        raw = yaml.safe_load((root / "sweep.yaml").read_text())
        sweep_plugins(raw.get("plugins") if isinstance(raw, dict) else None, root, "optional")
    except (OSError, yaml.YAMLError, ConfigError):
        pass


def load_frames(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) frames of a sweep directory; corrupt trial files are skipped with one warning."""
    root = Path(sweep_dir).expanduser()
    # a stage's experiment, then an extended sweep's parts of it (eval-2, ...)
    stage_dirs = [(s, p) for s in ("search", "eval") for p in sorted(root.glob(f"{s}*"), key=_part_order)
                  if p.is_dir() and (p.name == s or p.name[len(s) + 1:].isdigit())]
    if not (root / "sweep.yaml").is_file() and not stage_dirs:
        raise ConfigError(f"{root} is not a sweep directory (no sweep.yaml, search/ or eval/)")
    _plugin_names(root)
    trials: list[dict] = []
    history: list[dict] = []
    skipped: list[str] = []
    table = eval_stage_table(root) if any(s == "eval" for s, _ in stage_dirs) else {}
    first_release = _first_release(root)
    for stage, path in stage_dirs:
        t, h = _stage_rows(stage, path, skipped, table, first_release)
        trials += t
        history += h
    if first_release:
        _rename_first_release(trials, history, table)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} trial(s) with corrupt or unreadable result files: "
                      f"{', '.join(Path(s).name for s in skipped)}", stacklevel=2)
    return pd.DataFrame(trials, columns=TRIAL_COLUMNS), pd.DataFrame(history)


def trials_frame(sweep_dir: str | Path) -> pd.DataFrame:
    return load_frames(sweep_dir)[0]


def history_frame(sweep_dir: str | Path) -> pd.DataFrame:
    return load_frames(sweep_dir)[1]
