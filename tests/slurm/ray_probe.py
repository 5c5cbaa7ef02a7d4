"""What another account on a node can do with a sweep's Ray: run by tests/test_slurm.py as a second UNIX
user, with a Python and Ray of its own (the same Ray version). Each way in is tried bare and with a token
of the prober's own: a driver (``ray.init(address=...)``) running a task, Ray Client (``ray://``) on the
ports a head would give it, ``ray job submit`` to where a dashboard would listen; and reading the job's token
file. A task that runs creates MARKER (on the cluster, as the sweep's owner). Prints one JSON object.

    python ray_probe.py HOST:PORT MARKER TOKEN_FILE OWN_TOKEN_FILE [CLIENT_PORT ...] [--dashboard PORT ...]
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

DRIVER = """
import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False)
ray.get(ray.remote(lambda path: open(path, "w").write("ran")).remote(sys.argv[2]))
print("IN")
"""
CLIENT = """
import ray, sys
ray.init("ray://" + sys.argv[1], log_to_driver=False)
ray.get(ray.remote(lambda path: open(path, "w").write("ran")).remote(sys.argv[2]))
print("IN")
"""


def _try(argv: list[str], env: dict) -> dict:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        rc, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as exc:  # still trying after 60 s: what it said so far
        rc, stdout, stderr = "timeout", _text(exc.stdout), _text(exc.stderr)
    lines = [line.strip() for line in (stderr + stdout).splitlines() if line.strip()]
    refused = [line for line in lines if "Unauthenticated" in line or "InvalidAuthToken" in line]
    said = (refused or lines or [""])[-1][:300]
    return {"in": rc == 0 and "IN" in stdout, "rc": rc, "said": said}


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def main() -> None:
    args = sys.argv[1:]
    dashboards = args[args.index("--dashboard") + 1:] if "--dashboard" in args else []
    args = args[:args.index("--dashboard")] if "--dashboard" in args else args
    target, marker, token_file, own_token, *client_ports = args
    host = target.rsplit(":", 1)[0]
    python, ray = sys.executable, os.path.join(os.path.dirname(sys.executable), "ray")
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    bare["RAY_AUTH_MODE"] = "disabled"
    own = {**bare, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": own_token}
    tries = {}
    for label, env in (("bare", bare), ("own_token", own)):
        tries[f"ray.init {label}"] = ([python, "-c", DRIVER, target, marker], env)
        for port in client_ports:
            tries[f"ray client :{port} {label}"] = ([python, "-c", CLIENT, f"{host}:{port}", marker], env)
        for port in dashboards:
            tries[f"ray job submit :{port} {label}"] = (
                [ray, "job", "submit", f"--address=http://{host}:{port}", "--no-wait", "--", "touch", marker], env)
    with ThreadPoolExecutor(len(tries)) as pool:
        futures = {name: pool.submit(_try, argv, env) for name, (argv, env) in tries.items()}
        results = {name: f.result() for name, f in futures.items()}
    try:
        with open(token_file) as f:
            results["read token file"] = {"in": bool(f.read()), "said": "read it"}
    except OSError as exc:
        results["read token file"] = {"in": False, "said": f"{type(exc).__name__}: {exc.strerror}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
