"""``cuda_graphs``: the switch's validation, its no-op on CPU, re-capture per key and the fallback when a
capture fails (CPU, with the graph calls stood in for); the captured step itself on a GPU (skipped here)."""

import subprocess
import sys
import warnings

import pytest
import torch

from nas.config import EvalConfig, SearchConfig, config_from_mapping
from nas.errors import ConfigError
from nas.graphs import GraphedStep
from nas.train import run_eval, run_search

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def search_config(**kw):
    return SearchConfig(**{"op_set": "pibconv", "dataset": "digits", "channels": 4, "layers": 3, "nodes": 2,
                           "batch_size": 16, "epochs": 2, "max_steps_per_epoch": 4, "order": 2, **kw})


def eval_config(**kw):
    return EvalConfig(**{"genotype": "PIBCONV", "dataset": "digits", "channels": 8, "layers": 3, "epochs": 2,
                         "batch_size": 32, "max_steps_per_epoch": 4, **kw})


def test_the_switch_is_a_boolean_in_both_configs():
    assert config_from_mapping(SearchConfig, {"cuda_graphs": True}).cuda_graphs is True
    assert config_from_mapping(EvalConfig, {"cuda_graphs": False}).cuda_graphs is False
    for cls in (SearchConfig, EvalConfig):
        with pytest.raises(ConfigError, match="cuda_graphs must be true or false"):
            config_from_mapping(cls, {"cuda_graphs": "yes"})


def test_a_sweep_file_with_a_bad_switch_exits_2_before_any_work(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: g\ndataset: digits\nsearch:\n  op_sets: [pibconv]\n  cuda_graphs: 1\n")
    out = subprocess.run([sys.executable, "-m", "nas.cli", "sweep", "run", str(sweep), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "cuda_graphs" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("phase", ["search", "eval"])
def test_on_cpu_the_switch_warns_once_and_changes_nothing(digits, phase):
    runs = {}
    for graphs in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if phase == "search":
                runs[graphs] = run_search(search_config(cuda_graphs=graphs), data=digits).history
            else:
                runs[graphs] = run_eval(eval_config(cuda_graphs=graphs), data=digits).history
        ours = [w for w in caught if "cuda_graphs" in str(w.message)]
        assert len(ours) == (1 if graphs else 0)
    keys = ["train_loss", "train_acc", "valid_loss" if phase == "search" else "test_loss"]
    assert [[h[k] for k in keys] for h in runs[True]] == [[h[k] for k in keys] for h in runs[False]]


class StandInGraph(GraphedStep):
    """GraphedStep's logic with the CUDA calls stood in for: warm-up runs the step, capture records the
    static inputs and which step it captured, replay reruns that step on the static inputs."""

    def __init__(self, step, fail=False, **kw):
        super().__init__(step, torch.device("cuda"), **kw)
        self.fail, self.captures = fail, 0

    def _warm(self, inputs):
        return self.step(*inputs)

    def _capture(self, inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.captures += 1
        self.static_inputs = [t.clone() for t in inputs]
        self.graph, self.static_outputs = object(), None

    def _replay(self):
        self.static_outputs = self.step(*self.static_inputs)


def test_steps_are_captured_after_warm_up_and_recaptured_for_a_new_key():
    seen = []
    graphed = StandInGraph(lambda x: seen.append(x.clone()) or (x * 2,), warmup=2)
    for i in range(5):
        (out,) = graphed(0.1, torch.tensor([float(i)]))
        assert out.item() == 2 * i  # every call computes on its own input, captured or not
    assert graphed.captures == 1
    graphed(0.05, torch.tensor([7.0]))  # a new learning rate: warm up again, then capture again
    graphed(0.05, torch.tensor([8.0]))
    assert graphed.captures == 1
    (out,) = graphed(0.05, torch.tensor([9.0]))
    assert graphed.captures == 2 and out.item() == 18.0
    assert [t.item() for t in seen] == [0, 1, 2, 3, 4, 7, 8, 9]


def test_a_failed_capture_falls_back_with_one_warning():
    graphed = StandInGraph(lambda x: (x + 1,), fail=True, warmup=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [graphed(0, torch.tensor([float(i)]))[0].item() for i in range(4)]
    assert results == [1.0, 2.0, 3.0, 4.0]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "capturing the step failed (RuntimeError: operation not permitted" in messages[0]
    assert "more detail" not in messages[0] and not graphed.enabled


@needs_cuda
@pytest.mark.parametrize("phase", ["search", "eval"])
def test_captured_steps_train_like_uncaptured_ones(digits, phase):
    runs = {}
    for graphs in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would warn: the graph must really be captured
            if phase == "search":
                runs[graphs] = run_search(search_config(cuda_graphs=graphs, epochs=2, max_steps_per_epoch=6),
                                          data=digits, device="cuda").history
            else:
                runs[graphs] = run_eval(eval_config(cuda_graphs=graphs, max_steps_per_epoch=6), data=digits,
                                        device="cuda").history
    for a, b in zip(runs[True], runs[False]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
