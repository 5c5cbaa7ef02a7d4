"""Device-hours before launch: one timing per distinct network (seeds share it), a step-time table for a
cluster's GPU, and the dry-run's report."""

import json
import subprocess
import sys

import pytest

from nas.errors import ConfigError
from sweeps.estimate import estimate, estimate_report, read_table, sweep_networks, time_networks, write_table
from sweeps.spec import parse_sweep
from tests.ray_helpers import sweep_file


def spec(tmp_path, gpu=0.0, seeds=(0, 1, 2)):
    raw = sweep_file(tmp_path, "cost", search={"op_sets": ["pibconv"], "F": [2.0, 3.0], "seeds": list(seeds),
                                               "epochs": 4},
                     evaluation={"genotypes": ["searched", "DARTS_V2"], "layers": [1, 2], "seeds": list(seeds),
                                 "epochs": 3})
    for stage in ("search", "eval"):
        raw[stage]["resources"] = {"cpu": 1, "gpu": gpu}
    return parse_sweep(raw)


def test_networks_are_distinct_and_count_every_trial(tmp_path):
    networks = sweep_networks(spec(tmp_path))
    search = [n for n in networks if n.kind == "search"]
    evals = [n for n in networks if n.kind == "eval"]
    assert len(search) == 2 and all(n.trials == 3 for n in search)  # F 2, 3; three seeds each
    # DARTS_V2 at 1, 2 layers (3 seeds) and a stand-in for the searched cells: 2 op sets x 3 seeds = 6 cells
    assert {n.label for n in evals if not n.stand_in} == {"DARTS_V2 L1", "DARTS_V2 L2"}
    assert sum(n.trials for n in evals if not n.stand_in) == 6
    assert sum(n.trials for n in evals if n.stand_in) == 6 * 2 * 3  # cells x layers x seeds
    assert len({n.key for n in networks}) == len(networks)


def test_report_measures_once_per_network_and_scales_with_epochs(tmp_path):
    s = spec(tmp_path, seeds=(0,))
    networks = time_networks(s)
    assert all(n.timing["step_s"] > 0 and n.timing["image_s"] >= 0 for n in networks)
    stages = estimate(s, networks)
    assert stages["search"]["unit"] == "core-hours" and stages["search"]["device_hours"] > 0
    # three times the seeds: three times the hours, from the same timings
    tripled = sweep_networks(spec(tmp_path, seeds=(0, 1, 2)))
    for n in tripled:
        n.timing = next(m.timing for m in networks if m.key == n.key)
    assert estimate(s, tripled)["search"]["device_hours"] == pytest.approx(3 * stages["search"]["device_hours"])
    lines = estimate_report(s)
    assert lines[0].startswith("search: 2 trial(s) on 2 distinct network(s), ~") and "core-hours" in lines[0]
    assert any(line.startswith("total: ~") for line in lines)
    assert "USR1" in lines[-1]  # the lead time a job script's warning signal needs


def test_gpu_trials_use_a_table_and_scale_missing_networks(tmp_path, monkeypatch):
    s = spec(tmp_path, gpu=0.25, seeds=(0,))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    lines = estimate_report(s)
    assert "unknown: this machine has no GPU" in lines[0] and "--step-times" in lines[0]
    # a table as `sweep steps` on a cluster GPU writes it (here: timed on CPU, standing in for one)
    networks = time_networks(s, device="cpu")
    from sweeps.estimate import _gmac

    for n in networks:
        n.gmac = _gmac(n)
    table = tmp_path / "steps.json"
    monkeypatch.setattr("sweeps.estimate.torch.cuda.get_device_name", lambda: "test GPU", raising=False)
    write_table(table, networks, "cpu")
    loaded = read_table(table)
    assert len(loaded["networks"]) == len(networks)
    lines = estimate_report(s, table=table)
    assert "GPU-hours" in lines[0] and "(step times from table)" in " ".join(lines)
    hours = estimate(s, time_networks(s, table=table))["search"]["device_hours"]
    assert hours == pytest.approx(estimate(s, networks)["search"]["device_hours"])  # the table's times, unchanged
    whole = spec(tmp_path, gpu=1.0, seeds=(0,))  # a whole GPU per trial: four times the GPU-hours
    assert estimate(whole, time_networks(whole, table=table))["search"]["device_hours"] == pytest.approx(4 * hours)
    dropped = json.loads(table.read_text())
    dropped["networks"].pop(next(k for k in dropped["networks"] if k.startswith("eval:")))
    table.write_text(json.dumps(dropped))
    assert "scaled by GMACs" in " ".join(estimate_report(s, table=table))


def test_bad_tables_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_table(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"networks": 3}')
    with pytest.raises(ConfigError, match="not a step-time table"):
        read_table(tmp_path / "bad.json")
    run = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", "quickstart", "--dry-run",
                          "--step-times", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert run.returncode == 2 and "--step-times: " in run.stderr.strip().splitlines()[-1]


def test_dry_run_counts_complexity_once_per_network(tmp_path, monkeypatch):
    import nas.complexity
    from sweeps.driver import trial_table

    calls = []
    real = nas.complexity.complexity
    monkeypatch.setattr(nas.complexity, "complexity", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    raw = sweep_file(tmp_path, "many", evaluation={"genotypes": ["DARTS_V2", "PIBCONV"], "layers": [1, 2, 3],
                                                   "F": [2.0, 3.0], "seeds": list(range(5))})
    rows = trial_table(parse_sweep(raw))
    # DARTS_V2 ignores F (one variant), PIBCONV at F 2 and 3: 3 networks x 3 depths, each seed sharing them
    assert len(rows) == 3 * 3 * 5 and len(calls) == 3 * 3
