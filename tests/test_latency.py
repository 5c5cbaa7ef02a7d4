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


def test_lut_build_predict_check_and_mismatches(tmp_path):
    from dataclasses import replace

    from nas import lut as lut_lib
    from nas.genotypes import PIBCONV
    from nas.opsets import OP_SETS

    op_set = OP_SETS["pibconv"]
    table = lut_lib.build_lut(op_set, 4, 2, "cpu", image_size=8)
    # every op at every position: at 2 layers both cells reduce (C 8 at 8x8, then C 16 at 4x4), each with
    # stride-2 edges on its input and stride-1 edges at half the size
    assert {k.split("|", 1)[1] for k in table["ops"]} == {"8|2|8", "8|1|4", "16|2|4", "16|1|2"}
    assert len(table["ops"]) == 4 * len(op_set.primitives) and table["skeleton_ms"] > 0
    assert lut_lib.predict(table, lut_lib.skeleton(op_set)) == table["skeleton_ms"]  # nothing but the skeleton
    heavy = replace(PIBCONV, normal=tuple(("pib_conv_7x7", s) for _, s in PIBCONV.normal),
                    reduce=tuple(("pib_conv_7x7", s) for _, s in PIBCONV.reduce), name=None)
    light = replace(heavy, normal=tuple(("skip_connect", s) for _, s in heavy.normal),
                    reduce=tuple(("max_pool_3x3", s) for _, s in heavy.reduce))
    assert lut_lib.predict(table, heavy) > lut_lib.predict(table, light)
    table = lut_lib.calibrate(table, count=2)
    assert table["scale"] > 0
    result = lut_lib.check(table, count=3, seed=5)
    assert result["count"] == 3 and -1 <= result["spearman"] <= 1 and result["median_abs_error"] >= 0
    assert result["machine_speed"] > 0 and result["median_abs_error_at_build_speed"] >= 0
    rows = result["genotypes"]
    speed_scaled = sorted(abs(result["machine_speed"] * r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
                          for r in rows)
    assert result["median_abs_error_at_build_speed"] == pytest.approx(speed_scaled[1])  # the median of three
    with pytest.raises(ConfigError, match="lacks sep_conv_3x3"):
        lut_lib.predict(table, DARTS_V2)
    with pytest.raises(ConfigError, match="options"):
        lut_lib.predict(table, replace(PIBCONV, options=replace(PIBCONV.options, bottleneck_ratio=3.0)))
    with pytest.raises(ConfigError, match="built for channels 4, not 36"):
        lut_lib.check_compatible(table, PIBCONV, channels=36)
    path = tmp_path / "lut.json"
    path.write_text(json.dumps(table))
    out = subprocess.run([sys.executable, "-m", "nas.cli", "lut", "predict", "--lut", str(path), "--genotype",
                          "PIBCONV", "--device", "cuda"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "built for device cpu, not cuda" in out.stderr
    out = subprocess.run([sys.executable, "-m", "nas.cli", "lut", "predict", "--lut", str(path), "--genotype",
                          "PIBCONV", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and json.loads(out.stdout)["predicted_ms"] > table["skeleton_ms"]
