"""Sweep file validation and dry runs: no Ray is started."""

import json
import subprocess
import sys

import pytest
import yaml

from nas.errors import ConfigError
from nas.genotypes import Genotype
from sweeps.driver import plan_summary, trial_table
from sweeps.spec import builtin_sweeps, load_sweep, parse_sweep

BASE = {"name": "t", "dataset": "digits",
        "search": {"op_sets": ["pibconv"], "F": [2.0, 3.0], "epochs": 1, "channels": 4, "layers": 3, "nodes": 2},
        "eval": {"genotypes": ["searched", "DARTS_V2"], "layers": [2, 3], "epochs": 1, "channels": 4}}


def with_(path, value):
    raw = json.loads(json.dumps(BASE))
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize("path,value,message", [
    ("search.epocs", 3, "search: unknown key(s) 'epocs'"),
    ("evl", {}, "unknown top-level key(s) 'evl'"),
    ("search.op_sets", ["pibconv", "nope"], "search.op_sets[1]: unknown op set 'nope'"),
    ("search.op_sets", [{"primitives": ["none", "sep_conv_9x9"]}], "unknown primitive 'sep_conv_9x9'"),
    ("search.F", [2.0, 0], "search.F: bottleneck ratio F must be a positive number, got 0"),
    ("eval.F", [-1], "eval.F: bottleneck ratio F must be a positive number"),
    ("eval.layers", [2, 0], "eval.layers: every layer count must be an integer >= 1, got 0"),
    ("eval.layers", [], "eval.layers: is an empty list"),
    ("search.seeds", [], "search.seeds: is an empty list"),
    ("eval.genotypes", ["NOPE"], "eval.genotypes[0]: genotype 'NOPE' is neither a built-in"),
    ("dataset", "imagenet", "dataset: unknown dataset 'imagenet'"),
    ("search.order", 3, "search: order must be 1 or 2, got 3"),
    ("eval.resources", {"gpu": -1}, "eval.resources.gpu: must be a number >= 0"),
    ("eval.search_alg", {"type": "bayes"}, "eval.search_alg.type: unknown search algorithm 'bayes'"),
    ("eval.layers", {"min": 2, "max": 5}, "a {min, max} range needs search_alg random or optuna"),
    ("eval.scheduler", {"type": "pbt"}, "unknown scheduler 'pbt'"),
    ("name", "a/b", "name: must be a folder name"),
    ("failure", {"max_failure": 1}, "failure: only 'max_failures' is allowed"),
])
def test_broken_sweep_files(path, value, message):
    with pytest.raises(ConfigError) as err:
        parse_sweep(with_(path, value))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_searched_needs_search_stage():
    raw = with_("search", KeyError)
    with pytest.raises(ConfigError, match="'searched' needs a search stage"):
        parse_sweep(raw)


def test_multi_objective_optuna_refuses_asha():
    raw = with_("eval.search_alg", {"type": "optuna", "num_samples": 4, "metric": ["test_acc", "gmac"],
                                    "mode": ["max", "min"]})
    raw["eval"]["scheduler"] = {"type": "asha"}
    with pytest.raises(ConfigError, match="multi-objective"):
        parse_sweep(raw)


def test_dry_run_table_prices_every_eval_trial():
    spec = parse_sweep(with_("eval.genotypes", ["DARTS_V2", "PIBCONV"]))
    rows = trial_table(spec)
    search = [r for r in rows if r["stage"] == "search"]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert [(r["op_set"], r["F"]) for r in search] == [("pibconv", 2.0), ("pibconv-F3", 3.0)]
    assert {(r["genotype"], r["layers"]) for r in evals} == {(g, n) for g in ("DARTS_V2", "PIBCONV") for n in (2, 3)}
    pib = {r["layers"]: r for r in evals if r["genotype"] == "PIBCONV"}
    assert pib[3]["params_m"] > pib[2]["params_m"] > 0 and pib[3]["gmac"] > pib[2]["gmac"] > 0


def test_plan_summary_counts_what_each_stage_will_run():
    spec = parse_sweep(with_("eval.seeds", [0, 1]))  # 2 searches; eval: (searched cells + DARTS_V2) x 2 layers x 2 seeds
    assert plan_summary(spec, trial_table(spec)) == \
        "2 search trial(s), 4 eval trial(s) + up to 8 on the searched cells (4 per cell, up to 2 cells)"
    raw = with_("eval.search_alg", {"type": "random", "num_samples": 5})
    del raw["search"]
    raw["eval"]["genotypes"] = ["PIBCONV"]
    assert plan_summary(parse_sweep(raw), trial_table(parse_sweep(raw))) == \
        "0 search trial(s), 5 eval trial(s) sampled by random"


def test_eval_F_list_trains_genotypes_that_ignore_F_once():
    """genotypes x F would train DARTS_V2 (no op that uses F) once per F, the same network each time."""
    from ray.tune.search.variant_generator import generate_variants

    from sweeps.driver import _param_space, eval_genotypes
    from sweeps.spec import eval_table
    from sweeps.trainables import eval_trial_config

    raw = with_("eval.genotypes", ["DARTS_V2", "PIBCONV"])
    del raw["search"]
    raw["eval"].update(F=[2.0, 3.0], layers=[1, 2], seeds=[0])
    spec = parse_sweep(raw)
    rows = trial_table(spec)
    assert sorted((r["genotype"], r["F"], r["layers"]) for r in rows) == sorted(
        [("DARTS_V2", None, n) for n in (1, 2)] + [(g, f, n) for g, f in (("PIBCONV", 2.0), ("PIBCONV-F3", 3.0))
                                                   for n in (1, 2)])
    assert plan_summary(spec, rows) == "0 search trial(s), 6 eval trial(s)"
    # what Ray's grid expands to, and what each trial then trains
    genotypes = eval_genotypes(spec, {})
    configs = [c for _, c in generate_variants(_param_space(spec.eval, genotypes))]
    trained = [eval_trial_config(c, eval_table(spec.eval, genotypes))[1] for c in configs]
    got = sorted((t["genotype_id"], t["F"], t["layers"], t["op_set"]) for t in trained)
    assert got == sorted([("DARTS_V2", None, n, "darts") for n in (1, 2)]
                         + [(g, f, n, o) for g, f, o in (("PIBCONV", 2.0, "pibconv"), ("PIBCONV-F3", 3.0, "pibconv-F3"))
                            for n in (1, 2)])
    pib3 = [t for t in trained if t["genotype_id"] == "PIBCONV-F3"]
    assert pib3[0]["params_m"] > [t for t in trained if t["genotype_id"] == "PIBCONV" and t["layers"] == 1][0]["params_m"]
    # a searched cell (a hash id) gets a variant per other F, named after it; the search's op set no longer
    # describes the variant, so its trials name their own
    from nas.genotypes import PIBCONV
    from sweeps.spec import fold_ratios

    cell = {**PIBCONV.to_dict(), "name": None}
    gid = Genotype.from_dict(cell).id
    folded = fold_ratios(spec.eval, {gid: {"genotype": cell, "op_set": "pibconv", "F": 2.0, "source_trial": "x"}})
    assert list(folded) == [gid, f"{gid}-F3"] and folded[gid]["op_set"] == "pibconv"
    variant = folded[f"{gid}-F3"]
    assert Genotype.from_dict(variant["genotype"]).options.bottleneck_ratio == 3.0 and "op_set" not in variant
    assert variant["variant_of"] == gid and variant["source_trial"] == "x"
    # a sampler draws F for every trial: nothing to fold there
    raw["eval"]["search_alg"] = {"type": "random", "num_samples": 3}
    sampled = parse_sweep(raw)
    space = _param_space(sampled.eval, eval_genotypes(sampled, {}))
    assert space["F"] is not None and eval_table(sampled.eval, eval_genotypes(sampled, {})).keys() == {"DARTS_V2", "PIBCONV"}


def test_op_sets_that_ignore_F_are_not_duplicated():
    spec = parse_sweep(with_("search.op_sets", ["darts", "pibconv"]))
    assert list(spec.search.axes["op_sets"]) == ["darts", "pibconv", "pibconv-F3"]


@pytest.mark.parametrize("name", ["quickstart", "paper_table1", "roadmap", "f_sweep", "optuna_pareto"])
def test_builtin_definitions_validate(name):
    assert name in builtin_sweeps()
    spec = load_sweep(name)
    assert spec.name == name


def test_paper_table1_dry_run_matches_paper_shapes():
    rows = [r for r in trial_table(load_sweep("paper_table1")) if r["stage"] == "eval"]
    got = {(r["genotype"], r["layers"]): r for r in rows}
    assert len(rows) == 20
    assert got[("DARTS_V2", 20)]["params_m"] == pytest.approx(3.30, rel=0.025)
    assert got[("PIBCONV", 10)]["gmac"] == pytest.approx(0.470, rel=0.04)


def test_cli_dry_run_and_bad_file(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text(yaml.safe_dump(with_("eval.genotypes", ["PIBCONV"])))
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", str(good), "--dry-run", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sum(r["stage"] == "eval" for r in rows) == 2
    data_line, plan_line, *cost_lines = proc.stderr.strip().splitlines()
    assert any(line.startswith("t: total: ~") and "core-hours" in line for line in cost_lines), cost_lines
    assert data_line.startswith("t: data: digits from scikit-learn's bundled copy, loaded once by the driver")
    assert plan_line == "t: 2 search trial(s), 2 eval trial(s); nothing launched"
    assert not (tmp_path / "results").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_("search.F", [0])))
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "search.F" in proc.stderr and "Traceback" not in proc.stderr
    bad.write_text("name: [unclosed")
    proc = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


def test_yaml_is_never_evaluated(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    with pytest.raises(ConfigError):
        load_sweep(evil)
    assert not (tmp_path / "pwned").exists()
