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


def tensorboard_epochs(trial_dir: Path) -> list[int]:
    """The step of every ``ray/tune/epoch`` scalar in all of a trial's event files, in the order written
    (file by file: TensorBoard's own accumulator would hide a repeated step)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    steps = []
    for path in sorted(trial_dir.glob("events.out.tfevents.*"), key=lambda p: p.name.split(".")[3]):
        for event in LegacyEventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == "ray/tune/epoch"]
    return steps


def tensorboard_hparams(trial_dir: Path) -> tuple[dict, set[str]]:
    """A trial's HParams session as TensorBoard's HParams plugin reads it: (hyperparameters, metric tags)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(trial_dir))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    values = {}
    for name, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        values[name] = getattr(value, kind)
    return values, {m.name.tag for m in experiment.metric_infos}


@pytest.fixture(scope="module")
def module_ray():
    """A local Ray (2 CPUs) for a test module; use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
