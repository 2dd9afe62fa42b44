"""Fixtures shared by the unit suite, which runs once per backend."""

import gc

import keras
import numpy as np
import pytest

BACKEND = keras.config.backend()
SEED = 1234


def visible_gpus():
    """Number of GPUs the active backend sees; imports only that backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if BACKEND == "jax":
        import jax

        return sum(device.platform == "gpu" for device in jax.devices())
    if BACKEND == "torch":
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return 0


def pytest_collection_finish(session):
    """Leaves the objects of the imports (TensorFlow, JAX, PyTorch, Keras,
    pytest: millions) out of every later garbage collection.

    Keras's `Layer.__delattr__` runs `gc.collect()` after deleting a variable
    (quantizing, enabling or merging LoRA delete some): over that heap each
    collection took 0.27 s, over half of the JAX run of
    `test_quantization.py`. Frozen, they are never collected (they live as
    long as the process anyway); what the tests make is collected as before.
    """
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or visible_gpus():
        return
    skip = pytest.mark.skip(reason=f"no GPU visible to the {BACKEND} backend")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts from fresh layer names, float32 and a fixed seed."""
    # First: clear_session also forgets the dtype policy and the Keras seed.
    # No gc.collect() per test (free_memory=False): it costs ~1s on PyTorch.
    keras.backend.clear_session(free_memory=False)
    # What the earlier tests left is collected, and what is still alive
    # (the backends' caches, module fixtures) frozen with the imports: the
    # collections Keras runs inside the test scan this test's objects only.
    gc.collect()
    gc.freeze()
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(SEED)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    """A NumPy generator with a fixed seed, for ids and tables."""
    return np.random.default_rng(0)
