"""A sweep in object storage, against a real S3 server on localhost (moto's standalone server, the S3 HTTP
API; pyarrow is the client, as in Ray): a two-stage sweep with ``--storage s3://...?endpoint_override=...``
(the URI's query kept intact through every join), then ``sweep status`` and ``analyze`` straight from the
bucket; a missing or unreachable bucket is one line before any work; credentials stay out of the bucket."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_helpers import TINY_EVAL, TINY_SEARCH

pytestmark = pytest.mark.slow
SECRET = "dartsweep-fake-secret-5e1f"  # a fake key, distinctive enough to search every object for


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """(endpoint, environment) of a moto S3 server on 127.0.0.1 with bucket ``sweeps``; stopped after."""
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]', a dev dependency)")
    port = _port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "dartsweep-fake-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="dartsweep-fake-key", secret_key=SECRET, allow_bucket_creation=True)
        fs.create_dir("sweeps")
        yield f"127.0.0.1:{port}", env, fs
    finally:
        proc.terminate()
        proc.wait(10)


def cli(env: dict, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_two_stage_sweep_in_s3_then_status_and_analyze_from_the_bucket(tmp_path, s3):
    endpoint, env, fs = s3
    import pyarrow.fs as pafs

    query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
    storage = f"s3://sweeps/team/project?{query}"
    raw = {"name": "clouded", "dataset": "digits", "failure": {"max_failures": 0},
           "search": {**TINY_SEARCH, "op_sets": ["pibconv"], "F": [2.0], "seeds": [0], "epochs": 2,
                      "resources": {"cpu": 1}},
           "eval": {**TINY_EVAL, "genotypes": ["searched"], "layers": [1], "seeds": [0], "epochs": 2,
                    "resources": {"cpu": 1}}}
    (tmp_path / "clouded.yaml").write_text(yaml.safe_dump(raw))
    work = tmp_path / "cwd"
    work.mkdir()
    out = cli(env, "sweep", "up", str(tmp_path / "clouded.yaml"), "--storage", storage, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    location = f"s3://sweeps/team/project/clouded?{query}"
    assert out.stdout.strip().splitlines()[-1] == location  # the query stays at the end of every join

    objects = {i.path.removeprefix("sweeps/team/project/clouded/"): i.size for i in
               fs.get_file_info(pafs.FileSelector("sweeps/team/project/clouded", recursive=True))
               if i.type == pafs.FileType.File}
    for kind in ("search", "eval"):  # each trial's results and its own complete checkpoints, in the bucket
        results = [k for k in objects if k.startswith(f"{kind}/{kind}_") and k.endswith("/result.json")]
        markers = [k for k in objects if k.startswith(f"{kind}/") and k.endswith("/epoch_000002/complete.json")]
        assert len(results) == 1 and len(markers) == 1, sorted(objects)
    assert "sweep.yaml" in objects and any(k.startswith("genotypes/g-") for k in objects)
    assert not any(work.rglob("*")), list(work.rglob("*"))  # nothing fell back to a local folder
    for key in objects:  # the credentials never reach the sweep's objects
        if not key.endswith(("state.pt", ".pkl")):
            with fs.open_input_stream(f"sweeps/team/project/clouded/{key}") as fh:
                assert SECRET not in fh.read().decode(errors="replace"), key
    assert SECRET not in out.stdout + out.stderr

    status = cli(env, "sweep", "status", location, cwd=work)
    assert status.returncode == 0 and "trials: 2 finished" in status.stdout, status.stderr[-2000:]
    assert status.stdout.startswith("sweep clouded: search done, eval done")
    analyzed = cli(env, "analyze", location, cwd=work)
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    import csv

    with open(work / "clouded-analysis" / "trials.csv") as fh:
        trials = list(csv.DictReader(fh))
    assert [(t["stage"], t["status"]) for t in trials] == [("search", "finished"), ("eval", "finished")], trials
    # where each trial lives: in the bucket (not the temporary copy analysis read)
    assert all(t["trial_dir"].startswith("s3://sweeps/team/project/clouded/") for t in trials), trials
    history = (work / "clouded-analysis" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 4  # two epochs of each trial, read from the bucket's logs and checkpoints


def test_a_bucket_that_is_missing_or_unreachable_is_one_line_before_any_work(tmp_path, s3):
    endpoint, env, _ = s3
    for uri, message in ((f"s3://no-such-bucket/x?endpoint_override={endpoint}&scheme=http&region=us-east-1",
                          "bucket 'no-such-bucket' does not exist"),
                         (f"s3://sweeps/x?endpoint_override=127.0.0.1:{_port()}&scheme=http&region=us-east-1",
                          "cannot reach it")):
        out = cli(env, "sweep", "up", "quickstart", "--storage", uri, cwd=tmp_path, timeout=120)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "data:" not in out.stderr
    missing = cli(env, "sweep", "status", f"s3://sweeps/nothing-here?endpoint_override={endpoint}&scheme=http"
                  "&region=us-east-1", cwd=tmp_path)
    assert missing.returncode == 2 and "is not a sweep directory" in missing.stderr
