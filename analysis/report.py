"""``dartsweep analyze``: from a sweep folder to plots, tables and an index page (nothing in it changes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import plots
from analysis.frames import eval_stage_table, load_frames
from analysis.paper import SOURCE, beside_paper
from analysis.pareto import default_reference, hypervolume, network_means, pareto_set
from nas.errors import ConfigError
from nas.genotypes import Genotype
from nas.io import write_text_atomic
from sweeps.spec import genotype_for_trial

TABLE1_COLUMNS = {"cell": "Genotype", "layers": "Eval. Layers", "final_acc": "Test Acc. (%)", "acc_std": "± std",
                  "seeds": "Seeds", "params_m": "Params (M)", "gmac": "GMAC"}


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(no rows)_\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return str(value)


def table1(trials: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 1 layout over finished eval trials: mean test accuracy over seeds, its standard
    deviation (blank for one seed) and the seed count."""
    means = network_means(trials)
    if means.empty:
        return pd.DataFrame(columns=list(TABLE1_COLUMNS.values()))
    latency = "latency_ms" in means and means.latency_ms.notna().any()
    grouped = means.sort_values(["cell", "layers"], ascending=[True, False])
    grouped["layers"] = grouped.layers.astype(int)
    columns = {**TABLE1_COLUMNS, **({"latency_ms": "Latency (ms)"} if latency else {})}
    return grouped[list(columns)].rename(columns=columns).reset_index(drop=True)


def load_sweeps(sweep_dirs: list[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, history) of one or more sweeps with a ``sweep`` column (the folder's name, or its path where
    two names clash). With several sweeps a network trained in two of them stays two trials, and its
    ``cell`` label says which sweep (``PIBCONV [f_sweep]``), so tables and plots never pool them."""
    dirs = [Path(d) for d in sweep_dirs]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    trials, history = [], []
    for d, name in zip(dirs, names):
        t, h = load_frames(d)
        t.insert(0, "sweep", name)
        h.insert(0, "sweep", name)
        t["sweep_dir"] = str(d)
        trials.append(t)
        history.append(h)
    trials_frame, history_frame = pd.concat(trials, ignore_index=True), pd.concat(history, ignore_index=True)
    if len(dirs) > 1:
        trials_frame["cell"] = trials_frame.cell.astype(str) + " [" + trials_frame.sweep + "]"
    return trials_frame, history_frame


# the cost a printed Pareto set is on: column, unit (all: lower is better)
PARETO_COSTS = {"gmac": ("gmac", "GMAC"), "params": ("params_m", "M params"), "latency": ("latency_ms", "ms"),
                "throughput": ("ms_per_image", "ms per image")}


def analyze(sweep_dir: str | Path | list[str | Path], out: str | Path | None = None,
            edge: int = 0, cost: str = "gmac") -> tuple[Path, str]:
    """Write plots (PNG+SVG), tables (CSV+Markdown) and index.md for one sweep, or several merged into one
    set (:func:`load_sweeps`; ``out`` is then required); return (out dir, summary), whose Pareto set is on
    ``cost`` (gmac, params, latency, throughput)."""
    if cost not in PARETO_COSTS:
        raise ConfigError(f"--cost: one of {', '.join(PARETO_COSTS)}, got {cost!r}")
    dirs = [Path(d) for d in (sweep_dir if isinstance(sweep_dir, (list, tuple)) else [sweep_dir])]
    if len(dirs) > 1 and out is None:
        raise ConfigError("analyze: several sweeps need --out (where the merged analysis goes)")
    trials, history = load_sweeps(dirs)
    trials["ms_per_image"] = 1e3 / trials.throughput_img_s  # throughput as a cost: lower is better
    has_latency = trials.latency_ms.notna().any()
    column = PARETO_COSTS[cost][0]
    if column not in ("gmac", "params_m") and not has_latency:
        raise ConfigError(f"--cost {cost}: no trial of these sweeps measured latency or throughput")
    out = Path(out) if out else dirs[0] / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    trials.drop(columns="sweep_dir").to_csv(out / "trials.csv", index=False)
    history.to_csv(out / "history.csv", index=False)
    t1 = table1(trials)
    t1.to_csv(out / "table1.csv", index=False)
    write_text_atomic(out / "table1.md", markdown_table(t1))
    paper = beside_paper(network_means(trials))
    paper.to_csv(out / "table1_vs_paper.csv", index=False)
    write_text_atomic(out / "table1_vs_paper.md", markdown_table(paper) + f"\nPaper figures: {SOURCE}.\n")
    stops = search_stops(trials)
    if len(stops):
        stops.to_csv(out / "search_stops.csv", index=False)
    fronts, figures = {}, []
    for name in ("gmac", "params_m") + (("latency_ms", "ms_per_image") if has_latency else ()):
        front = pareto_set(trials, name)  # on each network's mean over seeds
        cols = [c for c in ["sweep", "genotype_id", "cell", "layers", "final_acc", "acc_std", "seeds", "params_m",
                            "gmac", "latency_ms", "throughput_img_s", "trial_ids"] if c in front.columns]
        front[cols].to_csv(out / f"pareto_{name}.csv", index=False)
        write_text_atomic(out / f"pareto_{name}.md", markdown_table(front[cols]))
        done = network_means(trials).dropna(subset=[name])
        ref = default_reference(done[name]) if len(done) else (0.0, 0.0)
        hv = hypervolume(done.final_acc.to_numpy(), done[name].to_numpy(), ref) if len(done) else 0.0
        fronts[name] = (front, ref, hv)
        figures += plots.accuracy_vs_cost(trials, out, name)
    figures += plots.latency_vs_gmac(trials, out)
    figures += plots.accuracy_vs_layers(trials, out)
    figures += plots.accuracy_vs_ratio(trials, out)
    search = trials[trials.stage == "search"]
    if len(search):
        figures += plots.search_accuracy(history, trials, out)
        best = search.sort_values("best_acc", ascending=False).iloc[0]
        figures += plots.alpha_evolution(best.trial_dir, out, edge=edge)
    evals = trials[trials.stage == "eval"].dropna(subset=["genotype_id"])
    for d in dirs:
        table = eval_stage_table(d)
        mine = evals[evals.sweep_dir == str(d)]
        for gid in sorted(set(mine.genotype_id)):
            geno = _genotype(d, gid, mine, table)
            if geno is not None:
                for cell in ("normal", "reduce"):
                    figures += plots.draw_cell(geno, cell, out / "cells" / gid)
    summary = _summary(trials, fronts, column)
    title = ", ".join(d.name for d in dirs)
    index = ["# Sweep analysis: " + title, "", "```", summary, "```", "",
             "## Table 1 (mean over seeds)", "", markdown_table(t1),
             "## Table 1 beside the paper", "", markdown_table(paper), f"Paper figures: {SOURCE}.", "",
             *(["## Searches that stopped early", "", markdown_table(stops)] if len(stops) else []),
             "## Pareto set (accuracy vs GMAC, network means over seeds)", "",
             markdown_table(fronts[column][0][["cell", "layers", "final_acc", "acc_std", "seeds", "params_m",
                                               "gmac"]]),
             "## Figures", ""]
    index += [f"- [{p.relative_to(out)}]({p.relative_to(out)})" for p in dict.fromkeys(figures) if p.suffix == ".png"]
    index += ["", "Data: [trials.csv](trials.csv), [history.csv](history.csv), [table1.csv](table1.csv)"]
    write_text_atomic(out / "index.md", "\n".join(index) + "\n")
    return out, summary


def _genotype(sweep_dir: Path, gid: str, trials: pd.DataFrame, table: dict[str, Any]) -> Genotype | None:
    from nas.genotypes import GENOTYPES

    if gid in GENOTYPES:
        return GENOTYPES[gid]
    path = sweep_dir / "genotypes" / f"{gid}.json"
    if path.is_file():
        return Genotype.from_dict(json.loads(path.read_text())["genotype"])
    # a genotype file's cell or an F variant: rebuilt from the frozen sweep file, as its trials built it
    rows = trials[(trials.genotype_id == gid) & (trials.stage == "eval")]
    for trial_dir in rows.trial_dir:
        params = json.loads(Path(trial_dir, "params.json").read_text())
        if params.get("genotype") in table:
            return genotype_for_trial(table[params["genotype"]]["genotype"], params.get("F"))
    return None


def search_stops(trials: pd.DataFrame) -> pd.DataFrame:
    """Search trials that stopped themselves (``stop_when_stable`` / ``max_skip_connects``): where, why, and
    the epochs and hours (at the trial's own epoch time) not trained."""
    if "stop_reason" not in trials:
        return pd.DataFrame()
    stopped = trials[(trials.stage == "search") & (trials.stop_reason.fillna("") != "")]
    def whole(column: pd.Series) -> pd.Series:  # counts, as integers (pandas' nullable kind: no "0.0")
        return pd.to_numeric(column, errors="coerce").round().astype("Int64")

    return pd.DataFrame({"Op set": stopped.op_set, "Seed": whole(stopped.seed),
                         "Stop epoch": whole(stopped.epochs_done), "Epochs": whole(stopped.epochs_total),
                         "Reason": stopped.stop_reason, "Epochs saved": whole(stopped.epochs_saved),
                         "Hours saved": pd.to_numeric(stopped.hours_saved, errors="coerce").round(4)}
                        ).reset_index(drop=True)


def _summary(trials: pd.DataFrame, fronts: dict, column: str = "gmac") -> str:
    lines = []
    for stage in ("search", "eval"):
        sub = trials[trials.stage == stage]
        if len(sub):
            counts = ", ".join(f"{v} {k}" for k, v in sub.status.value_counts().items())
            lines.append(f"{stage}: {len(sub)} trials ({counts})")
    stops = search_stops(trials)
    if len(stops):
        lines.append(f"search: {len(stops)} trial(s) stopped early, {stops['Epochs saved'].sum()} epoch(s) and "
                     f"~{stops['Hours saved'].sum():.3g} h of training saved")
    front, ref, hv = fronts[column]
    unit = next(u for c, u in PARETO_COSTS.values() if c == column)
    lines.append(f"Pareto set (test acc up, {unit} down), hypervolume {hv:.4g} vs reference "
                 f"(acc {ref[0]:g} %, {ref[1]:.4g} {unit}):")
    for _, r in front.iterrows():
        extra = f"  {r[column]:.4g} {unit}" if column not in ("gmac", "params_m") else ""
        spread = f" ± {r.acc_std:.2f}" if r.acc_std == r.acc_std else ""
        lines.append(f"  {r.cell} L={int(r.layers)}: {r.final_acc:.2f}{spread} % ({int(r.seeds)} seed(s))  "
                     f"{r.gmac:.4g} GMAC  {r.params_m:.3g} M" + extra)
    if front.empty:
        lines.append("  (no finished eval trials yet)")
    return "\n".join(lines)
