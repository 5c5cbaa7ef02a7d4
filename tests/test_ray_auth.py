"""Ray's token authentication on every Ray dartsweep starts or joins (sweeps.ray_auth): the embedded Ray
has a token (the user's, else a private one made for the run and removed after it) and refuses a client
without it; a bad token setting, a cluster that refuses the driver's token and a cluster that lets anyone
in are each one line, exit 2, before any work."""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_helpers import sweep_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _token_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def _tiny_sweep(tmp_path: Path) -> Path:
    raw = sweep_file(tmp_path, "authed", search={"op_sets": ["pibconv"], "F": [2.0], "seeds": [0], "epochs": 1})
    file = tmp_path / "authed.yaml"
    file.write_text(yaml.safe_dump(raw))
    return file


def test_embedded_ray_makes_a_private_token_refuses_clients_without_it_and_removes_it(tmp_path):
    """No token anywhere (an empty HOME, neither variable): the embedded Ray runs with a fresh private
    token; a client with no token is refused, one with it gets in; Ray's record of the job does not hold the
    token; the file goes when Ray stops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    script = f"""
import json, os, stat, subprocess, sys
from pathlib import Path
from sweeps import driver, ray_auth
driver._ray_init(None)
import ray
path = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
gcs = ray.get_runtime_context().gcs_address
out = {{"mode": os.environ["RAY_AUTH_MODE"], "file_mode": oct(stat.S_IMODE(path.stat().st_mode)),
        "dir_mode": oct(stat.S_IMODE(path.parent.stat().st_mode)), "length": len(path.read_text()),
        "without_token": ray_auth._answers_without_token(gcs),
        "ran": ray.get(ray.remote(lambda: "ran").remote())}}
# what Ray records of the job (its config, runtime env, entrypoint) holds the token's path, never the token
jobs = repr(ray._private.state.jobs())
out["job_recorded"], out["token_in_job"] = str(os.getpid()) in jobs, path.read_text() in jobs
with_token = subprocess.run([sys.executable, "-c",
    "from ray._raylet import GcsClient; GcsClient(address=%r).internal_kv_keys(b'', namespace=None, timeout=10)" % gcs],
    capture_output=True, env={{**os.environ, "RAY_AUTH_MODE": "token"}})
out["with_token"] = with_token.returncode == 0
driver._ray_stop()
out["removed"] = not path.exists() and not path.parent.exists()
out["home_token"] = (Path.home() / ".ray" / "auth_token").exists()
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"mode": "token", "file_mode": "0o600", "dir_mode": "0o700", "length": 64,
                   "without_token": False, "ran": "ran", "job_recorded": True, "token_in_job": False,
                   "with_token": True, "removed": True,
                   "home_token": False}, out


def test_bad_token_settings_are_one_line_before_any_work(tmp_path):
    file = _tiny_sweep(tmp_path)
    storage = tmp_path / "results"
    cases = [({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, "RAY_AUTH_TOKEN_PATH=" + str(tmp_path / "missing")),
             ({"RAY_AUTH_TOKEN_PATH": str(_empty(tmp_path))}, "the file is empty"),
             ({"RAY_AUTH_MODE": "disabled"}, "RAY_AUTH_MODE=disabled")]
    for extra, message in cases:
        out = cli({**os.environ, **extra}, "sweep", "up", str(file), "--storage", str(storage))
        assert out.returncode == 2, (extra, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert message in lines[-1] and "Traceback" not in out.stderr, (extra, out.stderr)
        assert not (storage / "authed").exists()  # nothing written
    # --address with no token at all (no variables, an empty HOME)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    out = cli({**env, "HOME": str(tmp_path)}, "sweep", "up", str(file), "--storage", str(storage),
              "--address", "127.0.0.1:6379")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "no Ray token here" in last and "RAY_AUTH_TOKEN_PATH" in last, out.stderr


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty_token"
    path.write_text("\n")
    return path


def _ray_head(port: int, env: dict, temp: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}",
                             f"--ray-client-server-port={_free_port()}", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_up(port: int, env: dict) -> None:
    deadline = time.time() + 90
    while time.time() < deadline:
        out = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{port}"], env=env,
                             capture_output=True, timeout=60)
        if out.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"Ray on {port} did not come up")


def _stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # a head Ray keeps draining: nothing of it is needed any more
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_address_of_a_cluster_that_refuses_the_token_or_lets_anyone_in_is_refused(tmp_path):
    """Two heads: one with a token of its own (the driver's is refused by it), one started with auth
    disabled (it lets in a client with no token: the driver will not run a sweep there)."""
    file = _tiny_sweep(tmp_path)
    storage = tmp_path / "results"
    folder = Path(tempfile.mkdtemp(prefix="dartsweep-auth-"))
    other = _token_file(folder, "other_token")
    secured_port, open_port = _free_port(), _free_port()
    secured_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(other)}
    open_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temps = [Path(tempfile.mkdtemp(prefix="r", dir="/tmp")) for _ in range(2)]
    heads = [_ray_head(secured_port, secured_env, temps[0]), _ray_head(open_port, open_env, temps[1])]
    try:
        _wait_up(secured_port, secured_env)
        _wait_up(open_port, open_env)
        out = cli(os.environ, "sweep", "up", str(file), "--storage", str(storage), "--address",
                  f"127.0.0.1:{secured_port}")
        assert out.returncode == 2, out.stderr[-3000:]
        line = out.stderr.strip().splitlines()[-1]
        assert "Traceback" not in out.stderr and "refused this driver's Ray token" in line and "RAY_AUTH_TOKEN_PATH" in line, line
        assert os.environ["RAY_AUTH_TOKEN_PATH"] in line  # where the token came from; never the token
        assert Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text() not in out.stderr + out.stdout
        # the control: with that cluster's own token the same check gets in (the refusal was the token's)
        probe = ("from sweeps import ray_auth; ray_auth.use_token_mode(); from ray._raylet import GcsClient; "
                 f"GcsClient(address='127.0.0.1:{secured_port}').internal_kv_keys(b'', namespace=None, timeout=10)")
        ok = subprocess.run([sys.executable, "-c", probe], env=secured_env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
        assert ok.returncode == 0, ok.stderr[-2000:]
        out = cli(os.environ, "sweep", "up", str(file), "--storage", str(tmp_path / "open"), "--address",
                  f"127.0.0.1:{open_port}")
        assert out.returncode == 2, out.stderr[-3000:]
        line = out.stderr.strip().splitlines()[-1]
        assert "Traceback" not in out.stderr and "lets in clients with no token" in line and "RAY_AUTH_MODE=token" in line, line
        assert not (tmp_path / "open" / "authed").exists()
    finally:
        for head in heads:
            os.killpg(head.pid, 15)
        for head in heads:
            _stop(head)
        import shutil

        for temp in [*temps, folder]:
            shutil.rmtree(temp, ignore_errors=True)
