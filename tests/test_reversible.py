"""ReversibleEmbedding: a drop-in `keras.layers.ReversibleEmbedding`.

Parity with Keras's layer in every table format, tied and untied; logits
against a NumPy reference (where Keras has known bugs, against the reference
only); masks, shapes and dtypes; errors; config; training; `Model.quantize` and
`replace_embeddings`."""

import gc
import json

import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import (
    check_config_round_trip,
    dtype_of,
    run_layer_checks,
    to_numpy,
)
from quantization_reference import (
    absmax_dequantized,
    comparable_dtype,
    dequantized_reverse_table,
    dequantized_table,
    raw,
)

from keras_ext_embedding import (
    InvalidIdError,
    ReversibleEmbedding,
    _projection,
    replace_embeddings,
)

BACKEND = keras.config.backend()
VOCAB, DIM = 64, 13
IDS = np.array([[1, 2, 3, 0], [7, 7, 63, 4], [12, 30, 30, 5]], dtype="int32")

# Table formats: (quantization mode, int4 block size). 13 columns make a
# partial last group of 8 and an odd number of int4 nibbles; the default block
# of 128 gets 133 columns, so that it has a partial group too.
FORMATS = {
    "float": (None, None),
    "int8": ("int8", None),
    "int4-per-row": ("int4", None),
    "int4-default": ("int4", "default"),
    "int4-block8": ("int4", 8),
}
QUANTIZED = [name for name in FORMATS if name != "float"]
TIES = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
LORA_WEIGHTS = ["lora_embeddings_a", "lora_embeddings_b"]
# Keras's tied int8 reverse transposes its 1-D scale, which PyTorch warns
# about (once per process) in the middle of Keras's call.
KERAS_1D_TRANSPOSE = pytest.mark.filterwarnings(
    "ignore:The use of `x.T` on tensors of dimension other than 2:UserWarning"
)


@pytest.fixture(autouse=True)
def no_full_collection_per_removed_variable(monkeypatch):
    """Keras's `Layer.__delattr__` runs `gc.collect()` for each variable that
    `quantize` replaces, ~0.4 s apiece with three backends' modules loaded;
    the tables here are a few kilobytes, and hundreds of layers are quantized."""
    monkeypatch.setattr(gc, "collect", lambda generation=2: 0)


def dim_of(fmt):
    return 133 if fmt == "int4-default" else DIM


def config_of(fmt):
    """A fresh quantization config for the format (None: Keras's default)."""
    mode, block_size = FORMATS[fmt]
    if mode != "int4" or block_size == "default":
        return None
    return keras.quantizers.Int4QuantizationConfig(block_size=block_size)


def straddling(rng, shape, axis):
    """Random values at least 0.1 away from zero, of alternating sign along
    `axis`: every int4 group holds both signs, where our grouped quantization
    is Keras's bit for bit."""
    signs = np.where(np.arange(shape[axis]) % 2 == 0, 1.0, -1.0)
    signs = np.expand_dims(signs, 1 - axis)
    magnitudes = 0.1 + np.abs(rng.normal(scale=0.5, size=shape))
    return (magnitudes * signs).astype("float32")


def hidden(rng, dim, batch=(3, 4)):
    return rng.normal(size=(*batch, dim)).astype("float32")


def copy_variables(source, target):
    assert [v.name for v in target.weights] == [v.name for v in source.weights]
    for mine, theirs in zip(target.weights, source.weights, strict=True):
        mine.assign(theirs)


def layers_of(classes, rng, fmt, tie, lora=False, dim=None, **kwargs):
    """One layer of each class, with the same random float tables (`dim`
    columns, else the format's), then quantized to `fmt`; with `lora`, the
    same random adapters (B away from zero, so that they count)."""
    mode, _ = FORMATS[fmt]
    dim = dim or dim_of(fmt)
    layers = [
        cls(VOCAB, dim, tie_weights=tie, name="tokens", **kwargs) for cls in classes
    ]
    for layer in layers:
        layer.build()
    first = layers[0]
    first.weights[0].assign(straddling(rng, (VOCAB, dim), axis=1))
    if not tie:
        first.reverse_embeddings.assign(straddling(rng, (dim, VOCAB), axis=0))
    for layer in layers[1:]:
        copy_variables(first, layer)
    for layer in layers:
        if mode:
            layer.quantize(mode, config=config_of(fmt))
        if lora:
            layer.enable_lora(3, lora_alpha=6.0)
    if lora:
        first.lora_embeddings_a.assign(rng.normal(size=(VOCAB, 3)).astype("float32"))
        first.lora_embeddings_b.assign(rng.normal(size=(3, dim)).astype("float32"))
        for layer in layers[1:]:
            copy_variables(first, layer)
    return layers


def keras_pair(rng, fmt, tie, lora=False, **kwargs):
    """Our layer and Keras's, from the same float tables (and adapters)."""
    classes = (keras.layers.ReversibleEmbedding, ReversibleEmbedding)
    theirs, ours = layers_of(classes, rng, fmt, tie, lora, **kwargs)
    return ours, theirs


def built(fmt, tie, rng, lora=False, **kwargs):
    """Our layer alone, as `keras_pair` makes it."""
    (layer,) = layers_of([ReversibleEmbedding], rng, fmt, tie, lora, **kwargs)
    return layer


def variables_of(layer):
    return [(v.name, tuple(v.shape), comparable_dtype(v)) for v in layer.weights]


def assert_relclose(actual, expected, rtol=1e-5):
    """Within `rtol` of `expected`, relative to its largest magnitude."""
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    assert actual.shape == expected.shape
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max()
    )


def lora_term(layer, h):
    """`alpha / rank * (h @ B^T) @ A^T` in float64."""
    a, b = to_numpy(layer.lora_embeddings_a), to_numpy(layer.lora_embeddings_b)
    return (layer.lora_alpha / layer.lora_rank) * ((h @ b.T) @ a.T)


def reverse_reference(layer, h):
    """The logits the SPEC promises, in float64 from the layer's variables.

    A quantized table is read back through its scales; hidden states go
    through `layer.inputs_quantizer` when it has one (int8, as Keras). LoRA
    adds `h @ (s * A @ B)^T` to a tied layer only; the soft cap comes last."""
    h = np.asarray(h, "float64")
    mode = layer.quantization_mode
    if mode is None:
        kernel = (
            to_numpy(layer.weights[0]).T
            if layer.tie_weights
            else to_numpy(layer.reverse_embeddings)
        )
        inputs = h
    else:
        kernel = (
            dequantized_table(layer).T
            if layer.tie_weights
            else dequantized_reverse_table(layer)
        )
        quantizer = layer.inputs_quantizer
        inputs = absmax_dequantized(h) if quantizer is not None else h
    logits = inputs @ kernel
    if layer.lora_enabled and layer.tie_weights:
        logits = logits + lora_term(layer, h)
    if layer.logit_soft_cap is not None:
        cap = layer.logit_soft_cap
        logits = np.tanh(logits / cap) * cap
    return logits


# Parity with keras.layers.ReversibleEmbedding.


@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_variables_match_keras(fmt, tie, rng):
    ours, theirs = keras_pair(rng, fmt, tie)
    assert ours.dtype_policy.name == theirs.dtype_policy.name
    assert ours.quantization_mode == theirs.quantization_mode == FORMATS[fmt][0]
    assert variables_of(ours) == variables_of(theirs)
    assert [v.path for v in ours.weights] == [v.path for v in theirs.weights]
    for mine, keras_variable in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(raw(mine), raw(keras_variable), err_msg=mine.name)
    assert [v.name for v in ours.trainable_weights] == [
        v.name for v in theirs.trainable_weights
    ]
    if fmt != "float":
        quantizer = theirs.inputs_quantizer
        assert type(ours.inputs_quantizer) is type(quantizer)
    if fmt == "float":
        np.testing.assert_array_equal(raw(ours(IDS)), raw(theirs(IDS)))
    else:
        np.testing.assert_array_max_ulp(raw(ours(IDS)), raw(theirs(IDS)), maxulp=1)


@TIES
@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("float", [("embeddings", (VOCAB, DIM), "float32")]),
        (
            "int8",
            [
                ("embeddings", (VOCAB, DIM), "int8"),
                ("embeddings_scale", (VOCAB,), "float32"),
            ],
        ),
        (
            "int4-per-row",
            [
                ("embeddings", (VOCAB, 7), "int8"),
                ("embeddings_scale", (VOCAB,), "float32"),
            ],
        ),
        (
            "int4-block8",
            [
                ("embeddings", (VOCAB, 7), "int8"),
                ("embeddings_scale", (VOCAB, 2), "float32"),
                ("embeddings_zero", (VOCAB, 2), "int8"),
                ("g_idx", (DIM,), "float32"),
            ],
        ),
    ],
)
def test_variables_per_format(fmt, expected, tie, rng):
    """The SPEC's table, independently of Keras: the reverse table of an
    untied layer follows the forward one, its zero point in float32."""
    if not tie:
        reverse = {
            "float": [("reverse_embeddings", (DIM, VOCAB), "float32")],
            "int8": [
                ("reverse_embeddings", (DIM, VOCAB), "int8"),
                ("reverse_embeddings_scale", (VOCAB,), "float32"),
            ],
            "int4-per-row": [
                ("reverse_embeddings", (7, VOCAB), "int8"),
                ("reverse_embeddings_scale", (VOCAB,), "float32"),
            ],
            "int4-block8": [
                ("reverse_embeddings", (7, VOCAB), "int8"),
                ("reverse_embeddings_scale", (2, VOCAB), "float32"),
                ("reverse_embeddings_zero", (2, VOCAB), "float32"),
            ],
        }[fmt]
        expected = expected + reverse
    layer = built(fmt, tie, rng)
    assert [(v.name, tuple(v.shape), dtype_of(v)) for v in layer.weights] == expected
    trainable = [] if fmt != "float" else [name for name, _, _ in expected]
    assert [v.name for v in layer.trainable_weights] == trainable


@KERAS_1D_TRANSPOSE
@pytest.mark.parametrize("cap", [None, 4.0], ids=["no_cap", "soft_cap"])
@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_match_keras(fmt, tie, cap, rng):
    ours, theirs = keras_pair(rng, fmt, tie, logit_soft_cap=cap)
    # Keras's quantized bits in ours: only the projection is compared here.
    copy_variables(theirs, ours)
    h = hidden(rng, ours.output_dim)
    got = ours(h, reverse=True)
    expected = theirs(h, reverse=True)
    assert tuple(got.shape) == (3, 4, VOCAB)
    assert dtype_of(got) == "float32"
    if fmt == "int8":
        np.testing.assert_array_equal(raw(got), raw(expected))
    else:
        assert_relclose(raw(got), raw(expected))


@TIES
def test_float_lora_logits_match_keras(tie, rng):
    ours, theirs = keras_pair(rng, "float", tie, lora=True)
    assert variables_of(ours) == variables_of(theirs)
    h = hidden(rng, DIM)
    assert_relclose(raw(ours(h, reverse=True)), raw(theirs(h, reverse=True)))
    # The lookup too: Keras merges the whole table, ours adds rows.
    assert_relclose(raw(ours(IDS)), raw(theirs(IDS)))


@KERAS_1D_TRANSPOSE
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_tied_quantized_lora_logits_include_adapters(fmt, rng):
    """Ours adds LoRA to the tied reverse projection in every format. Keras
    3.15 leaves it out of a quantized one (it adds it in the float reverse
    only, keras-team/keras#23630); later Keras adds it too."""
    ours, theirs = keras_pair(rng, fmt, True, lora=True)
    h = hidden(rng, ours.output_dim)
    got = raw(ours(h, reverse=True))
    assert_relclose(got, reverse_reference(ours, h))
    adapters = lora_term(ours, h.astype("float64"))
    assert np.abs(adapters).max() > 1e-2
    keras_logits = raw(theirs(h, reverse=True))
    if np.abs(got - keras_logits).max() > 1e-2:
        # Keras 3.15: without the adapters' term, the logits are Keras's.
        got = got - adapters
    assert_relclose(got, keras_logits, rtol=1e-4)


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_untied_quantized_lora_logits_match_keras(fmt, rng):
    """Untied, the reverse table has no adapter in either layer."""
    ours, theirs = keras_pair(rng, fmt, False, lora=True)
    copy_variables(theirs, ours)
    h = hidden(rng, ours.output_dim)
    got, expected = raw(ours(h, reverse=True)), raw(theirs(h, reverse=True))
    if fmt == "int8":
        np.testing.assert_array_equal(got, expected)
    else:
        assert_relclose(got, expected)


POLICY_BUILDS = {
    "int8_from_float32": "int8",
    "int4_from_float32": "int4-per-row",
    "int4/8_from_float32": "int4-block8",
}


@KERAS_1D_TRANSPOSE
@pytest.mark.parametrize("policy", POLICY_BUILDS)
@TIES
def test_policy_built_layer_quantizes_hidden_states_for_int8_only(policy, tie, rng):
    """Built from a quantized policy alone (as when a weights file is loaded),
    Keras 3.15 quantizes the hidden states with AbsMax for int4 too, so that
    its reloaded int4 layer's logits are not those of the layer that was
    quantized and saved. Ours does so for int8 only (the SPEC's deliberate
    deviation; later Keras does as ours): int8 logits stay Keras's bit for
    bit, int4 ones stay weight-only, those of `layer.quantize("int4")`."""
    quantized, keras_quantized = keras_pair(rng, POLICY_BUILDS[policy], tie)
    copy_variables(keras_quantized, quantized)
    layers = []
    for cls in (ReversibleEmbedding, keras.layers.ReversibleEmbedding):
        layer = cls(VOCAB, DIM, tie_weights=tie, dtype=policy, name="tokens")
        layer.build()
        copy_variables(keras_quantized, layer)
        layers.append(layer)
    ours, theirs = layers
    assert ours.dtype_policy.name == theirs.dtype_policy.name == policy
    h = hidden(rng, DIM)
    got = raw(ours(h, reverse=True))
    if ours.quantization_mode == "int8":
        assert isinstance(theirs.inputs_quantizer, keras.quantizers.AbsMaxQuantizer)
        assert isinstance(ours.inputs_quantizer, keras.quantizers.AbsMaxQuantizer)
        assert ours.inputs_quantizer.axis == theirs.inputs_quantizer.axis
        np.testing.assert_array_equal(got, raw(theirs(h, reverse=True)))
    else:
        assert ours.inputs_quantizer is None
        np.testing.assert_array_equal(got, raw(quantized(h, reverse=True)))
        assert_relclose(got, raw(keras_quantized(h, reverse=True)))
        if theirs.inputs_quantizer is None:
            # Later Keras: weight-only too, the same logits.
            assert_relclose(got, raw(theirs(h, reverse=True)))
        else:
            assert isinstance(theirs.inputs_quantizer, keras.quantizers.AbsMaxQuantizer)
    assert_relclose(got, reverse_reference(ours, h))


# Values against a NumPy reference.


@pytest.mark.parametrize("batch", [(), (5,), (2, 3)], ids=["rank1", "rank2", "rank3"])
@pytest.mark.parametrize("cap", [None, 3.0], ids=["no_cap", "soft_cap"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@TIES
def test_float_logits_equal_numpy_reference(tie, lora, cap, batch, rng):
    layer = built("float", tie, rng, lora=lora, logit_soft_cap=cap)
    h = hidden(rng, DIM, batch)
    table = to_numpy(layer.weights[0])
    if tie:
        expected = h @ table.T
        if lora:
            a = to_numpy(layer.lora_embeddings_a)
            b = to_numpy(layer.lora_embeddings_b)
            expected = expected + 2.0 * ((h @ b.T) @ a.T)
    else:
        # Untied: the reverse table alone, with or without LoRA.
        expected = h @ to_numpy(layer.reverse_embeddings)
    if cap is not None:
        expected = np.tanh(expected / cap) * cap
    got = layer(h, reverse=True)
    assert tuple(got.shape) == (*batch, VOCAB)
    assert_relclose(to_numpy(got), expected)


def test_keras_correctness_example():
    """Keras's own test_correctness numbers."""
    layer = ReversibleEmbedding(input_dim=3, output_dim=2)
    layer.build()
    layer.embeddings.assign(np.array([[0.0, 0.0], [2.0, 2.0], [3.0, 3.0]]))
    out = layer(np.array([2, 1, 0]))
    np.testing.assert_array_equal(
        raw(out), np.array([[3.0, 3.0], [2.0, 2.0], [0.0, 0.0]])
    )
    out = layer(np.array([[1.0, 1.0]]), reverse=True)
    np.testing.assert_allclose(raw(out), [[0.0, 4.0, 6.0]], rtol=1e-6)
    capped = ReversibleEmbedding(3, 2, logit_soft_cap=5)
    capped.build()
    capped.embeddings.assign(np.array([[0.0, 0.0], [2.0, 2.0], [3.0, 3.0]]))
    out = capped(np.array([[1.0, 1.0]]), reverse=True)
    np.testing.assert_allclose(raw(out), [[0.0, 3.320184, 4.168273]], rtol=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@TIES
@pytest.mark.parametrize("fmt", QUANTIZED)
def test_quantized_logits_equal_numpy_reference(fmt, tie, lora, rng):
    layer = built(fmt, tie, rng, lora=lora, logit_soft_cap=3.0 if lora else None)
    if FORMATS[fmt][0] == "int8":
        assert isinstance(layer.inputs_quantizer, keras.quantizers.AbsMaxQuantizer)
    else:  # int4 from layer.quantize is weight-only, as Keras's.
        assert layer.inputs_quantizer is None
    h = hidden(rng, layer.output_dim)
    got = layer(h, reverse=True)
    assert dtype_of(got) == "float32"
    assert_relclose(to_numpy(got), reverse_reference(layer, h))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_logits_of_hidden_states_of_unknown_size_equal_numpy_reference(
    fmt, tie, lora, rng, monkeypatch
):
    """Where a trace leaves the hidden states' sizes unknown or symbolic
    (a TensorFlow graph, a JAX or PyTorch export), the projection keeps
    their leading axes (tensordots, no flattening reshape): forced here,
    eagerly, so that every format's form (int4's eager sign-flipped bytes
    included, as a PyTorch export runs them) is checked on every backend."""
    layer = built(fmt, tie, rng, lora=lora)
    h = hidden(rng, layer.output_dim, (2, 3))
    expected = reverse_reference(layer, h)
    monkeypatch.setattr(_projection, "static_rows", lambda hidden: None)
    reshapes = []
    reshape = ops.reshape

    def counted(x, shape):
        reshapes.append(tuple(shape))
        return reshape(x, shape)

    monkeypatch.setattr(_projection.ops, "reshape", counted)
    got = to_numpy(layer(h, reverse=True))
    # Neither the flattening reshape of the hidden states nor the one back
    # (what jax2onnx cannot translate with symbolic sizes) ran.
    flat_forms = {(-1, layer.output_dim), (2, 3, VOCAB)}
    assert not flat_forms.intersection(reshapes), reshapes
    assert got.shape == (2, 3, VOCAB)
    assert_relclose(got, expected)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "predict"])
@pytest.mark.parametrize(
    "batch",
    [(1,), (2, 3), (7, 4)],
    ids=["one_token", "per_group_partials", "dequantized_chunks"],
)
@TIES
def test_grouped_int4_logits_equal_numpy_reference_for_any_token_count(
    tie, batch, traced, rng, monkeypatch
):
    """Whole groups (48 columns in 6 groups of 8): eagerly, up to 48 / 6 = 8
    hidden states take per-group partial logits (bytes with a flipped sign
    bit), more dequantize each chunk (nibbles unpacked in int8); `predict`
    (traced on TensorFlow and JAX) dequantizes each chunk with float32 ops,
    except one hidden state on JAX, which takes Keras's form: the whole
    table dequantized, transposed, and one matmul.
    Every way gives the logits of the dequantized table, and the same as
    Keras's layer."""
    layers = layers_of(
        (ReversibleEmbedding, keras.layers.ReversibleEmbedding),
        rng,
        "int4-block8",
        tie,
        dim=48,
    )
    ours, theirs = layers
    h = hidden(rng, 48, batch)
    table = type(ours._table)
    steps = []
    decoding_step = table._decoding_step_logits
    monkeypatch.setattr(
        table,
        "_decoding_step_logits",
        lambda self, hidden: steps.append(hidden.shape) or decoding_step(self, hidden),
    )
    if traced:
        inputs = keras.Input((*batch[1:], 48))
        model = keras.Model(inputs, ours(inputs, reverse=True))
        got = model.predict(h, batch_size=batch[0], verbose=0)
    else:
        got = to_numpy(ours(h, reverse=True))
    one_jax_step = BACKEND == "jax" and traced and batch == (1,)
    assert bool(steps) == one_jax_step, steps
    assert got.shape == (*batch, VOCAB)
    assert_relclose(got, reverse_reference(ours, h))
    assert_relclose(got, raw(theirs(h, reverse=True)))


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_lookup_rows_equal_table(fmt, lora, rng):
    # Untied: a reverse table beside it changes nothing in the lookup.
    layer = built(fmt, False, rng, lora=lora)
    out = layer(IDS)
    assert tuple(out.shape) == (*IDS.shape, layer.output_dim)
    assert dtype_of(out) == "float32"
    quantized = fmt != "float"
    table = dequantized_table(layer) if quantized else to_numpy(layer.weights[0])
    if lora:
        a, b = to_numpy(layer.lora_embeddings_a), to_numpy(layer.lora_embeddings_b)
        table = table + 2.0 * (a @ b)
        np.testing.assert_allclose(to_numpy(out), table[IDS], rtol=1e-5, atol=1e-5)
    elif fmt == "float":
        np.testing.assert_array_equal(to_numpy(out), table[IDS])
    else:
        np.testing.assert_allclose(to_numpy(out), table[IDS], rtol=1e-6, atol=1e-7)


@TIES
def test_layer_checks(tie):
    """The suite's standard checks on the lookup (untied: no fit step, as the
    reverse table gets no gradient from a lookup)."""
    weights = [("embeddings", (10, 4))]
    if not tie:
        weights.append(("reverse_embeddings", (4, 10)))

    def make_layer(**overrides):
        return ReversibleEmbedding(10, 4, tie_weights=tie, **overrides)

    ids = np.array([[1, 2, 3], [4, 5, 0]], dtype="int32")
    run_layer_checks(
        make_layer, ids, (2, 3, 4), expected_weights=weights, check_fit=tie
    )


@TIES
def test_invalid_ids_in_lookup_as_embedding(tie):
    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, name="tokens")
    with pytest.raises(InvalidIdError, match=r"'tokens' received an invalid id 64"):
        layer(np.array([[1, VOCAB]], dtype="int32"))
    zeros = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, invalid_ids="zeros")
    out = to_numpy(zeros(np.array([3, VOCAB, -1], dtype="int32")))
    np.testing.assert_array_equal(out[0], to_numpy(zeros.weights[0])[3])
    np.testing.assert_array_equal(out[1:], np.zeros((2, DIM)))


@TIES
def test_weights_argument_sets_the_lookup_table(tie, rng):
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, weights=table)
    np.testing.assert_array_equal(raw(layer.weights[0]), table)
    np.testing.assert_array_equal(raw(layer(IDS)), table[IDS])


def test_regularizer_and_constraint_on_the_lookup_table_only_like_keras():
    layers = [
        cls(
            VOCAB,
            DIM,
            tie_weights=False,
            embeddings_initializer="ones",
            embeddings_regularizer="l2",
            embeddings_constraint="non_neg",
        )
        for cls in (ReversibleEmbedding, keras.layers.ReversibleEmbedding)
    ]
    for layer in layers:
        layer.build()
    ours, theirs = layers
    assert len(ours.losses) == len(theirs.losses) == 1
    np.testing.assert_allclose(to_numpy(ours.losses[0]), to_numpy(theirs.losses[0]))
    assert [v.constraint is not None for v in ours.weights] == [True, False]


# Masks.


class MaskProbe(keras.layers.Layer):
    """Returns the mask it receives as floats, or -1 where it receives none."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return ops.full(ops.shape(inputs)[:-1], -1.0)
        return ops.cast(mask, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape[:-1]

    def compute_mask(self, inputs, mask=None):
        return None


@pytest.mark.parametrize("mask_zero", [True, False])
@TIES
def test_lookup_carries_mask_reverse_does_not(tie, mask_zero):
    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, mask_zero=mask_zero)
    ids = keras.Input((4,), dtype="int32")
    states = layer(ids)
    logits = layer(states, reverse=True)
    model = keras.Model(ids, [MaskProbe()(states), MaskProbe()(logits)])
    forward_mask = (IDS != 0).astype("float32") if mask_zero else -np.ones(IDS.shape)
    for forward, reverse in (model(IDS), model.predict(IDS, verbose=0)):
        np.testing.assert_array_equal(to_numpy(forward), forward_mask)
        np.testing.assert_array_equal(to_numpy(reverse), -np.ones(IDS.shape))


def test_mask_matches_keras_layer_in_a_model(rng):
    def model_of(cls):
        ids = keras.Input((4,), dtype="int32")
        layer = cls(VOCAB, DIM, mask_zero=True, name="tokens")
        x = keras.layers.GlobalAveragePooling1D()(layer(ids))  # masked mean
        return keras.Model(ids, layer(x, reverse=True))

    ours, theirs = (
        model_of(ReversibleEmbedding),
        model_of(keras.layers.ReversibleEmbedding),
    )
    theirs.set_weights(ours.get_weights())
    assert_relclose(
        ours.predict(IDS, verbose=0), theirs.predict(IDS, verbose=0), rtol=1e-5
    )


# Shapes and dtypes.


def test_compute_output_shape():
    layer = ReversibleEmbedding(VOCAB, DIM)
    assert tuple(layer.compute_output_shape((None, 7))) == (None, 7, DIM)
    assert tuple(layer.compute_output_shape((None, 7, DIM), reverse=True)) == (
        None,
        7,
        VOCAB,
    )
    assert tuple(layer.compute_output_shape((DIM,), reverse=True)) == (VOCAB,)


DTYPE_CASES = [
    ("float32", None, "float32"),
    ("mixed_bfloat16", None, "bfloat16"),
    ("mixed_bfloat16", "float32", "float32"),
    ("float32", "bfloat16", "bfloat16"),
]


@pytest.mark.parametrize(
    ("policy", "reverse_dtype", "expected"),
    DTYPE_CASES,
    ids=["float32", "mixed_bfloat16", "mixed_bfloat16_reverse_float32", "bf16"],
)
@TIES
@pytest.mark.parametrize("fmt", ["float", "int8", "int4-block8"])
def test_reverse_output_dtype_is_reverse_dtype_or_compute_dtype(
    fmt, tie, policy, reverse_dtype, expected, rng
):
    """Keras's spec says compute_dtype but its logits follow the input dtype;
    ours are what compute_output_spec says, in every format."""
    layer = built(fmt, tie, rng, dtype=policy, reverse_dtype=reverse_dtype)
    spec = layer.compute_output_spec(
        keras.KerasTensor((None, 4, DIM), dtype="float32"), reverse=True
    )
    assert tuple(spec.shape) == (None, 4, VOCAB)
    assert spec.dtype == expected
    symbolic = layer(keras.Input((4, DIM), dtype="float32"), reverse=True)
    assert tuple(symbolic.shape) == (None, 4, VOCAB)
    assert symbolic.dtype == expected
    h = hidden(rng, DIM)
    for inputs in (h, ops.cast(h, "bfloat16")):
        out = layer(inputs, reverse=True)
        assert dtype_of(out) == expected
    # bfloat16 keeps 8 bits: the logits are the reference's to ~1%.
    assert_relclose(to_numpy(layer(h, reverse=True)), reverse_reference(layer, h), 3e-2)


@pytest.mark.parametrize(
    "dtype", ["float32", "bfloat16", "float16", "mixed_float16", "mixed_bfloat16"]
)
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@TIES
@pytest.mark.parametrize(
    "batch", [(), (1,), (1, 1), (5,), (3, 4), (2, 3, 2)], ids=lambda b: f"{b}"
)
def test_float_logits_of_any_shape_match_numpy(batch, tie, lora, dtype, rng):
    """Every hidden shape (one state takes a table-first matmul) and 16-bit
    values at odd widths (13 columns: where TensorFlow's ellipsis einsum goes
    wrong on AMX CPUs, errors the size of the logits) give the reference's
    logits."""
    layer = built("float", tie, rng, lora=lora, dtype=dtype)
    h = hidden(rng, DIM, batch)
    logits = layer(h, reverse=True)
    assert tuple(logits.shape) == (*batch, VOCAB)
    assert dtype_of(logits) == layer.compute_dtype
    rtol = 1e-5 if dtype == "float32" else 2e-2
    assert_relclose(to_numpy(logits), reverse_reference(layer, h), rtol)


def test_compute_output_spec_of_lookup():
    layer = ReversibleEmbedding(VOCAB, DIM, dtype="mixed_bfloat16")
    spec = layer.compute_output_spec(keras.KerasTensor((2, 3), dtype="int32"))
    assert tuple(spec.shape) == (2, 3, DIM)
    assert spec.dtype == "bfloat16"


@TIES
def test_symbolic_reverse_call_in_functional_model(tie, rng):
    layer = built("float", tie, rng)
    states = keras.Input((4, DIM), dtype="float32")
    logits = layer(states, reverse=True)
    assert isinstance(logits, keras.KerasTensor)
    assert tuple(logits.shape) == (None, 4, VOCAB)
    model = keras.Model(states, logits)
    h = hidden(rng, DIM)
    assert_relclose(model.predict(h, verbose=0), to_numpy(layer(h, reverse=True)))
    assert_relclose(model.predict(h, verbose=0), reverse_reference(layer, h))


# Errors.


@pytest.mark.parametrize("where", ["eager", "symbolic"])
@TIES
@pytest.mark.parametrize("fmt", ["float", "int8"])
def test_hidden_states_of_other_width_are_refused(fmt, tie, where, rng):
    layer = built(fmt, tie, rng)
    # The message names the layer, output_dim and the received shape.
    message = r"(?s)(?=.*'tokens')(?=.*output_dim\D{0,4}13\b)"
    if where == "eager":
        with pytest.raises(ValueError, match=message + r"(?=.*[(\[]3, 4, 5[)\]])"):
            layer(hidden(rng, 5), reverse=True)
    else:
        with pytest.raises(ValueError, match=message + r"(?=.*[(\[]None, 4, 5[)\]])"):
            layer(keras.Input((4, 5)), reverse=True)


def test_integer_hidden_states_are_refused():
    layer = ReversibleEmbedding(VOCAB, DIM, name="tokens")
    layer.build()
    with pytest.raises(ValueError, match="'tokens'"):
        layer(np.ones((2, DIM), dtype="int32"), reverse=True)


def both_errors(action, tie=True, **kwargs):
    """The error `action(layer)` raises for our layer and for Keras's."""
    errors = []
    for cls in (ReversibleEmbedding, keras.layers.ReversibleEmbedding):
        layer = cls(VOCAB, 8, tie_weights=tie, name="tokens", **kwargs)
        with pytest.raises(Exception) as info:
            action(layer)
        errors.append(info.value)
    return errors


def built_then(*calls):
    def action(layer):
        layer.build()
        for call in calls:
            call(layer)

    return action


@pytest.mark.parametrize(
    ("action", "kwargs", "error_type", "fragment"),
    [
        (
            built_then(lambda layer: layer.quantize("int16")),
            {},
            ValueError,
            "Invalid quantization mode",
        ),
        (
            built_then(lambda layer: layer.quantize("float8")),
            {},
            NotImplementedError,
            "Expected one of ('int8', 'int4'). Received: quantization_mode=float8",
        ),
        (
            built_then(lambda layer: layer.quantize()),
            {},
            ValueError,
            "You must provide either `mode` or `config`",
        ),
        (
            built_then(lambda layer: layer.enable_lora(2)),
            {"embeddings_constraint": "non_neg"},
            ValueError,
            "Lora is incompatible with embedding constraints.",
        ),
        (
            lambda layer: layer.enable_lora(2),
            {},
            ValueError,
            "Cannot enable lora on a layer that isn't yet built.",
        ),
    ],
    ids=["invalid_mode", "float8", "no_mode", "constraint", "unbuilt"],
)
@TIES
def test_errors_match_keras(action, kwargs, error_type, fragment, tie):
    ours, theirs = both_errors(action, tie=tie, **kwargs)
    assert type(ours) is type(theirs) is error_type
    assert str(ours) == str(theirs)
    assert fragment in str(ours)


@TIES
def test_enable_lora_twice_says_more_than_keras(tie):
    twice = built_then(
        lambda layer: layer.enable_lora(2), lambda layer: layer.enable_lora(4)
    )
    ours, theirs = both_errors(twice, tie=tie)
    assert type(ours) is type(theirs) is ValueError
    # Keras's words first, then the layer, its rank and the way out.
    assert str(theirs).startswith("lora is already enabled")
    assert str(ours).startswith(
        "lora is already enabled on layer 'tokens', with rank 2 (lora_alpha=2)"
    )
    assert "(received: rank=4), call `merge_lora()` first" in str(ours)


@TIES
def test_refused_quantize_leaves_layer_as_it_was(tie, rng):
    layer = built("float", tie, rng)
    before = [raw(v) for v in layer.weights]
    with pytest.raises(ValueError, match="Invalid quantization mode"):
        layer.quantize("int16")
    assert layer.quantization_mode is None
    assert layer.dtype_policy.name == "float32"
    for variable, values in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(raw(variable), values)


@TIES
def test_subclass_needs_type_check_false(tie):
    class Subclass(ReversibleEmbedding):
        pass

    layer = Subclass(VOCAB, 8, tie_weights=tie)
    layer.build()
    with pytest.raises(
        NotImplementedError,
        match=r"Layer Subclass does not have a `quantize` method implemented",
    ):
        layer.quantize("int8")
    assert layer.quantization_mode is None
    layer.quantize("int8", type_check=False)
    assert layer.quantization_mode == "int8"
    if not tie:
        assert dtype_of(layer.reverse_embeddings) == "int8"


def test_quantize_twice_is_refused_like_keras():
    ours, theirs = both_errors(
        built_then(
            lambda layer: layer.quantize("int8"),
            lambda layer: layer.quantize("int4"),
        )
    )
    assert type(ours) is type(theirs) is ValueError
    assert str(ours) == str(theirs)
    assert "is already quantized" in str(ours)


# Config.


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tie_weights": False},
        {"reverse_dtype": "float32", "logit_soft_cap": 30.0, "mask_zero": True},
        {"embeddings_initializer": "glorot_normal", "dtype": "mixed_bfloat16"},
    ],
    ids=["default", "untied", "reverse_options", "initializer_policy"],
)
def test_config_equals_keras_config_and_loads_into_keras(kwargs):
    ours = ReversibleEmbedding(VOCAB, DIM, name="tokens", **kwargs).get_config()
    theirs = keras.layers.ReversibleEmbedding(
        VOCAB, DIM, name="tokens", **kwargs
    ).get_config()
    assert set(ours) == set(theirs)
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)
    keras_layer = keras.layers.ReversibleEmbedding.from_config(ours)
    assert json.dumps(keras_layer.get_config(), sort_keys=True) == json.dumps(
        ours, sort_keys=True
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"tie_weights": False, "logit_soft_cap": 5.0, "reverse_dtype": "float32"},
        {"lora_rank": 2, "lora_alpha": 5.0},
        {"invalid_ids": "zeros", "mask_zero": True},
        {"dtype": "int4/8_from_float32", "tie_weights": False},
    ],
    ids=["default", "reverse_options", "lora", "invalid_ids", "quantized"],
)
def test_config_round_trip(kwargs):
    layer = ReversibleEmbedding(VOCAB, DIM, **kwargs)
    check_config_round_trip(layer)
    layer.build()
    check_config_round_trip(layer)
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "keras_ext_embedding>ReversibleEmbedding"
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(revived) is ReversibleEmbedding
    for name in ("tie_weights", "logit_soft_cap", "reverse_dtype", "mask_zero"):
        assert getattr(revived, name) == getattr(layer, name), name


def test_lora_config_keys_are_keras_keys_with_lora():
    layer = ReversibleEmbedding(VOCAB, DIM)
    layer.build()
    layer.enable_lora(3, lora_alpha=6)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (3, 6)
    keras_layer = keras.layers.ReversibleEmbedding(VOCAB, DIM, lora_rank=3)
    assert set(config) == set(keras_layer.get_config())


def test_registered_name():
    assert (
        keras.saving.get_registered_name(ReversibleEmbedding)
        == "keras_ext_embedding>ReversibleEmbedding"
    )
    assert (
        keras.saving.get_registered_object("keras_ext_embedding>ReversibleEmbedding")
        is ReversibleEmbedding
    )


def test_defaults_match_keras():
    ours = ReversibleEmbedding(VOCAB, DIM)
    theirs = keras.layers.ReversibleEmbedding(VOCAB, DIM)
    for name in ("tie_weights", "reverse_dtype", "logit_soft_cap", "mask_zero"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.invalid_ids == "raise"


# LoRA.


@pytest.mark.parametrize("how", ["enable_lora", "constructor"])
def test_untied_lora_freezes_reverse_table_until_merged(how, rng):
    """Keras leaves reverse_embeddings trainable under LoRA (a full fine-tune
    of the output table; with `lora_rank` in the constructor its build even
    fails); ours freezes it, and merge_lora unfreezes it."""
    if how == "enable_lora":
        layer = built("float", False, rng, lora=True)
    else:
        layer = ReversibleEmbedding(
            VOCAB, DIM, tie_weights=False, lora_rank=3, lora_alpha=6.0
        )
        layer.build()
        layer.lora_embeddings_b.assign(rng.normal(size=(3, DIM)).astype("float32"))
    assert [v.name for v in layer.weights] == [
        "embeddings",
        "reverse_embeddings",
        *LORA_WEIGHTS,
    ]
    assert [v.name for v in layer.trainable_weights] == LORA_WEIGHTS
    assert not layer.reverse_embeddings.trainable
    h = hidden(rng, DIM)
    before = to_numpy(layer(h, reverse=True))
    rows = to_numpy(layer(IDS))
    layer.merge_lora()
    assert [v.name for v in layer.trainable_weights] == [
        "embeddings",
        "reverse_embeddings",
    ]
    assert layer.reverse_embeddings.trainable
    np.testing.assert_array_equal(to_numpy(layer(h, reverse=True)), before)
    np.testing.assert_allclose(to_numpy(layer(IDS)), rows, rtol=1e-5, atol=1e-5)


def test_tied_merge_lora_keeps_logits(rng):
    layer = built("float", True, rng, lora=True)
    h = hidden(rng, DIM)
    before = to_numpy(layer(h, reverse=True))
    layer.merge_lora()
    assert not layer.lora_enabled
    assert [v.name for v in layer.trainable_weights] == ["embeddings"]
    assert_relclose(to_numpy(layer(h, reverse=True)), before)


# Training.


def language_model(layer, length=IDS.shape[1]):
    """ids -> lookup -> Dense -> tied/untied logits over the vocabulary."""
    ids = keras.Input((length,), dtype="int32")
    x = keras.layers.Dense(layer.output_dim, name="mix")(layer(ids))
    return keras.Model(ids, layer(x, reverse=True))


def next_token_task(rng, n=32, length=IDS.shape[1]):
    ids = rng.integers(0, VOCAB, size=(n, length)).astype("int32")
    return ids, (ids + 1) % VOCAB


@pytest.mark.parametrize(
    ("fmt", "lora", "tie"),
    [
        ("float", False, True),
        ("float", False, False),
        ("float", True, True),
        ("float", True, False),
        ("int8", True, True),
    ],
    ids=["tied", "untied", "tied-lora", "untied-lora", "int8-tied-lora"],
)
def test_logits_model_trains(fmt, lora, tie, rng):
    layer = ReversibleEmbedding(
        VOCAB, DIM, tie_weights=tie, embeddings_initializer="normal", name="tokens"
    )
    model = language_model(layer)
    if fmt != "float":
        layer.quantize(fmt)
    if lora:
        layer.enable_lora(4)
    model.compile(
        keras.optimizers.Adam(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    frozen = {v.name: raw(v) for v in layer.weights if not v.trainable}
    moving = {v.name: raw(v) for v in layer.trainable_weights}
    if lora:
        # Every table, the reverse one too when untied, is frozen.
        assert sorted(moving) == LORA_WEIGHTS
        assert "embeddings" in frozen
        assert tie or "reverse_embeddings" in frozen
    ids, targets = next_token_task(rng)
    history = model.fit(ids, targets, epochs=15, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    # LoRA untied trains least (its reverse table is frozen): ~0.8 here.
    assert losses[-1] < 0.9 * losses[0], losses
    for variable in layer.weights:
        if variable.name in frozen:
            np.testing.assert_array_equal(raw(variable), frozen[variable.name])
        else:
            assert not np.array_equal(raw(variable), moving[variable.name]), (
                variable.name
            )


# Model.quantize and replace_embeddings.


# Keras warns that the model's InputLayer has no quantize method.
@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have")
@pytest.mark.parametrize("mode", ["int8", "int4"])
@TIES
def test_model_quantize_quantizes_our_layer(mode, tie, rng):
    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, name="tokens")
    model = language_model(layer)
    before = model.predict(IDS, verbose=0)
    model.quantize(mode)
    assert layer.quantization_mode == mode
    assert layer.dtype_policy.name.startswith(mode)
    assert dtype_of(layer._embeddings) == "int8"
    if not tie:
        assert dtype_of(layer.reverse_embeddings) == "int8"
    assert layer.trainable_weights == []
    after = model.predict(IDS, verbose=0)
    assert not np.array_equal(after, before)
    # int4 keeps 16 levels per row or group: logits within ~10% here.
    tolerance = 0.02 if mode == "int8" else 0.25
    np.testing.assert_allclose(after, before, atol=tolerance * np.abs(before).max())


def keras_language_model(rng, tie, mask_zero=False):
    ids = keras.Input((IDS.shape[1],), dtype="int32")
    layer = keras.layers.ReversibleEmbedding(
        VOCAB, DIM, tie_weights=tie, mask_zero=mask_zero, name="tokens"
    )
    x = keras.layers.Dense(DIM, name="mix")(layer(ids))
    model = keras.Model(ids, layer(x, reverse=True))
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


@pytest.mark.parametrize("mask_zero", [False, True])
@TIES
def test_replace_embeddings_turns_keras_reversible_into_ours(tie, mask_zero, rng):
    model = keras_language_model(rng, tie, mask_zero)
    before = model.predict(IDS, verbose=0)
    weights = {v.path: raw(v) for v in model.weights}
    assert replace_embeddings(model) is model
    layer = model.get_layer("tokens")
    assert type(layer) is ReversibleEmbedding
    assert (layer.tie_weights, layer.mask_zero) == (tie, mask_zero)
    assert [v.path for v in model.weights] == list(weights)
    for variable in model.weights:
        np.testing.assert_array_equal(raw(variable), weights[variable.path])
    assert_relclose(model.predict(IDS, verbose=0), before, rtol=1e-5)
    # The graph runs our layer: its table drives the logits.
    table = layer.weights[0]
    table.assign(ops.zeros(table.shape))
    assert not np.allclose(model.predict(IDS, verbose=0), before)


@KERAS_1D_TRANSPOSE
@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have")
def test_replace_embeddings_keeps_keras_int8_logits(rng):
    model = keras_language_model(rng, tie=True)
    model.get_layer("tokens").quantize("int8")
    h = hidden(rng, DIM)
    keras_logits = raw(model.get_layer("tokens")(h, reverse=True))
    replace_embeddings(model)
    layer = model.get_layer("tokens")
    assert type(layer) is ReversibleEmbedding
    assert layer.dtype_policy.name == "int8_from_float32"
    np.testing.assert_array_equal(raw(layer(h, reverse=True)), keras_logits)


# The projection never builds a table-sized float temporary.

# An 8 MiB float table: larger than the few MiB that a quantized table is
# widened to float in at a time.
BIG_VOCAB, BIG_DIM = 32768, 64


def reverse_temporaries(layer, h):
    """Shapes of the float values that `layer(h, reverse=True)` computes with
    `BIG_VOCAB * BIG_DIM` elements or more; reading a variable, and views of
    it, are not counted, only what is computed."""
    h = ops.convert_to_tensor(h)
    found = []  # (shape, is_float)
    if BACKEND == "jax":
        import jax

        def logits(trainable, non_trainable, h):
            return layer.stateless_call(trainable, non_trainable, h, reverse=True)[0]

        def walk(jaxpr):
            for equation in jaxpr.eqns:
                for var in equation.outvars:
                    dtype = np.dtype(var.aval.dtype)
                    found.append((tuple(var.aval.shape), dtype.kind == "f"))
                for param in equation.params.values():
                    params = param if isinstance(param, list | tuple) else [param]
                    for inner in params:
                        inner = getattr(inner, "jaxpr", inner)
                        if hasattr(inner, "eqns"):
                            walk(inner)

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        walk(jax.make_jaxpr(logits)(trainable, non_trainable, h).jaxpr)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        graph = (
            tf.function(lambda h: layer(h, reverse=True)).get_concrete_function(h).graph
        )
        skipped = ("ReadVariableOp", "VarHandleOp", "Placeholder", "Identity")
        for operation in graph.get_operations():
            if operation.type in skipped:
                continue
            for output in operation.outputs:
                found.append((tuple(output.shape), output.dtype.is_floating))
    else:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        def storages(tree):
            return {
                t.untyped_storage().data_ptr()
                for t in tree_leaves(tree)
                if isinstance(t, torch.Tensor)
            }

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                inputs = storages((args, kwargs))
                for tensor in tree_leaves(out):
                    # A view shares its input's storage: nothing is copied.
                    if isinstance(tensor, torch.Tensor) and (
                        tensor.untyped_storage().data_ptr() not in inputs
                    ):
                        found.append(
                            (tuple(tensor.shape), tensor.dtype.is_floating_point)
                        )
                return out

        with Record():
            layer(h, reverse=True)
    return [
        shape
        for shape, is_float in found
        if is_float
        and None not in shape
        and int(np.prod(shape, dtype="int64")) >= BIG_VOCAB * BIG_DIM
    ]


@pytest.mark.parametrize("variant", ["tied", "untied", "tied_lora"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reverse_builds_no_table_sized_float_temporary(fmt, variant):
    layer = ReversibleEmbedding(BIG_VOCAB, BIG_DIM, tie_weights=variant != "untied")
    layer.build()
    mode, _ = FORMATS[fmt]
    if mode:
        layer.quantize(mode, config=config_of(fmt))
    if variant == "tied_lora":
        layer.enable_lora(4)
    h = np.ones((3, BIG_DIM), dtype="float32")
    assert reverse_temporaries(layer, h) == []


def test_keras_int4_reverse_trips_the_temporary_check():
    """The check above can fail: Keras's int4 reverse dequantizes the whole
    table."""
    layer = keras.layers.ReversibleEmbedding(BIG_VOCAB, BIG_DIM)
    layer.build()
    layer.quantize("int4")
    h = np.ones((3, BIG_DIM), dtype="float32")
    assert reverse_temporaries(layer, h) != []


def test_weights_argument_sets_both_untied_tables(rng):
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    reverse = rng.normal(size=(DIM, VOCAB)).astype("float32")
    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=False, weights=[table, reverse])
    np.testing.assert_array_equal(to_numpy(layer.embeddings), table)
    np.testing.assert_array_equal(to_numpy(layer.reverse_embeddings), reverse)
    hidden = rng.normal(size=(2, DIM)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(layer(hidden, reverse=True)), hidden @ reverse, rtol=1e-5, atol=1e-6
    )
    # The table alone leaves the reverse table to its initializer.
    alone = ReversibleEmbedding(VOCAB, DIM, tie_weights=False, weights=table)
    np.testing.assert_array_equal(to_numpy(alone.embeddings), table)


def test_weights_argument_errors(rng):
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    with pytest.raises(ValueError, match="has tied weights: `weights` is its one"):
        ReversibleEmbedding(VOCAB, DIM, weights=[table, table.T])
    with pytest.raises(ValueError, match=r"reverse_embeddings\) of shape \(64, 13\)"):
        ReversibleEmbedding(VOCAB, DIM, tie_weights=False, weights=[table, table])
