import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray with token authentication, as users run it: one token for the whole test session, in a private file
# (each test's Ray, embedded or `ray start`ed, and every CLI the tests start inherit these two)
os.environ["RAY_AUTH_MODE"] = "token"
if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    import atexit
    import secrets
    import shutil
    import tempfile

    _token_dir = tempfile.mkdtemp(prefix="dartsweep-test-auth-")
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(_token_dir, "auth_token")
    with os.fdopen(os.open(os.environ["RAY_AUTH_TOKEN_PATH"], os.O_WRONLY | os.O_CREAT, 0o600), "w") as _f:
        _f.write(secrets.token_hex(32))
    atexit.register(shutil.rmtree, _token_dir, True)
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")

import pytest
import torch

# `make test` runs two pytest-xdist workers: each computes on one thread, or the two workers' thread pools
# spin against each other on two cores (a 17 s search test took 99 s)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    from nas.data import load_dataset

    return load_dataset("digits")
