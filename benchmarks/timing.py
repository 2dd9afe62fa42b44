"""Timing helpers shared by the benchmark sections of `bench_backend.py`.

Every comparison times its callables in one process, on the same ids, in a
rotating order (for two callables: alternating which goes first), so that
load from other processes hits them alike; results are medians with their
interquartile range.
"""

import contextlib
import ctypes
import gc
import statistics
import time

import keras
import numpy as np
from plan import BATCH_SHAPE

BACKEND = keras.config.backend()
SEED = 0


def make_ids(input_dim):
    """The `64 x 32` int32 batch of ids every case looks up, as NumPy."""
    rng = np.random.default_rng(SEED)
    return rng.integers(0, input_dim, size=BATCH_SHAPE).astype("int32")


def block(outputs):
    """Waits until `outputs` are computed.

    JAX dispatches asynchronously; TensorFlow (eager and tf.function) and
    PyTorch on CPU return finished tensors, so there is nothing to wait for.
    """
    if BACKEND == "jax":
        import jax

        jax.block_until_ready(outputs)
    return outputs


# False in a `--quick` run (bench_backend.py): its tiny cases free little, and
# each full collection scanned all that the run had built, 0.2-0.3 s a call
# (a quick PyTorch run: 60 s of CPU with them, 29 without; TensorFlow 78 and
# 58). Its memory figures mean little anyway.
RELEASE_MEMORY = True


def release_memory():
    """Collects garbage, then hands freed heap back to the OS.

    glibc keeps freed memory for reuse: after a 4M-row TensorFlow case, the
    process stayed 4 GiB larger, and the next case's peak added to it (19 GiB
    for the 4M cases of the scaling section, 15 GiB with the trim).
    """
    if not RELEASE_MEMORY:
        return
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def summarize(seconds):
    milliseconds = [s * 1000 for s in seconds]
    q1, _, q3 = statistics.quantiles(milliseconds, n=4)
    return {
        "median_ms": statistics.median(milliseconds),
        "iqr_ms": q3 - q1,
        "reps": len(milliseconds),
    }


def timed(function):
    start = time.perf_counter()
    block(function())
    return time.perf_counter() - start


def compare(callables, reps, warmup, settle=False):
    """Times zero-argument callables, `{name: callable}`, rotating their order.

    Repetition `r` starts with the `r`-th callable (modulo their number), so
    each one goes first equally often. Returns `{name: summary}`.

    With `settle`, each timed call follows an untimed call of the same
    callable. A Keras LoRA call at 1M rows leaves work running after it
    returns (freeing gigabytes of temporaries): timed right after it, our
    JAX training step measured 5x its steady-state time. The settle call
    absorbs the other callables' leftovers; the timed call still pays its
    own previous call's, as a training loop does.
    """
    names = list(callables)
    for _ in range(warmup):
        for name in names:
            block(callables[name]())
    times = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if settle:
                block(callables[name]())
            times[name].append(timed(callables[name]))
    return {name: summarize(seconds) for name, seconds in times.items()}


def ours_against_keras(ours, theirs, reps, warmup, settle=False):
    """`compare` of two callables, as `{"ours", "keras", "ratio"}` where
    `ratio` is ours / keras (below 1: ours is faster)."""
    result = compare({"ours": ours, "keras": theirs}, reps, warmup, settle)
    result["ratio"] = result["ours"]["median_ms"] / result["keras"]["median_ms"]
    return result
