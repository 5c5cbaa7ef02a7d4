"""Shared pieces of the real-Ray tests."""

import copy
import json
from pathlib import Path

import pytest

TINY_EVAL = {"channels": 4, "batch_size": 64, "lr": 0.05, "max_steps_per_epoch": 3}
TINY_SEARCH = {"channels": 4, "layers": 3, "nodes": 2, "batch_size": 32, "order": 1, "max_steps_per_epoch": 3}


def sweep_file(tmp_path: Path, name: str, search: dict | None = None, evaluation: dict | None = None,
               max_failures: int = 1) -> dict:
    raw = {"name": name, "dataset": "digits", "failure": {"max_failures": max_failures}}
    if search is not None:
        raw["search"] = {**TINY_SEARCH, "resources": {"cpu": 1}, **search}
    if evaluation is not None:
        raw["eval"] = {**TINY_EVAL, "resources": {"cpu": 1}, **evaluation}
    return copy.deepcopy(raw)


def epochs_of(trial_dir: Path) -> list[int]:
    """Epochs in a trial's result.json, in order; a last line Ray is still writing is not there yet (any
    other unreadable line fails the test)."""
    text = (trial_dir / "result.json").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return [json.loads(line)["epoch"] for line in lines]


@pytest.fixture(scope="module")
def module_ray():
    """A local Ray (2 CPUs) for a test module; use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
