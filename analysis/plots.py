"""The paper's figures from a sweep: accuracy vs layers (Fig. 3c), accuracy vs GMAC / params with the
Pareto front (Fig. 3b), alpha evolution (Fig. 3a), search accuracy vs epoch (Fig. 6), cells (Fig. 4)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.frames import trial_history  # noqa: E402
from analysis.pareto import layer_curves, network_means, pareto_mask, ratio_curves  # noqa: E402
from nas.genotypes import Genotype  # noqa: E402

FORMATS = ("png", "svg")


def _save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def place_labels(ax: plt.Axes, xs: np.ndarray, ys: np.ndarray, labels: list[str], fontsize: int = 7) -> list:
    """Label points without overlaps: each label takes the first of 8 offsets whose box is free."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken = []
    point_px = ax.transData.transform(np.column_stack([xs, ys]))
    for (px, py) in point_px:  # the markers themselves are taken
        taken.append((px - 3, py - 3, px + 3, py + 3))
    texts = []
    offsets = [(5, 5), (5, -11), (-5, 5), (-5, -11), (0, 9), (0, -15), (9, -3), (-9, -3), (12, 12), (-12, -18)]
    for x, y, label in zip(xs, ys, labels):
        for dx, dy in offsets:
            t = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            ha="left" if dx >= 0 else "right")
            bb = t.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            if not any(box[0] < o[2] and box[2] > o[0] and box[1] < o[3] and box[3] > o[1] for o in taken):
                taken.append(box)
                texts.append(t)
                break
            t.remove()
        else:  # nowhere free: skip the label rather than overlap (the point stays)
            continue
    return texts


def accuracy_vs_layers(trials: pd.DataFrame, out: Path, by: str = "cell") -> list[Path]:
    curves = layer_curves(trials, by)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, group in curves.groupby(by):
        group = group.sort_values("layers")
        ax.errorbar(group.layers, group.acc_mean, yerr=group.acc_std.fillna(0), marker="o", capsize=3, label=str(key))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layer counts: no 2.2, 2.4 ... ticks
    ax.set_xlabel("evaluation layers (cells)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs evaluation layers")
    ax.grid(alpha=0.3)
    if len(curves):
        ax.legend(title="genotype" if by == "cell" else by.replace("_", " "), fontsize=8)
    return _save(fig, out, "accuracy_vs_layers")


def accuracy_vs_ratio(trials: pd.DataFrame, out: Path) -> list[Path]:
    """Test accuracy vs bottleneck ratio F, one curve per layer count, each point the mean and std over the
    finished eval trials at that F (cells and seeds): an F sweep's result. Drawn only when they span two or
    more F values; genotypes whose ops ignore F (F blank) are left out."""
    curves = ratio_curves(trials)
    if curves.F.nunique() < 2:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for layers, group in curves.groupby("layers"):
        group = group.sort_values("F")
        ax.errorbar(group.F, group.acc_mean, yerr=group.acc_std.fillna(0), marker="o", capsize=3,
                    label=f"{int(layers)}")
    ax.set_xlabel("bottleneck ratio F (C_inv / C)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs bottleneck ratio (mean over cells and seeds at each F)")
    ax.grid(alpha=0.3)
    ax.legend(title="layers", fontsize=8)
    return _save(fig, out, "accuracy_vs_F")


def accuracy_vs_cost(trials: pd.DataFrame, out: Path, cost: str = "gmac") -> list[Path]:
    """Each network's mean test accuracy over its seeds (error bar: the standard deviation; each seed a faint
    dot), and the Pareto front of the means."""
    done = trials[(trials.stage == "eval") & (trials.status == "finished")].dropna(subset=[cost, "final_acc"])
    means = network_means(done).dropna(subset=[cost, "final_acc"])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, group in means.groupby("cell"):
        bars = ax.errorbar(group[cost], group.final_acc, yerr=group.acc_std.fillna(0), fmt="o", ms=4.5, capsize=3,
                           label=str(key), zorder=3)
        seeds = done[done.cell == key]
        if (group.seeds > 1).any():
            ax.scatter(seeds[cost], seeds.final_acc, s=8, alpha=0.35, color=bars[0].get_color(), zorder=2)
    if len(means):
        mask = pareto_mask(means.final_acc.to_numpy(), means[cost].to_numpy())
        front = means[mask].sort_values(cost)
        ax.step(front[cost], front.final_acc, where="post", color="k", lw=1, ls="--",
                label="Pareto front (means)", zorder=2)
        ax.legend(fontsize=8)
        place_labels(ax, means[cost].to_numpy(), means.final_acc.to_numpy(), [f"{int(n)}" for n in means.layers])
    unit, title, stem = COSTS[cost]
    ax.set_xlabel(unit)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"Accuracy vs {title} (labels: layers)")
    ax.grid(alpha=0.3)
    return _save(fig, out, f"accuracy_vs_{stem}")


# cost column -> (axis label, title, file stem)
COSTS = {"gmac": ("GMAC (multiply-accumulates x 1e9 per image)", "GMAC", "gmac"),
         "params_m": ("parameters (millions)", "parameters", "params"),
         "latency_ms": ("latency at batch 1 (ms, measured on each trial's device)", "latency", "latency"),
         "ms_per_image": ("ms per image at the training batch size (1 / throughput)", "throughput", "throughput")}


def latency_vs_gmac(trials: pd.DataFrame, out: Path) -> list[Path]:
    """Measured latency against GMACs for every eval trial that measured it: how far the two disagree."""
    done = trials[trials.stage == "eval"].dropna(subset=["latency_ms", "gmac"])
    if done.empty:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, group in done.groupby("cell"):
        ax.scatter(group.gmac, group.latency_ms, label=str(key), s=22)
    ax.set_xlabel("GMAC per image")
    ax.set_ylabel("latency at batch 1 (ms)")
    ax.set_title("Latency vs GMAC (each trial on its own device)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out, "latency_vs_gmac")


def read_search_history(trial_dir: str | Path) -> list[dict[str, Any]]:
    """The search epochs that reported architecture weights, in order."""
    return [r for r in trial_history(trial_dir) if "alpha_normal" in r]


def alpha_evolution(trial_dir: str | Path, out: Path, edge: int = 0, cell: str = "normal") -> list[Path]:
    """softmax(alpha) of one edge over the search epochs, one line per op (Fig. 3a)."""
    history = read_search_history(trial_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    if history:
        weights = np.array([h[f"alpha_{cell}"][edge] for h in history])
        epochs = [h["epoch"] for h in history]
        for i, op in enumerate(history[-1]["primitives"]):
            ax.plot(epochs, weights[:, i], label=op, marker="." if len(epochs) < 30 else None)
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("search epoch")
    ax.set_ylabel("softmax(alpha)")
    ax.set_title(f"Architecture weights, {cell} cell, edge {edge}")
    ax.grid(alpha=0.3)
    return _save(fig, out, f"alpha_{cell}_edge{edge}")


def search_accuracy(history: pd.DataFrame, trials: pd.DataFrame, out: Path) -> list[Path]:
    """Search valid accuracy (top-1 %) vs epoch per search trial (Fig. 6)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    search = history[history.stage == "search"] if len(history) else history
    names = trials.set_index("trial_id").op_set.to_dict() if len(trials) else {}
    for trial_id, group in (search.groupby("trial_id") if len(search) else []):
        group = group.sort_values("epoch")
        ax.plot(group.epoch, group.valid_acc, marker=".", label=f"{names.get(trial_id, '')} ({trial_id})")
    if len(search):
        ax.legend(fontsize=7)
    ax.set_xlabel("search epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Search phase: validation accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, out, "search_accuracy")


def _cell_edges(genotype: Genotype, cell: str) -> tuple[list[tuple[str, str, str]], list[str], tuple[int, ...]]:
    edges_raw = genotype.normal if cell == "normal" else genotype.reduce
    concat = genotype.normal_concat if cell == "normal" else genotype.reduce_concat
    names = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(len(edges_raw) // 2)]
    edges = [(names[src], names[2 + i // 2], op) for i, (op, src) in enumerate(edges_raw)]
    return edges, names, concat


def draw_cell(genotype: Genotype, cell: str, out: Path) -> list[Path]:
    """The cell as a graph (Fig. 4): graphviz's dot when installed, else a matplotlib drawing."""
    edges, names, concat = _cell_edges(genotype, cell)
    stem = f"cell_{cell}"
    if shutil.which("dot"):
        lines = ["digraph G {", "rankdir=LR;", 'node [shape=box, style="rounded,filled", fillcolor=lightblue];']
        lines += [f'"{a}" -> "{b}" [label="{op}"];' for a, b, op in edges]
        lines += [f'"{names[c]}" -> "c_{{k}}";' for c in concat]
        lines.append("}")
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for fmt in FORMATS:
            path = out / f"{stem}.{fmt}"
            subprocess.run(["dot", f"-T{fmt}", "-o", str(path)], input="\n".join(lines), text=True, check=True)
            paths.append(path)
        return paths
    n = len(names) - 2
    pos = {"c_{k-2}": (0.0, 0.75), "c_{k-1}": (0.0, 0.25), "c_{k}": (n + 1.5, 0.5)}
    for i in range(n):
        pos[str(i)] = (i + 1.0, 0.9 - 0.8 * i / max(n - 1, 1))
    fig, ax = plt.subplots(figsize=(2.2 * (n + 2), 4))
    for a, b, op in edges:
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="0.4", shrinkA=14, shrinkB=14,
                                                            connectionstyle="arc3,rad=0.12"))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.03, op, fontsize=7, ha="center", color="darkred",
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    for c in concat:
        (x0, y0), (x1, y1) = pos[names[c]], pos["c_{k}"]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="0.75", shrinkA=14, shrinkB=14))
    for name, (x, y) in pos.items():
        ax.text(x, y, f"${name}$" if name.startswith("c_") else name, ha="center", va="center", fontsize=10,
                bbox=dict(boxstyle="round", fc="lightblue" if not name.startswith("c_") else "lightgreen"))
    ax.set_xlim(-0.5, n + 2)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(f"{genotype.id}: {cell} cell")
    return _save(fig, out, stem)
