"""The paper's published Table 1, beside what a sweep measured.

Transcribed from Table 1 of "Pseudo-Inverted Bottleneck Convolution for DARTS Search Space" (ICASSP 2023,
arXiv 2301.01286), CIFAR-10, C = 36: test accuracy (%), parameters (M) and GMAC per genotype and evaluation
layer count. The rows here are the ones the reference copy in this project shows (DARTS_V2 at 20 and 10
layers, PIBConv at 10 and 5); the paper's rows for 2-8 and 15 layers are not in it and are left blank rather
than guessed (the measured side of those depths is still shown when a sweep trained them).
"""

from __future__ import annotations

import math

import pandas as pd

SOURCE = ("Table 1 of Pseudo-Inverted Bottleneck Convolution for DARTS Search Space (ICASSP 2023), CIFAR-10, "
          "C = 36; rows for 2-8 and 15 layers not transcribed")
# (genotype id, layers) -> (test acc %, params M, GMAC)
PAPER_TABLE1: dict[tuple[str, int], tuple[float, float, float]] = {
    ("DARTS_V2", 20): (97.24, 3.30, 0.547),
    ("DARTS_V2", 10): (96.72, 1.6, 0.265),
    ("PIBCONV", 10): (97.29, 3.02, 0.470),
    ("PIBCONV", 5): (96.65, 1.30, 0.218),
}


def beside_paper(means: pd.DataFrame, channels: int = 36) -> pd.DataFrame:
    """One row per published (genotype, layers), and one per other depth the sweep trained DARTS_V2 or
    PIBCONV at (paper columns blank there): the paper's figures, the measured ones and the differences.
    Params and GMAC are counted here for every row (``nas.complexity``, as the paper counted them), so
    the comparison is there before any training; accuracy comes from ``means`` (``network_means`` of the
    sweep's finished eval trials of that genotype and depth: mean ± std over its seeds, and how many), blank
    where the sweep did not train it."""
    from nas.complexity import complexity
    from nas.genotypes import GENOTYPES

    keys = set(PAPER_TABLE1)
    if len(means):
        keys |= {(g, int(n)) for g, n in zip(means.genotype_id, means.layers) if g in ("DARTS_V2", "PIBCONV")}
    rows = []
    for gid, layers in sorted(keys, key=lambda k: (k[0], -k[1])):
        acc, params, gmac = PAPER_TABLE1.get((gid, layers), (math.nan, math.nan, math.nan))
        cost = complexity(GENOTYPES[gid], layers, channels)
        trained = means[(means.genotype_id == gid) & (means.layers == layers)] if len(means) else means
        if len(trained) > 1:  # several sweeps merged: the one with the most seeds
            trained = trained.sort_values("seeds", ascending=False)
        got = trained.iloc[0] if len(trained) else None
        measured_acc = float(got.final_acc) if got is not None else math.nan
        rows.append({
            "Genotype": gid, "Eval. Layers": layers,
            "Paper acc (%)": acc, "Measured acc (%)": measured_acc,
            "± std": float(got.acc_std) if got is not None else math.nan,
            "Seeds": int(got.seeds) if got is not None else 0,
            "Δ acc": measured_acc - acc,
            "Paper params (M)": params, "Params (M)": round(cost.params_m, 3), "Δ params": round(cost.params_m - params, 3),
            "Paper GMAC": gmac, "GMAC": round(cost.gmac, 4), "Δ GMAC": round(cost.gmac - gmac, 4),
        })
    return pd.DataFrame(rows)
