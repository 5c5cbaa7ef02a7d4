"""Measured latency: the median and spread of at least 20 timed passes per batch size, in eval mode."""

import json
import subprocess
import sys

import pytest
import torch

from nas.errors import ConfigError
from nas.eval_network import EvalNetwork
from nas.genotypes import DARTS_V2
from nas.latency import measure_latency


def test_measure_latency_reports_each_batch_and_restores_the_mode():
    model = EvalNetwork(DARTS_V2, 4, 2, 10, 3, auxiliary=False).train()
    result = measure_latency(model, (3, 16, 16), "cpu", (1, 8), repeats=20, warmup=1)
    assert set(result["batches"]) == {1, 8} and model.training  # measured in eval mode, then put back
    for r in result["batches"].values():
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["iqr_ms"] >= 0 and r["repeats"] == 20
    assert result["latency_ms"] == result["batches"][1]["median_ms"]
    assert result["throughput_img_s"] == pytest.approx(8 / (result["batches"][8]["median_ms"] / 1e3))
    assert result["device"].startswith("cpu") and result["threads"] == torch.get_num_threads()
    with pytest.raises(ConfigError, match="at least 20"):
        measure_latency(model, (3, 16, 16), repeats=5)


def test_latency_cli():
    out = subprocess.run([sys.executable, "-m", "nas.cli", "latency", "--genotype", "PIBCONV", "--layers", "2",
                          "--channels", "8", "--batch", "1,4", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["genotype"] == "PIBCONV" and set(data["batches"]) == {"1", "4"} and data["latency_ms"] > 0
    bad = subprocess.run([sys.executable, "-m", "nas.cli", "latency", "--genotype", "PIBCONV", "--layers", "2",
                          "--batch", "one"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--batch" in bad.stderr and "Traceback" not in bad.stderr
