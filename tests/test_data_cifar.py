"""The CIFAR path for real: torchvision's on-disk format (a tiny fake), the download command, paths that
resolve against the sweep file, and data shipped from the driver to trials on other nodes."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from nas.cli import main
from nas.data import from_arrays, load_dataset, to_arrays
from nas.errors import ConfigError
from sweeps.spec import load_sweep
from tests.fake_cifar import trust_fake_cifar, write_fake_cifar


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """A trusted fake CIFAR-10 (200 training, 50 test images) in tmp_path/exp/data."""
    data_dir = tmp_path / "exp" / "data"
    trust_fake_cifar(monkeypatch, write_fake_cifar(data_dir))
    return data_dir


def test_loads_torchvision_format(fake_cifar):
    data = load_dataset("cifar10", fake_cifar, download=False)
    assert data.train_x.shape == (200, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (50, 3, 32, 32) and data.num_classes == 10
    assert int(data.train_y.max()) < 10 and (data.crop_padding, data.cutout_length) == (4, 16)
    back = from_arrays(to_arrays(data))  # what travels through Ray's object store
    assert all(torch.equal(getattr(back, k), getattr(data, k)) for k in ("train_x", "train_y", "test_x", "test_y"))
    assert (back.name, back.mean, back.num_classes) == (data.name, data.mean, data.num_classes)


def test_missing_or_corrupted_data_names_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setattr("nas.data._online", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match=r"offline; on a machine with internet run `dartsweep data download "
                                          rf"cifar10 --data-dir {tmp_path}`"):
        load_dataset("cifar10", tmp_path, download=True)
    write_fake_cifar(tmp_path)  # present, but not the real files: torchvision's checksums fail
    with pytest.raises(ConfigError, match="not found \\(or corrupted\\).*dartsweep data download cifar10"):
        load_dataset("cifar10", tmp_path, download=False)


def test_data_download_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("nas.data._online", lambda timeout=3.0: False)
    assert main(["data", "download", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "cannot reach www.cs.toronto.edu" in capsys.readouterr().err
    md5s = write_fake_cifar(tmp_path / "d")
    assert main(["data", "download", "cifar10", "--data-dir", str(tmp_path / "d")]) == 2  # checksums fail
    err = capsys.readouterr().err
    assert "data_batch_1 is corrupted" in err and md5s["data_batch_1"] in err and "delete" in err
    trust_fake_cifar(monkeypatch, md5s)
    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", lambda self: pytest.fail("downloaded again"))
    assert main(["data", "download", "cifar10", "--data-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert f"7 files in {tmp_path / 'd' / 'cifar-10-batches-py'}" in out
    assert all(f"{md5}  {name}" in out for name, md5 in md5s.items())
    assert main(["data", "download", "cifar100", "--data-dir", str(tmp_path / "d")]) == 2  # missing, offline


def test_download_when_missing_and_online(tmp_path, monkeypatch, capsys):
    md5s = write_fake_cifar(tmp_path / "staging")
    trust_fake_cifar(monkeypatch, md5s)
    monkeypatch.setattr("nas.data._online", lambda timeout=3.0: True)

    def fake_download(self):  # what torchvision's download leaves behind
        import shutil

        shutil.copytree(tmp_path / "staging" / "cifar-10-batches-py", Path(self.root) / "cifar-10-batches-py")

    monkeypatch.setattr("torchvision.datasets.CIFAR10.download", fake_download)
    assert main(["data", "download", "cifar10", "--data-dir", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "cifar-10-batches-py" / "test_batch").is_file()
    assert md5s["test_batch"] in capsys.readouterr().out


def test_relative_paths_resolve_against_the_sweep_file(tmp_path, monkeypatch, capsys):
    exp = tmp_path / "exp"
    (exp / "cells").mkdir(parents=True)
    (exp / "cells" / "cell.json").write_text(json.dumps({
        "normal": [["skip_connect", 0], ["skip_connect", 1]] * 2, "normal_concat": [2, 3],
        "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1]] * 2, "reduce_concat": [2, 3]}))
    (exp / "s.yaml").write_text(yaml.safe_dump({
        "name": "rel", "dataset": "cifar10", "data_dir": "./data", "storage": "results",
        "eval": {"genotypes": ["cells/cell.json"], "layers": [1], "epochs": 1}}))
    monkeypatch.chdir(tmp_path / "exp" / "cells")  # anywhere else
    spec = load_sweep(exp / ".." / "exp" / "s.yaml")
    assert spec.data_dir == str(exp / "data") and spec.storage == str(exp / "results")
    assert spec.raw["data_dir"] == str(exp / "data") and spec.eval.base["data_dir"] == str(exp / "data")
    assert main(["sweep", "run", str(exp / "s.yaml"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert f"data: cifar10 from {exp / 'data'} (missing: the driver downloads it when online)" in err
    assert "resolve against its folder" in err
    # a built-in definition lives inside the package: its relative paths mean the current directory
    assert load_sweep("paper_table1").data_dir == str(tmp_path / "exp" / "cells" / "data")
    with pytest.raises(ConfigError, match=r"s.yaml: data_transfer: must be one of object_store, shared_path"):
        (exp / "s.yaml").write_text(yaml.safe_dump({"name": "x", "data_transfer": "nfs", "eval": {}}))
        load_sweep(exp / "s.yaml")


def test_shared_path_trial_reads_its_data_dir(fake_cifar, monkeypatch):
    """data_transfer: shared_path: a trial given no data reads data_dir itself (outside Tune here)."""
    from nas.genotypes import GENOTYPES
    from sweeps import trainables

    table = {"DARTS_V2": {"genotype": GENOTYPES["DARTS_V2"].to_dict()}}
    reported = []
    monkeypatch.setattr(trainables.tune, "report", lambda metrics, checkpoint=None: reported.append(metrics))
    monkeypatch.setattr(trainables.tune, "get_checkpoint", lambda: None)
    base = {"dataset": "cifar10", "data_dir": str(fake_cifar), "epochs": 1, "channels": 4, "batch_size": 32,
            "max_steps_per_epoch": 1, "auxiliary": False}
    trainables.eval_trainable({"genotype": "DARTS_V2", "layers": 1, "seed": 0, "base": base},
                              table, data=None)
    assert [r["train_images"] for r in reported] == [200] and reported[0]["epoch"] == 1
    with pytest.raises(ConfigError, match="dartsweep data download cifar10"):
        trainables.eval_trainable({"genotype": "DARTS_V2", "layers": 1, "seed": 0,
                                   "base": {**base, "data_dir": str(fake_cifar.parent / "elsewhere")}},
                                  table, data=None)


# ------------------------------------------------------------------------------------- sweeps on real Ray

TINY = {"channels": 4, "layers": 2, "batch_size": 32, "max_steps_per_epoch": 2, "epochs": 1,
        "resources": {"cpu": 1}}


def _cifar_sweep(exp: Path, name: str, storage: str = "results") -> Path:
    """A search + eval sweep file on cifar10 with a relative data_dir, in ``exp``."""
    path = exp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "dataset": "cifar10", "data_dir": "./data", "storage": storage,
        "failure": {"max_failures": 0},
        "search": {**TINY, "op_sets": ["darts"], "nodes": 2, "order": 1},
        "eval": {**TINY, "genotypes": ["searched", "DARTS_V2"], "layers": [1], "auxiliary": False}}))
    return path


def _check_trials(sweep: Path) -> list[dict]:
    from analysis.frames import load_frames

    trials, _ = load_frames(sweep)
    assert len(trials) == 3 and (trials.status == "finished").all(), trials[["trial_dir", "status", "error"]]
    last = [json.loads((Path(d) / "result.json").read_text().splitlines()[-1]) for d in trials.trial_dir]
    assert [r["train_images"] for r in last] == [200] * 3  # every trial got the whole fake training set
    evals = trials[trials.stage == "eval"]  # each measured its network's latency where it ran
    assert (evals.latency_ms > 0).all() and (evals.throughput_img_s > 0).all()
    assert evals.device.str.startswith("cpu").all()
    return last


@pytest.mark.slow
def test_cifar_sweep_on_embedded_ray_from_another_folder(fake_cifar, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from sweeps.driver import run_sweep

    if ray.is_initialized():
        ray.shutdown()
    exp = fake_cifar.parent
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # Ray's trial folders are elsewhere again
    out = Path(run_sweep(load_sweep(_cifar_sweep(exp, "c10")), verbose=0))
    assert out == exp / "results" / "c10"  # storage: results, next to the sweep file
    frozen = yaml.safe_load((out / "sweep.yaml").read_text())
    assert frozen["data_dir"] == str(exp / "data") and frozen["search"]["op_sets"] == ["darts"]
    _check_trials(out)
    assert not ray.is_initialized()


@pytest.mark.slow
def test_cifar_sweep_on_two_nodes_without_the_data_there(fake_cifar, tmp_path, monkeypatch):
    """A two-node cluster; the data folder is gone once the driver has read it, so no trial can read it."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    import sweeps.driver as driver

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    real_load = driver.load_dataset

    def load_then_hide(*args, **kwargs):
        data = real_load(*args, **kwargs)
        fake_cifar.rename(fake_cifar.parent / "hidden")
        return data

    monkeypatch.setattr(driver, "load_dataset", load_then_hide)
    try:
        out = Path(driver.run_sweep(load_sweep(_cifar_sweep(fake_cifar.parent, "c10_nodes")), verbose=0))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert not fake_cifar.exists()
    last = _check_trials(out)
    assert {r["node_id"] for r in last} <= {w.node_id for w in workers}  # the head has no CPUs
