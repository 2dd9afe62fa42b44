import keras
import numpy as np
import pytest

BACKEND = keras.config.backend()


def visible_gpus():
    """Number of GPUs the active backend can see."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if BACKEND == "jax":
        import jax

        return len([d for d in jax.devices() if d.platform == "gpu"])
    if BACKEND == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def pytest_collection_modifyitems(config, items):
    if visible_gpus():
        return
    skip = pytest.mark.skip(reason=f"no GPU visible to the {BACKEND} backend")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def clean_state():
    """Every test starts from float32, a fixed seed and a fresh name scope."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    keras.backend.clear_session()
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
