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
