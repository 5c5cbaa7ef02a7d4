"""Ray token authentication for every Ray dartsweep starts or joins.

Ray 2.52+ checks a shared token on every gRPC and HTTP server of a cluster when ``RAY_AUTH_MODE=token``
is set in the environment of every node and client; the token comes from ``RAY_AUTH_TOKEN`` (the value),
``RAY_AUTH_TOKEN_PATH`` (a file) or ``~/.ray/auth_token``, in that order. Without it anyone who can
reach a node can run code as the sweep's owner (CVE-2023-48022, "ShadowRay").

dartsweep never runs Ray without it:
- the embedded single-machine Ray of ``sweep up`` uses the user's token where Ray would find one, else a
  fresh random token in a private file (mode 600 in a mode-700 folder) made for this run and removed
  after it;
- ``--address`` takes the token the way Ray does; a cluster that refuses it, or that lets a client in with
  no token at all, is one line (exit 2) before any work starts;
- ``RAY_AUTH_MODE`` set to anything but ``token`` is refused.
The token itself is never printed, logged or written into a sweep folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from nas.errors import ConfigError

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
PATH_ENV = "RAY_AUTH_TOKEN_PATH"
HOW = ("set RAY_AUTH_TOKEN_PATH to a file holding the cluster's token (slurm/dartsweep.sbatch makes one per "
       "job; `ray get-auth-token --generate` writes ~/.ray/auth_token)")


def default_token_file() -> Path:
    """Where Ray looks for a token when neither variable is set."""
    return Path.home() / ".ray" / "auth_token"


def token_source() -> str | None:
    """Where the token comes from (a variable's name or a file's path; never the token), None when there is
    none. A ``RAY_AUTH_TOKEN_PATH`` that is missing, unreadable or empty is a ConfigError naming it (Ray
    would stop with a fatal error later)."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV
    path = os.environ.get(PATH_ENV)
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read it ({exc.strerror or exc}); {HOW}") from None
        if not text.strip():
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty; {HOW}")
        return path
    default = default_token_file()
    try:
        return str(default) if default.read_text().strip() else None
    except OSError:
        return None


def check_mode() -> None:
    """Refuse a ``RAY_AUTH_MODE`` other than ``token``: dartsweep never runs an unauthenticated Ray."""
    mode = os.environ.get(MODE_ENV)
    if mode is not None and mode.strip().lower() != "token":
        raise ConfigError(f"RAY_AUTH_MODE={mode}: dartsweep runs Ray with token authentication only; unset "
                          "RAY_AUTH_MODE or set it to token")


def check(address: str | None) -> None:
    """Everything about authentication that can be wrong, before any cluster work: the mode, the token's
    file, and for ``address`` that the cluster accepts this token and refuses a client without one."""
    check_mode()
    source = token_source()
    if not address:
        return
    if source is None:
        raise ConfigError(f"--address {address}: no Ray token here; {HOW}")
    gcs = _gcs_address(address)
    if gcs is None:
        return  # "auto" with no local cluster: ray.init says so
    use_token_mode()
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=gcs).internal_kv_keys(b"session_name", namespace=None, timeout=10)
    except AuthenticationError:
        raise ConfigError(f"--address {address}: the cluster refused this driver's Ray token (from {source}); "
                          f"{HOW}") from None
    except Exception:  # noqa: BLE001 - unreachable: ray.init reports it in its own words
        return
    if _answers_without_token(gcs):
        raise ConfigError(f"--address {address}: that Ray lets in clients with no token (started without "
                          "RAY_AUTH_MODE=token): anyone who reaches it can run code as you; start it with "
                          "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH, as slurm/dartsweep.sbatch does")


def _gcs_address(address: str) -> str | None:
    if address != "auto":
        return address.removeprefix("ray://")
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except Exception:  # noqa: BLE001 - a private API; the check is then left to ray.init
        return None


def _answers_without_token(gcs: str) -> bool:
    """Whether the control store at ``gcs`` answers a client that sends no token (a fresh process: the
    mode is per process)."""
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, PATH_ENV)}
    env[MODE_ENV] = "disabled"
    env["HOME"] = tempfile.gettempdir()  # no ~/.ray/auth_token either
    probe = ("from ray._raylet import GcsClient\n"
             f"GcsClient(address={gcs!r}).internal_kv_keys(b'session_name', namespace=None, timeout=10)\n")
    try:
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def use_token_mode() -> None:
    """Token mode for this process and the Ray processes it starts, also where Ray is imported already
    (Ray caches its config and token: both are refreshed, as Ray's own default for ``ray.init`` does)."""
    os.environ[MODE_ENV] = "token"
    if "ray" in sys.modules:
        try:
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
        except Exception:  # noqa: BLE001 - private API moved: the environment still holds for new processes
            pass


def private_token() -> Path:
    """A fresh random token (32 bytes) in a file only this user can read, in a folder of its own
    (``tempfile.mkdtemp``: mode 700); ``RAY_AUTH_TOKEN_PATH`` points at it. Remove it with
    :func:`remove_private_token`."""
    folder = Path(tempfile.mkdtemp(prefix="dartsweep-ray-auth-"))
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ[PATH_ENV] = str(path)
    return path


def remove_private_token(path: Path | None) -> None:
    if path is not None:
        if os.environ.get(PATH_ENV) == str(path):
            del os.environ[PATH_ENV]
        shutil.rmtree(path.parent, ignore_errors=True)


def prepare(address: str | None) -> Path | None:
    """Set this process up to start (no ``address``) or join an authenticated Ray; returns the private
    token file made for an embedded Ray where the user has no token (remove it after ``ray.shutdown``)."""
    check_mode()
    made = private_token() if address is None and token_source() is None else None
    use_token_mode()
    return made
