"""The table formats of an embedding layer: float, int8, int4 per row, int4 grouped.

Each format is one class. It creates the layer's table variables, under
`keras.layers.Embedding`'s names and in its order (`_checkpoint` shows the
layout), and answers everything the layer asks of its table: the rows of
gathered ids, the projection of hidden states onto every row (`h @ table^T`,
a `ReversibleEmbedding`'s logits), the whole table in float32, the variables
a checkpoint stores and what they hold, values set from a float table, and
what `layer.embeddings` returns. The layer composes ids -> table -> LoRA
adapters -> output and does not ask which format it holds.

A table holds a vocabulary of `input_dim` rows of `output_dim` values. Where
its variables live is its `Placement`: `FORWARD` is the table a lookup reads
(`embeddings`, rows first), `REVERSE` the untied output projection of a
`ReversibleEmbedding` (`reverse_embeddings`, stored transposed, as Keras
stores it). A format reads both the same way: each slice of rows it reads is
turned rows-first on the way (a transpose of the few stored bytes of that
slice, never of the table).

The variables stay attributes of the layer (`layer._embeddings`,
`layer.embeddings_scale`, `layer.reverse_embeddings`, ...), where Keras and
checkpoints expect them; a format reads them from there.

Quantized rows are read back from gathered rows only: a lookup of `n` ids
touches `n` packed rows, never the `input_dim x output_dim` table that Keras
unpacks on every int4 call; a projection reads the table in vocabulary
chunks (`_projection`), so no float copy of it is ever made.
"""

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import (
    _checkpoint,
    _ids,
    _layout,
    _projection,
    _quantization,
    _runs,
)

# Keras from 3.16 on lists each layer's variables per quantization mode in
# `Layer.variable_serialization_spec`, and a per-row int4 layer holds None in
# the grouped format's attributes there (`embeddings_zero`, `g_idx`,
# `reverse_embeddings_zero`); Keras 3.15's holds no such attributes (its tests
# check that). Ours holds what the installed Keras's layer holds.
OPTIONAL_VARIABLES_ARE_NONE = hasattr(keras.layers.Layer, "variable_serialization_spec")

FLOAT_SHAPE_HINT = (
    "Build the layer with the input_dim and output_dim the table was made for."
)
QUANTIZED_SHAPE_HINT = (
    "Build the layer with the input_dim, output_dim, dtype policy and "
    "quantization_config the checkpoint was saved with."
)


class Placement:
    """Where a table's variables live on the layer, and which way round.

    Each variable has a role (`"embeddings"`, `"scale"`, `"zero"`, and for
    the forward table `"g_idx"`) and Keras's name for it: the role's name
    after `prefix` (`reverse_embeddings_scale`). The name is also the layer
    attribute holding it, except the forward table's `_embeddings` (the
    `embeddings` property returns the table merged with LoRA).
    """

    ROLES = {
        "embeddings": "embeddings",
        "scale": "embeddings_scale",
        "zero": "embeddings_zero",
        "g_idx": "g_idx",
    }

    def __init__(self, prefix, transposed, zero_dtype, group_index, attributes):
        roles = dict(self.ROLES)
        if not group_index:
            del roles["g_idx"]
        self.variables = {role: prefix + name for role, name in roles.items()}
        self.attributes = {**self.variables, **attributes}
        self.transposed = transposed
        self.zero_dtype = zero_dtype
        self.description = prefix.replace("_", " ")

    def name(self, role):
        return self.variables[role]

    def has(self, role):
        return role in self.variables

    def get(self, layer, role):
        return getattr(layer, self.attributes[role])

    def set(self, layer, role, variable):
        setattr(layer, self.attributes[role], variable)

    def delete(self, layer, role):
        delattr(layer, self.attributes[role])

    def shape(self, rows_first):
        """The stored shape of a variable whose rows-first shape is given
        (or the `_layout` roles of its dimensions)."""
        if self.transposed and len(rows_first) == 2:
            return tuple(reversed(rows_first))
        return tuple(rows_first)

    def stored(self, array):
        """A rows-first NumPy array in this placement's orientation."""
        array = np.asarray(array)
        return array.T if self.transposed and array.ndim == 2 else array

    def read(self, value, start, stop):
        """Rows `[start, stop)` of a variable's value, rows first."""
        if len(value.shape) == 1:
            return value[start:stop]
        if self.transposed:
            return ops.transpose(value[:, start:stop])
        return value[start:stop]


FORWARD = Placement(
    prefix="",
    transposed=False,
    zero_dtype="int8",
    group_index=True,
    attributes={"embeddings": "_embeddings"},
)
# Keras's untied reverse table: `(output_dim, input_dim)`, int4 packed along
# axis 0, per-group scales and zero points `(groups, input_dim)`, the zero
# points float32 (the forward table's are int8), and no `g_idx` of its own.
REVERSE = Placement(
    prefix="reverse_",
    transposed=True,
    zero_dtype="float32",
    group_index=False,
    attributes={},
)


class _Table:
    def __init__(self, layer, placement=FORWARD):
        self.layer = layer
        self.placement = placement

    @property
    def rows_count(self):
        return self.layer.input_dim

    @property
    def variable(self):
        """The variable holding the table's values (`embeddings` for the
        forward table, `reverse_embeddings` for the reverse one)."""
        return self.placement.get(self.layer, "embeddings")

    def add_weight(self, role, shape, roles, **kwargs):
        """Creates and sets the variable of `role`, of rows-first `shape`
        whose dimensions span `roles` (`_layout`), stored in this
        placement's orientation.

        The table is laid out by the distribution's rule for its path, or
        for a reverse table after the forward one (its rows and columns
        swapped); the other variables after the table.
        """
        layer, place = self.layer, self.placement
        if role != "embeddings":
            follows = (self.variable, place.shape(_layout.TABLE))
        elif place is FORWARD:
            follows = None
        else:
            follows = (FORWARD.get(layer, "embeddings"), _layout.TABLE)
        variable = _layout.add_weight(
            layer,
            place.shape(roles),
            follows,
            name=place.name(role),
            shape=place.shape(shape),
            **kwargs,
        )
        place.set(layer, role, variable)
        return variable

    def check_stored(self, arrays):
        """Refuses checkpoint arrays whose values cannot be this table's
        (their count, dtypes and shapes are checked by `_checkpoint`)."""

    def add_delta(self, delta):
        """Adds a float32 `(input_dim, output_dim)` delta (merged LoRA
        adapters) to the table, kept in its format."""
        self.assign_float(ops.add(self.float_table(), delta))

    def freeze(self):
        """Stops the table from training (while LoRA adapters train)."""
        self.variable.trainable = False

    def unfreeze(self):
        """Lets the table train again if its format can."""
        self.variable.trainable = self.trainable

    def stored_float(self):
        """The whole table in float32, in its placement's orientation."""
        table = self.float_table()
        return ops.transpose(table) if self.placement.transposed else table


class FloatTable(_Table):
    """`embeddings` `(input_dim, output_dim)` (transposed for the reverse
    table), in the layer's variable dtype."""

    quantized = False
    mode = None
    block_size = None
    shape_hint = FLOAT_SHAPE_HINT

    @property
    def description(self):
        return f"a float {self.placement.description}table"

    def build(self):
        layer = self.layer
        forward = self.placement is FORWARD
        # As Keras: only the forward table takes the regularizer and
        # constraint. A row-sparse table is read without autocasting: its
        # step writes the whole variable back, which a model's mixed
        # precision scope would otherwise round to the compute dtype.
        row_sparse = forward and layer._row_sparse_rule is not None
        self.add_weight(
            "embeddings",
            (layer.input_dim, layer.output_dim),
            _layout.TABLE,
            initializer=layer.embeddings_initializer,
            regularizer=layer.embeddings_regularizer if forward else None,
            constraint=layer.embeddings_constraint if forward else None,
            trainable=True,
            autocast=not row_sparse,
        )

    def remove(self):
        self.placement.delete(self.layer, "embeddings")

    @property
    def trainable(self):
        """Whether the table trains when LoRA is off."""
        return True

    @property
    def row_dtype(self):
        """The dtype of `rows`, before the layer casts to its compute dtype."""
        return self.variable.dtype

    def rows(self, index, reader=None):
        """The rows at `index`, read by a `_runs.RowReader`."""
        return (reader or _runs.RowReader()).rows(self.variable, index)

    def project(self, hidden, dtype, inputs_quantizer=None):
        """`hidden @ table^T`, `(..., output_dim) -> (..., input_dim)`, in
        `dtype`.

        The product runs in the wider of the table's dtype and `dtype`: a
        bfloat16 policy's float32 table is read as it is (no cast copy of
        the table; the logits are rounded once, at the end), and a bfloat16
        table asked for float32 logits is widened chunk by chunk.
        """
        table = ops.convert_to_tensor(self.variable)
        dot_dtype = keras.backend.result_type(table.dtype, dtype)
        hidden = ops.cast(hidden, dot_dtype)
        if keras.backend.standardize_dtype(table.dtype) == dot_dtype:
            logits = _projection.table_logits(
                hidden, table, transposed=self.placement.transposed
            )
        else:
            logits = _projection.chunked_logits(
                hidden,
                self.rows_count,
                self.layer.output_dim,
                lambda start, stop: ops.cast(
                    self.placement.read(table, start, stop), dot_dtype
                ),
            )
        return ops.cast(logits, dtype)

    def float_table(self):
        """The whole table as float32, rows first."""
        table = ops.cast(self.variable, "float32")
        return ops.transpose(table) if self.placement.transposed else table

    def embeddings(self, lora):
        """What `layer.embeddings` returns: the table, merged with `lora`
        (the adapters, or None) in the compute dtype."""
        table = self.variable
        if lora is None:
            return table
        merged = ops.add(table, lora.delta())
        return ops.cast(merged, self.layer.compute_dtype)

    def stored(self):
        """`(name, variable)` of the table, in checkpoint order."""
        return [(self.placement.name("embeddings"), self.variable)]

    def assign_stored(self, arrays):
        _layout.assign(self.variable, arrays[0])

    def assign_merged(self, arrays, lora_a, lora_b, lora_alpha):
        """Assigns a checkpoint's table with its LoRA adapters folded in
        (for a layer without LoRA), merged in float64 on the host."""
        self.assign_float(
            _checkpoint.merged_table(arrays[0], lora_a, lora_b, lora_alpha)
        )

    def assign_float(self, table):
        """Assigns rows-first float values."""
        variable = self.variable
        values = ops.cast(table, variable.dtype)
        variable.assign(ops.transpose(values) if self.placement.transposed else values)


class _QuantizedTable(_Table):
    """What every quantized format shares: `embeddings` int8 and one
    `embeddings_scale` per row (or per group), both frozen."""

    quantized = True
    block_size = None
    shape_hint = QUANTIZED_SHAPE_HINT
    # The largest magnitude of a stored value: bounds the integer dot of the
    # projection (`_projection.exact_logits`).
    value_bound = 127

    def build(self):
        layer = self.layer
        self.add_weight(
            "embeddings",
            (layer.input_dim, self.width),
            _layout.TABLE,
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        # autocast=False: under a mixed policy Keras would read the scales in
        # the compute dtype (bfloat16), rounding them before they are used;
        # rows are dequantized in float32 and rounded once, at the end.
        self.add_weight(
            "scale",
            self.scale_shape,
            self.scale_roles,
            initializer="ones",
            trainable=False,
            autocast=False,
        )

    def remove(self):
        self.placement.delete(self.layer, "embeddings")
        self.placement.delete(self.layer, "scale")

    @property
    def description(self):
        return f"an {self.mode}-quantized {self.placement.description}table"

    @property
    def trainable(self):
        return False

    @property
    def width(self):
        return self.layer.output_dim

    @property
    def scale_shape(self):
        return (self.layer.input_dim,)

    # One scale per row: laid out as the rows.
    scale_roles = (_layout.ROWS,)

    @property
    def row_dtype(self):
        return "float32"  # rows are dequantized in float32

    def rows(self, index, reader=None):
        # A quantized table is frozen: how a trained one is read does not
        # apply.
        return self._rows(lambda variable: _gather_rows(variable, index))

    def project(self, hidden, dtype, inputs_quantizer=None):
        """`hidden @ table^T` in `dtype`, with Keras's numerics.

        As `keras.layers.ReversibleEmbedding`: with an `inputs_quantizer`
        (int8's AbsMax per token), the hidden states are quantized and
        multiplied by the stored integers exactly, then divided by both
        scales; without one, by the stored integers, then divided by the
        table's scale. The table is read in vocabulary chunks, each widened
        to float32 on its own.
        """
        inputs_scale = None
        if inputs_quantizer is not None:
            hidden, inputs_scale = inputs_quantizer(hidden)
        logits = self._chunked_logits(
            ops.cast(hidden, "float32"), exact=inputs_scale is not None
        )
        return self._descaled(ops.cast(logits, dtype), inputs_scale, dtype)

    def _chunked_logits(self, hidden, exact):
        """`hidden @ values^T` of the stored integers, chunk by chunk."""
        place = self.placement
        embeddings = ops.convert_to_tensor(place.get(self.layer, "embeddings"))

        def kernel(start, stop):
            return ops.cast(place.read(embeddings, start, stop), "float32")

        if exact:
            return _projection.exact_logits(
                hidden, self.rows_count, self.layer.output_dim, kernel, self.value_bound
            )
        return _projection.chunked_logits(
            hidden, self.rows_count, self.layer.output_dim, kernel
        )

    def _descaled(self, logits, inputs_scale, dtype):
        """The logits divided by the table's scale of each row (and the
        hidden states' scale), as Keras divides them."""
        scale = ops.cast(self.placement.get(self.layer, "scale"), dtype)
        if inputs_scale is not None:
            scale = ops.multiply(ops.cast(inputs_scale, dtype), scale)
        return ops.divide(logits, scale)

    def float_table(self):
        """The whole table as float32, rows first: an explicit `input_dim x
        output_dim` step (merging LoRA, a traced function's float copy),
        never a lookup or a projection."""
        place, rows = self.placement, self.rows_count
        return self._rows(
            lambda variable: place.read(ops.convert_to_tensor(variable), 0, rows)
        )

    def embeddings(self, lora):
        # As keras.layers.Embedding: the stored integers (int4 unpacked to
        # int8), without the delta.
        return self._unpacked(self.layer._embeddings)

    def stored(self):
        place = self.placement
        return [
            (place.name(role), place.get(self.layer, role)) for role in self._roles()
        ]

    def assign_stored(self, arrays):
        for (_, variable), array in zip(self.stored(), arrays, strict=True):
            _layout.assign(variable, array)

    def assign_merged(self, arrays, lora_a, lora_b, lora_alpha):
        """Assigns a checkpoint's quantized table, then folds its adapters in
        as `merge_lora()` does: dequantized, merged, quantized again."""
        self.assign_stored(arrays)
        rank = lora_a.shape[-1]
        delta = ops.matmul(ops.cast(lora_a, "float32"), ops.cast(lora_b, "float32"))
        self.add_delta((lora_alpha / rank) * delta)

    def assign_float(self, table):
        """Quantizes rows-first float values with the layer's config and
        assigns them."""
        layer = self.layer
        table = ops.convert_to_numpy(ops.cast(table, "float32"))
        config = layer._default_config(self.mode)
        self.assign_quantized(
            _quantization.quantize_table(table, self.mode, config, layer.name)
        )

    def assign_quantized(self, arrays):
        """Assigns the rows-first arrays of `_quantization.quantize_table`
        (named `embeddings`, `embeddings_scale`, `embeddings_zero`)."""
        place = self.placement
        for role in self._roles():
            name = FORWARD.name(role)
            if name in arrays:
                variable = place.get(self.layer, role)
                _layout.assign(variable, place.stored(arrays[name]))

    def _roles(self):
        return ("embeddings", "scale")

    def _rows(self, read):
        """Dequantized float32 rows; `read(variable)` selects them (rows
        first) from each of the table's variables."""
        place = self.placement
        values = self._unpacked(read(place.get(self.layer, "embeddings")))
        return self._dequantize(values, read(place.get(self.layer, "scale")))

    def _unpacked(self, values, dtype="int8"):
        """Stored int8 values as one `dtype` value per column."""
        return _cast(values, dtype)

    def _dequantize(self, values, scale, halved=False):
        # One scale per row. The same bits on every backend: XLA (JAX,
        # TensorFlow with jit_compile) turns `values / scale` into `values *
        # (1 / scale)`, whose last bit can differ, so that product is what
        # every backend computes, as `(values * 0.5) * (2 / scale)`: scaling
        # by powers of two is exact, and a literal `1 / scale` would become
        # TensorFlow's approximate Reciprocal op in a graph. `values * 0.5` is
        # also the cast to float32.
        # `2 / scale` and the expansion run on the small tensor of scales;
        # the rows see one multiplication (with the cast) and one product.
        # `halved`: the values are already `values * 0.5`, float32.
        halves = values if halved else ops.multiply(values, 0.5)
        doubled = ops.divide(2.0, scale)
        if len(doubled.shape) < len(values.shape):
            doubled = ops.expand_dims(doubled, -1)
        return ops.multiply(halves, doubled)


class Int8Table(_QuantizedTable):
    """int8 values, `(input_dim, output_dim)`; a row reads back as
    `int8_row / scale`."""

    mode = "int8"


class Int4Table(_QuantizedTable):
    """Two int4 values a byte, `(input_dim, ceil(output_dim / 2))`, low
    nibble first; one scale per row, read back as for int8."""

    mode = "int4"
    value_bound = 8

    @property
    def description(self):
        table = f"{self.placement.description}table"
        return f"an int4-quantized {table} with one scale per row"

    @property
    def width(self):
        return _quantization.packed_width(self.layer.output_dim)

    def build(self):
        super().build()
        if OPTIONAL_VARIABLES_ARE_NONE:
            for role in ("zero", "g_idx"):
                if self.placement.has(role):
                    self.placement.set(self.layer, role, None)

    def _unpacked(self, values, dtype="int8"):
        return _quantization.unpack_int4(values, self.layer.output_dim, dtype)

    def rows(self, index, reader=None):
        """The dequantized rows at `index`: their bytes unpacked by one
        gather from a table of nibbles or in int8 (`unpack_int4_float`),
        except where XLA likely compiles the trace, which fuses the
        arithmetic of `unpack_int4` better: a JAX trace, and a TensorFlow
        trace beside an accelerator (Keras compiles `fit` and `predict` with
        XLA there by default, without it on a CPU)."""
        backend = keras.config.backend()
        xla = backend == "jax" or (backend == "tensorflow" and not _ids.cpu_only())
        if xla and not (reader and reader.eager):
            return super().rows(index, reader)
        place = self.placement

        def read(role):
            return _gather_rows(place.get(self.layer, role), index)

        values = _quantization.unpack_int4_float(
            read("embeddings"),
            self.layer.output_dim,
            halved=self.block_size is None,
            cache=bool(reader and reader.checked),
        )
        return self._dequantize_unpacked(values, read)

    def _dequantize_unpacked(self, halves, read):
        """Rows from their halved float32 values; `read(role)` gathers the
        rows of a variable."""
        return self._dequantize(halves, read("scale"), halved=True)

    def _chunked_logits(self, hidden, exact):
        """`hidden @ values^T` of the stored integers, chunk by chunk, the
        even and odd hidden columns meeting each byte's low and high nibbles
        (`_projection.NibbleProduct`): no interleaved copy of a chunk (its
        stack and reshape cost several times the product). Exact for
        integer hidden states: their product unpacks the nibbles, and int4
        values keep every partial sum far below 2**24."""
        place = self.placement
        packed = ops.convert_to_tensor(place.get(self.layer, "embeddings"))
        columns = _projection.Columns(hidden)
        even, odd = _projection.split_columns(columns.values, self.width)
        product = _projection.NibbleProduct(
            even, odd, shifted=_ids.is_concrete(hidden) and not exact
        )
        logits = _projection.chunked(
            self.rows_count,
            self.layer.output_dim,
            lambda start, stop: product.logits(place.read(packed, start, stop)),
        )
        if product.offset is not None:
            logits = ops.add(logits, product.offset)
        return columns.logits(logits)


class GroupedInt4Table(Int4Table):
    """int4 values as `Int4Table`, each row cut into groups of `block_size`
    values with a float32 scale and a zero point each, `(input_dim,
    groups)`; a value reads back as `(int4 - zero) * scale`, and the forward
    table's `g_idx` (float32, `(output_dim,)`) names the group of each
    column."""

    def __init__(self, layer, block_size, placement=FORWARD):
        super().__init__(layer, placement)
        self.block_size = block_size

    @property
    def description(self):
        return (
            f"an int4-quantized {self.placement.description}table in groups "
            f"of {self.block_size}"
        )

    @property
    def groups(self):
        return _quantization.group_count(self.layer.output_dim, self.block_size)

    @property
    def scale_shape(self):
        return (self.layer.input_dim, self.groups)

    scale_roles = (_layout.ROWS, None)

    def build(self):
        _QuantizedTable.build(self)
        layer, place = self.layer, self.placement
        self.add_weight(
            "zero",
            self.scale_shape,
            self.scale_roles,
            initializer="zeros",
            dtype=place.zero_dtype,
            trainable=False,
        )
        if place.has("g_idx"):
            # The group of each column: a few bytes, on every device.
            g_idx = self.add_weight(
                "g_idx",
                (layer.output_dim,),
                (None,),
                initializer="zeros",
                dtype="float32",
                trainable=False,
            )
            g_idx.assign(_quantization.group_index(layer.output_dim, self.block_size))

    def remove(self):
        super().remove()
        self.placement.delete(self.layer, "zero")
        if self.placement.has("g_idx"):
            self.placement.delete(self.layer, "g_idx")

    def _chunked_logits(self, hidden, exact):
        """`hidden @ values^T` of the dequantized values, chunk by chunk.

        Eagerly, for a few hidden states (a decoding step: `tokens * groups
        <= output_dim`), each group's dot with the stored integers is summed
        apart, and the scales and zero points applied to those partial
        logits, `sum_g scale * (h_g . q_g - zero * sum(h_g))`: no pass over
        the chunk dequantizes it. More hidden states, and traced calls,
        dequantize each chunk (`_dequantized_nibbles`): XLA fuses that into
        the product and hoists it out of a decoding loop, where the partials
        took 1.2-1.6x its time (`jax.jit`, `jit_compile=True`, keras-hub
        `generate`; docs/guides/language_models.md). One hidden state in a
        JAX trace takes Keras's form (`_decoding_step_logits`).
        """
        tokens = _projection.static_rows(hidden)
        groups, block_size = self.groups, self.block_size
        whole_groups = self.layer.output_dim == groups * block_size
        # Probed once: an eager probe is an op.
        concrete = _ids.is_concrete(hidden)
        # One traced state (`_projection.one_traced_state`) on JAX.
        jax = keras.config.backend() == "jax"
        if jax and whole_groups and tokens == 1 and not concrete:
            return self._decoding_step_logits(hidden)
        if (
            tokens is None
            or not concrete
            or tokens * groups > self.layer.output_dim
            or block_size % 2
            or not whole_groups
        ):
            return self._dequantized_logits(hidden)
        place, layer, rows = self.placement, self.layer, self.rows_count
        packed = ops.convert_to_tensor(place.get(layer, "embeddings"))
        scale, zero = (
            place.read(ops.convert_to_tensor(place.get(layer, role)), 0, rows)
            for role in ("scale", "zero")
        )
        half = block_size // 2
        columns = _projection.Columns(hidden)
        # Each group's columns, `(groups, block_size, n)`: a free reshape.
        sums = ops.sum(ops.reshape(columns.values, (groups, block_size, -1)), axis=1)
        even, odd = (
            ops.reshape(values, (groups, half, -1))
            for values in _projection.split_columns(columns.values, self.width)
        )
        product = _projection.NibbleProduct(even, odd, shifted=True, grouped=True)
        # What the zero points and the product's offset (`(groups, 1, n)`)
        # take from every logit, for the whole table at once: `(rows,
        # groups) x (groups, n)`.
        offsets = ops.subtract(
            ops.matmul(ops.multiply(ops.cast(zero, "float32"), scale), sums),
            ops.matmul(scale, product.offset[:, 0]),
        )
        scale = ops.expand_dims(ops.transpose(scale), -1)  # (groups, rows, 1)

        def chunk_logits(start, stop):
            grouped = ops.reshape(place.read(packed, start, stop), (-1, groups, half))
            # `(groups, rows, half)`: the bytes of each group together.
            partial = product.logits(ops.transpose(grouped, (1, 0, 2)))
            # A product and a sum over the few groups (TensorFlow's einsum
            # for this is 3x slower).
            return ops.sum(ops.multiply(partial, scale[:, start:stop]), axis=0)

        logits = _projection.chunked(rows, layer.output_dim, chunk_logits)
        return columns.logits(ops.subtract(logits, offsets))

    def _decoding_step_logits(self, hidden):
        """`hidden @ values^T` of one hidden state in a JAX trace (a compiled
        decoding step), as Keras computes it: the packed bytes transposed,
        unpacked and dequantized into one `(output_dim, rows)` float32
        table, then one matmul. XLA hoists the table out of a decoding loop
        (keras-hub `generate`), and its vector-matrix product reads it in
        order: 1.00x Keras's time per token (a Gemma of 128,000 x 256,
        groups of 128), where the chunked products took 1.1-1.3x. The float
        table is then what a compiled step holds, as with Keras's layer."""
        place, layer, rows = self.placement, self.layer, self.rows_count
        groups, block_size = self.groups, self.block_size

        def rows_first(role):
            return place.read(ops.convert_to_tensor(place.get(layer, role)), 0, rows)

        values = keras.quantizers.unpack_int4(
            ops.transpose(rows_first("embeddings")), layer.output_dim, axis=0
        )
        grouped = ops.reshape(values, (groups, block_size, rows))
        # `(groups, 1, rows)`: each group's zero point and scale of a row.
        zero = ops.expand_dims(ops.transpose(rows_first("zero")), 1)
        scale = ops.expand_dims(ops.transpose(rows_first("scale")), 1)
        centered = ops.subtract(_cast(grouped, "float32"), ops.cast(zero, "float32"))
        table = ops.reshape(ops.multiply(centered, scale), (layer.output_dim, rows))
        return ops.matmul(hidden, table)

    def _dequantized_logits(self, hidden):
        """`hidden @ values^T` of the dequantized values, chunk by chunk:
        each chunk's nibbles unpacked (in int8 when eager), then
        dequantized (`_dequantized_nibbles`)."""
        place = self.placement
        packed = ops.convert_to_tensor(place.get(self.layer, "embeddings"))
        columns = _projection.Columns(hidden)
        even, odd = _projection.split_columns(columns.values, self.width)
        if _ids.is_concrete(hidden):
            unpack = _quantization.integer_nibbles
        else:
            unpack = _quantization.nibbles

        def chunk_logits(start, stop):
            low, high = unpack(place.read(packed, start, stop))
            low, high = self._dequantized_nibbles(low, high, start, stop)
            return _projection.nibble_logits(even, odd, low, high)

        return columns.logits(
            _projection.chunked(self.rows_count, self.layer.output_dim, chunk_logits)
        )

    def _dequantized_nibbles(self, low, high, start, stop):
        """`(nibble - zero) * scale` of rows `[start, stop)`, each nibble
        with its column's group (Keras dequantizes the whole table first)."""
        place, layer = self.placement, self.layer
        scale = place.read(
            ops.convert_to_tensor(place.get(layer, "scale")), start, stop
        )
        zero = place.read(ops.convert_to_tensor(place.get(layer, "zero")), start, stop)
        zero = ops.cast(zero, "float32")
        half = self.block_size // 2
        if (
            self.block_size % 2 == 0
            and layer.output_dim == self.groups * self.block_size
        ):
            # Whole groups of an even size: both nibbles of a byte share a
            # group, `half` bytes a group.
            rows = stop - start

            def dequantized(values):
                grouped = ops.reshape(values, (rows, self.groups, half))
                centered = ops.subtract(grouped, ops.expand_dims(zero, -1))
                values = ops.multiply(centered, ops.expand_dims(scale, -1))
                return ops.reshape(values, (rows, self.groups * half))

            return dequantized(low), dequantized(high)
        low_groups, high_groups = _quantization.half_column_groups(
            layer.output_dim, self.block_size
        )

        def dequantized_in(values, groups):
            centered = ops.subtract(values, ops.take(zero, groups, axis=-1))
            return ops.multiply(centered, ops.take(scale, groups, axis=-1))

        return dequantized_in(low, low_groups), dequantized_in(high, high_groups)

    def _descaled(self, logits, inputs_scale, dtype):
        """The scales are in the values already: only the hidden states'
        scale divides the logits (Keras's order)."""
        if inputs_scale is None:
            return logits
        return ops.divide(logits, ops.cast(inputs_scale, dtype))

    def _roles(self):
        roles = ("embeddings", "scale", "zero", "g_idx")
        return roles if self.placement.has("g_idx") else roles[:3]

    def check_stored(self, arrays):
        if self.placement.has("g_idx"):
            layer = self.layer
            _quantization.check_group_index(
                layer.name, arrays[3], layer.output_dim, self.block_size
            )

    def _rows(self, read):
        place = self.placement
        values = self._unpacked(read(place.get(self.layer, "embeddings")))
        scale = read(place.get(self.layer, "scale"))
        # The zero points lie in [-8, 7]: int8 holds them exactly (the
        # reverse table stores them as float32, as Keras does).
        zero = ops.cast(read(place.get(self.layer, "zero")), "int8")
        return self._dequantize_groups(values, scale, zero)

    def _dequantize_unpacked(self, values, read):
        # float32 values less int8 zero points: exact, as in int8.
        return self._dequantize_groups(values, read("scale"), read("zero"))

    def _dequantize_groups(self, values, scale, zero):
        """`(values - zero) * scale`, each column with its group's zero and
        scale. The zero point is subtracted in int8 (values and zero points
        both lie in [-8, 7]), before the one cast to float32."""
        output_dim, block_size, groups = (
            self.layer.output_dim,
            self.block_size,
            self.groups,
        )
        if groups == 1:
            centered = ops.subtract(values, zero)
            return ops.multiply(_cast(centered, "float32"), scale)
        if output_dim == groups * block_size:
            # Whole groups: broadcast each group's zero and scale over its
            # columns.
            leading = _quantization.leading_shape(values)
            grouped = ops.reshape(values, (*leading, groups, block_size))
            centered = ops.subtract(grouped, ops.expand_dims(zero, -1))
            rows = ops.multiply(_cast(centered, "float32"), ops.expand_dims(scale, -1))
            return ops.reshape(rows, (*leading, output_dim))
        columns = _quantization.group_index(output_dim, block_size).astype("int32")
        centered = ops.subtract(values, ops.take(zero, columns, axis=-1))
        scale = ops.take(scale, columns, axis=-1)
        return ops.multiply(_cast(centered, "float32"), scale)


def _cast(values, dtype):
    """`values` as `dtype`, without an op when they are (an eager cast to
    the same dtype is still dispatched)."""
    if keras.backend.standardize_dtype(values.dtype) == dtype:
        return values
    return ops.cast(values, dtype)


def _gather_rows(variable, index):
    """`variable[index]` along the first axis; for a per-row scale (1-D) on
    PyTorch, with a trailing axis of 1 (`_dequantize` takes either).

    On PyTorch a per-row scale is gathered through its `(input_dim, 1)`
    view: Keras's PyTorch `take` of a 1-D tensor flattens the ids with
    `aten::ravel`, which PyTorch's ONNX export refuses, while a 2-D gather
    exports as ONNX's Gather, and the view costs nothing there; the gathered
    column is already the shape that scales the rows. Elsewhere the view
    would be a copy of the scales on every eager call (JAX: 5x the time of
    the gather), so the scales are gathered as they are.
    """
    if len(variable.shape) > 1 or keras.config.backend() != "torch":
        return ops.take(variable, index, axis=0)
    column = ops.expand_dims(ops.convert_to_tensor(variable), -1)
    return ops.take(column, index, axis=0)


def quantized_table(layer, mode, config, placement=FORWARD):
    """The format that `mode` and `config` describe (an int4 config's
    `block_size`; without one, what the layer's policy names)."""
    if mode == "int8":
        return Int8Table(layer, placement)
    if not isinstance(config, keras.quantizers.Int4QuantizationConfig):
        config = layer._default_config(mode)
    block_size = _quantization.block_size_of(config)
    if block_size is None:
        return Int4Table(layer, placement)
    return GroupedInt4Table(layer, block_size, placement)
