"""Property-based tests: any shape, integer dtype and ids against NumPy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError

INPUT_DIM = 50
DTYPES = st.sampled_from(["int8", "int16", "int32", "int64", "uint8", "uint16"])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

LAYER = Embedding(INPUT_DIM, 3, name="prop")
ZEROS_LAYER = Embedding(INPUT_DIM, 3, invalid_ids="zeros", name="prop_zeros")
LAYER.build()
ZEROS_LAYER.build()


def ids_arrays(low, high):
    return st.tuples(DTYPES, SHAPES).flatmap(
        lambda ds: hnp.arrays(
            ds[0],
            ds[1],
            elements=st.integers(
                max(low, int(np.iinfo(ds[0]).min)),
                min(high, int(np.iinfo(ds[0]).max)),
            ),
        )
    )


@SETTINGS
@given(ids=ids_arrays(0, INPUT_DIM - 1), as_tensor=st.booleans())
def test_valid_ids_give_exact_rows(ids, as_tensor):
    arg = ops.convert_to_tensor(ids) if as_tensor else ids
    out = LAYER(arg)
    assert tuple(out.shape) == (*ids.shape, 3)
    np.testing.assert_array_equal(to_numpy(out), table_of(LAYER)[ids.astype(int)])


@SETTINGS
@given(ids=ids_arrays(-300, 300))
def test_invalid_ids_raise_at_the_first_invalid_position(ids):
    invalid = (ids.astype(int) < 0) | (ids.astype(int) >= INPUT_DIM)
    if not invalid.any():
        LAYER(ids)
        return
    first = np.unravel_index(int(np.argmax(invalid.reshape(-1))), ids.shape)
    position = tuple(int(i) for i in first)
    with pytest.raises(InvalidIdError) as info:
        LAYER(ops.convert_to_tensor(ids))
    assert f"invalid id {ids[position]} at position {position}" in str(info.value)


@SETTINGS
@given(ids=ids_arrays(-300, 300), as_tensor=st.booleans())
def test_zeros_mode_matches_reference(ids, as_tensor):
    wide = ids.astype(int)
    invalid = (wide < 0) | (wide >= INPUT_DIM)
    expected = table_of(ZEROS_LAYER)[np.where(invalid, 0, wide)]
    expected[invalid] = 0.0
    arg = ops.convert_to_tensor(ids) if as_tensor else ids
    np.testing.assert_array_equal(to_numpy(ZEROS_LAYER(arg)), expected)


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
    )
)
def test_float_ids(ids):
    with np.errstate(invalid="ignore"):
        invalid = ~((ids >= 0) & (ids <= INPUT_DIM - 1) & (np.floor(ids) == ids))
    safe = np.where(invalid, 0, np.nan_to_num(ids)).astype(int)
    expected = table_of(ZEROS_LAYER)[safe]
    expected[invalid] = 0.0
    np.testing.assert_array_equal(
        to_numpy(ZEROS_LAYER(ops.convert_to_tensor(ids))), expected
    )
    if invalid.any():
        with pytest.raises(InvalidIdError):
            LAYER(ids)
    else:
        np.testing.assert_array_equal(to_numpy(LAYER(ids)), table_of(LAYER)[safe])
