import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import table_of

from keras_ext_embedding import Embedding

IDS = np.array([[1, 2, 3, 0], [7, 7, 9, 4]], dtype="int32")


def as_numpy(variable):
    return ops.convert_to_numpy(ops.cast(variable, "float32"))


def make_model(layer_cls=Embedding, **kwargs):
    inputs = keras.Input((4,), dtype="int32")
    x = layer_cls(10, 6, name="tokens", **kwargs)(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def randomize(layer, rng):
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"mask_zero": True},
        {"lora_rank": 2, "lora_alpha": 7},
        {"invalid_ids": "zeros"},
        {"dtype": "mixed_float16"},
        {"dtype": "bfloat16"},
        {"lora_rank": 3, "dtype": "mixed_bfloat16"},
    ],
)
def test_keras_file_round_trip(kwargs, tmp_path, rng):
    model = make_model(**kwargs)
    randomize(model.get_layer("tokens"), rng)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    layer = loaded.get_layer("tokens")
    assert type(layer) is Embedding
    assert layer.get_config() == model.get_layer("tokens").get_config()
    for saved, reloaded in zip(model.weights, loaded.weights, strict=True):
        assert saved.name == reloaded.name
        assert saved.dtype == reloaded.dtype
        np.testing.assert_array_equal(as_numpy(saved), as_numpy(reloaded))
    np.testing.assert_array_equal(
        model.predict(IDS, verbose=0), loaded.predict(IDS, verbose=0)
    )


def test_weights_file_round_trip_with_lora(tmp_path, rng):
    model = make_model(lora_rank=2, lora_alpha=3)
    randomize(model.get_layer("tokens"), rng)
    model.save_weights(tmp_path / "m.weights.h5")
    other = make_model(lora_rank=2, lora_alpha=3)
    other.load_weights(tmp_path / "m.weights.h5")
    for saved, reloaded in zip(model.weights, other.weights, strict=True):
        np.testing.assert_array_equal(as_numpy(saved), as_numpy(reloaded))


def sgd_step(model, ids, y):
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.train_on_batch(ids, y)
    return [as_numpy(v) for v in model.weights]


def test_lora_training_resumes_exactly_after_reload(tmp_path, rng):
    model = make_model(lora_rank=2, lora_alpha=4)
    model.get_layer("tokens").lora_embeddings_b.assign(rng.normal(size=(2, 6)))
    y = rng.normal(size=(2, 2)).astype("float32")
    sgd_step(model, IDS, y)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = loaded.get_layer("tokens")
    assert layer.lora_enabled
    assert [v.name for v in layer.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    continued = sgd_step(model, IDS, y)
    resumed = sgd_step(loaded, IDS, y)
    for a, b in zip(continued, resumed, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mixed_precision_lora_saves_float32_table(tmp_path, rng):
    table = rng.normal(size=(10, 6)).astype("float32")
    ours = make_model(lora_rank=2, dtype="mixed_float16")
    theirs = make_model(keras.layers.Embedding, lora_rank=2, dtype="mixed_float16")
    for model in (ours, theirs):
        model.get_layer("tokens")._embeddings.assign(table)
        model.save_weights(tmp_path / "w.weights.h5")
        plain = make_model()
        plain.load_weights(tmp_path / "w.weights.h5", skip_mismatch=False)
        model.reloaded_table = as_numpy(plain.get_layer("tokens").embeddings)
    # Ours stores the float32 table untouched; Keras merges it in float16.
    np.testing.assert_array_equal(ours.reloaded_table, table)
    assert np.abs(theirs.reloaded_table - table).max() > 1e-4


@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
def test_weights_cross_with_keras_embedding(direction, tmp_path, rng):
    source_cls, target_cls = (keras.layers.Embedding, Embedding)
    if direction == "ours_to_keras":
        source_cls, target_cls = target_cls, source_cls
    source = make_model(source_cls, mask_zero=True)
    randomize(source.get_layer("tokens"), rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model(target_cls, mask_zero=True)
    target.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_array_equal(
        source.predict(IDS, verbose=0), target.predict(IDS, verbose=0)
    )


def test_keras_lora_checkpoint_loads_as_base(tmp_path, rng):
    theirs = make_model(keras.layers.Embedding, lora_rank=2)
    layer = theirs.get_layer("tokens")
    layer.lora_embeddings_b.assign(rng.normal(size=(2, 6)))
    theirs.save_weights(tmp_path / "w.weights.h5")
    ours = make_model(lora_rank=2)
    ours.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_allclose(
        ours.predict(IDS, verbose=0), theirs.predict(IDS, verbose=0), atol=1e-6
    )
    assert not np.any(as_numpy(ours.get_layer("tokens").lora_embeddings_b))


def test_lora_checkpoint_into_layer_without_lora_is_merged(tmp_path, rng):
    source = make_model(lora_rank=2, lora_alpha=5)
    randomize(source.get_layer("tokens"), rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model()
    target.load_weights(tmp_path / "w.weights.h5")
    np.testing.assert_allclose(
        table_of(target.get_layer("tokens")),
        table_of(source.get_layer("tokens")),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        target.predict(IDS, verbose=0), source.predict(IDS, verbose=0), atol=1e-5
    )


def test_plain_checkpoint_into_lora_layer_can_train(tmp_path, rng):
    source = make_model()
    randomize(source.get_layer("tokens"), rng)
    source.save_weights(tmp_path / "w.weights.h5")
    target = make_model(lora_rank=2)
    target.load_weights(tmp_path / "w.weights.h5")
    layer = target.get_layer("tokens")
    np.testing.assert_allclose(
        table_of(layer), table_of(source.get_layer("tokens")), atol=1e-6
    )
    assert np.any(as_numpy(layer.lora_embeddings_a))
    b_before = as_numpy(layer.lora_embeddings_b)
    sgd_step(target, IDS, np.ones((2, 2), "float32"))
    assert not np.array_equal(as_numpy(layer.lora_embeddings_b), b_before)


def built_layer(**kwargs):
    layer = Embedding(10, 6, name="tokens", **kwargs)
    layer.build()
    return layer


def test_wrong_table_shape_is_refused(tmp_path):
    other = keras.Sequential([keras.Input((4,), dtype="int32"), Embedding(12, 6)])
    other.save_weights(tmp_path / "w.weights.h5")
    model = keras.Sequential([keras.Input((4,), dtype="int32"), Embedding(10, 6)])
    with pytest.raises(ValueError, match=r"of shape \(12, 6\).*expects \(10, 6\)"):
        model.load_weights(tmp_path / "w.weights.h5")


def test_wrong_number_of_arrays_is_refused():
    with pytest.raises(ValueError, match="checkpoint entry with 2 arrays"):
        built_layer().load_own_variables(
            {"0": np.zeros((10, 6)), "1": np.zeros((10, 2))}
        )


def lora_store(rank=2, alpha=4.0):
    return {
        "0": np.zeros((10, 6), "float32"),
        "1": np.ones((10, rank), "float32"),
        "2": np.ones((rank, 6), "float32"),
        "3": np.array([alpha]),
    }


def test_lora_rank_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"has LoRA rank=3.*adapters of rank=2"):
        built_layer(lora_rank=3, lora_alpha=4).load_own_variables(lora_store())


def test_lora_alpha_mismatch_is_refused():
    with pytest.raises(ValueError, match=r"lora_alpha=8.*lora_alpha=4\.0"):
        built_layer(lora_rank=2, lora_alpha=8).load_own_variables(lora_store())


def test_lora_adapter_shape_mismatch_is_refused():
    store = lora_store()
    store["2"] = np.ones((2, 5), "float32")
    with pytest.raises(ValueError, match=r"lora_embeddings_b of shape \(2, 5\)"):
        built_layer(lora_rank=2, lora_alpha=4).load_own_variables(store)


def test_loading_into_unbuilt_layer_is_refused():
    with pytest.raises(ValueError, match="was never built"):
        Embedding(10, 6).load_own_variables({"0": np.zeros((10, 6))})


def test_lora_store_layout(rng):
    layer = built_layer(lora_rank=2, lora_alpha=5)
    randomize(layer, rng)
    store = {}
    layer.save_own_variables(store)
    assert sorted(store) == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(
        ops.convert_to_numpy(store["0"]), ops.convert_to_numpy(layer._embeddings)
    )
    assert float(np.asarray(store["3"])[0]) == 5.0
