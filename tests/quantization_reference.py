"""NumPy references for quantized tables, written from Keras's format alone.

They read a quantized layer's variables back to float64 without any code of
the package or of Keras, so a lookup can be checked against them.
"""

import keras
import numpy as np
from keras import ops

# (mode, Int4QuantizationConfig block_size or "default", description); the
# default int4 config has block_size=128, one group per row below 128 columns.
CONFIGS = [
    ("int8", None),
    ("int4", "default"),
    ("int4", None),
    ("int4", 5),
]
CONFIG_IDS = ["int8", "int4-default", "int4-per-row", "int4-block5"]


def config_for(mode, block_size):
    if mode == "int8":
        return None
    if block_size == "default":
        return None
    return keras.quantizers.Int4QuantizationConfig(block_size=block_size)


def raw(variable):
    return np.array(ops.convert_to_numpy(variable))


def comparable_dtype(variable):
    """A variable's dtype, as compared with Keras's layer's. Keras 3.15 stores
    an untied int4 table's reverse zero points as float32, as ours does (our
    checkpoint format); later Keras as int8. Both hold the same integers in
    [-8, 7], and each layer loads the other's (test_reversible_saving.py)."""
    if variable.name == "reverse_embeddings_zero":
        return "zero points"
    return keras.backend.standardize_dtype(variable.dtype)


def unpack_int4(packed, output_dim):
    """Low nibble first, two's complement in 4 bits."""
    packed = packed.astype(np.uint8)
    low = (packed & 0x0F).astype(np.int16)
    high = (packed >> 4).astype(np.int16)
    values = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)
    values = values[..., :output_dim]
    return np.where(values > 7, values - 16, values)


def dequantized_table(layer):
    """The layer's quantized table read back to float64, `(input_dim, dim)`."""
    values = raw(layer._embeddings)
    scale = raw(layer.embeddings_scale).astype("float64")
    if layer.quantization_mode == "int4":
        values = unpack_int4(values, layer.output_dim)
    values = values.astype("float64")
    if scale.ndim == 1:
        return values / scale[:, None]
    groups = raw(layer.g_idx).astype("int64")  # the group of each column
    zero = raw(layer.embeddings_zero).astype("float64")
    return (values - zero[:, groups]) * scale[:, groups]


def step_sizes(layer):
    """The quantization step of each value, `(input_dim, dim)`."""
    scale = raw(layer.embeddings_scale).astype("float64")
    if scale.ndim == 1:
        return np.broadcast_to(
            1.0 / scale[:, None], (layer.input_dim, layer.output_dim)
        )
    return scale[:, raw(layer.g_idx).astype("int64")]


def dequantized_reverse_table(layer):
    """An untied layer's quantized `reverse_embeddings` read back to float64,
    `(output_dim, input_dim)`: int4 packed along axis 0, one scale per
    vocabulary column, or per group of rows (the groups of `g_idx`) and
    column, with a float zero point."""
    values = raw(layer.reverse_embeddings)
    scale = raw(layer.reverse_embeddings_scale).astype("float64")
    if layer.quantization_mode == "int4":
        # Packed along axis 0 is packed along the last axis of the transpose.
        values = unpack_int4(values.T, layer.output_dim).T
    values = values.astype("float64")
    if scale.ndim == 1:
        return values / scale[None, :]
    groups = raw(layer.g_idx).astype("int64")
    zero = raw(layer.reverse_embeddings_zero).astype("float64")
    return (values - zero[groups, :]) * scale[groups, :]


def absmax_dequantized(x, value_range=(-127, 127), epsilon=1e-7):
    """`x` through Keras's `AbsMaxQuantizer(axis=-1)` and back, as float64.

    The scale and the rounding are computed in float32, as the quantizer
    does, so that every value rounds to the same integer."""
    x = np.asarray(x, dtype="float32")
    scale = np.float32(value_range[1]) / (
        np.max(np.abs(x), axis=-1, keepdims=True) + np.float32(epsilon)
    )
    values = np.clip(np.round(x * scale), *value_range)
    return values.astype("float64") / scale.astype("float64")
