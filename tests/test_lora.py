import keras
import numpy as np
import pytest
from conftest import BACKEND
from keras import ops
from layer_test_case import table_of, to_numpy

from keras_ext_embedding import Embedding, InvalidIdError


def as_numpy(variable):
    return ops.convert_to_numpy(variable).astype("float64")


def randomize_adapters(layer, rng):
    layer.lora_embeddings_a.assign(rng.normal(size=layer.lora_embeddings_a.shape))
    layer.lora_embeddings_b.assign(rng.normal(size=layer.lora_embeddings_b.shape))


def lora_reference(layer, ids):
    table = as_numpy(layer._embeddings)
    a, b = as_numpy(layer.lora_embeddings_a), as_numpy(layer.lora_embeddings_b)
    return table[ids] + (layer.lora_alpha / layer.lora_rank) * (a[ids] @ b)


def test_enable_lora_errors_match_keras():
    with pytest.raises(ValueError, match="Cannot enable lora on a layer that isn't"):
        Embedding(10, 4).enable_lora(2)
    layer = Embedding(10, 4, embeddings_constraint="non_neg")
    layer.build()
    with pytest.raises(ValueError, match="Lora is incompatible with embedding"):
        layer.enable_lora(2)
    layer = Embedding(10, 4)
    layer.build()
    layer.enable_lora(2)
    with pytest.raises(ValueError, match="lora is already enabled"):
        layer.enable_lora(2)


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, None, "4"])
def test_enable_lora_rank_must_be_positive_int(rank):
    layer = Embedding(10, 4)
    layer.build()
    with pytest.raises(ValueError, match="`rank` must be a positive integer"):
        layer.enable_lora(rank)
    assert not layer.lora_enabled
    assert [v.name for v in layer.weights] == ["embeddings"]


@pytest.mark.parametrize("alpha", [0, -2.0, "8", False])
def test_enable_lora_alpha_must_be_positive(alpha):
    layer = Embedding(10, 4)
    layer.build()
    with pytest.raises(ValueError, match="`lora_alpha` must be a positive number"):
        layer.enable_lora(2, lora_alpha=alpha)


def test_constructor_alpha_survives_build_config_and_reload():
    layer = Embedding(10, 4, lora_rank=2, lora_alpha=16)
    layer.build()
    assert (layer.lora_rank, layer.lora_alpha) == (2, 16)
    config = layer.get_config()
    assert (config["lora_rank"], config["lora_alpha"]) == (2, 16)
    clone = Embedding.from_config(config)
    clone.build()
    assert (clone.lora_rank, clone.lora_alpha) == (2, 16)
    # keras.layers.Embedding replaces the alpha by the rank when it builds.
    theirs = keras.layers.Embedding(10, 4, lora_rank=2, lora_alpha=16)
    theirs.build()
    assert theirs.lora_alpha == 2


@pytest.mark.parametrize("dtype", ["float32", "mixed_float16", "bfloat16"])
def test_lora_variables(dtype):
    layer = Embedding(10, 4, lora_rank=3, dtype=dtype)
    layer.build()
    assert [v.name for v in layer.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    assert [v.name for v in layer.non_trainable_weights] == ["embeddings"]
    dtypes = [keras.backend.standardize_dtype(v.dtype) for v in layer.weights]
    table_dtype = "bfloat16" if dtype == "bfloat16" else "float32"
    assert dtypes == [table_dtype, "float32", "float32"]
    assert not np.any(as_numpy(layer.lora_embeddings_b))


def test_forward_equals_numpy_reference(rng):
    layer = Embedding(30, 5, lora_rank=3, lora_alpha=6)
    layer.build()
    randomize_adapters(layer, rng)
    ids = rng.integers(0, 30, size=(4, 7))
    np.testing.assert_allclose(
        to_numpy(layer(ids)), lora_reference(layer, ids), rtol=1e-5, atol=1e-5
    )
    merged = as_numpy(layer._embeddings) + 2.0 * (
        as_numpy(layer.lora_embeddings_a) @ as_numpy(layer.lora_embeddings_b)
    )
    np.testing.assert_allclose(table_of(layer), merged, rtol=1e-5, atol=1e-5)


def test_forward_equals_keras_lora(rng):
    ours = Embedding(30, 5, lora_rank=3)
    theirs = keras.layers.Embedding(30, 5, lora_rank=3)
    ours.build()
    theirs.build()
    randomize_adapters(ours, rng)
    theirs.set_weights(ours.get_weights())
    ids = rng.integers(0, 30, size=(3, 4))
    np.testing.assert_allclose(
        to_numpy(ours(ids)), to_numpy(theirs(ids)), rtol=1e-6, atol=1e-6
    )


def lora_model(vocab=40, **kwargs):
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            Embedding(vocab, 8, name="tokens", **kwargs),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1),
        ]
    )
    return model, model.get_layer("tokens")


def toy_task(rng, vocab=40, n=64):
    ids = rng.integers(0, vocab // 2, size=(n, 6))
    y = (ids.mean(axis=1, keepdims=True) / vocab).astype("float32")
    return ids, y


def test_lora_training_lowers_loss_and_freezes_table(rng):
    model, layer = lora_model()
    layer.enable_lora(4, lora_alpha=8)
    model.layers[-1].trainable = False
    model.compile(keras.optimizers.Adam(0.02), "mse")
    ids, y = toy_task(rng)
    table = as_numpy(layer._embeddings)
    a_before = as_numpy(layer.lora_embeddings_a)
    history = model.fit(ids, y, epochs=15, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_array_equal(as_numpy(layer._embeddings), table)
    # Rows of A for ids never looked up get no gradient.
    unseen = np.arange(20, 40)
    np.testing.assert_array_equal(
        as_numpy(layer.lora_embeddings_a)[unseen], a_before[unseen]
    )
    assert not np.array_equal(as_numpy(layer.lora_embeddings_a), a_before)


def test_merge_lora(rng):
    model, layer = lora_model(lora_rank=2, lora_alpha=5)
    ids, y = toy_task(rng)
    randomize_adapters(layer, rng)
    before = model.predict(ids, verbose=0)
    layer.merge_lora()
    assert not layer.lora_enabled
    assert [v.name for v in layer.weights] == ["embeddings"]
    assert [v.name for v in layer.trainable_weights] == ["embeddings"]
    assert "lora_rank" not in layer.get_config()
    np.testing.assert_allclose(
        model.predict(ids, verbose=0), before, rtol=1e-5, atol=1e-5
    )
    model.compile(keras.optimizers.SGD(0.5), "mse")
    table = as_numpy(layer._embeddings)
    model.fit(ids, y, epochs=1, verbose=0)
    assert not np.array_equal(as_numpy(layer._embeddings), table)


def test_merge_lora_without_lora():
    layer = Embedding(10, 4, name="plain")
    layer.build()
    with pytest.raises(ValueError, match="'plain' has no LoRA adapters to merge"):
        layer.merge_lora()


def test_merge_lora_keeps_table_dtype(rng):
    layer = Embedding(10, 4, lora_rank=2, dtype="bfloat16")
    layer.build()
    randomize_adapters(layer, rng)
    expected = table_of(layer)
    layer.merge_lora()
    assert keras.backend.standardize_dtype(layer._embeddings.dtype) == "bfloat16"
    np.testing.assert_allclose(table_of(layer), expected, rtol=2e-2, atol=2e-2)


def test_invalid_ids_with_lora():
    layer = Embedding(10, 4, lora_rank=2, name="tokens")
    with pytest.raises(InvalidIdError, match="invalid id 10 at position"):
        layer(np.array([1, 10]))
    model = keras.Sequential([keras.Input((2,), dtype="int32"), layer])
    if BACKEND == "torch":  # Keras runs predict eagerly on PyTorch
        with pytest.raises(InvalidIdError):
            model.predict(np.array([[1, 10]]), verbose=0)
        return
    out = model.predict(np.array([[1, 10]]), verbose=0)
    np.testing.assert_allclose(out[0, 0], table_of(layer)[1], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 1], np.zeros(4))
