"""The projection of hidden states onto a whole table, in vocabulary chunks.

A `ReversibleEmbedding`'s logits are `h @ table^T`: every row of the table is
read once, by table-first matmuls (`Columns`): each chunk's logits come
rows first, `(rows, n)`, and are transposed once a call. A quantized table is
widened to float32 for the product one chunk
of rows at a time, so the float values that exist at any moment are those of
one chunk (`CHUNK_BYTES`, or an eighth of a smaller table), never the
`input_dim x output_dim` table that Keras builds on every int8/int4 call.
The chunks are a Python loop of static slices: the same program eagerly and
under a trace (XLA fuses each slice with its widening and its product). An
eager op costs about 0.1 ms to dispatch on TensorFlow whatever its size, so
chunks are large: with 16 MiB of float32 values (32 chunks of a 256,000 x
512 table) int4 in groups of 128 ran 1.3x faster than with 8 MiB there;
larger ones raised the peak memory of JAX's asynchronous eager calls past a
quarter of the float table (docs/guides/language_models.md). At most
`MAX_CHUNKS` keeps a traced program small.

With quantized hidden states (Keras's int8 reverse path), the product of
integers is computed exactly in float32 GEMMs: every partial sum of products
of int8 values over at most `exact_width` columns stays below 2**24, where
float32 holds every integer. Wider tables are cut along the hidden axis and
their exact partial products summed as int32. The logits are then Keras's
integer logits bit for bit.
"""

import math

from keras import ops

from keras_ext_embedding import _ids, _quantization

CHUNK_BYTES = 16 * 2**20  # of float32 values widened at a time
# A small table is still cut in MIN_CHUNKS: a chunk's float values stay an
# eighth of the float table's size; a big one in at most MAX_CHUNKS.
MIN_CHUNKS = 8
MAX_CHUNKS = 64
FLOAT32_EXACT = 2**24
INT8_BOUND = 128  # the largest magnitude of quantized hidden states


def chunk_bounds(rows, width):
    """`(start, stop)` of the vocabulary chunks of a `rows x width` table."""
    per_chunk = min(CHUNK_BYTES // (4 * width), math.ceil(rows / MIN_CHUNKS))
    per_chunk = max(per_chunk, math.ceil(rows / MAX_CHUNKS), 1)
    return [
        (start, min(start + per_chunk, rows)) for start in range(0, rows, per_chunk)
    ]


def chunked(rows, width, chunk_logits):
    """The rows-first logits `(rows, n)`, from `chunk_logits(start, stop)`,
    those of rows `[start, stop)`."""
    parts = [chunk_logits(start, stop) for start, stop in chunk_bounds(rows, width)]
    return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=0)


class Columns:
    """Hidden states `(..., width)` as the columns of one `(width, n)`
    matrix, the right operand of every product with a table: `table @
    columns` gives rows-first logits `(rows, n)`, and `logits` turns those
    into `(..., rows)` once a call.

    A table-first matmul is the fastest public form of `h @ W^T` on every
    backend, and the only right one in 16 bits:

    - `einsum("...d,vd->...v", h, W)` (BLAS's small-`m` GEMM against a
      transposed operand) took 2.5-4.2x the table-first matmul's time on an
      AVX2 AMD EPYC (a 256,000 x 512 table, 8 hidden states: TensorFlow 409
      ms against 98, PyTorch 224 against 91, JAX 109 against 65), and 1.6x
      on an AMX Xeon for one hidden state (34 ms against 21);
    - `matmul(h, transpose(W))` copies the table on every eager call (JAX,
      TensorFlow);
    - TensorFlow's einsum with a leading ellipsis returns wrong bfloat16 and
      float16 values on CPUs with AMX (oneDNN; errors the size of the
      logits, TensorFlow 2.21), and PyTorch's CPU einsum runs bfloat16
      50-100x slower than its matmul (docs/guides/language_models.md).

    Where a traced size is unknown or symbolic (`static_rows` is None),
    the columns keep the leading axes, `(width, ...)`, and products are
    tensordots: `jax2onnx` cannot reshape a flat axis back into symbolic
    ones, and a trace compiles either form to one dot.
    """

    def __init__(self, hidden, state_first=None):
        shape = ops.shape(hidden)
        self.leading = tuple(shape[:-1])
        self.flat = static_rows(hidden) is not None
        if state_first is None:
            state_first = one_traced_state(hidden)
        self.state_first = state_first
        if self.flat:
            self.values = ops.transpose(ops.reshape(hidden, (-1, shape[-1])))
        else:
            # Explicit axes: PyTorch's ONNX export writes a negative one
            # into the Transpose, which onnxruntime refuses.
            rank = hidden.ndim
            self.values = ops.transpose(hidden, (rank - 1, *range(rank - 1)))

    def product(self, table):
        """`table @ columns`: `(rows, width) -> (rows, n)`."""
        return times(table, self.values, self.state_first)

    def logits(self, rows_first):
        """`(rows, n) -> (..., rows)`."""
        if not self.flat:
            rank = rows_first.ndim
            return ops.transpose(rows_first, (*range(1, rank), 0))
        return ops.reshape(
            ops.transpose(rows_first), (*self.leading, rows_first.shape[0])
        )


def times(matrix, columns, state_first=False):
    """`matrix @ columns`: a matmul of matrices (or of batches of them, the
    same rank), a tensordot of a matrix with columns that keep leading
    axes (`Columns` of a traced call); `state_first` for the one column
    of `one_traced_state`, as `(columns^T @ matrix^T)^T`."""
    if matrix.ndim == 2 and columns.ndim != 2:
        return ops.tensordot(matrix, columns, axes=1)
    if state_first:
        return ops.transpose(ops.matmul(ops.transpose(columns), ops.transpose(matrix)))
    return ops.matmul(matrix, columns)


def one_traced_state(hidden):
    """Whether `hidden` is one hidden state under a trace (a compiled
    decoding step of one sequence), whose products with a table take
    Keras's form, `h @ transpose(W)`: XLA folds the transpose, and its
    matrix-vector kernel for that form took 0.82x the table-first one's
    time (128,000 x 256, `jax.jit` 6.2 ms against 7.6, `jit_compile=True`
    7.1 against 8.4; keras-hub Gemma `generate` on JAX had been 1.2x
    Keras's time per token); a TensorFlow graph without XLA folds it into
    the matmul too (10.9 ms against 10.6)."""
    return static_rows(hidden) == 1 and not _ids.is_concrete(hidden)


def table_logits(hidden, table, transposed=False):
    """`hidden @ table^T`, `(..., width) -> (..., rows)`, of a table stored
    rows first (`(rows, width)`, a table-first matmul: `Columns`) or
    `transposed` (`(width, rows)`, the plain matmul), in one product and
    without a transposed copy of the table; `one_traced_state` as Keras
    does, `matmul(h, transpose(table))`."""
    # Decided once: `one_traced_state` reads an empty slice on the host.
    state_first = one_traced_state(hidden)
    if state_first:
        return ops.matmul(hidden, table if transposed else ops.transpose(table))
    if transposed:
        if static_rows(hidden) is None:
            return ops.matmul(hidden, table)
        shape = ops.shape(hidden)
        flat = ops.reshape(hidden, (-1, shape[-1]))
        return ops.reshape(ops.matmul(flat, table), (*shape[:-1], table.shape[1]))
    columns = Columns(hidden, state_first)
    return columns.logits(columns.product(table))


def static_rows(hidden):
    """How many hidden states `hidden` holds, or None where a traced size is
    unknown (None) or symbolic (a JAX export's)."""
    leading = hidden.shape[:-1]
    if all(isinstance(size, int) for size in leading):
        return math.prod(leading)
    return None


def chunked_logits(hidden, rows, width, kernel):
    """`hidden @ table^T`, `(..., width) -> (..., rows)`, where
    `kernel(start, stop)` gives rows `[start, stop)` of the table, rows first,
    in the dtype of `hidden`."""
    columns = Columns(hidden)
    return columns.logits(
        chunked(rows, width, lambda start, stop: columns.product(kernel(start, stop)))
    )


def exact_width(value_bound):
    """The most columns whose products of int8 hidden states and table values
    of magnitude `value_bound` sum exactly in float32."""
    return FLOAT32_EXACT // (INT8_BOUND * value_bound)


def exact_logits(hidden, rows, width, kernel, value_bound):
    """`chunked_logits` of integer-valued float32 `hidden` and table values of
    magnitude at most `value_bound`, exactly: each logit the exact integer
    product, as float32 (or int32 where the table was cut along the hidden
    axis: a sum of partial products may exceed 2**24)."""
    step = exact_width(value_bound)
    if width <= step:
        return chunked_logits(hidden, rows, width, kernel)
    slices = [(start, min(start + step, width)) for start in range(0, width, step)]
    columns = Columns(hidden)

    def exact_chunk(start, stop):
        table = kernel(start, stop)
        total = None
        for low, high in slices:
            part = times(table[:, low:high], columns.values[low:high])
            part = ops.cast(part, "int32")
            total = part if total is None else ops.add(total, part)
        return total

    return columns.logits(chunked(rows, width, exact_chunk))


def split_columns(columns, half_width):
    """The even and odd hidden columns of `columns` (`(width, n)`, the
    values of `Columns`), each `(half_width, n)` (the odd ones padded with a
    zero row when the width is odd): the hidden values that meet the low
    and the high nibbles of packed int4 bytes."""
    even = columns[0::2]
    odd = columns[1::2]
    if odd.shape[0] < half_width:
        padding = [[0, half_width - odd.shape[0]]] + [[0, 0]] * (odd.ndim - 1)
        odd = ops.pad(odd, padding)
    return even, odd


def nibble_logits(even, odd, low, high):
    """The rows-first logits of a chunk given as its low and high nibbles
    (`(..., rows, half_width)` each, float32), against the even and odd
    hidden columns (`(..., half_width, n)`): no interleaved copy of the
    chunk."""
    return ops.add(times(low, even), times(high, odd))


class NibbleProduct:
    """The product of packed int4 bytes with hidden columns, a chunk at a
    time: `low . even + high . odd` over each byte's signed nibbles, the low
    one meeting the even hidden column and the high one the odd; bytes
    `(rows, half_width)` against columns `(half_width, ...)`, or, where
    `grouped`, `(groups, rows, half_width)` against `(groups, half_width,
    n)`.

    `logits(packed)` is that product for a chunk of bytes, rows first,
    less `offset` (`(1, ...)`, `(groups, 1, n)` where `grouped`, or `None`),
    which the caller adds to every
    logit before any scale. `shifted=False` unpacks each byte's nibbles with
    float32 ops (the form exporters translate and XLA fuses).
    `shifted=True` unpacks nothing, for eager calls: a byte `b` holds `16 *
    high + (low mod 16)`, so with the low nibble's sign bit flipped, `c = b ^
    8` holds `16 * high + low + 8` (in int8, exactly) and `w = c & 15` holds
    `low + 8`. Then `low = w - 8`, `high = (c - w) / 16`, and

        even . low + odd . high = (even - odd / 16) . w + (odd / 16) . c
                                  - 8 * sum(even)

    two int8 ops and two widenings a chunk, where unpacking takes six and
    two (TensorFlow dispatches each eager op for about 0.1 ms and runs
    int8 ops at a few GB/s). The hidden side is folded once a call.
    Not exact for integer hidden states of a wide table (the folded columns
    are sixteenths): `shifted=False` is.
    """

    def __init__(self, even, odd, shifted, grouped=False):
        self.shifted = shifted
        if shifted:
            # Tensors once a call: Keras converts a NumPy scalar on every op
            # (TensorFlow: 0.1-0.2 ms each, two ops a chunk).
            self.masks = tuple(
                ops.convert_to_tensor(mask)
                for mask in (_quantization.LOW_SIGN, _quantization.LOW_NIBBLE)
            )
            sixteenth = ops.multiply(odd, 1 / 16)
            self.columns = (ops.subtract(even, sixteenth), sixteenth)
            width_axis = 1 if grouped else 0
            self.offset = ops.multiply(
                ops.sum(even, axis=width_axis, keepdims=True), -8.0
            )
        else:
            self.columns = (even, odd)
            self.offset = None

    def logits(self, packed):
        if self.shifted:
            sign, nibble = self.masks
            flipped = ops.bitwise_xor(packed, sign)
            shifted_low = ops.bitwise_and(flipped, nibble)
            values = (ops.cast(shifted_low, "float32"), ops.cast(flipped, "float32"))
        else:
            values = _quantization.nibbles(packed)
        return nibble_logits(*self.columns, *values)
