"""Pareto fronts and hypervolume for (accuracy up, cost down), and accuracy-vs-layers curves."""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_mask(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """True where no other point has accuracy >= and cost <= with one of them strict.

    Exact ties (same accuracy and cost) dominate neither each other: both stay on the front.
    """
    acc, c = np.asarray(accuracy, float), np.asarray(cost, float)
    keep = np.ones(len(acc), bool)
    for i in range(len(acc)):
        better_or_equal = (acc >= acc[i]) & (c <= c[i])
        strictly = (acc > acc[i]) | (c < c[i])
        keep[i] = not np.any(better_or_equal & strictly)
    return keep


def hypervolume(accuracy: np.ndarray, cost: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by the points and bounded by ``reference`` = (accuracy_ref, cost_ref).

    Larger is better. Points with accuracy <= accuracy_ref or cost >= cost_ref add nothing.
    """
    acc_ref, cost_ref = reference
    acc, c = np.asarray(accuracy, float), np.asarray(cost, float)
    inside = (acc > acc_ref) & (c < cost_ref)
    acc, c = acc[inside], c[inside]
    if not len(acc):
        return 0.0
    front = pareto_mask(acc, c)
    order = np.lexsort((-acc[front], c[front]))  # by cost, then accuracy descending
    fa, fc = acc[front][order], c[front][order]
    area, best = 0.0, acc_ref
    edges = np.append(fc, cost_ref)
    for i in range(len(fc)):  # staircase: accuracy rises with cost along the front
        best = max(best, fa[i])
        area += (edges[i + 1] - edges[i]) * (best - acc_ref)
    return float(area)


def default_reference(cost: pd.Series) -> tuple[float, float]:
    """The stated reference point: 0 % accuracy and 1.1 x the largest cost seen."""
    return 0.0, float(cost.max()) * 1.1


NETWORK_KEYS = ["sweep", "genotype_id", "cell", "layers"]


def network_means(trials: pd.DataFrame, accuracy: str = "final_acc") -> pd.DataFrame:
    """One row per network (sweep, genotype, layers) over its finished eval trials: ``accuracy`` as the mean
    over seeds, ``acc_std`` (NaN for one seed), ``seeds`` (how many), costs (params, GMAC: the same for
    every seed; latency and throughput: medians) and ``trial_ids``. DARTS-space differences are often
    within seed noise: fronts and tables are made of these means, with the spread beside them."""
    done = trials[(trials.stage == "eval") & (trials.status == "finished")].dropna(subset=[accuracy])
    keys = [k for k in NETWORK_KEYS if k in done.columns]
    medians = {c: (c, "median") for c in ("latency_ms", "throughput_img_s", "ms_per_image") if c in done.columns}
    if done.empty:
        return pd.DataFrame(columns=[*keys, accuracy, "acc_std", "seeds", "params_m", "gmac", *medians, "trial_ids"])
    grouped = done.groupby(keys, dropna=False, as_index=False).agg(
        **{accuracy: (accuracy, "mean")}, acc_std=(accuracy, "std"), seeds=(accuracy, "size"),
        params_m=("params_m", "mean"), gmac=("gmac", "mean"), **medians,
        trial_ids=("trial_id", lambda ids: ";".join(sorted(map(str, ids)))))
    return grouped


def pareto_set(trials: pd.DataFrame, cost: str = "gmac", accuracy: str = "final_acc") -> pd.DataFrame:
    """Networks (:func:`network_means`: mean accuracy over seeds) on the (accuracy up, ``cost`` down) front,
    sorted by cost."""
    means = network_means(trials, accuracy).dropna(subset=[cost, accuracy])
    if means.empty:
        return means
    return means[pareto_mask(means[accuracy].to_numpy(), means[cost].to_numpy())].sort_values([cost, accuracy])


def ratio_curves(trials: pd.DataFrame, accuracy: str = "final_acc") -> pd.DataFrame:
    """Mean/std accuracy per (layers, F) over the finished eval trials at that F (cells and seeds); trials
    whose genotype ignores F (F NaN) are left out."""
    done = trials[(trials.stage == "eval") & (trials.status == "finished")].dropna(subset=["F", accuracy])
    grouped = done.groupby(["layers", "F"])[accuracy]
    return grouped.agg(acc_mean="mean", acc_std="std", n="size").reset_index()


def layer_curves(trials: pd.DataFrame, by: str = "genotype_id", accuracy: str = "final_acc") -> pd.DataFrame:
    """Mean/std accuracy per (``by``, layers) over seeds, finished eval trials only."""
    done = trials[(trials.stage == "eval") & (trials.status == "finished")]
    if done.empty:
        return pd.DataFrame(columns=[by, "layers", "acc_mean", "acc_std", "n", "params_m", "gmac"])
    grouped = done.groupby([by, "layers"])
    return grouped.agg(acc_mean=(accuracy, "mean"), acc_std=(accuracy, "std"), n=(accuracy, "size"),
                       params_m=("params_m", "mean"), gmac=("gmac", "mean")).reset_index()
