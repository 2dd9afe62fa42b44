"""Saving ReversibleEmbedding: `.weights.h5` crossing with
`keras.layers.ReversibleEmbedding` both ways in every table format, tied and
untied; `.keras` round trips; LoRA checkpoints that keep the adapters and
resume training; checkpoints that do not fit, refused."""

import gc
import json
import zipfile

import h5py
import keras
import numpy as np
import pytest
from quantization_reference import comparable_dtype, raw

from keras_ext_embedding import ReversibleEmbedding

VOCAB, DIM = 50, 13
IDS = np.array([[1, 2, 3, 0], [7, 7, 49, 4], [12, 30, 30, 5]], dtype="int32")
# Keras names a layer's group in the file after its class; both are
# ReversibleEmbedding.
LAYER_IN_FILE = "layers/reversible_embedding/vars"
# name: (mode, int4 block size or "default", the dtype policy it gives).
FORMATS = {
    "float": (None, None, "float32"),
    "int8": ("int8", None, "int8_from_float32"),
    "int4-per-row": ("int4", None, "int4/-1_from_float32"),
    "int4-default": ("int4", "default", "int4/128_from_float32"),
    "int4-block8": ("int4", 8, "int4/8_from_float32"),
}
TIES = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
# Keras's tied int8 reverse transposes its 1-D scale, which PyTorch warns
# about (once per process) in the middle of Keras's call.
KERAS_1D_TRANSPOSE = pytest.mark.filterwarnings(
    "ignore:The use of `x.T` on tensors of dimension other than 2:UserWarning"
)
# After a layer refuses its entry, Keras (3.15) goes on through the functional
# model's containers and warns about one it cannot match; the error still
# reaches the caller.
SKIPPING_CONTAINER = pytest.mark.filterwarnings(
    "ignore:Skipping nested container:UserWarning"
)


@pytest.fixture(autouse=True)
def no_full_collection_per_removed_variable(monkeypatch):
    """Keras's `Layer.__delattr__` runs `gc.collect()` for each variable that
    `quantize` replaces, ~0.4 s apiece with three backends' modules loaded."""
    monkeypatch.setattr(gc, "collect", lambda generation=2: 0)


def config_of(fmt):
    mode, block_size, _ = FORMATS[fmt]
    if mode != "int4" or block_size == "default":
        return None
    return keras.quantizers.Int4QuantizationConfig(block_size=block_size)


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def make_model(layer_cls=ReversibleEmbedding, tie=True, vocab=VOCAB, **kwargs):
    """ids -> tokens -> Dense -> tokens(reverse=True): logits over the
    vocabulary, the layer called both ways."""
    ids = keras.Input((IDS.shape[1],), dtype="int32")
    layer = layer_cls(vocab, DIM, tie_weights=tie, name="tokens", **kwargs)
    x = keras.layers.Dense(DIM, name="mix")(layer(ids))
    return keras.Model(ids, layer(x, reverse=True))


def tokens(model):
    return model.get_layer("tokens")


def straddling(rng, shape, axis):
    """Values of alternating sign along `axis`, at least 0.1 from zero: every
    int4 group holds both signs, where our quantization is Keras's."""
    signs = np.where(np.arange(shape[axis]) % 2 == 0, 1.0, -1.0)
    magnitudes = 0.1 + np.abs(rng.normal(scale=0.5, size=shape))
    return (magnitudes * np.expand_dims(signs, 1 - axis)).astype("float32")


def quantized_model(fmt, tie, rng, layer_cls=ReversibleEmbedding, lora=False):
    """A model with random tables and head, quantized to `fmt`; with `lora`,
    random adapters on top."""
    model = make_model(layer_cls, tie)
    layer = tokens(model)
    layer.embeddings.assign(straddling(rng, (VOCAB, DIM), axis=1))
    if not tie:
        layer.reverse_embeddings.assign(straddling(rng, (DIM, VOCAB), axis=0))
    mix = model.get_layer("mix")
    mix.kernel.assign(rng.normal(size=(DIM, DIM)).astype("float32"))
    mode = FORMATS[fmt][0]
    if mode:
        layer.quantize(mode, config=config_of(fmt))
    if lora:
        layer.enable_lora(2, lora_alpha=6.0)
        layer.lora_embeddings_a.assign(rng.normal(size=(VOCAB, 2)).astype("float32"))
        layer.lora_embeddings_b.assign(rng.normal(size=(2, DIM)).astype("float32"))
    return model


def hidden(rng):
    return rng.normal(size=(3, 4, DIM)).astype("float32")


def predict(model):
    """The model's logits for IDS, eagerly (compiled predict is tested in
    test_reversible.py; here it would compile one program per model)."""
    return raw(model(IDS))


def assert_same_variables(model, other):
    assert [v.path for v in model.weights] == [v.path for v in other.weights]
    for saved, reloaded in zip(model.weights, other.weights, strict=True):
        assert comparable_dtype(saved) == comparable_dtype(reloaded), saved.path
        np.testing.assert_array_equal(raw(saved), raw(reloaded), err_msg=saved.path)


def assert_relclose(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, "float64"), np.asarray(expected, "float64")
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max()
    )


def assert_same_logits(layer, other, h, exact):
    got, expected = raw(layer(h, reverse=True)), raw(other(h, reverse=True))
    if exact:
        np.testing.assert_array_equal(got, expected)
    else:
        assert_relclose(got, expected)


def assert_logits_of_alike_layers(model, others, h, fmt):
    """The logits of `model`'s layer are those of each layer in `others` that
    quantizes hidden states alike (whether a policy-built int4 layer does is
    test_reversible.py's question, not the checkpoint's): bit for bit in
    int8, within float32 rounding otherwise."""

    def quantizer(layer):
        return type(getattr(layer, "inputs_quantizer", None))

    layer = tokens(model)
    alike = [tokens(o) for o in others if quantizer(tokens(o)) is quantizer(layer)]
    for other in alike:
        assert_same_logits(layer, other, h, exact=fmt == "int8")


def arrays_in_file(path):
    with h5py.File(path, "r") as f:
        group = f[LAYER_IN_FILE]
        return [group[str(i)][()] for i in range(len(group))]


def store_of(layer):
    store = {}
    layer.save_own_variables(store)
    return store


# `.weights.h5` crossing with keras.layers.ReversibleEmbedding.


@KERAS_1D_TRANSPOSE
@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_cross_with_keras(fmt, tie, direction, tmp_path, rng):
    source_cls, target_cls = keras.layers.ReversibleEmbedding, ReversibleEmbedding
    if direction == "ours_to_keras":
        source_cls, target_cls = target_cls, source_cls
    policy = FORMATS[fmt][2]
    source = quantized_model(fmt, tie, rng, layer_cls=source_cls)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model(target_cls, tie, dtype=policy)
    target.load_weights(tmp_path / "w.weights.h5")
    assert type(tokens(target)) is target_cls
    assert tokens(target).quantization_mode == FORMATS[fmt][0]
    assert_same_variables(source, target)
    # The same rows; the logits of the layers, of either class, that
    # quantize hidden states alike.
    reference = make_model(source_cls, tie, dtype=policy)
    reference.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_max_ulp(
        raw(tokens(target)(IDS)), raw(tokens(source)(IDS)), maxulp=1
    )
    assert_logits_of_alike_layers(target, [reference, source], hidden(rng), fmt)
    # And back again, through a second file.
    target.save_weights(tmp_path / "back.weights.h5")
    again = make_model(source_cls, tie, dtype=policy)
    again.load_weights(tmp_path / "back.weights.h5")
    assert_same_variables(source, again)


@KERAS_1D_TRANSPOSE
@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
@TIES
@pytest.mark.parametrize("fmt", ["float", "int8", "int4-block8"])
def test_keras_file_weights_cross_with_keras(fmt, tie, direction, tmp_path, rng):
    """`load_weights` of another class's `.keras` file."""
    source_cls, target_cls = keras.layers.ReversibleEmbedding, ReversibleEmbedding
    if direction == "ours_to_keras":
        source_cls, target_cls = target_cls, source_cls
    source = quantized_model(fmt, tie, rng, layer_cls=source_cls)
    source.save(tmp_path / "m.keras")
    target = make_model(target_cls, tie, dtype=FORMATS[fmt][2])
    target.load_weights(tmp_path / "m.keras")
    assert_same_variables(source, target)
    assert_logits_of_alike_layers(target, [source], hidden(rng), fmt)


@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_reloaded_layer_gives_the_saved_logits(fmt, tie, tmp_path, rng):
    """Into a layer built from the dtype policy alone, a weights file gives
    back the logits of the layer that was quantized and saved (Keras's int4
    layer, so built, quantizes the hidden states and gives other logits)."""
    model = quantized_model(fmt, tie, rng)
    model.save_weights(tmp_path / "w.weights.h5")
    other = make_model(tie=tie, dtype=FORMATS[fmt][2])
    other.load_weights(tmp_path / "w.weights.h5")
    h = hidden(rng)
    assert_same_logits(tokens(other), tokens(model), h, exact=True)
    np.testing.assert_array_equal(predict(other), predict(model))


@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_store_layout_is_keras_layout(fmt, tie, rng):
    ours = quantized_model(fmt, tie, rng)
    theirs = make_model(keras.layers.ReversibleEmbedding, tie, dtype=FORMATS[fmt][2])
    for mine, keras_variable in zip(
        tokens(ours).weights, tokens(theirs).weights, strict=True
    ):
        keras_variable.assign(mine)
    our_store, their_store = store_of(tokens(ours)), store_of(tokens(theirs))
    assert list(our_store) == list(their_store)
    dtypes = [comparable_dtype(v) for v in tokens(theirs).weights]
    for key in their_store:
        mine, keras_array = raw(our_store[key]), raw(their_store[key])
        if dtypes[int(key)] != "zero points":
            assert mine.dtype == keras_array.dtype, key
        np.testing.assert_array_equal(mine, keras_array, err_msg=key)


@pytest.mark.parametrize("fmt", ["int4-default", "int4-block8"])
def test_reverse_zero_points_stay_float32_and_load_from_int8(fmt, rng):
    """An untied grouped int4 layer keeps its reverse zero points in float32,
    Keras 3.15's format and the one our files have always held, whichever
    Keras is installed. Later Keras stores them as int8: each layer loads the
    other's entries, to the same values."""
    ours = tokens(quantized_model(fmt, False, rng))
    assert dtype_of(ours.reverse_embeddings_zero) == "float32"
    store = {key: raw(array) for key, array in store_of(ours).items()}
    zero = str([v.name for v in ours.weights].index("reverse_embeddings_zero"))
    assert store[zero].dtype == np.float32

    def fresh(layer_cls):
        layer = layer_cls(VOCAB, DIM, tie_weights=False, dtype=FORMATS[fmt][2])
        layer.build()
        return layer

    theirs = fresh(keras.layers.ReversibleEmbedding)
    theirs.load_own_variables(store)
    np.testing.assert_array_equal(raw(theirs.reverse_embeddings_zero), store[zero])
    # Keras's entries, and int8 zero points as later Keras writes them.
    for other in (store_of(theirs), {**store, zero: store[zero].astype("int8")}):
        again = fresh(ReversibleEmbedding)
        again.load_own_variables(other)
        assert dtype_of(again.reverse_embeddings_zero) == "float32"
        for mine, loaded in zip(ours.weights, again.weights, strict=True):
            np.testing.assert_array_equal(raw(mine), raw(loaded), err_msg=mine.name)


# `.keras` round trips of ours.


def layer_configs_in_file(path):
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    return [
        layer
        for layer in config["config"]["layers"]
        if layer["config"]["name"] == "tokens"
    ]


@pytest.mark.parametrize(
    ("fmt", "lora"),
    [(fmt, False) for fmt in FORMATS] + [("float", True), ("int4-block8", True)],
    ids=[*FORMATS, "float-lora", "int4-block8-lora"],
)
@TIES
def test_keras_file_round_trip(fmt, lora, tie, tmp_path, rng):
    model = quantized_model(fmt, tie, rng, lora=lora)
    model.save(tmp_path / "m.keras")
    (layer_config,) = layer_configs_in_file(tmp_path / "m.keras")
    assert layer_config["registered_name"] == "keras_ext_embedding>ReversibleEmbedding"
    # No custom_objects: importing the package registered the class.
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = tokens(loaded)
    assert type(layer) is ReversibleEmbedding
    assert layer.tie_weights is tie
    assert layer.quantization_mode == FORMATS[fmt][0]
    assert layer.lora_enabled is lora
    assert json.dumps(layer.get_config(), sort_keys=True) == json.dumps(
        tokens(model).get_config(), sort_keys=True
    )
    assert_same_variables(model, loaded)
    assert [v.name for v in layer.trainable_weights] == [
        v.name for v in tokens(model).trainable_weights
    ]
    np.testing.assert_array_equal(predict(loaded), predict(model))


@TIES
def test_keras_file_round_trip_of_reverse_options(tie, tmp_path, rng):
    model = make_model(
        tie=tie,
        mask_zero=True,
        logit_soft_cap=2.0,
        reverse_dtype="float32",
        dtype="mixed_bfloat16",
    )
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = tokens(loaded)
    assert (layer.mask_zero, layer.logit_soft_cap, layer.reverse_dtype) == (
        True,
        2.0,
        "float32",
    )
    assert layer.dtype_policy.name == "mixed_bfloat16"
    h = hidden(rng)
    out = layer(h, reverse=True)
    assert dtype_of(out) == "float32"
    np.testing.assert_array_equal(raw(out), raw(tokens(model)(h, reverse=True)))
    assert np.abs(raw(out)).max() <= 2.0


# LoRA checkpoints: the tables as they are, then the adapters.


@TIES
@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_checkpoint_appends_adapters_after_the_tables(fmt, tie, tmp_path, rng):
    model = quantized_model(fmt, tie, rng, lora=True)
    layer = tokens(model)
    tables = [v for v in layer.weights if not v.name.startswith("lora_")]
    model.save_weights(tmp_path / "m.weights.h5")
    stored = arrays_in_file(tmp_path / "m.weights.h5")
    expected = [
        *(raw(v) for v in tables),
        raw(layer.lora_embeddings_a),
        raw(layer.lora_embeddings_b),
        np.array([6.0]),
    ]
    assert len(stored) == len(expected) == len(tables) + 3
    for array, values in zip(stored, expected, strict=True):
        assert array.dtype == values.dtype
        np.testing.assert_array_equal(array, values)
    # Reloaded into a fresh LoRA model, the adapters come back.
    other = make_model(tie=tie, dtype=FORMATS[fmt][2], lora_rank=2, lora_alpha=6.0)
    other.load_weights(tmp_path / "m.weights.h5")
    for mine, saved in zip(tokens(other).weights, layer.weights, strict=True):
        np.testing.assert_array_equal(raw(mine), raw(saved), err_msg=mine.name)
    np.testing.assert_array_equal(raw(tokens(other)(IDS)), raw(layer(IDS)))
    if FORMATS[fmt][0] != "int4":
        # (Built from an int4 policy, a layer quantizes its hidden states, as
        # Keras's does; `layer.quantize("int4")` left them float.)
        np.testing.assert_array_equal(predict(other), predict(model))


@pytest.mark.parametrize(
    ("fmt", "tie"),
    [("float", False), ("int8", True)],
    ids=["float-untied", "int8-tied"],
)
def test_lora_training_resumes_exactly_after_reload(fmt, tie, tmp_path, rng):
    model = quantized_model(fmt, tie, rng, lora=True)
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    targets = (IDS + 1) % VOCAB
    for _ in range(2):
        model.train_on_batch(IDS, targets)
    model.save(tmp_path / "m.keras")
    resumed = keras.saving.load_model(tmp_path / "m.keras")
    assert [v.name for v in tokens(resumed).trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    before = [raw(v) for v in model.weights]
    for _ in range(2):
        model.train_on_batch(IDS, targets)
        resumed.train_on_batch(IDS, targets)
    # CPU kernels are deterministic: the same steps give the same bits.
    for variable, other, old in zip(
        model.weights, resumed.weights, before, strict=True
    ):
        np.testing.assert_array_equal(raw(other), raw(variable), err_msg=variable.path)
        moved = not np.array_equal(raw(variable), old)
        # The tables (the reverse one too, untied) stay frozen.
        assert moved == ("lora" in variable.path or "mix" in variable.path), (
            variable.path
        )


# Checkpoints that do not fit: refused, the layer left as it was.


def float_store(tie, vocab=VOCAB):
    layer = ReversibleEmbedding(vocab, DIM, tie_weights=tie, name="tokens")
    layer.build()
    return store_of(layer)


@pytest.mark.parametrize(
    ("store", "tie", "message"),
    [
        (
            lambda: float_store(tie=False),
            True,
            r"Layer 'tokens' cannot load a checkpoint entry with 2 arrays: the "
            r"layer holds a float table \(tie_weights=True\)",
        ),
        (
            lambda: float_store(tie=True),
            False,
            r"Layer 'tokens' cannot load a checkpoint entry with 1 arrays: the "
            r"layer holds a float table and a float reverse table "
            r"\(tie_weights=False\)",
        ),
        (
            lambda: float_store(tie=True, vocab=VOCAB + 10),
            True,
            r"Layer 'tokens' cannot load .*\(60, 13\).*\(50, 13\)",
        ),
        (
            lambda: float_store(tie=False, vocab=VOCAB + 10),
            False,
            r"Layer 'tokens' cannot load .*\(60, 13\).*\(50, 13\)",
        ),
        (
            lambda: {
                **float_store(tie=False),
                "1": np.zeros((DIM, VOCAB + 1), "float32"),
            },
            False,
            r"Layer 'tokens' cannot load .*\(13, 51\).*\(13, 50\)",
        ),
    ],
    ids=[
        "untied_into_tied",
        "tied_into_untied",
        "vocab_tied",
        "vocab_untied",
        "reverse_table_shape",
    ],
)
def test_mismatched_store_is_refused_and_layer_unchanged(store, tie, message, rng):
    layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, name="tokens")
    layer.build()
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    before = [raw(v) for v in layer.weights]
    with pytest.raises(ValueError, match=message):
        layer.load_own_variables(store())
    for variable, values in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(raw(variable), values, err_msg=variable.name)


@SKIPPING_CONTAINER
@pytest.mark.parametrize(
    ("saved", "loading", "message"),
    [
        ({"tie": False}, {"tie": True}, r"cannot load a checkpoint entry"),
        ({"tie": True}, {"tie": False}, r"cannot load a checkpoint entry"),
        ({"vocab": VOCAB + 10}, {}, r"\(60, 13\).*\(50, 13\)"),
        ({"tie": False, "dtype": "int8_from_float32"}, {"tie": False}, r"float"),
    ],
    ids=["untied_into_tied", "tied_into_untied", "vocab", "int8_into_float"],
)
def test_mismatched_weights_file_is_refused(saved, loading, message, tmp_path, rng):
    make_model(**saved).save_weights(tmp_path / "w.weights.h5")
    target = make_model(**loading)
    layer = tokens(target)
    before = [raw(v) for v in layer.weights]
    with pytest.raises(ValueError, match=rf"Layer 'tokens' .*{message}"):
        target.load_weights(tmp_path / "w.weights.h5")
    for variable, values in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(raw(variable), values, err_msg=variable.name)


def test_unbuilt_layer_saves_nothing():
    store = {}
    ReversibleEmbedding(VOCAB, DIM, tie_weights=False).save_own_variables(store)
    assert store == {}


def test_plain_checkpoint_into_untied_lora_layer_restarts_adapters(tmp_path, rng):
    source = quantized_model("float", False, rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model(tie=False, lora_rank=2)
    target.load_weights(tmp_path / "w.weights.h5")
    layer = tokens(target)
    assert not np.any(raw(layer.lora_embeddings_b))
    saved = {v.name: raw(v) for v in tokens(source).weights}
    for variable in layer.weights[:2]:
        np.testing.assert_array_equal(raw(variable), saved[variable.name])
    assert_relclose(predict(target), predict(source))
    assert not layer.reverse_embeddings.trainable
