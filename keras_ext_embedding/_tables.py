"""The table formats of an Embedding: float, int8, int4 per row, int4 grouped.

Each format is one class. It creates the layer's table variables, under
`keras.layers.Embedding`'s names and in its order (`_checkpoint` shows the
layout), and answers everything the layer asks of its table: the rows of
gathered ids, the whole table in float32, the variables a checkpoint stores
and what they hold, values set from a float table, and what
`layer.embeddings` returns. The layer composes ids -> table -> LoRA adapters
-> output and does not ask which format it holds.

The variables stay attributes of the layer (`layer._embeddings`,
`layer.embeddings_scale`, ...), where Keras and checkpoints expect them; a
format reads them from there.

Quantized rows are read back from gathered rows only: a lookup of `n` ids
touches `n` packed rows, never the `input_dim x output_dim` table that Keras
unpacks on every int4 call.
"""

import keras
from keras import ops

from keras_ext_embedding import _checkpoint, _quantization

FLOAT_SHAPE_HINT = (
    "Build the layer with the input_dim and output_dim the table was made for."
)
QUANTIZED_SHAPE_HINT = (
    "Build the layer with the input_dim, output_dim, dtype policy and "
    "quantization_config the checkpoint was saved with."
)


class _Table:
    def __init__(self, layer):
        self.layer = layer

    def check_stored(self, arrays):
        """Refuses checkpoint arrays whose values cannot be this table's
        (their count, dtypes and shapes are checked by `_checkpoint`)."""

    def add_delta(self, delta):
        """Adds a float32 `(input_dim, output_dim)` delta (merged LoRA
        adapters) to the table, kept in its format."""
        self.assign_float(ops.add(self.float_table(), delta))


class FloatTable(_Table):
    """`embeddings`, `(input_dim, output_dim)`, in the layer's variable dtype."""

    quantized = False
    mode = None
    block_size = None
    description = "a float table"
    shape_hint = FLOAT_SHAPE_HINT

    def build(self):
        layer = self.layer
        layer._embeddings = layer.add_weight(
            shape=(layer.input_dim, layer.output_dim),
            initializer=layer.embeddings_initializer,
            name="embeddings",
            regularizer=layer.embeddings_regularizer,
            constraint=layer.embeddings_constraint,
            trainable=True,
        )

    def remove(self):
        del self.layer._embeddings

    @property
    def trainable(self):
        """Whether the table trains when LoRA is off."""
        return True

    @property
    def row_dtype(self):
        """The dtype of `rows`, before the layer casts to its compute dtype."""
        return self.layer._embeddings.dtype

    def rows(self, index):
        return ops.take(self.layer._embeddings, index, axis=0)

    def float_table(self):
        """The whole table as float32."""
        return ops.cast(self.layer._embeddings, "float32")

    def embeddings(self, lora):
        """What `layer.embeddings` returns: the table, merged with `lora`
        (the adapters, or None) in the compute dtype."""
        table = self.layer._embeddings
        if lora is None:
            return table
        merged = ops.add(table, lora.delta())
        return ops.cast(merged, self.layer.compute_dtype)

    def stored(self):
        """`(name, variable)` of the table, in checkpoint order."""
        return [("embeddings", self.layer._embeddings)]

    def assign_stored(self, arrays):
        self.assign_float(arrays[0])

    def assign_merged(self, arrays, lora_a, lora_b, lora_alpha):
        """Assigns a checkpoint's table with its LoRA adapters folded in
        (for a layer without LoRA), merged in float64 on the host."""
        self.assign_float(
            _checkpoint.merged_table(arrays[0], lora_a, lora_b, lora_alpha)
        )

    def assign_float(self, table):
        variable = self.layer._embeddings
        variable.assign(ops.cast(table, variable.dtype))


class _QuantizedTable(_Table):
    """What every quantized format shares: `embeddings` int8 and one
    `embeddings_scale` per row (or per group), both frozen."""

    quantized = True
    block_size = None
    shape_hint = QUANTIZED_SHAPE_HINT

    def build(self):
        layer = self.layer
        layer._embeddings = layer.add_weight(
            name="embeddings",
            shape=(layer.input_dim, self.width),
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        # autocast=False: under a mixed policy Keras would read the scales in
        # the compute dtype (bfloat16), rounding them before they are used;
        # rows are dequantized in float32 and rounded once, at the end.
        layer.embeddings_scale = layer.add_weight(
            name="embeddings_scale",
            shape=self.scale_shape,
            initializer="ones",
            trainable=False,
            autocast=False,
        )

    def remove(self):
        del self.layer._embeddings
        del self.layer.embeddings_scale

    @property
    def trainable(self):
        return False

    @property
    def width(self):
        return self.layer.output_dim

    @property
    def scale_shape(self):
        return (self.layer.input_dim,)

    @property
    def row_dtype(self):
        return "float32"  # rows are dequantized in float32

    def rows(self, index):
        values = self._unpacked(ops.take(self.layer._embeddings, index, axis=0))
        scale = ops.take(self.layer.embeddings_scale, index, axis=0)
        return self._dequantize(values, scale, index)

    def float_table(self):
        """The whole table as float32: an explicit `input_dim x output_dim`
        step (merging LoRA, a traced function's float copy), never a lookup."""
        return self.rows(ops.arange(self.layer.input_dim))

    def embeddings(self, lora):
        # As keras.layers.Embedding: the stored integers (int4 unpacked to
        # int8), without the delta.
        return self._unpacked(self.layer._embeddings)

    def stored(self):
        return [
            ("embeddings", self.layer._embeddings),
            ("embeddings_scale", self.layer.embeddings_scale),
        ]

    def assign_stored(self, arrays):
        for (_, variable), array in zip(self.stored(), arrays, strict=True):
            variable.assign(array)

    def assign_merged(self, arrays, lora_a, lora_b, lora_alpha):
        """Assigns a checkpoint's quantized table, then folds its adapters in
        as `merge_lora()` does: dequantized, merged, quantized again."""
        self.assign_stored(arrays)
        rank = lora_a.shape[-1]
        delta = ops.matmul(ops.cast(lora_a, "float32"), ops.cast(lora_b, "float32"))
        self.add_delta((lora_alpha / rank) * delta)

    def assign_float(self, table):
        """Quantizes float values with the layer's config and assigns them."""
        layer = self.layer
        table = ops.convert_to_numpy(ops.cast(table, "float32"))
        config = layer._default_config(self.mode)
        self.assign_quantized(
            _quantization.quantize_table(table, self.mode, config, layer.name)
        )

    def assign_quantized(self, arrays):
        """Assigns the arrays of `_quantization.quantize_table`."""
        for name, variable in self.stored():
            if name in arrays:
                variable.assign(arrays[name])

    def _unpacked(self, values):
        """Stored int8 values as one int8 value per column."""
        return values

    def _dequantize(self, values, scale, index):
        # One scale per row. The same bits on every backend: XLA (JAX,
        # TensorFlow with jit_compile) turns `values / scale` into `values *
        # (1 / scale)`, whose last bit can differ, so that product is what
        # every backend computes, as `(values * 0.5) * (2 / scale)`: scaling
        # by powers of two is exact, and a literal `1 / scale` would become
        # TensorFlow's approximate Reciprocal op in a graph. `values * 0.5` is
        # also the cast to float32.
        halves = ops.multiply(values, 0.5)
        return ops.multiply(halves, ops.expand_dims(ops.divide(2.0, scale), -1))


class Int8Table(_QuantizedTable):
    """int8 values, `(input_dim, output_dim)`; a row reads back as
    `int8_row / scale`."""

    mode = "int8"
    description = "an int8-quantized table"


class Int4Table(_QuantizedTable):
    """Two int4 values a byte, `(input_dim, ceil(output_dim / 2))`, low
    nibble first; one scale per row, read back as for int8."""

    mode = "int4"
    description = "an int4-quantized table with one scale per row"

    @property
    def width(self):
        return _quantization.packed_width(self.layer.output_dim)

    def _unpacked(self, values):
        return _quantization.unpack_int4(values, self.layer.output_dim)


class GroupedInt4Table(Int4Table):
    """int4 values as `Int4Table`, each row cut into groups of `block_size`
    values with a float32 scale and an int8 zero point each, `(input_dim,
    groups)`; a value reads back as `(int4 - zero) * scale`, and `g_idx`
    (float32, `(output_dim,)`) names the group of each column."""

    def __init__(self, layer, block_size):
        super().__init__(layer)
        self.block_size = block_size

    @property
    def description(self):
        return f"an int4-quantized table in groups of {self.block_size}"

    @property
    def groups(self):
        return _quantization.group_count(self.layer.output_dim, self.block_size)

    @property
    def scale_shape(self):
        return (self.layer.input_dim, self.groups)

    def build(self):
        super().build()
        layer = self.layer
        layer.embeddings_zero = layer.add_weight(
            name="embeddings_zero",
            shape=self.scale_shape,
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        layer.g_idx = layer.add_weight(
            name="g_idx",
            shape=(layer.output_dim,),
            initializer="zeros",
            dtype="float32",
            trainable=False,
        )
        layer.g_idx.assign(_quantization.group_index(layer.output_dim, self.block_size))

    def remove(self):
        super().remove()
        del self.layer.embeddings_zero
        del self.layer.g_idx

    def stored(self):
        return [
            *super().stored(),
            ("embeddings_zero", self.layer.embeddings_zero),
            ("g_idx", self.layer.g_idx),
        ]

    def check_stored(self, arrays):
        layer = self.layer
        _quantization.check_group_index(
            layer.name, arrays[3], layer.output_dim, self.block_size
        )

    def _dequantize(self, values, scale, index):
        """`(values - zero) * scale`, each column with its group's zero and
        scale. The zero point is subtracted in int8 (values and zero points
        both lie in [-8, 7]), before the one cast to float32."""
        zero = ops.take(self.layer.embeddings_zero, index, axis=0)
        output_dim, block_size, groups = (
            self.layer.output_dim,
            self.block_size,
            self.groups,
        )
        if groups == 1:
            centered = ops.subtract(values, zero)
            return ops.multiply(ops.cast(centered, "float32"), scale)
        if output_dim == groups * block_size:
            # Whole groups: broadcast each group's zero and scale over its
            # columns.
            leading = _quantization.leading_shape(values)
            grouped = ops.reshape(values, (*leading, groups, block_size))
            centered = ops.subtract(grouped, ops.expand_dims(zero, -1))
            rows = ops.multiply(
                ops.cast(centered, "float32"), ops.expand_dims(scale, -1)
            )
            return ops.reshape(rows, (*leading, output_dim))
        columns = _quantization.group_index(output_dim, block_size).astype("int32")
        centered = ops.subtract(values, ops.take(zero, columns, axis=-1))
        return ops.multiply(
            ops.cast(centered, "float32"), ops.take(scale, columns, axis=-1)
        )


def quantized_table(layer, mode, config):
    """The format that `mode` and `config` describe (an int4 config's
    `block_size`; without one, what the layer's policy names)."""
    if mode == "int8":
        return Int8Table(layer)
    if not isinstance(config, keras.quantizers.Int4QuantizationConfig):
        config = layer._default_config(mode)
    block_size = _quantization.block_size_of(config)
    if block_size is None:
        return Int4Table(layer)
    return GroupedInt4Table(layer, block_size)
