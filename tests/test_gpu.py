"""Checks that only mean something on a GPU; skipped where none is visible."""

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()

pytestmark = pytest.mark.gpu


def on_gpu(x):
    """Whether a backend tensor lives on a GPU."""
    if BACKEND == "jax":
        return all(device.platform == "gpu" for device in x.devices())
    if BACKEND == "torch":
        return x.device.type == "cuda"
    # TensorFlow: "/job:localhost/replica:0/task:0/device:GPU:0".
    return "GPU" in x.device.upper()


def test_lookup_runs_on_the_gpu():
    layer = Embedding(1000, 16)
    ids = np.array([[1, 2, 999]], dtype="int32")
    out = layer(ops.convert_to_tensor(ids))
    assert on_gpu(out)
    assert on_gpu(layer.embeddings.value)  # the table itself
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[ids])


def test_lora_lookup_runs_on_the_gpu():
    layer = Embedding(1000, 16, lora_rank=4)
    layer.build()
    layer.lora_embeddings_b.assign(np.ones((4, 16), dtype="float32"))
    ids = np.array([[1, 2, 999]], dtype="int32")
    out = layer(ops.convert_to_tensor(ids))
    assert on_gpu(out)
    np.testing.assert_allclose(
        to_numpy(out), table_of(layer)[ids], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bad_id", [10, -1, 2**20])
def test_invalid_id_on_gpu_raises_and_the_device_keeps_working(bad_id):
    layer = Embedding(10, 4, name="tokens")
    with pytest.raises(InvalidIdError, match=f"invalid id {bad_id} at position"):
        layer(ops.convert_to_tensor(np.array([1, bad_id], dtype="int32")))
    # The check runs before the gather: no device-side assert, no dead
    # context; the next lookup on the same device works.
    out = layer(ops.convert_to_tensor(np.array([1, 9], dtype="int32")))
    assert on_gpu(out)
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[1, 9]])


def test_zeros_mode_on_gpu_and_the_device_keeps_working():
    layer = Embedding(10, 4, invalid_ids="zeros")
    out = layer(ops.convert_to_tensor(np.array([1, 10, -1], dtype="int32")))
    assert on_gpu(out)
    expected = table_of(layer)[[1, 0, 0]]
    expected[1:] = 0.0
    np.testing.assert_array_equal(to_numpy(out), expected)
    out = layer(ops.convert_to_tensor(np.array([9], dtype="int32")))
    np.testing.assert_array_equal(to_numpy(out), table_of(layer)[[9]])


def test_predict_on_gpu_with_invalid_ids():
    layer = Embedding(10, 4, invalid_ids="zeros")
    model = keras.Sequential([keras.Input((2,), dtype="int32"), layer])
    out = model.predict(np.array([[1, 10]], dtype="int32"), verbose=0)
    np.testing.assert_array_equal(out[0, 0], table_of(layer)[1])
    np.testing.assert_array_equal(out[0, 1], np.zeros(4))
    valid = model.predict(np.array([[3, 9]], dtype="int32"), verbose=0)
    np.testing.assert_array_equal(valid[0], table_of(layer)[[3, 9]])


@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_lookup_on_gpu_equals_numpy_reference(mode, block_size):
    """int8 casts and int4 unpacking (float32 floor and select) as the GPU
    kernels do them."""
    from quantization_reference import dequantized_table

    if mode == "int8" and block_size is not None:
        pytest.skip("int8 has one scale per row")
    layer = Embedding(1000, 16)
    layer.build()
    config = None
    if mode == "int4":
        config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
    layer.quantize(mode, config=config)
    ids = np.array([[1, 2, 999], [0, 500, 7]], dtype="int32")
    out = layer(ops.convert_to_tensor(ids))
    assert on_gpu(out)
    assert on_gpu(layer._embeddings.value)
    np.testing.assert_allclose(
        to_numpy(out), dequantized_table(layer)[ids], rtol=1e-6, atol=1e-7
    )
    with pytest.raises(InvalidIdError, match="invalid id 1000 at position"):
        layer(ops.convert_to_tensor(np.array([1, 1000], dtype="int32")))
    model = keras.Sequential([keras.Input((3,), dtype="int32"), layer])
    bad = np.array([[1, 1000, 2]], dtype="int32")
    if BACKEND == "torch":  # Keras runs predict eagerly on PyTorch
        with pytest.raises(InvalidIdError, match="invalid id 1000 at position"):
            model.predict(bad, verbose=0)
    else:  # compiled: zeros
        np.testing.assert_array_equal(model.predict(bad, verbose=0)[0, 1], np.zeros(16))
