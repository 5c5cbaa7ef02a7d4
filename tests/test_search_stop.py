"""A search that stops when it has settled (genotype unchanged K epochs) or collapsed (more than N
skip_connects in the normal cell, DARTS+), each off by default, and never otherwise."""

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from nas.config import SearchConfig
from nas.errors import ConfigError
from nas.genotypes import DARTS_V2, PIBCONV
from nas.train import run_search, search_stop_reason
from tests.ray_helpers import sweep_file

SKIPS_ONLY = {"primitives": ["none", "skip_connect"]}  # every derived edge is a skip_connect
TINY = dict(dataset="digits", channels=4, layers=3, nodes=2, batch_size=32, order=1, max_steps_per_epoch=2)


def history(genotypes):
    return [{"epoch": i + 1, "genotype": g.to_dict()} for i, g in enumerate(genotypes)]


def test_stop_reason_fires_exactly_when_it_should():
    cfg = SearchConfig(**TINY, epochs=50, stop_when_stable=3, stop_min_epochs=5)
    same = [DARTS_V2] * 4
    assert search_stop_reason(cfg, history(same)) is None  # 3 epochs unchanged, but before epoch 5
    assert search_stop_reason(cfg, history([PIBCONV] * 2 + same[:3])) is None  # epoch 5: unchanged for 2 only
    reason = search_stop_reason(cfg, history([PIBCONV] + same))
    assert reason == "settled: genotype unchanged for 3 epochs at epoch 5"
    assert search_stop_reason(cfg, history([PIBCONV] * 5 + [DARTS_V2])) is None  # just changed
    off = SearchConfig(**TINY, epochs=50)
    assert search_stop_reason(off, history([DARTS_V2] * 40)) is None  # off by default
    at_end = SearchConfig(**TINY, epochs=6, stop_when_stable=3, stop_min_epochs=5)
    assert search_stop_reason(at_end, history([PIBCONV, PIBCONV] + same)) is None  # the last epoch: no early stop
    assert search_stop_reason(cfg, history([PIBCONV, PIBCONV] + same)) is not None

    skips = sum(op == "skip_connect" for op, _ in DARTS_V2.normal)  # DARTS_V2's normal cell has 3
    collapse = SearchConfig(**TINY, epochs=50, max_skip_connects=skips - 1, stop_min_epochs=1)
    assert search_stop_reason(collapse, history([DARTS_V2])).startswith(f"collapsed: {skips} skip_connects")
    assert search_stop_reason(replace_n(collapse, skips), history([DARTS_V2])) is None  # N itself is allowed


def replace_n(cfg, n):
    import dataclasses

    return dataclasses.replace(cfg, max_skip_connects=n)


@pytest.mark.parametrize("field,value", [("stop_when_stable", 0), ("max_skip_connects", -1),
                                         ("stop_min_epochs", -2), ("stop_when_stable", 1.5)])
def test_bad_stop_settings(field, value):
    with pytest.raises(ConfigError, match=field):
        SearchConfig(**TINY, **{field: value})


def test_digits_search_stops_on_each_criterion_and_runs_on_without():
    collapsed = run_search(SearchConfig(**TINY, op_set=SKIPS_ONLY, epochs=6, max_skip_connects=3, stop_min_epochs=2))
    assert len(collapsed.history) == 2 and collapsed.history[-1]["collapsed"] is True
    assert collapsed.history[-1]["stop_reason"].startswith("collapsed: 4 skip_connects")
    # alphas all but frozen (arch_lr 1e-9): the derived genotype cannot change
    settled = run_search(SearchConfig(**TINY, op_set=SKIPS_ONLY, epochs=6, stop_when_stable=2, stop_min_epochs=1,
                                      arch_lr=1e-9))
    assert [h["epoch"] for h in settled.history] == [1, 2, 3] and settled.history[-1]["collapsed"] is False
    assert settled.genotype.to_dict() == settled.history[-1]["genotype"]  # the genotype at the stop
    never = run_search(SearchConfig(**TINY, op_set=SKIPS_ONLY, epochs=4, max_skip_connects=4, stop_when_stable=4,
                                    stop_min_epochs=1))
    assert len(never.history) == 4 and not any("stop_reason" in h for h in never.history)


@pytest.mark.slow
def test_sweep_reports_stops_evaluates_the_stop_genotype_and_analyze_shows_savings(tmp_path):
    # the skip-only op set collapses at once (4 skip_connects > 3); pibconv's alphas are all but frozen
    # (arch_lr 1e-9) so its genotype settles: unchanged for 2 epochs at epoch 3
    raw = sweep_file(tmp_path, "stops", search={"op_sets": [SKIPS_ONLY, "pibconv"], "seeds": [0], "epochs": 8,
                                                "stop_when_stable": 2, "max_skip_connects": 3, "stop_min_epochs": 2,
                                                "arch_lr": 1e-9},
                     evaluation={"genotypes": ["searched"], "layers": [1], "seeds": [0], "epochs": 1})
    file = tmp_path / "stops.yaml"
    file.write_text(yaml.safe_dump(raw))
    run = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "up", str(file), "--storage", str(tmp_path),
                          "--verbose", "0"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    analyze = subprocess.run([sys.executable, "-m", "nas.cli", "analyze", str(tmp_path / "stops")],
                             capture_output=True, text=True, timeout=300)
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "stops" / "analysis" / "trials.csv")
    search = trials[trials.stage == "search"]
    stopped = search[search.stop_reason.fillna("") != ""]
    assert len(stopped) == 2 and (stopped.status == "finished").all()
    skips = stopped[stopped.op_set.str.startswith("custom-")].iloc[0]
    assert skips.epochs_done == 2 and skips.epochs_saved == 6 and skips.hours_saved > 0
    assert skips.stop_reason.startswith("collapsed: 4 skip_connects")
    pib = stopped[stopped.op_set == "pibconv"].iloc[0]
    assert pib.epochs_done == 3 and pib.stop_reason.startswith("settled")
    stops = pd.read_csv(tmp_path / "stops" / "analysis" / "search_stops.csv")
    import csv

    with open(tmp_path / "stops" / "analysis" / "search_stops.csv") as fh:
        for row in csv.DictReader(fh):  # whole numbers as such, hours to 4 decimals (not "0.0", 17 digits)
            assert all(row[k].isdigit() for k in ("Seed", "Stop epoch", "Epochs", "Epochs saved")), row
            assert len(row["Hours saved"].split(".")[-1]) <= 4 and float(row["Hours saved"]) >= 0, row
    assert (stops["Stop epoch"] < stops["Epochs"]).all() and "stopped early" in \
        (tmp_path / "stops" / "analysis" / "index.md").read_text().lower()
    evals = trials[trials.stage == "eval"]
    assert (evals.status == "finished").all() and len(evals) == len(search)  # each search's cell evaluated
    assert set(evals.genotype_id) == set(search.genotype_id)  # as derived at the stop epoch
