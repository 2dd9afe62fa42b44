"""`replace_embeddings`: existing models upgraded to our Embedding with the
same weights, config and outputs."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_ext_embedding import (
    Embedding,
    InvalidIdError,
    ReversibleEmbedding,
    replace_embeddings,
)

VOCAB, DIM = 40, 6
IDS = np.array([[1, 2, 3, 0], [7, 7, 39, 4]], dtype="int32")


def predict(model, ids=IDS):
    return np.asarray(model.predict(ids, verbose=0))


def randomize(model, rng):
    for variable in model.weights:
        if "int" in str(variable.dtype):
            continue
        values = rng.normal(size=variable.shape).astype("float32")
        variable.assign(ops.cast(values, variable.dtype))


def embeddings_of(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Embedding | Embedding)
    ]


def assert_upgraded(original, upgraded, count, exact=True):
    layers = embeddings_of(upgraded)
    assert len(layers) == count
    assert all(type(layer) is Embedding for layer in layers)
    for ours in layers:
        name = ours.name
        (theirs,) = [
            layer for layer in embeddings_of(original) if layer.name == name
        ] or [None]
        if theirs is not None and type(theirs) is keras.layers.Embedding:
            expected = theirs.get_config()
            got = ours.get_config()
            assert keras.saving.serialize_keras_object(got) == (
                keras.saving.serialize_keras_object(expected)
            )
            assert [v.path for v in ours.weights] == [v.path for v in theirs.weights]
            for new, old in zip(ours.weights, theirs.weights, strict=True):
                np.testing.assert_array_equal(
                    ops.convert_to_numpy(new), ops.convert_to_numpy(old)
                )
    if exact:
        np.testing.assert_array_equal(predict(upgraded), predict(original))
    else:
        np.testing.assert_allclose(
            predict(upgraded), predict(original), rtol=1e-5, atol=1e-6
        )


def test_functional_model_with_nested_sequential(rng):
    inner = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM)],
        name="inner",
    )
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, mask_zero=True, name="tokens")(inputs)
    x = keras.layers.LSTM(3)(x)
    y = keras.layers.GlobalAveragePooling1D()(inner(inputs))
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([x, y]))
    model = keras.Model(inputs, outputs)
    randomize(model, rng)
    upgraded = replace_embeddings(model)
    assert upgraded is not model
    assert_upgraded(model, upgraded, count=2)
    # The original is untouched.
    assert type(model.get_layer("tokens")) is keras.layers.Embedding
    assert upgraded.get_layer("tokens").mask_zero
    # The clone owns its variables: training it leaves the original alone.
    before = predict(model)
    upgraded.compile("sgd", "mse")
    upgraded.fit(IDS, np.ones((2, 2)), verbose=0)
    np.testing.assert_array_equal(predict(model), before)


def test_sequential_model(rng):
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(VOCAB, DIM, name="tokens"),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    randomize(model, rng)
    upgraded = replace_embeddings(model)
    assert isinstance(upgraded, keras.Sequential)
    assert_upgraded(model, upgraded, count=1)


class Recommender(keras.Model):
    def __init__(self):
        super().__init__()
        self.users = keras.layers.Embedding(VOCAB, DIM, name="users")
        self.items = [keras.layers.Embedding(VOCAB, DIM, name="items")]
        self.head = keras.layers.Dense(1)

    def call(self, ids):
        users = self.users(ids[:, 0])
        items = self.items[0](ids[:, 1])
        return self.head(users * items)


def test_subclassed_model_is_upgraded_in_place(rng):
    model = Recommender()
    pairs = IDS[:, :2]
    model(pairs)
    randomize(model, rng)
    before = predict(model, pairs)
    weights = [ops.convert_to_numpy(v).copy() for v in model.weights]
    paths = [v.path for v in model.weights]
    upgraded = replace_embeddings(model, invalid_ids="zeros")
    assert upgraded is model
    assert type(model.users) is Embedding
    assert type(model.items[0]) is Embedding
    assert model.users.invalid_ids == "zeros"
    np.testing.assert_array_equal(predict(model, pairs), before)
    assert [v.path for v in model.weights] == paths
    for variable, old in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), old)
    # The replaced layers are the model's own: they train, and the new
    # behaviour (zeros for an invalid id) is in effect.
    model.compile("sgd", "mse")
    model.fit(pairs, np.ones((2, 1)), verbose=0)
    bad = np.array([[1, VOCAB + 3]], dtype="int32")
    out = ops.convert_to_numpy(model.items[0](bad[:, 1]))
    assert not out.any()


class Backbone(keras.Model):
    """A keras-hub-style backbone: a Model subclass built with the
    functional API in `__init__`, its layers also kept as attributes."""

    def __init__(self, **kwargs):
        inputs = keras.Input((4,), dtype="int32")
        token_embedding = keras.layers.Embedding(VOCAB, DIM, name="token_embedding")
        pooled = keras.layers.GlobalAveragePooling1D()(token_embedding(inputs))
        outputs = keras.layers.Dense(2, name="head")(pooled)
        super().__init__(inputs, outputs, **kwargs)
        self.token_embedding = token_embedding


class Task(keras.Model):
    """A keras-hub-style task: a functional subclass calling a backbone."""

    def __init__(self, backbone, **kwargs):
        inputs = keras.Input((4,), dtype="int32")
        outputs = keras.layers.Dense(1, name="task_head")(backbone(inputs))
        super().__init__(inputs, outputs, **kwargs)
        self.backbone = backbone


@pytest.mark.parametrize("wrapped", [False, True], ids=["backbone", "task"])
def test_functional_subclass_runs_the_replacement(wrapped, rng):
    backbone = Backbone()
    model = Task(backbone) if wrapped else backbone
    randomize(model, rng)
    before = predict(model)
    paths = [v.path for v in model.weights]

    upgraded = replace_embeddings(model)

    assert upgraded is model
    assert type(backbone.token_embedding) is Embedding
    assert backbone.get_layer("token_embedding") is backbone.token_embedding
    assert [v.path for v in model.weights] == paths
    np.testing.assert_array_equal(predict(model), before)
    # The graph really runs our layer: its table drives the outputs, and an
    # invalid id gets our error instead of Keras's silent lookup.
    table = backbone.token_embedding.embeddings
    table.assign(ops.zeros(table.shape))
    assert not np.array_equal(predict(model), before)
    with pytest.raises(InvalidIdError, match="received an invalid id 40"):
        model(np.array([[1, 2, 3, VOCAB]], dtype="int32"))
    # And it trains as the model's own layer.
    model.compile(keras.optimizers.SGD(0.5), "mse")
    model.fit(IDS, np.ones((2, model.outputs[0].shape[-1])), verbose=0)
    assert np.any(ops.convert_to_numpy(backbone.token_embedding.embeddings))


def test_model_with_lora_keeps_its_adapters(rng):
    inputs = keras.Input((4,), dtype="int32")
    layer = keras.layers.Embedding(VOCAB, DIM, name="tokens")
    x = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    layer.enable_lora(3)
    randomize(model, rng)
    upgraded = replace_embeddings(model)
    ours = upgraded.get_layer("tokens")
    assert ours.lora_enabled and (ours.lora_rank, ours.lora_alpha) == (3, 3)
    assert [w.name for w in ours.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    for name in ("lora_embeddings_a", "lora_embeddings_b"):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(getattr(ours, name)),
            ops.convert_to_numpy(getattr(layer, name)),
        )
    # Ours adds the adapters row by row, Keras to the whole table first.
    assert_upgraded(model, upgraded, count=1, exact=False)


@pytest.mark.filterwarnings("ignore:Layer InputLayer does not have")
def test_quantized_model(rng):
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(VOCAB, DIM, name="tokens"),
            keras.layers.GlobalAveragePooling1D(),
        ]
    )
    randomize(model, rng)
    model.get_layer("tokens").quantize("int8")
    upgraded = replace_embeddings(model)
    assert upgraded.get_layer("tokens").dtype_policy.name == "int8_from_float32"
    # The same int8 variables; the compiled graphs differ (ours also masks
    # invalid ids), so a fused reduction may round the last bit differently.
    assert_upgraded(model, upgraded, count=1, exact=False)


def test_overrides_apply_to_every_replacement():
    model = keras.Sequential(
        [keras.Input((2,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM)]
    )
    upgraded = replace_embeddings(model, invalid_ids="zeros")
    out = upgraded(np.array([[1, VOCAB]], dtype="int32"))
    assert not ops.convert_to_numpy(out)[0, 1].any()
    strict = replace_embeddings(model)
    with pytest.raises(InvalidIdError, match=f"invalid id {VOCAB}"):
        strict(np.array([[1, VOCAB]], dtype="int32"))


def test_subclasses_that_change_keras_embedding_are_left_alone():
    class Custom(keras.layers.Embedding):
        def call(self, inputs):
            return super().call(inputs) * 2

    model = keras.Sequential([keras.Input((2,), dtype="int32"), Custom(VOCAB, DIM)])
    upgraded = replace_embeddings(model)
    assert type(upgraded.layers[0]) is Custom


def test_empty_subclasses_are_replaced_like_keras_layers(rng):
    # keras-hub's `keras_hub.layers.ReversibleEmbedding` is such a subclass.
    class Empty(keras.layers.ReversibleEmbedding):
        pass

    class EmptierStill(Empty):
        """Only a docstring."""

    inputs = keras.Input((4,), dtype="int32")
    tokens = EmptierStill(VOCAB, DIM, name="tokens")
    model = keras.Model(inputs, tokens(tokens(inputs), reverse=True))
    ids = rng.integers(0, VOCAB, size=(2, 4)).astype("int32")
    upgraded = replace_embeddings(model)
    assert type(upgraded.get_layer("tokens")) is ReversibleEmbedding
    np.testing.assert_allclose(
        ops.convert_to_numpy(upgraded(ids)),
        ops.convert_to_numpy(model(ids)),
        rtol=1e-6,
        atol=1e-7,
    )


def test_errors():
    with pytest.raises(ValueError, match=r"expects a keras\.Model"):
        replace_embeddings(keras.layers.Embedding(VOCAB, DIM))
    with pytest.raises(ValueError, match="is not built"):
        replace_embeddings(Recommender())
