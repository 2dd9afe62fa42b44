import os
import subprocess
import sys
from pathlib import Path

import pytest

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def run_under(backend, *args, timeout=300):
    """Runs a Python script in a fresh process under `backend`."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{args} under {backend} failed:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="session")
def saved_everywhere(tmp_path_factory):
    """Each backend saves its models, then each backend loads all of them."""
    root = tmp_path_factory.mktemp("cross_backend")
    for backend in BACKENDS:
        run_under(backend, SCRIPTS / "cross_backend.py", "save", root)
    for backend in BACKENDS:
        run_under(backend, SCRIPTS / "cross_backend.py", "load", root)
    return root
