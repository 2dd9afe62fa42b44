"""`replace_embeddings`: every kind of model upgraded in place to our Embedding,
with the same weights, config and outputs."""

import gc
import weakref

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

BACKEND = keras.config.backend()
VOCAB, DIM = 40, 6
IDS = np.array([[1, 2, 3, 0], [7, 7, 39, 4]], dtype="int32")
BAD_IDS = np.array([[1, 2, 3, VOCAB]], dtype="int32")


def predict(model, ids=IDS):
    return np.asarray(model.predict(ids, verbose=0))


def randomize(model, rng):
    for variable in model.weights:
        if "int" in str(variable.dtype):
            continue
        values = rng.normal(size=variable.shape).astype("float32")
        variable.assign(ops.cast(values, variable.dtype))


def numpy(variable):
    return ops.convert_to_numpy(variable)


def keras_embeddings(model):
    """Keras's embedding layers that `model` reaches (ours is no subclass)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.Embedding)
    ]


def our_embeddings(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, Embedding)
    ]


def summary(model):
    lines = []
    model.summary(
        expand_nested=True, print_fn=lambda line, line_break=False: lines.append(line)
    )
    return "\n".join(lines)


class Upgrade:
    """What a model was before `replace_embeddings`, to check it after."""

    def __init__(self, model, ids=IDS):
        self.model = model
        self.ids = ids
        self.keras_layers = keras_embeddings(model)
        self.keras_variables = [v for layer in self.keras_layers for v in layer.weights]
        self.weights = [(v.path, numpy(v).copy()) for v in model.weights]
        self.outputs = predict(model, ids)

    def run(self, **overrides):
        returned = replace_embeddings(self.model, **overrides)
        assert returned is self.model
        return returned

    def check(self, count, exact=True):
        """The model holds ours wherever it held Keras's, with the same
        weights and outputs, and really runs ours."""
        model = self.model
        assert keras_embeddings(model) == []
        ours = our_embeddings(model)
        assert len(ours) == count
        assert {layer.name for layer in ours} == {
            layer.name for layer in self.keras_layers
        }
        for layer in model.layers:
            assert not isinstance(layer, keras.layers.Embedding)
        # The same weights, in the same order, under the same paths; none of
        # them is a Keras layer's.
        assert [v.path for v in model.weights] == [p for p, _ in self.weights]
        for variable, (_, value) in zip(model.weights, self.weights, strict=True):
            np.testing.assert_array_equal(numpy(variable), value)
            assert not any(variable is old for old in self.keras_variables)
        for layer in ours:
            for variable in layer.weights:
                assert any(variable is w for w in model.weights)
        if exact:
            np.testing.assert_array_equal(predict(model, self.ids), self.outputs)
        else:
            np.testing.assert_allclose(
                predict(model, self.ids), self.outputs, rtol=1e-5, atol=1e-6
            )
        # Keras's layer looks up any id it is given (or fails in the backend's
        # own gather); ours raises its own error, eagerly.
        bad = self.ids.copy()
        bad[0, -1] = VOCAB
        with pytest.raises(InvalidIdError, match=f"invalid id {VOCAB}"):
            model(bad)
        return ours


def assert_trains(model, layers, targets, rng):
    """`fit` (after compiling) moves every table of `layers`."""
    tables = {layer.name: numpy(layer.embeddings).copy() for layer in layers}
    model.compile(keras.optimizers.SGD(0.5), "mse")
    model.fit(IDS, targets, verbose=0)
    for layer in layers:
        assert not np.array_equal(numpy(layer.embeddings), tables[layer.name]), (
            layer.name
        )


# Every kind of model, changed in place.


# Keras's LSTM consumes the mask but, from the Keras 3.16 nightlies on, says
# `supports_masking = False` and warns that it drops it: Keras's warning.
@pytest.mark.filterwarnings(
    r"ignore:Layer 'lstm' \(of type LSTM\) was passed an input with a mask"
    ":UserWarning"
)
def test_functional_model_with_nested_sequential(rng):
    inner = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(VOCAB, DIM, name="inner_tokens"),
        ],
        name="inner",
    )
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, mask_zero=True, name="tokens")(inputs)
    x = keras.layers.LSTM(3)(x)
    y = keras.layers.GlobalAveragePooling1D()(inner(inputs))
    outputs = keras.layers.Dense(2)(keras.layers.Concatenate()([x, y]))
    model = keras.Model(inputs, outputs)
    randomize(model, rng)
    config = model.get_layer("tokens").get_config()
    upgrade = Upgrade(model)
    upgrade.run()
    upgrade.check(count=2)
    tokens = model.get_layer("tokens")
    assert type(tokens) is Embedding
    assert type(inner.get_layer("inner_tokens")) is Embedding
    assert model.get_layer("inner") is inner
    assert tokens.mask_zero
    serialize = keras.saving.serialize_keras_object
    assert serialize(tokens.get_config()) == serialize(config)
    assert_trains(model, our_embeddings(model), np.ones((2, 2)), rng)


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
    upgrade = Upgrade(model)
    upgrade.run()
    (ours,) = upgrade.check(count=1)
    # Its layer list and the Functional that Sequential runs both hold ours.
    assert type(model.get_layer("tokens")) is Embedding
    assert model.layers[0] is ours
    assert model._functional.get_layer("tokens") is ours
    assert [type(layer).__name__ for layer in model.layers] == [
        "Embedding",
        "Flatten",
        "Dense",
    ]
    assert_trains(model, [ours], np.ones((2, 1)), rng)


def nested_model():
    """A Functional model inside a Sequential one inside a Functional one,
    each level with an Embedding of its own."""
    ids = keras.Input((4,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(VOCAB, DIM, name="innermost_tokens")(ids)
    )
    innermost = keras.Model(ids, pooled, name="innermost")
    middle = keras.Sequential(
        [keras.Input((4,), dtype="int32"), innermost, keras.layers.Dense(3)],
        name="middle",
    )
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(VOCAB, DIM, name="tokens")(inputs)
    )
    x = keras.layers.Concatenate()([x, middle(inputs)])
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="outer")


def test_nested_functional_sequential_functional(rng):
    model = nested_model()
    randomize(model, rng)
    upgrade = Upgrade(model)
    upgrade.run()
    upgrade.check(count=2)
    middle = model.get_layer("middle")
    innermost = middle.get_layer("innermost")
    assert type(model.get_layer("tokens")) is Embedding
    assert type(innermost.get_layer("innermost_tokens")) is Embedding
    assert middle.layers[0] is innermost
    assert middle._functional.get_layer("innermost") is innermost
    assert_trains(model, our_embeddings(model), np.ones((2, 2)), rng)


class Encoder(keras.Model):
    """A subclassed model calling a Functional model it holds, like a layer."""

    def __init__(self, tower, **kwargs):
        super().__init__(**kwargs)
        self.tower = tower
        self.head = keras.layers.Dense(1)

    def call(self, ids):
        return self.head(self.tower(ids))


def test_model_called_as_a_layer(rng):
    ids = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, name="tokens")(ids)
    tower = keras.Model(ids, keras.layers.GlobalAveragePooling1D()(x), name="tower")
    model = Encoder(tower)
    model(IDS)
    randomize(model, rng)
    upgrade = Upgrade(model)
    upgrade.run()
    (ours,) = upgrade.check(count=1)
    assert model.tower is tower
    assert tower.get_layer("tokens") is ours
    assert_trains(model, [ours], np.ones((2, 1)), rng)


def test_layer_shared_by_two_models_of_one_model(rng):
    # Two towers looking up the same table, both inside one model.
    shared = keras.layers.Embedding(VOCAB, DIM, name="shared")
    towers = []
    for name in ("left", "right"):
        ids = keras.Input((4,), dtype="int32")
        pooled = keras.layers.GlobalAveragePooling1D()(shared(ids))
        towers.append(keras.Model(ids, keras.layers.Dense(2)(pooled), name=name))
    inputs = keras.Input((4,), dtype="int32")
    outputs = keras.layers.Add()([tower(inputs) for tower in towers])
    model = keras.Model(inputs, outputs)
    randomize(model, rng)
    upgrade = Upgrade(model)
    upgrade.run()
    (ours,) = upgrade.check(count=1)
    left, right = towers
    assert left.get_layer("shared") is right.get_layer("shared") is ours
    # One table, listed once, which both towers look up.
    assert [v.path for v in model.weights].count(ours.embeddings.path) == 1
    ours.embeddings.assign(ops.zeros((VOCAB, DIM)))
    for tower in towers:
        dense = tower.layers[-1]
        np.testing.assert_allclose(
            predict(tower), np.broadcast_to(numpy(dense.bias), (2, 2)), atol=1e-6
        )
    assert_trains(model, [ours], np.ones((2, 2)), rng)


def test_models_sharing_a_layer_share_its_replacement(rng, tmp_path):
    # A training model and an inference model built on the same layers.
    shared = keras.layers.Embedding(VOCAB, DIM, name="shared")
    ids = keras.Input((4,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(shared(ids))
    infer = keras.Model(ids, pooled, name="infer")
    train = keras.Model(ids, keras.layers.Dense(1, name="score")(pooled), name="train")
    randomize(train, rng)
    infer_outputs = predict(infer)
    upgrade = Upgrade(train)
    upgrade.run()
    (ours,) = upgrade.check(count=1)
    # The graph nodes the two share run ours already.
    with pytest.raises(InvalidIdError):
        infer(BAD_IDS)
    # Upgraded in turn, the inference model gets the same layer object.
    with pytest.raises(ValueError, match="Layer 'shared' was already replaced"):
        replace_embeddings(infer, invalid_ids="zeros")
    assert keras_embeddings(infer) == [shared]
    assert replace_embeddings(infer) is infer
    assert infer.get_layer("shared") is ours
    assert keras_embeddings(infer) == []
    np.testing.assert_array_equal(predict(infer), infer_outputs)
    assert any(v is ours.embeddings for v in infer.weights)
    infer.save(tmp_path / "infer.keras")
    reloaded = keras.saving.load_model(tmp_path / "infer.keras")
    assert type(reloaded.get_layer("shared")) is Embedding
    np.testing.assert_array_equal(predict(reloaded), infer_outputs)
    # Training one moves the other's outputs.
    assert_trains(train, [ours], np.ones((2, 1)), rng)
    assert not np.array_equal(predict(infer), infer_outputs)


class Recommender(keras.Model):
    def __init__(self):
        super().__init__()
        self.users = keras.layers.Embedding(VOCAB, DIM, name="users")
        self.items = [keras.layers.Embedding(VOCAB, DIM, name="items")]
        self.context = {"hour": keras.layers.Embedding(24, DIM, name="hour")}
        self.head = keras.layers.Dense(1)

    def call(self, ids):
        users = self.users(ids[:, 0])
        items = self.items[0](ids[:, 1])
        hours = self.context["hour"](ids[:, 1] % 24)
        return self.head(users * items + hours)


def test_subclassed_model_is_upgraded_in_place(rng):
    model = Recommender()
    pairs = IDS[:, :2]
    model(pairs)
    randomize(model, rng)
    upgrade = Upgrade(model, ids=pairs)
    upgrade.run(invalid_ids="zeros")
    assert type(model.users) is Embedding
    assert type(model.items[0]) is Embedding
    assert type(model.context["hour"]) is Embedding
    assert model.users.invalid_ids == "zeros"
    assert keras_embeddings(model) == []
    assert [v.path for v in model.weights] == [p for p, _ in upgrade.weights]
    for variable, (_, value) in zip(model.weights, upgrade.weights, strict=True):
        np.testing.assert_array_equal(numpy(variable), value)
    np.testing.assert_array_equal(predict(model, pairs), upgrade.outputs)
    # The replaced layers are the model's own: they train, and the new
    # behaviour (zeros for an invalid id) is in effect.
    tables = [numpy(layer.embeddings).copy() for layer in our_embeddings(model)]
    model.compile(keras.optimizers.SGD(0.5), "mse")
    model.fit(pairs, np.ones((2, 1)), verbose=0)
    for layer, table in zip(our_embeddings(model), tables, strict=True):
        assert not np.array_equal(numpy(layer.embeddings), table), layer.name
    out = numpy(model.items[0](np.array([1, VOCAB + 3], dtype="int32")))
    assert out[0].any() and not out[1].any()


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


# What the upgraded model keeps and forgets, on every kind of model.


def functional_model():
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, name="tokens")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="head")(x))


def sequential_model():
    return keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(VOCAB, DIM, name="tokens"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, name="head"),
        ]
    )


class Pooled(keras.Model):
    def __init__(self):
        super().__init__()
        self.tokens = keras.layers.Embedding(VOCAB, DIM, name="tokens")
        self.head = keras.layers.Dense(1, name="head")

    def call(self, ids):
        return self.head(ops.mean(self.tokens(ids), axis=1))


def subclassed_model():
    model = Pooled()
    model(IDS)
    return model


def nested_single_output():
    model = nested_model()
    inputs = keras.Input((4,), dtype="int32")
    return keras.Model(inputs, keras.layers.Dense(1)(model(inputs)))


MODELS = {
    "functional": functional_model,
    "sequential": sequential_model,
    "subclassed": subclassed_model,
    "nested": nested_single_output,
}
GRAPH_MODELS = ["functional", "sequential", "nested"]


@pytest.mark.parametrize("kind", MODELS)
def test_keras_layers_are_no_longer_reachable(kind):
    model = MODELS[kind]()
    model.compile("sgd", "mse")
    model.fit(IDS, np.ones((2, 1)), verbose=0)
    predict(model)
    originals = [weakref.ref(layer) for layer in keras_embeddings(model)]
    assert originals
    replace_embeddings(model)
    gc.collect()
    assert [ref() for ref in originals] == [None] * len(originals)


@pytest.mark.parametrize("kind", MODELS)
def test_model_that_ran_fit_and_predict_before(kind, rng):
    model = MODELS[kind]()
    randomize(model, rng)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(IDS, np.ones((2, 1)), verbose=0)
    before = predict(model)
    (keras_layer,) = keras_embeddings(model)[:1]
    keras_table = numpy(keras_layer.embeddings).copy()

    replace_embeddings(model)

    np.testing.assert_array_equal(predict(model), before)
    with pytest.raises(InvalidIdError):
        model(BAD_IDS)
    # `predict` runs our layer: a function traced before would still read
    # Keras's table, which keeps its values.
    (ours,) = [
        layer for layer in our_embeddings(model) if layer.name == keras_layer.name
    ]
    table = numpy(ours.embeddings).copy()
    ours.embeddings.assign(np.zeros_like(table))
    assert not np.array_equal(predict(model), before)
    ours.embeddings.assign(table)
    # Compiled again, as the docstring says, `fit` trains ours.
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(IDS, np.ones((2, 1)), verbose=0)
    assert not np.array_equal(numpy(ours.embeddings), table)
    np.testing.assert_array_equal(numpy(keras_layer.embeddings), keras_table)


@pytest.mark.parametrize("kind", MODELS)
def test_compiled_model_not_yet_trained_needs_no_new_compile(kind, rng):
    # As keras-hub tasks are once constructed. Warnings are errors here:
    # Keras would warn if the model had lost track of its layers' state.
    model = MODELS[kind]()
    model.compile(keras.optimizers.SGD(0.5), "mse")
    replace_embeddings(model)
    ours = our_embeddings(model)
    tables = [numpy(layer.embeddings).copy() for layer in ours]
    model.fit(IDS, np.ones((2, 1)), verbose=0)
    for layer, table in zip(ours, tables, strict=True):
        assert not np.array_equal(numpy(layer.embeddings), table), layer.name


@pytest.mark.parametrize("kind", GRAPH_MODELS)
def test_keras_file_reloads_with_our_layers(kind, rng, tmp_path):
    model = MODELS[kind]()
    randomize(model, rng)
    before = predict(model)
    replace_embeddings(model, invalid_ids="zeros")
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert keras_embeddings(reloaded) == []
    layers = {layer.name: layer for layer in our_embeddings(reloaded)}
    assert {name: type(layer) for name, layer in layers.items()} == {
        layer.name: Embedding for layer in our_embeddings(model)
    }
    assert all(layer.invalid_ids == "zeros" for layer in layers.values())
    assert [v.name for v in reloaded.weights] == [v.name for v in model.weights]
    np.testing.assert_array_equal(predict(reloaded), before)


@pytest.mark.parametrize("kind", GRAPH_MODELS)
def test_summary_shows_the_same_graph(kind):
    model = MODELS[kind]()
    before = summary(model)
    replace_embeddings(model)
    # Our classes have Keras's names and the same weights; the graph's
    # connections survive the rewiring.
    assert summary(model) == before
    assert "tokens (Embedding)" in before


@pytest.mark.skipif(BACKEND != "torch", reason="torch parameters exist on torch only")
@pytest.mark.parametrize("kind", MODELS)
def test_torch_parameters_are_the_new_layers(kind):
    model = MODELS[kind]()
    old = [v.value for layer in keras_embeddings(model) for v in layer.weights]
    replace_embeddings(model)
    parameters = list(model.parameters())
    for layer in our_embeddings(model):
        assert any(p is layer.embeddings.value for p in parameters)
    assert not any(p is o for p in parameters for o in old)


@pytest.mark.skipif(
    BACKEND != "tensorflow", reason="TensorFlow tracks a graph's layer list itself"
)
def test_tensorflow_saved_model_export(rng, tmp_path):
    # TensorFlow refuses to save a tracked list whose items were replaced
    # behind its back.
    model = functional_model()
    randomize(model, rng)
    before = predict(model)
    replace_embeddings(model)
    model.export(tmp_path / "exported", format="tf_saved_model", verbose=False)
    import tensorflow as tf

    served = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_array_equal(np.asarray(served.serve(IDS)), before)


# A model with nothing to replace.


def test_model_without_embedding_warns_and_is_unchanged(rng):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs), name="plain")
    layers = list(model.layers)
    weights = list(model.weights)
    x = rng.normal(size=(2, 4)).astype("float32")
    before = predict(model, x)
    with pytest.warns(UserWarning) as record:
        returned = replace_embeddings(model)
    assert returned is model
    (warning,) = record
    assert str(warning.message) == (
        "`replace_embeddings` left model 'plain' unchanged: it holds no "
        "`keras.layers.Embedding` or `keras.layers.ReversibleEmbedding`, nor a "
        "subclass of either that adds nothing to it. Subclasses of Keras's "
        "layers that override methods are left alone, as their call may "
        "differ; this model holds none."
    )
    assert model.layers == layers
    assert all(a is b for a, b in zip(model.weights, weights, strict=True))
    np.testing.assert_array_equal(predict(model, x), before)


def test_subclasses_that_change_keras_embedding_are_left_alone():
    class Custom(keras.layers.Embedding):
        def call(self, inputs):
            return super().call(inputs) * 2

    layer = Custom(VOCAB, DIM, name="custom")
    model = keras.Sequential([keras.Input((2,), dtype="int32"), layer], name="seq")
    with pytest.warns(
        UserWarning,
        match=r"left model 'seq' unchanged.*override methods are left alone, "
        r"as their call may differ \(here 'custom' \(Custom\)\)\.",
    ):
        upgraded = replace_embeddings(model)
    assert upgraded is model
    assert model.layers == [layer]


def test_second_call_warns_that_the_layers_are_ours_already():
    model = functional_model()
    replace_embeddings(model)
    (ours,) = our_embeddings(model)
    with pytest.warns(
        UserWarning,
        match=r"Its layers 'tokens' \(Embedding\) are keras_ext_embedding's already",
    ):
        replace_embeddings(model)
    assert model.get_layer("tokens") is ours


# Overrides, LoRA, quantization, keras-hub's empty subclass, errors.


def test_overrides_apply_to_every_replacement():
    def model():
        return keras.Sequential(
            [keras.Input((2,), dtype="int32"), keras.layers.Embedding(VOCAB, DIM)]
        )

    lenient = replace_embeddings(model(), invalid_ids="zeros")
    out = ops.convert_to_numpy(lenient(np.array([[1, VOCAB]], dtype="int32")))
    assert out[0, 0].any() and not out[0, 1].any()
    strict = replace_embeddings(model())
    with pytest.raises(InvalidIdError, match=f"invalid id {VOCAB}"):
        strict(np.array([[1, VOCAB]], dtype="int32"))


def test_a_rejected_override_leaves_the_model_as_it_was(rng):
    model = nested_single_output()
    randomize(model, rng)
    layers = keras_embeddings(model)
    before = predict(model)
    # Keras's `from_config` wraps our ValueError in a TypeError.
    with pytest.raises(TypeError, match="`invalid_ids` must be one of"):
        replace_embeddings(model, invalid_ids="ignore")
    assert keras_embeddings(model) == layers
    np.testing.assert_array_equal(predict(model), before)
    # And the upgrade still works afterwards.
    upgrade = Upgrade(model)
    upgrade.run()
    upgrade.check(count=2)


def test_model_with_lora_keeps_its_adapters(rng):
    inputs = keras.Input((4,), dtype="int32")
    layer = keras.layers.Embedding(VOCAB, DIM, name="tokens")
    x = keras.layers.GlobalAveragePooling1D()(layer(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    layer.enable_lora(3)
    randomize(model, rng)
    upgrade = Upgrade(model)
    upgrade.run()
    # Ours adds the adapters row by row, Keras to the whole table first.
    (ours,) = upgrade.check(count=1, exact=False)
    assert ours.lora_enabled and (ours.lora_rank, ours.lora_alpha) == (3, 3)
    assert [w.name for w in ours.trainable_weights] == [
        "lora_embeddings_a",
        "lora_embeddings_b",
    ]
    for name in ("lora_embeddings_a", "lora_embeddings_b"):
        np.testing.assert_array_equal(
            numpy(getattr(ours, name)), numpy(getattr(layer, name))
        )


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
    upgrade = Upgrade(model)
    upgrade.run()
    # The same int8 variables; the compiled graphs differ (ours also masks
    # invalid ids), so a fused reduction may round the last bit differently.
    upgrade.check(count=1, exact=False)
    assert model.get_layer("tokens").dtype_policy.name == "int8_from_float32"


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
    before = ops.convert_to_numpy(model(ids))
    assert replace_embeddings(model) is model
    assert type(model.get_layer("tokens")) is ReversibleEmbedding
    assert keras_embeddings(model) == []
    np.testing.assert_allclose(
        ops.convert_to_numpy(model(ids)), before, rtol=1e-6, atol=1e-7
    )


def test_errors():
    with pytest.raises(ValueError, match=r"expects a keras\.Model"):
        replace_embeddings(keras.layers.Embedding(VOCAB, DIM))
    with pytest.raises(ValueError, match="is not built"):
        replace_embeddings(Recommender())


# --- keras-rs EmbedReduce becomes our EmbeddingBag. ---

BAG_IDS = np.array([[1, 2, 3, 5], [7, 7, 39, 4]], dtype="int32")
BAG_WEIGHTS = np.array([[0.5, 1.0, 2.0, 1.5], [1.0, 3.0, 0.25, 2.0]], "float32")


class BagRecommender(keras.Model):
    """A subclassed model holding keras-rs bags in attributes and a dict."""

    def __init__(self, **kwargs):
        import keras_rs

        super().__init__(**kwargs)
        self.seen = keras_rs.layers.EmbedReduce(VOCAB, DIM, combiner="sum")
        self.context = {"tags": keras_rs.layers.EmbedReduce(VOCAB, DIM)}
        self.head = keras.layers.Dense(1)

    def call(self, ids):
        return self.head(
            keras.ops.concatenate([self.seen(ids), self.context["tags"](ids)], -1)
        )


def embed_reduce_model(kind, combiner):
    import keras_rs

    if kind == "subclassed":
        return BagRecommender()
    layer = keras_rs.layers.EmbedReduce(VOCAB, DIM, combiner=combiner, name="bag")
    if kind == "sequential":
        return keras.Sequential(
            [keras.Input((4,), dtype="int32"), layer, keras.layers.Dense(1)]
        )
    ids = keras.Input((4,), dtype="int32")
    weights = keras.Input((4,))
    return keras.Model([ids, weights], keras.layers.Dense(1)(layer(ids, weights)))


@pytest.mark.parametrize(
    ("kind", "combiner"),
    [
        ("functional", "mean"),
        ("functional", "sqrtn"),
        ("sequential", "sum"),
        ("subclassed", None),
    ],
)
def test_keras_rs_embed_reduce_becomes_embedding_bag(kind, combiner, rng):
    from keras_ext_embedding import EmbeddingBag

    model = embed_reduce_model(kind, combiner)
    data = [BAG_IDS, BAG_WEIGHTS] if kind == "functional" else BAG_IDS
    model(data)
    randomize(model, rng)
    before = np.asarray(model.predict(data, verbose=0))
    paths = [v.path for v in model.weights]
    assert replace_embeddings(model) is model
    bags = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if "EmbedReduce" in type(layer).__name__ or isinstance(layer, EmbeddingBag)
    ]
    assert bags and all(type(layer) is EmbeddingBag for layer in bags)
    if kind == "subclassed":
        assert type(model.seen) is EmbeddingBag
        assert type(model.context["tags"]) is EmbeddingBag
        assert (model.seen.combiner, model.context["tags"].combiner) == (
            "sum",
            "mean",
        )
    else:
        assert model.get_layer("bag").combiner == combiner
    assert [v.path for v in model.weights] == paths
    np.testing.assert_allclose(
        np.asarray(model.predict(data, verbose=0)), before, rtol=1e-5, atol=1e-6
    )
    # The replacement trains, and checks ids as ours do.
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(data, np.ones((2, 1)), verbose=0)
    bad = BAG_IDS.copy()
    bad[1, 2] = VOCAB
    layer = bags[0]
    with pytest.raises(InvalidIdError, match="in bag 1 at position 2"):
        layer(bad)
