"""Property-based tests: any shape, integer dtype and ids against NumPy."""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

INPUT_DIM, OUTPUT_DIM = 50, 3
TENSOR_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"]
# uint64 only as NumPy: not every backend has a uint64 tensor.
NUMPY_DTYPES = [*TENSOR_DTYPES, "uint64"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@functools.cache
def layer(invalid_ids="raise"):
    """One built layer per mode, shared by all examples (building is slow)."""
    built = Embedding(INPUT_DIM, OUTPUT_DIM, invalid_ids=invalid_ids, name="prop")
    built.build()
    return built


@st.composite
def ids_arrays(draw, low, high, as_tensor):
    dtype = draw(st.sampled_from(TENSOR_DTYPES if as_tensor else NUMPY_DTYPES))
    info = np.iinfo(dtype)
    if as_tensor:
        # JAX without x64 converts int64 tensors to int32: keep values there.
        info = np.iinfo(dtype if np.iinfo(dtype).bits < 64 else "int32")
    elements = st.integers(max(low, int(info.min)), min(high, int(info.max)))
    return draw(hnp.arrays(dtype, SHAPES, elements=elements))


def call(layer, ids, as_tensor):
    return layer(ops.convert_to_tensor(ids) if as_tensor else ids)


def invalid_mask(ids):
    wide = ids.astype("int64")  # Drawn values stay within +-2**40.
    return (wide < 0) | (wide >= INPUT_DIM)


def reference(layer, ids, invalid):
    """NumPy `table[ids]`, with zero rows at the invalid positions."""
    table = table_of(layer)
    safe = np.where(invalid, 0, ids).astype("int64")
    expected = table[safe]
    expected[invalid] = 0.0
    return expected


@SETTINGS
@given(data=st.data(), as_tensor=st.booleans())
def test_valid_ids_give_exact_rows(data, as_tensor):
    ids = data.draw(ids_arrays(0, INPUT_DIM - 1, as_tensor))
    out = call(layer(), ids, as_tensor)
    assert tuple(out.shape) == (*ids.shape, OUTPUT_DIM)
    np.testing.assert_array_equal(to_numpy(out), table_of(layer())[ids.astype(int)])


@SETTINGS
@given(data=st.data(), as_tensor=st.booleans())
def test_invalid_ids_raise_at_the_first_invalid_position(data, as_tensor):
    ids = data.draw(ids_arrays(-(2**40), 2**40, as_tensor))
    invalid = invalid_mask(ids)
    if not invalid.any():
        np.testing.assert_array_equal(
            to_numpy(call(layer(), ids, as_tensor)),
            table_of(layer())[ids.astype(int)],
        )
        return
    first = np.unravel_index(int(np.argmax(invalid.reshape(-1))), ids.shape)
    position = tuple(int(i) for i in first)
    with pytest.raises(InvalidIdError) as info:
        call(layer(), ids, as_tensor)
    assert (
        f"Layer 'prop' received an invalid id {ids[position]} at position {position}"
    ) in str(info.value)


@SETTINGS
@given(data=st.data(), as_tensor=st.booleans())
def test_zeros_mode_matches_reference(data, as_tensor):
    ids = data.draw(ids_arrays(-300, 300, as_tensor))
    out = call(layer("zeros"), ids, as_tensor)
    assert tuple(out.shape) == (*ids.shape, OUTPUT_DIM)
    np.testing.assert_array_equal(
        to_numpy(out), reference(layer("zeros"), ids, invalid_mask(ids))
    )


@SETTINGS
@given(
    ids=hnp.arrays(
        "float32",
        SHAPES,
        elements=st.one_of(
            st.integers(0, INPUT_DIM - 1).map(float),
            st.floats(-5, 60, width=32),
            st.sampled_from([float("nan"), float("inf"), -float("inf")]),
        ),
    ),
    as_tensor=st.booleans(),
)
def test_float_ids(ids, as_tensor):
    with np.errstate(invalid="ignore"):
        whole = (ids >= 0) & (ids <= INPUT_DIM - 1) & (np.floor(ids) == ids)
    invalid = ~whole
    safe = np.where(invalid, 0, np.nan_to_num(ids, posinf=0, neginf=0))
    out = call(layer("zeros"), ids, as_tensor)
    np.testing.assert_array_equal(
        to_numpy(out), reference(layer("zeros"), safe, invalid)
    )
    if invalid.any():
        with pytest.raises(InvalidIdError):
            call(layer(), ids, as_tensor)
    else:
        np.testing.assert_array_equal(
            to_numpy(call(layer(), ids, as_tensor)), reference(layer(), safe, invalid)
        )
