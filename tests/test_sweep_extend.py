"""A finished sweep grows: only the new grid points train, cells from new search trials reach the eval
stage, and a change to how existing trials train is refused."""

import json
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_ray")]

ray = pytest.importorskip("ray")

from analysis.frames import load_frames  # noqa: E402
from nas.cli import main  # noqa: E402
from sweeps.driver import run_sweep  # noqa: E402
from sweeps.spec import parse_sweep  # noqa: E402
from tests.ray_helpers import module_ray, sweep_file  # noqa: E402,F401


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_extend_runs_only_new_points_and_new_cells(tmp_path, capsys):
    # pibconv at F 2 and 3 (folded into op set ids), PIBCONV at its own F: points whose configs hold F None
    raw = sweep_file(tmp_path, "grow", search={"op_sets": ["pibconv"], "F": [2.0, 3.0], "epochs": 1},
                     evaluation={"genotypes": ["searched", "PIBCONV"], "layers": [1], "epochs": 2})
    sweep = Path(run_sweep(parse_sweep(raw), storage=str(tmp_path), verbose=0))
    before, _ = load_frames(sweep)
    old_cells = set(before[(before.stage == "eval") & (before.genotype_id != "PIBCONV")].genotype_id)
    assert len(before) == 2 + len(old_cells) + 1 and (before.status == "finished").all()
    kept = {d: (Path(d) / "result.json").read_bytes() for d in before.trial_dir}

    more = sweep_file(tmp_path, "grow", search={"op_sets": ["darts"], "epochs": 1},
                      evaluation={"genotypes": ["searched", "PIBCONV", "DARTS_V2"], "layers": [1, 2], "epochs": 2})
    file = write(tmp_path / "more.yaml", more)
    assert main(["sweep", "extend", str(sweep), str(file), "--dry-run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # one new search trial (the old ones are not listed again); the known cells and PIBCONV at the new layer
    # count, DARTS_V2 at both; the new trial's cells to come
    assert [r["op_set"] for r in rows if r["stage"] == "search"] == ["darts"]
    evals = [r for r in rows if r["stage"] == "eval"]
    assert sorted((r["genotype"], r["layers"]) for r in evals[:-1]) == \
        sorted([(g, 2) for g in old_cells | {"PIBCONV"}] + [("DARTS_V2", 1), ("DARTS_V2", 2)])
    assert evals[-1]["genotype"] == "<cells of the 1 new search trial(s)>"

    bad = write(tmp_path / "bad.yaml", {**more, "eval": {**more["eval"], "epochs": 3}})
    assert main(["sweep", "extend", str(sweep), str(bad)]) == 2
    assert "eval.epochs: 2 in the sweep, 3 in" in capsys.readouterr().err

    assert main(["sweep", "extend", str(sweep), str(file), "--verbose", "0"]) == 0
    after, _ = load_frames(sweep)
    assert (after.status == "finished").all()
    assert {d: (Path(d) / "result.json").read_bytes() for d in before.trial_dir} == kept  # reused, untouched
    search = after[after.stage == "search"]
    assert sorted(search.op_set) == ["darts", "pibconv", "pibconv-F3"]
    cells = set(json.loads((sweep / "genotypes" / "index.json").read_text()))
    evals = after[after.stage == "eval"]
    assert {(g, int(n)) for g, n in zip(evals.genotype_id, evals.layers)} == \
        {(g, n) for g in cells | {"PIBCONV", "DARTS_V2"} for n in (1, 2)}
    assert len(evals) == 2 * (len(cells) + 2)  # each point once
    assert (sweep / "eval-2").is_dir() and (sweep / "search-2").is_dir()
    # a second extend with nothing new trains nothing
    assert main(["sweep", "extend", str(sweep), str(file), "--verbose", "0"]) == 0
    assert len(load_frames(sweep)[0]) == len(after)
