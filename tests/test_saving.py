"""Saving: `.keras` and `.weights.h5` round trips, LoRA checkpoints, crossing
checkpoints with `keras.layers.Embedding`, and the errors of a bad checkpoint.

Helpers are local so this file depends only on the package and public Keras API.
"""

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from keras_ext_embedding import Embedding

VOCAB, DIM = 50, 8
IDS = np.array([[1, 2, 3, 0], [7, 7, 49, 4], [12, 30, 30, 5]], dtype="int32")
TARGETS = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype="float32")
# Where a `.weights.h5` keeps the layer's arrays: Keras names the group after
# the class, and both classes are called Embedding.
TABLE_IN_FILE = "layers/embedding/vars/0"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def raw(variable):
    """A variable's values in its own dtype, for bitwise comparisons."""
    return np.array(ops.convert_to_numpy(variable))


def numpy_of(x):
    return ops.convert_to_numpy(ops.cast(x, "float32")).astype("float64")


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def make_model(layer_cls=Embedding, vocab=VOCAB, **kwargs):
    inputs = keras.Input((IDS.shape[1],), dtype="int32")
    x = layer_cls(vocab, DIM, name="tokens", **kwargs)(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def tokens(model):
    return model.get_layer("tokens")


def built_layer(**kwargs):
    layer = Embedding(VOCAB, DIM, name="tokens", **kwargs)
    layer.build()
    return layer


def loaded_from_weights(path, **kwargs):
    """A fresh `make_model(**kwargs)` with the weights file loaded."""
    model = make_model(**kwargs)
    model.load_weights(path)
    return model


def train_steps(model, steps):
    """`steps` SGD steps on the fixed batch; returns every variable after."""
    for _ in range(steps):
        model.train_on_batch(IDS, TARGETS)
    return [raw(v) for v in model.weights]


def randomize(layer, rng):
    """Random values in every variable of the layer (B too, so LoRA is live)."""
    for variable in layer.weights:
        values = rng.normal(size=variable.shape).astype("float32")
        variable.assign(ops.cast(values, variable.dtype))


def assert_same_variables(model, other):
    assert [v.path for v in model.weights] == [v.path for v in other.weights]
    for saved, reloaded in zip(model.weights, other.weights, strict=True):
        assert dtype_of(saved) == dtype_of(reloaded), saved.path
        np.testing.assert_array_equal(raw(saved), raw(reloaded), err_msg=saved.path)


def predict(model):
    return np.asarray(model.predict(IDS, verbose=0))


def table_in_file(path):
    with h5py.File(path, "r") as f:
        return f[TABLE_IN_FILE][()]


def arrays_in_file(path):
    with h5py.File(path, "r") as f:
        return sorted(f["layers/embedding/vars"].keys())


# `.keras` and `.weights.h5` round trips.

ROUND_TRIP_CASES = {
    "plain": {},
    "mask_zero": {"mask_zero": True},
    "lora": {"lora_rank": 2, "lora_alpha": 7},
    "invalid_ids_zeros": {"invalid_ids": "zeros"},
    "mixed_float16": {"dtype": "mixed_float16"},
    "bfloat16": {"dtype": "bfloat16"},
    "lora_mixed_bfloat16": {"lora_rank": 3, "dtype": "mixed_bfloat16"},
}


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_keras_file_round_trip(case, tmp_path, rng):
    kwargs = ROUND_TRIP_CASES[case]
    model = make_model(**kwargs)
    randomize(tokens(model), rng)
    path = tmp_path / "model.keras"
    model.save(path)
    # No custom_objects: importing the package registered the class.
    loaded = keras.saving.load_model(path)
    layer = tokens(loaded)
    assert type(layer) is Embedding
    assert layer.get_config() == tokens(model).get_config()
    assert_same_variables(model, loaded)
    np.testing.assert_array_equal(predict(loaded), predict(model))
    if "lora_rank" in kwargs:
        assert layer.lora_enabled
        assert (layer.lora_rank, layer.lora_alpha) == (
            kwargs["lora_rank"],
            kwargs.get("lora_alpha", kwargs["lora_rank"]),
        )
        assert [v.name for v in layer.trainable_weights] == [
            "lora_embeddings_a",
            "lora_embeddings_b",
        ]
    if case == "mask_zero":
        mask = ops.convert_to_numpy(layer.compute_mask(IDS))
        np.testing.assert_array_equal(mask, IDS != 0)
    if case == "invalid_ids_zeros":
        out = numpy_of(layer(np.array([3, VOCAB, -1])))
        np.testing.assert_array_equal(out[0], numpy_of(layer.embeddings)[3])
        np.testing.assert_array_equal(out[1:], np.zeros((2, DIM)))


def test_keras_file_round_trip_under_global_mixed_float16(tmp_path, rng):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = make_model(lora_rank=2, lora_alpha=3)
        randomize(tokens(model), rng)
        model.save(tmp_path / "model.keras")
        loaded = keras.saving.load_model(tmp_path / "model.keras")
        assert_same_variables(model, loaded)
        np.testing.assert_array_equal(predict(loaded), predict(model))
    finally:
        keras.config.set_dtype_policy("float32")
    expected = raw(tokens(model)(IDS))
    assert dtype_of(expected) == "float16"
    # Loaded under float32, the layer keeps the policy of its saved config.
    # (Keras's functional model itself does not: its own policy, which casts
    # between layers, is not saved, so only the layer's output is compared.)
    layer = tokens(keras.saving.load_model(tmp_path / "model.keras"))
    assert layer.dtype_policy.name == "mixed_float16"
    assert [dtype_of(v) for v in layer.weights] == ["float32"] * 3
    np.testing.assert_array_equal(raw(layer(IDS)), expected)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"lora_rank": 2, "lora_alpha": 3}, {"dtype": "bfloat16"}],
    ids=["plain", "lora", "bfloat16"],
)
def test_weights_file_round_trip(kwargs, tmp_path, rng):
    model = make_model(**kwargs)
    randomize(tokens(model), rng)
    model.save_weights(tmp_path / "m.weights.h5")
    other = make_model(**kwargs)
    other.load_weights(tmp_path / "m.weights.h5")
    assert_same_variables(model, other)
    np.testing.assert_array_equal(predict(other), predict(model))


# A LoRA checkpoint keeps the adapters and resumes training exactly.


def test_lora_checkpoint_keeps_unmerged_table_and_adapters(tmp_path, rng):
    model = make_model(lora_rank=2, lora_alpha=5)
    layer = tokens(model)
    randomize(layer, rng)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    # The file holds the table as it is, not merged with the adapters.
    assert arrays_in_file(tmp_path / "m.weights.h5") == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(
        table_in_file(tmp_path / "m.weights.h5"), raw(layer._embeddings)
    )
    for reloaded in (
        tokens(keras.saving.load_model(tmp_path / "m.keras")),
        tokens(
            loaded_from_weights(tmp_path / "m.weights.h5", lora_rank=2, lora_alpha=5)
        ),
    ):
        for name in ("_embeddings", "lora_embeddings_a", "lora_embeddings_b"):
            np.testing.assert_array_equal(
                raw(getattr(reloaded, name)), raw(getattr(layer, name)), err_msg=name
            )
        assert reloaded.lora_alpha == 5


@pytest.mark.parametrize("fmt", ["keras", "weights"])
def test_lora_training_resumes_exactly_after_reload(fmt, tmp_path, rng):
    model = make_model(lora_rank=2, lora_alpha=4)
    # B away from zero, so that A's gradient is not zero either.
    tokens(model).lora_embeddings_b.assign(rng.normal(size=(2, DIM)).astype("float32"))
    # A `.keras` file also holds the optimizer: its momentum resumes too.
    momentum = 0.9 if fmt == "keras" else 0.0
    model.compile(keras.optimizers.SGD(0.1, momentum=momentum), "mse")
    train_steps(model, 2)
    if fmt == "keras":
        model.save(tmp_path / "m.keras")
        resumed = keras.saving.load_model(tmp_path / "m.keras")
    else:
        model.save_weights(tmp_path / "m.weights.h5")
        resumed = loaded_from_weights(
            tmp_path / "m.weights.h5", lora_rank=2, lora_alpha=4
        )
        resumed.compile(keras.optimizers.SGD(0.1), "mse")
    assert [v.name for v in tokens(resumed).trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    before = [raw(v) for v in model.weights]
    continued = train_steps(model, 2)
    after_reload = train_steps(resumed, 2)
    # CPU kernels are deterministic: the same step gives the same bits.
    for name, a, b, old in zip(
        [v.path for v in model.weights], continued, after_reload, before, strict=True
    ):
        np.testing.assert_array_equal(b, a, err_msg=name)
        if "lora" in name or name.startswith("head"):
            assert not np.array_equal(a, old), f"{name} did not train"
        else:
            np.testing.assert_array_equal(a, old, err_msg=f"{name} is frozen")


def test_mixed_float16_lora_saves_float32_table_keras_float16(tmp_path, rng):
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    paths = {"ours": tmp_path / "ours.weights.h5", "keras": tmp_path / "k.weights.h5"}
    for name, cls in (("ours", Embedding), ("keras", keras.layers.Embedding)):
        model = make_model(cls, lora_rank=2, dtype="mixed_float16")
        tokens(model)._embeddings.assign(table)
        model.save_weights(paths[name])
    ours, theirs = table_in_file(paths["ours"]), table_in_file(paths["keras"])
    # Ours keeps the float32 table bit for bit.
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, table)
    # Keras writes its merged table in the float16 compute dtype: every entry
    # is rounded (B is zero, so the merge itself adds nothing).
    assert theirs.dtype == np.float16
    np.testing.assert_array_equal(theirs, table.astype("float16"))
    assert np.abs(theirs.astype("float32") - table).max() > 1e-4
    # Reloaded into a float32 layer: ours gives the table back, Keras's the
    # rounded one.
    ours_back = raw(tokens(loaded_from_weights(paths["ours"]))._embeddings)
    theirs_back = raw(tokens(loaded_from_weights(paths["keras"]))._embeddings)
    np.testing.assert_array_equal(ours_back, table)
    np.testing.assert_array_equal(
        theirs_back, table.astype("float16").astype("float32")
    )


# Checkpoints cross with keras.layers.Embedding.


@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
@pytest.mark.parametrize("mask_zero", [False, True])
def test_weights_cross_with_keras_embedding(direction, mask_zero, tmp_path, rng):
    source_cls, target_cls = keras.layers.Embedding, Embedding
    if direction == "ours_to_keras":
        source_cls, target_cls = target_cls, source_cls
    source = make_model(source_cls, mask_zero=mask_zero)
    randomize(tokens(source), rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model(target_cls, mask_zero=mask_zero)
    target.load_weights(tmp_path / "w.weights.h5")
    assert type(tokens(target)) is target_cls
    assert_same_variables(source, target)
    np.testing.assert_array_equal(predict(target), predict(source))
    # And back again, through a second file.
    target.save_weights(tmp_path / "back.weights.h5")
    again = make_model(source_cls, mask_zero=mask_zero)
    again.load_weights(tmp_path / "back.weights.h5")
    assert_same_variables(source, again)


def test_keras_lora_checkpoint_loads_as_base_of_our_lora_layer(tmp_path, rng):
    theirs = make_model(keras.layers.Embedding)
    tokens(theirs).enable_lora(2, lora_alpha=5)
    randomize(tokens(theirs), rng)
    theirs.save_weights(tmp_path / "w.weights.h5")
    ours = make_model(lora_rank=2, lora_alpha=5)
    ours.load_weights(tmp_path / "w.weights.h5")
    layer = tokens(ours)
    # Keras saved its merged table; ours loads it as the frozen base, with the
    # delta starting at zero.
    assert not np.any(raw(layer.lora_embeddings_b))
    np.testing.assert_array_equal(
        raw(layer._embeddings), raw(tokens(theirs).embeddings)
    )
    np.testing.assert_array_equal(raw(layer(IDS)), raw(tokens(theirs)(IDS)))
    np.testing.assert_allclose(predict(ours), predict(theirs), rtol=1e-6, atol=1e-6)


def test_lora_checkpoint_into_layer_without_lora_is_merged(tmp_path, rng):
    source = make_model(lora_rank=2, lora_alpha=5)
    layer = tokens(source)
    randomize(layer, rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model()
    target.load_weights(tmp_path / "w.weights.h5")
    # Merged in float64 on the host, rounded once to the table's float32.
    merged = raw(layer._embeddings).astype("float64") + 2.5 * (
        raw(layer.lora_embeddings_a).astype("float64")
        @ raw(layer.lora_embeddings_b).astype("float64")
    )
    np.testing.assert_array_equal(
        raw(tokens(target)._embeddings), merged.astype("float32")
    )
    np.testing.assert_allclose(predict(target), predict(source), rtol=1e-5, atol=1e-5)


def test_merged_lora_checkpoint_loads_into_keras_embedding(tmp_path, rng):
    source = make_model(lora_rank=2, lora_alpha=5)
    randomize(tokens(source), rng)
    expected = predict(source)
    tokens(source).merge_lora()
    source.save_weights(tmp_path / "w.weights.h5")
    assert arrays_in_file(tmp_path / "w.weights.h5") == ["0"]
    theirs = make_model(keras.layers.Embedding)
    theirs.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_allclose(predict(theirs), expected, rtol=1e-5, atol=1e-5)


def test_plain_checkpoint_into_lora_layer_starts_training(tmp_path, rng):
    source = make_model()
    randomize(tokens(source), rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model(lora_rank=2, lora_alpha=4)
    layer = tokens(target)
    randomize(layer, rng)  # stale adapters that loading must reset
    target.load_weights(tmp_path / "w.weights.h5")
    table = raw(tokens(source)._embeddings)
    np.testing.assert_array_equal(raw(layer._embeddings), table)
    # B at zero: the outputs are the table rows. A re-initialised, not zero,
    # so that B's gradient is not zero.
    assert not np.any(raw(layer.lora_embeddings_b))
    assert np.any(raw(layer.lora_embeddings_a))
    np.testing.assert_array_equal(raw(layer(IDS)), table[IDS])
    target.compile(keras.optimizers.SGD(0.1), "mse")
    b_before = raw(layer.lora_embeddings_b)
    train_steps(target, 1)
    assert np.any(raw(layer.lora_embeddings_b) != b_before)
    np.testing.assert_array_equal(raw(layer._embeddings), table)


# Store layout: exactly Keras's without LoRA.


def test_store_layout_without_lora_matches_keras(rng):
    ours = Embedding(VOCAB, DIM)
    theirs = keras.layers.Embedding(VOCAB, DIM)
    ours.build()
    theirs.build()
    randomize(ours, rng)
    theirs.set_weights(ours.get_weights())
    our_store, their_store = {}, {}
    ours.save_own_variables(our_store)
    theirs.save_own_variables(their_store)
    assert list(our_store) == list(their_store) == ["0"]
    np.testing.assert_array_equal(raw(our_store["0"]), raw(their_store["0"]))


def test_store_layout_with_lora(rng):
    layer = built_layer(lora_rank=2, lora_alpha=5)
    randomize(layer, rng)
    store = {}
    layer.save_own_variables(store)
    assert list(store) == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(raw(store["0"]), raw(layer._embeddings))
    np.testing.assert_array_equal(raw(store["1"]), raw(layer.lora_embeddings_a))
    np.testing.assert_array_equal(raw(store["2"]), raw(layer.lora_embeddings_b))
    alpha = np.asarray(store["3"])
    assert alpha.dtype == np.float64
    assert alpha.tolist() == [5.0]


def test_unbuilt_layer_saves_nothing():
    store = {}
    Embedding(VOCAB, DIM).save_own_variables(store)
    assert store == {}


# Errors.


def lora_store(rank=2, alpha=4.0, vocab=VOCAB, dim=DIM):
    return {
        "0": np.full((vocab, dim), 3.0, "float32"),
        "1": np.ones((vocab, rank), "float32"),
        "2": np.ones((rank, dim), "float32"),
        "3": np.array([alpha]),
    }


def assert_unchanged(layer, before):
    for variable, values in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(raw(variable), values, err_msg=variable.name)


@pytest.mark.parametrize(
    ("store", "message"),
    [
        (
            {"0": np.zeros((VOCAB + 1, DIM), "float32")},
            r"Layer 'tokens' cannot load the table of shape \(51, 8\) from the "
            r"checkpoint: the layer expects \(50, 8\)\.",
        ),
        (
            {"0": np.zeros((VOCAB, DIM - 1), "float32")},
            r"cannot load the table of shape \(50, 7\) .* expects \(50, 8\)",
        ),
        (
            {"0": np.zeros((VOCAB, DIM)), "1": np.zeros((VOCAB, 2))},
            r"Layer 'tokens' cannot load a checkpoint entry with 2 arrays",
        ),
        (
            {str(i): np.zeros((VOCAB, DIM)) for i in range(3)},
            r"cannot load a checkpoint entry with 3 arrays",
        ),
        (
            {str(i): np.zeros((VOCAB, DIM)) for i in range(5)},
            r"cannot load a checkpoint entry with 5 arrays",
        ),
        (
            {**lora_store(), "1": np.ones((VOCAB + 2, 2), "float32")},
            r"cannot load lora_embeddings_a of shape \(52, 2\) from the "
            r"checkpoint: the layer expects \(50, 2\)",
        ),
        (
            {**lora_store(), "2": np.ones((2, DIM + 1), "float32")},
            r"cannot load lora_embeddings_b of shape \(2, 9\) .* expects \(2, 8\)",
        ),
        (
            {**lora_store(), "0": np.zeros((VOCAB, DIM + 1), "float32")},
            r"cannot load the table of shape \(50, 9\) .* expects \(50, 8\)",
        ),
    ],
    ids=[
        "table_rows",
        "table_columns",
        "two_arrays",
        "three_arrays",
        "five_arrays",
        "lora_a_vocab",
        "lora_b_dim",
        "lora_table_dim",
    ],
)
@pytest.mark.parametrize("lora", [False, True])
def test_bad_store_is_refused_and_layer_unchanged(store, message, lora, rng):
    layer = built_layer(**({"lora_rank": 2, "lora_alpha": 4.0} if lora else {}))
    randomize(layer, rng)
    before = [raw(v) for v in layer.weights]
    with pytest.raises(ValueError, match=message):
        layer.load_own_variables(store)
    assert_unchanged(layer, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"lora_rank": 3, "lora_alpha": 4.0},
            r"Layer 'tokens' has LoRA rank=3, lora_alpha=4, but the checkpoint "
            r"holds adapters of rank=2, lora_alpha=4",
        ),
        (
            {"lora_rank": 2, "lora_alpha": 8},
            r"has LoRA rank=2, lora_alpha=8, but the checkpoint holds adapters of "
            r"rank=2, lora_alpha=4",
        ),
        (
            {"lora_rank": 2},
            r"has LoRA rank=2, lora_alpha=2, but the checkpoint holds adapters of "
            r"rank=2, lora_alpha=4",
        ),
    ],
    ids=["rank", "alpha", "default_alpha"],
)
def test_lora_mismatch_is_refused(kwargs, message, rng):
    layer = built_layer(**kwargs)
    randomize(layer, rng)
    before = [raw(v) for v in layer.weights]
    with pytest.raises(ValueError, match=message):
        layer.load_own_variables(lora_store())
    assert_unchanged(layer, before)


def test_matching_lora_store_loads(rng):
    layer = built_layer(lora_rank=2, lora_alpha=4)
    layer.load_own_variables(lora_store())
    np.testing.assert_array_equal(raw(layer._embeddings), np.full((VOCAB, DIM), 3.0))
    np.testing.assert_array_equal(raw(layer.lora_embeddings_a), np.ones((VOCAB, 2)))
    np.testing.assert_array_equal(raw(layer.lora_embeddings_b), np.ones((2, DIM)))


# After a layer refuses its entry, Keras (3.15) goes on through the functional
# model's containers and warns about one it cannot match; the error still
# reaches the caller.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
@pytest.mark.parametrize("lora", [False, True])
def test_weights_file_of_other_vocab_size_is_refused(lora, tmp_path):
    kwargs = {"lora_rank": 2} if lora else {}
    other = make_model(vocab=VOCAB + 10, **kwargs)
    other.save_weights(tmp_path / "w.weights.h5")
    model = make_model(**kwargs)
    with pytest.raises(ValueError, match=r"the table of shape \(60, 8\).*\(50, 8\)"):
        model.load_weights(tmp_path / "w.weights.h5")


def test_loading_into_unbuilt_layer_is_refused():
    layer = Embedding(VOCAB, DIM, name="tokens")
    with pytest.raises(ValueError) as info:
        layer.load_own_variables({"0": np.zeros((VOCAB, DIM))})
    message = str(info.value)
    assert "Layer 'tokens' was never built and thus has no variables" in message
    assert "lists 1 for it" in message
    assert not layer.built
    # An empty entry (what an unbuilt layer saves) loads as nothing.
    layer.load_own_variables({})
    assert not layer.built


def truncated_copy(path):
    data = path.read_bytes()
    cut = path.with_name("cut_" + path.name)
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_truncated_weights_file_is_refused_and_nothing_loads(tmp_path, rng):
    model = make_model()
    randomize(tokens(model), rng)
    model.save_weights(tmp_path / "m.weights.h5")
    target = make_model()
    before = [raw(v) for v in target.weights]
    with pytest.raises(OSError, match="truncated file"):
        target.load_weights(truncated_copy(tmp_path / "m.weights.h5"))
    for variable, values in zip(target.weights, before, strict=True):
        np.testing.assert_array_equal(raw(variable), values)


def test_truncated_keras_file_is_refused(tmp_path):
    make_model().save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match=r"accessible `\.keras` zip file"):
        keras.saving.load_model(truncated_copy(tmp_path / "m.keras"))
