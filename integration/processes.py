"""Fresh Python processes under a chosen Keras backend, for the integration tests.

`KERAS_BACKEND` is read when keras is first imported, so every backend needs a
process of its own. The test process itself never imports keras: it only
starts scripts and compares the `.npy`/`.json` files they write.

`INTEGRATION_BACKENDS` (space- or comma-separated, all three when unset)
selects the backends a run covers: `BACKENDS` holds them, and a test that
needs another backend is skipped with `needs(backend)`.
"""

import importlib.metadata
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ALL_BACKENDS = ("tensorflow", "jax", "torch")
ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
TIMEOUT_S = 300


def selected_backends(value):
    """The backends `value` names (space- or comma-separated), in the order
    of ALL_BACKENDS; all three when it names none."""
    names = value.replace(",", " ").split()
    unknown = [name for name in names if name not in ALL_BACKENDS]
    if unknown:
        raise ValueError(
            f"INTEGRATION_BACKENDS must name backends among "
            f"{', '.join(ALL_BACKENDS)}, separated by spaces or commas. "
            f"Received: INTEGRATION_BACKENDS={value!r} (unknown: "
            f"{', '.join(unknown)})."
        )
    return tuple(b for b in ALL_BACKENDS if b in names) or ALL_BACKENDS


BACKENDS = selected_backends(os.environ.get("INTEGRATION_BACKENDS", ""))


def installed_version(*distributions):
    """The version of the first of `distributions` installed, from its
    metadata (this process never imports keras), or None."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def _major_minor(version):
    return tuple(int(part) for part in version.split(".")[:2])


# `make ... KERAS=nightly` installs keras-nightly in place of keras.
KERAS = installed_version("keras", "keras-nightly")
KERAS_HUB = installed_version("keras-hub")
# keras-hub 0.32 (requirements-keras-hub.txt) imports
# `keras.src.backend.get_keras_mask`, which the Keras 3.16 nightlies removed:
# `import keras_hub` fails there, for keras-hub's reasons. A keras-hub release
# newer than 0.32 gets tested again.
KERAS_HUB_UNSUPPORTED = (
    f"keras-hub {KERAS_HUB} cannot be imported with Keras {KERAS} (it imports "
    "keras.src.backend.get_keras_mask, which Keras 3.16 removed)"
    if KERAS_HUB is not None
    and _major_minor(KERAS) >= (3, 16)
    and _major_minor(KERAS_HUB) <= (0, 32)
    else None
)
needs_keras_hub_on_this_keras = pytest.mark.skipif(
    KERAS_HUB_UNSUPPORTED is not None, reason=KERAS_HUB_UNSUPPORTED or ""
)


def needs(backend):
    """Skips a test, or one parameter (`pytest.param(..., marks=needs(b))`),
    when this run did not select `backend`."""
    return pytest.mark.skipif(
        backend not in BACKENDS,
        reason=f"{backend} is not among INTEGRATION_BACKENDS ({' '.join(BACKENDS)})",
    )


# One JAX compilation cache for every process of a test run: a model loaded
# under JAX reuses the programs its JAX saver compiled (scripts/layer_outputs.py
# `load`: 5 s of CPU instead of 14), every program however short. Removed when
# the run ends; a cache named in the environment is used as it is.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _JAX_CACHE = tempfile.TemporaryDirectory(prefix="jax-cache-")
JAX_CACHE = {
    "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", _JAX_CACHE and _JAX_CACHE.name
    ),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}

# The processes of a test run side by side (three backends, and the unit
# suites beside them): PyTorch's own thread pool spun on the other cores
# (examples/movielens.py alone: 69 s of CPU against 45 with one thread, for
# 40 s against 46 of wall time). TensorFlow and XLA already ran on about one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _run(backend, args, timeout, env=None):
    env = dict(env or {})
    # A script's XLA_FLAGS (8 virtual devices) add to the run's own
    # (tests/run_backends.py sets the compiler's optimization level).
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} {env.pop('XLA_FLAGS', '')}"
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "XLA_FLAGS": xla_flags.strip(),
        **ONE_THREAD,
        **JAX_CACHE,
        **env,
    }
    return subprocess.run(
        [sys.executable, *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _failure(backend, args, done):
    return (
        f"`python {' '.join(map(str, args))}` under KERAS_BACKEND={backend} "
        f"exited with {done.returncode}:\n"
        f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    )


def run_under(backend, *args, timeout=TIMEOUT_S, env=None):
    """Runs `python *args` under `backend` (plus `env`); returns its stdout,
    asserts exit 0."""
    done = _run(backend, args, timeout, env)
    assert done.returncode == 0, _failure(backend, args, done)
    return done.stdout


def run_under_each(*args, timeout=TIMEOUT_S):
    """Runs `python *args` once per selected backend, concurrently; asserts
    all exit 0.

    Most of a run is importing the backend, so the three overlap well even on
    two cores. Returns {backend: stdout}.
    """
    with ThreadPoolExecutor(len(BACKENDS)) as pool:
        futures = {b: pool.submit(_run, b, args, timeout) for b in BACKENDS}
        results = {b: future.result() for b, future in futures.items()}
    failures = [
        _failure(b, args, done) for b, done in results.items() if done.returncode
    ]
    assert not failures, "\n\n".join(failures)
    return {b: done.stdout for b, done in results.items()}
