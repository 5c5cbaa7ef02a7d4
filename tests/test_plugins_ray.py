"""Plugins on a real Ray: a sweep whose op set and genotypes are a plugin's, frozen with its hash (a changed
plugin refused, accepted only when asked, analysis working without it), and a two-node Ray (``ray start``
head + worker) whose worker node cannot see the plugin's folder: Ray ships the plugin there itself."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_helpers import TINY_EVAL, TINY_SEARCH

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "mbconv_se.py"
BIN = Path(sys.executable).parent


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], capture_output=True, text=True, timeout=timeout)


def plugin_sweep(folder: Path, name: str, plugin: str, primitives: list[str], dataset) -> Path:
    raw = {"name": name, "plugins": [plugin], "dataset": dataset, "failure": {"max_failures": 0},
           "search": {**TINY_SEARCH, "op_sets": [{"primitives": primitives, "activation": "gelu"}], "F": [2.0],
                      "seeds": [0], "epochs": 2, "resources": {"cpu": 1}},
           "eval": {**TINY_EVAL, "genotypes": ["searched"], "layers": [2], "seeds": [0], "epochs": 2,
                    "resources": {"cpu": 1}}}
    file = folder / f"{name}.yaml"
    file.write_text(yaml.safe_dump(raw))
    return file


def test_plugin_sweep_frozen_with_its_hash(tmp_path, monkeypatch):
    """The example plugin and an image folder made by the example's script, through `sweep up`, `analyze`
    and `status` as the README shows them; then the plugin changed, accepted, and gone."""
    shutil.copy(EXAMPLE, tmp_path / "mbconv_se.py")
    made = subprocess.run([sys.executable, str(ROOT / "examples" / "make_shapes.py"), str(tmp_path / "shapes"),
                           "--per-class", "30", "--size", "12"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    file = plugin_sweep(tmp_path, "plugged", "mbconv_se.py", ["none", "mbconv_se_3x3", "mbconv_se_5x5"],
                        {"image_folder": "shapes", "size": 8})
    monkeypatch.setenv("DARTSWEEP_CACHE", str(tmp_path / "cache"))
    out = cli("sweep", "up", str(file), "--storage", str(tmp_path / "results"))
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "results" / "plugged"
    frozen = yaml.safe_load((sweep / "sweep.yaml").read_text())
    sha = frozen["plugins"][0]["sha256"]
    assert frozen["plugins"][0]["source"] == str(tmp_path / "mbconv_se.py") and len(sha) == 64
    assert frozen["dataset"]["image_folder"] == str(tmp_path / "shapes")
    genotypes = [json.loads(p.read_text()) for p in (sweep / "genotypes").glob("g-*.json")]
    assert genotypes
    for entry in genotypes:  # the JSON names the plugin ops and records the plugin's content hash
        used = {op for op, _ in entry["genotype"]["normal"] + entry["genotype"]["reduce"]}
        assert used <= {"mbconv_se_3x3", "mbconv_se_5x5"}
        assert entry["plugins"] == [{"source": str(tmp_path / "mbconv_se.py"), "sha256": sha, "ops": sorted(used)}]
    results = [json.loads(p.read_text().splitlines()[-1]) for p in sweep.glob("eval/eval_*/result.json")]
    assert len(results) == 1 and results[0]["epoch"] == 2 and results[0]["gmac"] > 0 and results[0]["params_m"] > 0

    # a changed plugin: refused, nothing touched; accepted when asked, and said so in the sweep's log
    before = (sweep / "sweep.yaml").read_bytes()
    with open(tmp_path / "mbconv_se.py", "a") as fh:
        fh.write("\n# tuned\n")
    out = cli("sweep", "up", str(file), "--storage", str(tmp_path / "results"))
    assert out.returncode == 2 and f"plugin {tmp_path / 'mbconv_se.py'} changed since the sweep was frozen" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and (sweep / "sweep.yaml").read_bytes() == before
    out = cli("sweep", "up", str(file), "--storage", str(tmp_path / "results"), "--accept-plugin-change")
    assert out.returncode == 0, out.stderr[-3000:]
    new_sha = yaml.safe_load((sweep / "sweep.yaml").read_text())["plugins"][0]["sha256"]
    assert new_sha != sha
    assert f"changed (sha256 {sha[:12]} -> {new_sha[:12]}); accepted with --accept-plugin-change" in \
        (sweep / "driver.log").read_text()

    # the plugin gone: tables, plots and status still work (they need its names, not its code)
    (tmp_path / "mbconv_se.py").unlink()
    out = cli("analyze", str(sweep))
    assert out.returncode == 0, out.stderr[-3000:]
    trials = (sweep / "analysis" / "trials.csv").read_text()
    assert all(p.stem in trials for p in (sweep / "genotypes").glob("g-*.json"))
    assert any(p.suffix == ".png" for p in (sweep / "analysis" / "cells").rglob("*"))
    out = cli("sweep", "status", str(sweep))
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):  # a Ray node drains up to 30 s: not needed here
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


HIDDEN_PLUGIN = '''
import json, os
import torch.nn as nn
from nas.registry import register_op

def _node():
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None

with open({log!r}, "a") as fh:  # who imported this file, where, and whether that node sees its folder
    fh.write(json.dumps({{"pid": os.getpid(), "node": _node(),
                         "sees_folder": os.path.exists({path!r})}}) + "\\n")

register_op("hidden_conv_3x3", lambda c, s, a, o: nn.Sequential(nn.Conv2d(c, c, 3, s, 1, bias=False),
                                                                 nn.BatchNorm2d(c, affine=a)))
'''


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_plugin_reaches_a_worker_node_that_cannot_see_it(tmp_path):
    """Head (0 CPUs) and worker started with `ray start`; the worker inside its own mount namespace with the
    plugin's folder covered by an empty tmpfs, so only Ray's runtime_env can bring the plugin there. Every
    trial runs on the worker, imports the plugin there and finishes."""
    folder = Path(tempfile.mkdtemp(prefix="dartsweep-plugin-"))
    imports = tmp_path / "imports.jsonl"
    plugin = folder / "hidden_ops.py"
    plugin.write_text(HIDDEN_PLUGIN.format(log=str(imports), path=str(plugin)))
    temp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}",
                             "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        hide = f"mount -t tmpfs tmpfs {folder} && exec \"$@\""
        worker = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh",
                                   str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{port}", "--num-cpus=2",
                                   "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes: list = []
        deadline = time.time() + 90
        probe = ("import json, ray; ray.init(address='127.0.0.1:%d', log_to_driver=False); "
                 "print(json.dumps([[n['NodeID'], n['Resources'].get('CPU', 0)] for n in ray.nodes() if n['Alive']]))"
                 % port)
        while time.time() < deadline and len(nodes) < 2:
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
            nodes = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []
            time.sleep(1)
        assert len(nodes) == 2, f"the worker never joined: {nodes}"
        worker_id = next(n for n, cpus in nodes if cpus == 2)
        # the control: the worker's namespace really does not see the plugin (an empty tmpfs covers it)
        seen = subprocess.run(["nsenter", "-t", str(worker.pid), "-m", "ls", "-A", str(folder)],
                              capture_output=True, text=True)
        assert seen.returncode == 0 and seen.stdout.strip() == "", seen

        file = plugin_sweep(tmp_path, "shipped", str(plugin), ["none", "hidden_conv_3x3"], "digits")
        out = cli("sweep", "up", str(file), "--storage", str(tmp_path / "results"), "--address", f"127.0.0.1:{port}")
        assert out.returncode == 0, out.stderr[-4000:]
    finally:
        for proc in (worker, head):
            if proc is not None:
                _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    sweep = tmp_path / "results" / "shipped"
    finished = [json.loads(p.read_text().splitlines()[-1]) for p in sweep.glob("*/*/result.json")]
    assert len(finished) == 2 and {r["stage"] for r in finished} == {"search", "eval"}
    for result in finished:  # both trials ran on the worker node and finished there
        assert result["node_id"] == worker_id and result["epoch"] == 2, result
    genotype = json.loads(next((sweep / "genotypes").glob("g-*.json")).read_text())["genotype"]
    assert "hidden_conv_3x3" in {op for op, _ in genotype["normal"] + genotype["reduce"]}
    lines = [json.loads(line) for line in imports.read_text().splitlines()]
    on_worker = [line for line in lines if line["node"] == worker_id]
    assert on_worker and not any(line["sees_folder"] for line in on_worker), lines  # Ray brought it there
    assert any(line["node"] is None and line["sees_folder"] for line in lines)  # the driver read it from disk
