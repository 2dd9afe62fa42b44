"""Quantized tables: making them from a float table, reading rows back.

The formats are those of `keras.layers.Embedding`, so checkpoints cross both
ways:

- int8: `embeddings` int8 `(input_dim, output_dim)` and one `embeddings_scale`
  per row; a row reads back as `int8_row / scale`.
- int4 per row (`block_size=None`): `embeddings` holds two int4 values per
  byte, `(input_dim, ceil(output_dim / 2))`, low nibble first; one scale per
  row, read back as for int8.
- int4 grouped (`block_size > 0`, Keras's default of 128): each row is cut into
  groups of `block_size` values, each with a scale and an int8 zero point,
  `(input_dim, groups)`; a value reads back as `(int4 - zero) * scale`, and
  `g_idx` (float32, `(output_dim,)`) names the group of each column.

This module makes them from float values on the host and unpacks int4
bytes; `_tables` reads rows back, one class per format.
"""

import math

import keras
import numpy as np
from keras import ops

MODES = ("int8", "int4")
INT8_RANGE = (-127, 127)
INT4_RANGE = (-8, 7)


def packed_width(output_dim):
    """Bytes per row of an int4 table: two values per byte, padded."""
    return (output_dim + 1) // 2


def group_count(output_dim, block_size):
    return math.ceil(output_dim / block_size)


def group_index(output_dim, block_size):
    """The group of each column, as Keras stores it in `g_idx` (float32)."""
    return (np.arange(output_dim) // block_size).astype("float32")


def check_group_index(layer_name, g_idx, output_dim, block_size):
    """Raises unless a checkpoint's `g_idx` is the one `block_size` makes."""
    expected = group_index(output_dim, block_size)
    if not np.array_equal(np.asarray(g_idx), expected):
        raise ValueError(
            f"Layer '{layer_name}' cannot load g_idx from the checkpoint: it "
            f"should number the groups of {block_size} columns, "
            f"{expected[: min(output_dim, 2 * block_size + 1)].tolist()}..., but "
            f"holds {np.asarray(g_idx)[: min(output_dim, 2 * block_size + 1)].tolist()}"
            "... The file is corrupt or was written for another int4 "
            "block_size."
        )


def check_config(config):
    """Raises `ValueError` unless `config` is `None` or an int8/int4 config."""
    if config is None:
        return
    if not isinstance(config, keras.quantizers.QuantizationConfig) or (
        config.mode not in MODES
    ):
        raise ValueError(
            "`quantization_config` must be None, a "
            "keras.quantizers.Int8QuantizationConfig or a "
            "keras.quantizers.Int4QuantizationConfig: an Embedding quantizes "
            f"to {MODES}. Received: quantization_config={config!r}."
        )


def keras_default_config(mode):
    """The config of a bare `quantize(mode)`, as Keras resolves it: int4 in
    groups of 128."""
    if mode == "int8":
        return keras.quantizers.Int8QuantizationConfig()
    return keras.quantizers.Int4QuantizationConfig()


def block_size_of(config):
    """The int4 group size of a config, `None` for one scale per row."""
    block_size = getattr(config, "block_size", None)
    return None if block_size in (None, -1) else block_size


def quantize_table(table, mode, config, layer_name):
    """Quantizes a float table on the host, as `keras.layers.Embedding` does.

    Returns a dict of NumPy arrays named like the layer's variables
    (`embeddings`, `embeddings_scale`, and for grouped int4 `embeddings_zero`).
    """
    table = np.asarray(table, dtype="float32")
    if mode == "int4" and block_size_of(config) is not None:
        values, scale, zero = _quantize_groups(table, block_size_of(config))
        return {
            "embeddings": _pack_int4(values),
            "embeddings_scale": scale,
            "embeddings_zero": zero,
        }
    if mode == "int8":
        default = keras.quantizers.AbsMaxQuantizer(axis=-1)
    else:
        default = keras.quantizers.AbsMaxQuantizer(
            axis=-1, value_range=INT4_RANGE, output_dtype="int8"
        )
    quantizer = getattr(config, "weight_quantizer", None) or default
    values, scale = quantizer(table, to_numpy=True)
    values = ops.convert_to_numpy(values)
    scale = ops.convert_to_numpy(scale)
    if scale.shape not in ((table.shape[0], 1), (table.shape[0],)):
        raise ValueError(
            f"Layer '{layer_name}' cannot quantize its table with the "
            f"weight_quantizer {quantizer!r}: it returned scales of shape "
            f"{scale.shape}, but an Embedding needs one scale per row, "
            f"{(table.shape[0], 1)}. Use a quantizer that reduces over the "
            "last axis, e.g. keras.quantizers.AbsMaxQuantizer(axis=-1)."
        )
    scale = scale.reshape(table.shape[0])
    if mode == "int4":
        values = _pack_int4(values)
    return {"embeddings": values, "embeddings_scale": scale}


def _quantize_groups(table, block_size):
    """Asymmetric int4 in groups of `block_size` along each row.

    The arithmetic of `keras.quantizers.abs_max_quantize_grouped_with_zero_point`
    (applied by Keras to the transposed table), with one difference: each
    group's range is widened to include zero. Keras clips the zero point to
    [-8, 7], so a group whose values share a sign (or a group of one value)
    loses most of its range, and its values can come back wrong by their
    whole magnitude. With zero in the range the zero point never clips and
    every value comes back within half a step. Where a group's values already
    straddle zero, the result is Keras's, bit for bit; the format is the same
    either way, so Keras reads these tables correctly.
    """
    input_dim, output_dim = table.shape
    groups = group_count(output_dim, block_size)
    padded = np.zeros((input_dim, groups * block_size), dtype="float32")
    padded[:, :output_dim] = table
    padded = padded.reshape(input_dim, groups, block_size)
    qmin, qmax = INT4_RANGE
    low = np.minimum(padded.min(axis=-1, keepdims=True), 0)
    high = np.maximum(padded.max(axis=-1, keepdims=True), 0)
    scale = np.divide(np.subtract(high, low) + keras.backend.epsilon(), qmax - qmin)
    zero = np.clip(np.round(np.divide(-low, scale)) + qmin, qmin, qmax)
    values = np.clip(np.round(np.divide(padded, scale)) + zero, qmin, qmax)
    values = values.reshape(input_dim, -1)[:, :output_dim].astype("int8")
    return values, scale[..., 0].astype("float32"), zero[..., 0].astype("int8")


LOW_NIBBLE = np.int8(15)
LOW_SIGN = np.int8(8)


def nibbles(packed):
    """The low and high signed nibbles of packed int4 bytes, as float32.

    A byte holds `16 * high + (low mod 16)` for its signed nibbles, so
    `high = floor(byte / 16)`, and `low` is the remainder, less 16 from 8 up.
    In float32, which holds these integers exactly, because every exporter
    translates its ops faithfully: tf2onnx's opset 15 has no BitwiseAnd,
    and jax2onnx cannot lower an integer floor division over a symbolic
    batch size. This is the form a traced function holds; XLA fuses it.
    """
    wide = ops.cast(packed, "float32")
    high = ops.floor(ops.multiply(wide, 1 / 16))
    low = ops.subtract(wide, ops.multiply(high, 16.0))
    low = ops.where(ops.greater_equal(low, 8.0), ops.subtract(low, 16.0), low)
    return low, high


def integer_nibbles(packed, widen=True):
    """`nibbles`, computed in int8 and widened once: for eager calls that
    need the values themselves (a grouped table dequantizing its chunks).

    Each eager op is a pass over the bytes, and an int8 pass reads and
    writes a quarter of a float32 one; this form runs 3-5x faster than
    `nibbles` on CPU (docs/guides/language_models.md). Exact also where
    PyTorch's ONNX export, which traces eager calls, rewrites the ops: the
    right shift meets only multiples of 16 (the export turns it into a
    division rounding toward zero).
    """
    # int8 masks: Keras's TensorFlow `bitwise_and` widens both sides to the
    # dtype of a Python int's tensor (int32), a 4x wider pass. Made from
    # Python ints: torch.compile traces no NumPy scalar's conversion (it
    # broke the graph at `LOW_NIBBLE`).
    nibble, sign = (ops.convert_to_tensor(m, dtype="int8") for m in (15, 8))
    unsigned_low = ops.bitwise_and(packed, nibble)
    low = ops.subtract(unsigned_low, ops.multiply(ops.bitwise_and(packed, sign), 2))
    high = ops.right_shift(ops.subtract(packed, unsigned_low), 4)
    if not widen:  # int8, for a caller that widens them once
        return low, high
    return ops.cast(low, "float32"), ops.cast(high, "float32")


def _nibble_values():
    """`(256, 2)` float32: the low and high signed nibble of each byte, row
    `b` for the byte whose unsigned value is `b`."""
    signed = np.arange(256, dtype=np.uint8).view(np.int8).astype(np.int32)
    low = (signed & 15) - 16 * ((signed & 8) != 0)
    high = signed >> 4
    return np.stack([low, high], axis=-1).astype("float32")


# The nibbles, and halved: the values a per-row dequantization multiplies
# first (`_tables._QuantizedTable._dequantize`).
NIBBLE_TABLES = {False: _nibble_values(), True: 0.5 * _nibble_values()}
_nibble_tensors = {}


def _nibble_tensor(halved, cache):
    """`NIBBLE_TABLES[halved]` as a tensor; made once per backend when
    `cache` (the caller is eager: a tensor made in a trace belongs to it)."""
    key = (keras.config.backend(), halved)
    if cache and key in _nibble_tensors:
        return _nibble_tensors[key]
    table = ops.convert_to_tensor(NIBBLE_TABLES[halved])
    if cache:
        _nibble_tensors[key] = table
    return table


def unpack_int4_float(packed, output_dim, halved=False, cache=False):
    """The values of `unpack_int4(packed, output_dim)` as float32 (halved:
    times 0.5, exactly), in the fewest eager ops the backend runs fastest.

    Measured at 64 x 32 rows of 128 values on CPU, against `nibbles`'s
    eleven float32 ops: on JAX and TensorFlow one gather from a 256-row
    table of nibbles (`NIBBLE_TABLES`), eager 5.7x and 1.4x faster, and a
    TensorFlow graph without XLA 1.4x; on PyTorch, whose Keras `take` widens
    and wraps every index (two more passes over them), `integer_nibbles`
    stacked in int8 and widened once: as fast as the gather, and PyTorch's
    ONNX export, which traces eager calls, translates it exactly (each byte
    repeated and shifted in int8 took 0.7x the time, but the export turns a
    right shift into a division rounding toward zero). XLA fuses the
    arithmetic better (jax.jit 1.3x, TensorFlow's jit_compile 2x faster than
    the gather): a JAX trace, and a TensorFlow one beside an accelerator
    (where Keras compiles with XLA by default), unpack with `unpack_int4`.
    `cache`: the caller is eager (`_nibble_tensor`).
    """
    backend = keras.config.backend()
    width = 2 * packed.shape[-1]
    if backend == "torch":
        low, high = integer_nibbles(packed, widen=False)
        pairs = ops.stack([low, high], axis=-1)
        values = ops.reshape(pairs, (*leading_shape(packed), width))
        values = ops.cast(values, "float32")
        if halved:
            values = ops.multiply(values, 0.5)
    else:
        if backend == "jax":
            # jnp.take fills a negative index with NaN: read bytes unsigned.
            index = ops.cast(packed, "uint8")
        else:
            # tf.gather takes no int8 index; Keras's take wraps a negative.
            index = ops.cast(packed, "int32")
        pairs = ops.take(_nibble_tensor(halved, cache), index, axis=0)
        values = ops.reshape(pairs, (*leading_shape(packed), width))
    if width != output_dim:
        values = values[..., :output_dim]
    return values


def unpack_int4(packed, output_dim, dtype="int8"):
    """Unpacks the last axis of packed int4 bytes into values in [-8, 7].

    The values of `keras.quantizers.unpack_int4(packed, output_dim, axis=-1)`
    in a few elementwise ops (`nibbles`) instead of Keras's masks, two
    transposes and sign fix-ups: a lookup runs this on its gathered rows.
    Returns `dtype` values.
    """
    low, high = nibbles(packed)
    pairs = ops.stack([low, high], axis=-1)
    values = ops.reshape(pairs, (*leading_shape(packed), 2 * packed.shape[-1]))
    if 2 * packed.shape[-1] != output_dim:
        values = values[..., :output_dim]
    return ops.cast(values, dtype)


def half_column_groups(output_dim, block_size):
    """The group of each packed column's low and high nibble (columns `2k`
    and `2k + 1`); a padding nibble past `output_dim` counts in the last
    group (it meets a zero hidden value)."""
    groups = group_count(output_dim, block_size)
    columns = np.arange(packed_width(output_dim))
    low = np.minimum(2 * columns // block_size, groups - 1)
    high = np.minimum((2 * columns + 1) // block_size, groups - 1)
    return low.astype("int32"), high.astype("int32")


def leading_shape(x):
    """All but the last dimension: static where known, else a tensor's
    (a TensorFlow graph with an unknown batch size)."""
    static = tuple(x.shape[:-1])
    if None not in static:
        return static
    return tuple(ops.shape(x)[:-1])


def _pack_int4(values):
    packed, _, _ = keras.quantizers.pack_int4(
        ops.convert_to_tensor(values, dtype="int8"), axis=-1
    )
    return ops.convert_to_numpy(packed)
