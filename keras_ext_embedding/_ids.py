"""Id validation: one behaviour for invalid ids on every backend.

Backends disagree on an id outside `[0, input_dim)`: JAX returns NaN, TensorFlow
raises on CPU and returns zeros on GPU, PyTorch raises (and on GPU kills the CUDA
context), and all three wrap negative ids to the last rows. The helpers here
give one answer instead:

- ids whose values can be read (eager execution) are checked on the host, and
  the first invalid one raises `InvalidIdError`;
- ids that are traced (`jax.jit`, `tf.function`, the compiled steps of
  `Model.fit`/`predict`) cannot raise, so invalid positions are looked up as
  row 0 and the output there is replaced by zeros.
"""

import functools
import warnings

import keras
import numpy as np
from keras import backend, ops

from keras_ext_embedding.errors import InvalidIdError

# The largest integer below which every integer is exactly representable.
# Past it, distinct ids collapse onto one float, so the id a caller meant
# cannot be recovered: such dtypes are refused instead of rounded.
FLOAT_EXACT_INTEGERS = {
    "float16": 2**11,
    "bfloat16": 2**8,
    "float32": 2**24,
    "float64": 2**53,
}
INTEGER_DTYPES = (
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
)


@functools.lru_cache(maxsize=256)
def check_ids_dtype(dtype, input_dim, layer_name):
    """Returns the standardized dtype of ids, or raises if it cannot hold ids.

    Integer ids of any width are accepted. Float ids are accepted when the
    dtype holds every id below `input_dim` exactly; anything else (bool,
    complex, string) is refused.
    """
    try:
        dtype = backend.standardize_dtype(dtype)
    except ValueError:  # e.g. strings: not a dtype Keras knows at all
        dtype = str(dtype)
    if dtype in INTEGER_DTYPES:
        return dtype
    if dtype in FLOAT_EXACT_INTEGERS:
        limit = FLOAT_EXACT_INTEGERS[dtype]
        if input_dim - 1 > limit:
            raise ValueError(
                f"Layer '{layer_name}' received ids of dtype {dtype}, which "
                f"holds whole numbers exactly only up to {limit}, but "
                f"input_dim={input_dim} needs ids up to {input_dim - 1}: "
                "larger ids may already have been rounded to a neighbouring "
                "id. Pass integer ids (e.g. `keras.Input(shape, "
                "dtype='int32')`), or a wider float dtype."
            )
        return dtype
    raise TypeError(
        f"Layer '{layer_name}' expects integer ids (or floats holding whole "
        f"numbers). Received ids of dtype {dtype}. Cast the ids to an integer "
        "dtype such as int32."
    )


def index_dtype(input_dim):
    """The narrowest gather index dtype that holds every id below input_dim."""
    return "int32" if input_dim <= 2**31 else "int64"


def _valid_on_host(ids, input_dim):
    """Boolean numpy mask of the valid entries of a numpy ids array."""
    if ids.dtype.kind in "iu":
        valid = ids <= input_dim - 1
        if ids.dtype.kind == "i":
            valid &= ids >= 0
        return valid
    ids = ids.astype("float64")
    with np.errstate(invalid="ignore"):
        return (ids >= 0) & (ids <= input_dim - 1) & (np.floor(ids) == ids)


def _all_valid_on_host(ids, input_dim):
    """Fast check: True when every entry of a numpy ids array is valid.

    Integer ids take one reduction: read as unsigned integers of the same
    width, a negative id becomes larger than any valid one, so the largest
    value alone tells (`min` and `max` took twice as long).
    """
    if ids.size == 0:
        return True
    if ids.dtype.kind == "i":
        ids = ids.view(f"u{ids.dtype.itemsize}")
    if ids.dtype.kind == "u":
        return bool(ids.max() <= input_dim - 1)
    return bool(_valid_on_host(ids, input_dim).all())


def raise_first_invalid(ids, input_dim, layer_name, locate=None):
    """Raises `InvalidIdError` naming the first invalid entry of numpy `ids`.

    `locate` turns the entry's position (a tuple) into the words that name
    it (a bag layer names the bag and the position in it); by default "at
    position (i, j)".
    """
    invalid = ~_valid_on_host(ids, input_dim)
    flat_index = int(np.argmax(invalid.reshape(-1)))
    position = tuple(int(i) for i in np.unravel_index(flat_index, ids.shape))
    where = f"at position {position}" if locate is None else locate(position)
    # str() of the NumPy scalar: the shortest repr in the ids' own dtype
    # (a float32 1.7 prints as 1.7, not 1.7000000476837158).
    value = str(ids.reshape(-1)[flat_index])
    raise InvalidIdError(
        f"Layer '{layer_name}' received an invalid id {value} {where}. "
        f"Ids must be whole numbers in [0, {input_dim - 1}] "
        f"(input_dim={input_dim}). Fix the ids, or construct the layer with "
        "`invalid_ids='zeros'` to look up an all-zero vector for every "
        "invalid id."
    )


def host_ids(ids, input_dim, layer_name, check, locate=None):
    """Validates numpy ids on the host and returns integer ids.

    Converting numpy ids to a backend tensor can change them before any check
    could run (JAX without x64 narrows int64 to int32; PyTorch has no uint64),
    so numpy ids are checked first and handed over as int32 (int64 for
    vocabularies past 2**31). With `check=False`, invalid entries become -1,
    which stays invalid on the device and is looked up as zeros there.
    """
    ids = np.asarray(ids)
    check_ids_dtype(ids.dtype.name, input_dim, layer_name)
    if _all_valid_on_host(ids, input_dim):
        return ids.astype(index_dtype(input_dim), copy=False)
    if check:
        raise_first_invalid(ids, input_dim, layer_name, locate)
    valid = _valid_on_host(ids, input_dim)
    return np.where(valid, ids, -1).astype(index_dtype(input_dim))


def in_symbolic_scope():
    """Whether Keras runs the call on placeholder values to infer its
    output (PyTorch's `compute_output_spec` fills tensors with 1s, 83s or
    89s under `keras.SymbolicScope`): their values are no one's ids.

    Keras exposes the scope's class, not a query: a scope entered here
    records the one it was entered in.
    """
    scope = keras.SymbolicScope()
    with scope:
        return scope.original_scope is not None


def _devices_are_host():
    """Whether ids that can be read are eager arrays in host memory, read
    without a copy from a device: every device of the backend is the host's
    CPU (TensorFlow, JAX; asked once a process).

    Never on PyTorch: its traces read as eager tensors (the tracing of
    `torch.onnx.export`, and torch.compile's tracing of NumPy calls), so a
    read there would make the example ids' validity part of the graph (an
    exported "zeros" model without its zeroing), or break torch.compile's
    graph. Traced TensorFlow and JAX values cannot be read at all."""
    return keras.config.backend() != "torch" and cpu_only()


@functools.cache
def cpu_only():
    """Whether every device the backend lists is a CPU (False where it lists
    none: Keras's PyTorch backend); asked once a process."""
    try:
        devices = keras.distribution.list_devices()
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return all(device.lower().startswith("cpu") for device in devices)


def read_on_host(ids, copy=True):
    """The values of concrete ids as a NumPy array; raises for traced ids
    and for placeholder values (`in_symbolic_scope`). With `copy=False`,
    also for ids NumPy cannot view without a copy (a device tensor)."""
    if in_symbolic_scope():
        raise TypeError("Placeholder values of a symbolic call are not read.")
    try:
        # Zero-copy for host tensors of every backend: the common case.
        return np.asarray(ids)
    except (TypeError, RuntimeError):
        if not copy:
            raise
        # A device tensor, one that needs grad, or a traced one.
    with warnings.catch_warnings():
        # Keras's PyTorch backend converts with np.array(tensor), which
        # NumPy 2 warns about; the values are unaffected.
        warnings.filterwarnings(
            "ignore", message="__array__ implementation", category=DeprecationWarning
        )
        return ops.convert_to_numpy(ids)


def is_concrete(ids):
    """Whether `ids` hold values (eager), not a trace; reads none of them."""
    # An empty slice: one op, whatever the ids' size or device.
    probe = ids[:0] if len(ids.shape) else ops.reshape(ids, (-1,))[:0]
    try:
        read_on_host(probe)
    except (TypeError, RuntimeError):
        return False
    return True


def eager_check(ids, input_dim, layer_name, locate=None, strict=True):
    """Checks ids whose values can be read; tells whether all are valid.

    Returns True when the ids are concrete and every one is valid: no op
    then needs to check them on the device. An invalid one raises
    `InvalidIdError` when `strict` (`invalid_ids="raise"`), and returns False
    otherwise, leaving it to the device. Traced ids return False: their
    values are unknown until the compiled program runs. When not `strict`
    (`invalid_ids="zeros"`), only ids already in host memory are read (the
    eager ids of a CPU): on a host one reduction in NumPy replaces the
    device's clip, compare and select, which an eager call dispatches one by
    one; ids on an accelerator would be copied to the host and waited for,
    the cost that mode avoids.
    """
    if not strict and not _devices_are_host():
        return False  # decided once a process: no read, no exception
    try:
        values = read_on_host(ids, copy=strict)
    except (TypeError, RuntimeError):
        # Traced values cannot be read: JAX raises a TypeError subclass
        # (TracerArrayConversionError), TensorFlow a RuntimeError subclass
        # (NotImplementedError) for symbolic tensors.
        return False
    if _all_valid_on_host(values, input_dim):
        return True
    if strict:
        raise_first_invalid(values, input_dim, layer_name, locate)
    return False


def gather_index(ids, dtype, input_dim, checked=False):
    """`(index, valid)`: integer gather indices, invalid entries pointing at
    row 0, and the boolean mask of the valid entries (None when every id is
    known to be valid: `checked` on the host, or bounded by the dtype).

    Integer ids are clipped into `[0, input_dim - 1]`, and an id is valid
    where clipping left it unchanged: two ops, which an eager call
    dispatches one by one (comparing with both bounds, combining and
    selecting took four). A bound the dtype already guarantees is skipped
    (an unsigned id is never negative; a uint8 id is always below
    input_dim=300), which also keeps a bound from overflowing a narrow
    dtype. Float ids must also be whole numbers.
    """
    valid = None
    if checked:
        index = ids
    elif dtype in FLOAT_EXACT_INTEGERS:
        valid = ops.logical_and(
            ops.equal(ids, ops.floor(ids)),
            ops.logical_and(
                ops.greater_equal(ids, 0), ops.less_equal(ids, input_dim - 1)
            ),
        )
        index = ops.where(valid, ids, 0)
    else:
        info = np.iinfo(dtype)
        low, high = info.min < 0, info.max > input_dim - 1
        if low and high:
            index = ops.clip(ids, 0, input_dim - 1)
        elif low:
            index = ops.maximum(ids, 0)
        elif high:
            index = ops.minimum(ids, input_dim - 1)
        else:
            index = ids
        if low or high:
            valid = ops.equal(index, ids)
    if dtype not in ("int32", "int64"):
        index = ops.cast(index, index_dtype(input_dim))
    return index, valid


def zero_invalid_rows(outputs, valid):
    """Replaces the looked-up rows at invalid positions by zeros."""

    def zeroed():
        return ops.where(ops.expand_dims(valid, -1), outputs, 0)

    if keras.config.backend() == "tensorflow":
        # A TensorFlow graph runs the select over the whole output as its own
        # kernel (+35% on a 64x32x128 lookup); a cond on the small id mask
        # skips it when every id is valid, the common case (eagerly too: one
        # reduction, where the select takes two ops). XLA (JAX) fuses the
        # select into the gather for free, where a cond would cost more.
        return ops.cond(ops.all(valid), lambda: outputs, zeroed)
    return zeroed()
