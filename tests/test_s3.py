"""A sweep in object storage, against a real S3 server on localhost (moto's standalone server, the S3 HTTP
API; pyarrow is the client, as in Ray): a two-stage sweep with ``--storage s3://...?endpoint_override=...``
(the URI's query kept intact through every join), then ``sweep status``, ``analyze`` and ``report``
straight from the bucket; a missing or unreachable bucket is one line before any work; credentials stay out of the bucket."""

import contextlib
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
    report = cli(env, "report", location, cwd=work)
    assert report.returncode == 0, report.stderr[-2000:]
    page = (work / "clouded-report.html").read_text()
    assert "plot-gmac" in page and "clouded" in page


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


def _objects(fs, root: str) -> dict[str, int]:
    import pyarrow.fs as pafs

    return {i.path.removeprefix(root + "/"): i.size for i in fs.get_file_info(pafs.FileSelector(root, recursive=True,
                                                                                                   allow_not_found=True))
            if i.type == pafs.FileType.File}


def _rows(fs, key: str) -> list[dict]:
    import json

    with fs.open_input_stream(key) as fh:
        return [json.loads(line) for line in fh.read().decode().splitlines() if line.strip()]


def test_s3_lock_is_exclusive_driver_killed_mid_stage_then_up_finishes_through_an_outage(tmp_path, s3):
    """S3's conditional write makes the lock exclusive (eight drivers racing for it: exactly one wins; a
    second ``sweep up`` while one runs exits 2 naming it). The driver SIGKILLed alone mid-stage, then
    ``sweep up`` again, during which the S3 server is unreachable for 4 s (:class:`Outage`): every trial
    finishes (or, where one exhausted its retries, is listed as failed), continued from its newest
    checkpoint in the bucket (none from scratch), every epoch once in each trial's result.json, no complete
    checkpoint lost."""
    import json
    import signal
    import threading

    from sweeps.driver import SweepDir
    from sweeps.lock import _create_exclusive

    endpoint, env, fs = s3
    outage = Outage(int(endpoint.rsplit(":", 1)[1]))  # every request of the sweep goes through it
    outage.up()
    query = f"endpoint_override=127.0.0.1:{outage.port}&scheme=http&region=us-east-1"
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    race = SweepDir.at(f"s3://sweeps/race?{query}")
    won: list[bool] = []
    threads = [threading.Thread(target=lambda: won.append(_create_exclusive(race, {"token": os.urandom(4).hex()})))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True], won

    epochs = 40  # ~0.25 s an epoch: the orphaned worker cannot finish before the next driver stops it
    raw = {"name": "killed", "dataset": "digits", "failure": {"max_failures": 3},
           "eval": {**TINY_EVAL, "genotypes": ["DARTS_V2"], "layers": [1], "seeds": [0, 1], "epochs": epochs,
                    "max_steps_per_epoch": 25, "channels": 16, "batch_size": 32, "resources": {"cpu": 1}}}
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(raw))
    storage = f"s3://sweeps/kill?{query}"
    root = "sweeps/kill/killed"
    up = [sys.executable, "-m", "nas.cli", "sweep", "up", str(tmp_path / "killed.yaml"), "--storage", storage,
          "--verbose", "0"]
    driver = subprocess.Popen(up, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:  # both trials past a few checkpoints, neither finished
            markers = [k for k in _objects(fs, root) if k.endswith("/complete.json")]
            if len({m.split("/")[1] for m in markers if "epoch_000003" in m or "epoch_000004" in m}) == 2:
                break
            assert driver.poll() is None, "the driver ended before the test could kill it"
            time.sleep(0.2)
        second = cli(env, "sweep", "up", str(tmp_path / "killed.yaml"), "--storage", storage, cwd=tmp_path)
        assert second.returncode == 2 and "is being run by another driver" in second.stderr, second.stderr[-2000:]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    at_kill = {k for k in _objects(fs, root) if k.endswith("/complete.json")}
    newest = {}
    for key in at_kill:
        trial, epoch = key.split("/")[1], int(key.split("/")[-2].removeprefix("epoch_"))
        newest[trial] = max(newest.get(trial, 0), epoch)
    assert len(newest) == 2 and all(e < epochs for e in newest.values()), newest
    again = subprocess.Popen(up, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and again.poll() is None:  # training again: then the outage
            done = {k for k in _objects(fs, root) if k.endswith("/complete.json")}
            if len(done - at_kill) >= 2:
                break
            time.sleep(0.2)
        outage.down()
        time.sleep(4)
        outage.up()
        err = again.communicate(timeout=400)[1]
    finally:
        if again.poll() is None:
            again.kill()
        outage.down()
    assert again.returncode in (0, 1), err[-3000:]
    assert "taking over the lock of a driver that is gone" in err
    objects = _objects(fs, root)
    assert "driver.lock" not in objects
    finished = {t for t in newest if f"eval/{t}/checkpoints/epoch_{epochs:06d}/complete.json" in objects}
    if again.returncode == 1:  # a trial that ran out of retries during the outage: listed, by name
        assert all(t in err.split("trial(s) failed:")[1] for t in set(newest) - finished), err[-3000:]
    else:
        assert finished == set(newest)
    for trial, epoch_at_kill in ((t, e) for t, e in newest.items() if t in finished):
        rows = _rows(fs, f"{root}/eval/{trial}/result.json")
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), (trial, [r["epoch"] for r in rows])
        # the trial ended in an attempt that started from a checkpoint at least as new as the kill's, not
        # from scratch (whose every row says 0); the killed driver's orphaned worker may have trained on a
        # few epochs meanwhile, which are the checkpoint's and are logged from its history
        assert rows[-1]["resumed_from"] >= epoch_at_kill, (trial, epoch_at_kill, [r["resumed_from"] for r in rows])
    print(json.dumps({"epochs": epochs, "newest_checkpoints_at_kill": newest, "exit_after_outage": again.returncode,
                      "resumed_from": {t: _rows(fs, f"{root}/eval/{t}/result.json")[-1]["resumed_from"]
                                       for t in finished}}))


class Outage:
    """A TCP forwarder in front of the S3 server: ``down()`` closes it and every connection through it (a
    client then gets "connection refused", as from a stopped server), ``up()`` listens again on the same
    port. The server keeps its objects meanwhile (moto keeps them in memory only)."""

    def __init__(self, target: int) -> None:
        import threading

        self.target, self.port = target, _port()
        self._conns: list[socket.socket] = []
        self._guard = threading.Lock()
        self._server: socket.socket | None = None

    def up(self) -> None:
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._guard:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
            self._conns.clear()

    def _accept(self, server: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._guard:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
