"""Checks that only mean something on a GPU; skipped where none is visible."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

pytestmark = pytest.mark.gpu


def device_of(x):
    if BACKEND == "jax":
        return next(iter(x.devices())).platform
    if BACKEND == "torch":
        return x.device.type
    return x.device


def test_lookup_runs_on_the_gpu():
    layer = Embedding(1000, 16, lora_rank=4)
    out = layer(ops.convert_to_tensor(np.array([[1, 2, 999]])))
    assert "gpu" in str(device_of(out)).lower() or "cuda" in str(device_of(out))
    np.testing.assert_allclose(to_numpy(out), table_of(layer)[[[1, 2, 999]]], atol=1e-5)


def test_invalid_id_on_gpu_raises_and_the_device_keeps_working():
    layer = Embedding(10, 4)
    with pytest.raises(InvalidIdError):
        layer(ops.convert_to_tensor(np.array([1, 10])))
    # The check runs before the gather: no device-side assert, no dead context.
    out = layer(ops.convert_to_tensor(np.array([1, 9])))
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[1, 9]])


def test_compiled_predict_on_gpu_gives_zeros():
    layer = Embedding(10, 4, invalid_ids="zeros")
    model = keras.Sequential([keras.Input((2,), dtype="int32"), layer])
    out = model.predict(np.array([[1, 10]]), verbose=0)
    np.testing.assert_array_equal(out[0, 1], np.zeros(4))
    np.testing.assert_array_equal(out[0, 0], table_of(layer)[1])
