"""Saving quantized tables: `.keras` and `.weights.h5` round trips, LoRA on a
quantized table kept apart from it, checkpoints crossing with Keras's quantized
Embedding both ways, and the errors of a checkpoint that does not fit."""

import json

import h5py
import keras
import numpy as np
import pytest
from keras import ops
from quantization_reference import CONFIG_IDS, CONFIGS, config_for, raw

from keras_ext_embedding import Embedding

VOCAB, DIM = 50, 13
IDS = np.array([[1, 2, 3, 0], [7, 7, 49, 4], [12, 30, 30, 5]], dtype="int32")
TARGETS = np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype="float32")
LAYER_IN_FILE = "layers/embedding/vars"
# The dtype policy each config gives, for building a layer quantized from the
# start (a fresh model to load into).
POLICIES = {
    "int8": "int8_from_float32",
    "int4-default": "int4/128_from_float32",
    "int4-per-row": "int4/-1_from_float32",
    "int4-block5": "int4/5_from_float32",
}


def make_model(layer_cls=Embedding, **kwargs):
    inputs = keras.Input((IDS.shape[1],), dtype="int32")
    x = layer_cls(VOCAB, DIM, name="tokens", **kwargs)(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(2, name="head")(x)
    return keras.Model(inputs, outputs)


def tokens(model):
    return model.get_layer("tokens")


def quantized_model(mode, block_size, rng, layer_cls=Embedding, lora=None, **kwargs):
    """A model whose table is random, then quantized; LoRA adapters random."""
    model = make_model(layer_cls, **kwargs)
    layer = tokens(model)
    # Values of alternating sign: every int4 group straddles zero, where
    # Keras's quantization is ours bit for bit.
    signs = np.where(np.arange(DIM) % 2 == 0, 1.0, -1.0)
    table = (0.1 + np.abs(rng.normal(scale=0.5, size=(VOCAB, DIM)))) * signs
    layer.embeddings.assign(table.astype("float32"))
    model.get_layer("head").kernel.assign(rng.normal(size=(DIM, 2)).astype("float32"))
    if lora == "before":
        layer.enable_lora(2, lora_alpha=6.0)
    layer.quantize(mode, config=config_for(mode, block_size))
    if lora == "after":
        layer.enable_lora(2, lora_alpha=6.0)
    if lora:
        layer.lora_embeddings_a.assign(rng.normal(size=(VOCAB, 2)).astype("float32"))
        layer.lora_embeddings_b.assign(rng.normal(size=(2, DIM)).astype("float32"))
    return model


def predict(model):
    return np.asarray(model.predict(IDS, verbose=0))


def assert_close_predictions(model, other):
    """Keras's layer and ours compile to different graphs: with the same
    variables, a fused reduction may round the last bit differently."""
    np.testing.assert_allclose(predict(other), predict(model), rtol=2e-6, atol=2e-6)


def config_json(config):
    """A config as it is written to a `.keras` file (tuples become lists)."""
    return json.dumps(config, sort_keys=True)


def assert_same_variables(model, other):
    assert [v.path for v in model.weights] == [v.path for v in other.weights]
    for saved, reloaded in zip(model.weights, other.weights, strict=True):
        assert saved.dtype == reloaded.dtype, saved.path
        np.testing.assert_array_equal(raw(saved), raw(reloaded), err_msg=saved.path)


def arrays_in_file(path):
    with h5py.File(path, "r") as f:
        group = f[LAYER_IN_FILE]
        return [group[str(i)][()] for i in range(len(group))]


# Round trips.


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("lora", [None, "before", "after"])
def test_keras_file_round_trip(mode, block_size, lora, tmp_path, rng):
    model = quantized_model(mode, block_size, rng, lora=lora, mask_zero=True)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    layer = tokens(loaded)
    assert type(layer) is Embedding
    assert layer.quantization_mode == mode
    assert layer.dtype_policy.name == tokens(model).dtype_policy.name
    assert config_json(layer.get_config()) == config_json(tokens(model).get_config())
    assert layer.lora_enabled == bool(lora)
    assert_same_variables(model, loaded)
    np.testing.assert_array_equal(predict(loaded), predict(model))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer.compute_mask(IDS)), IDS != 0
    )


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("lora", [False, True])
def test_weights_file_round_trip(mode, block_size, lora, tmp_path, rng, request):
    model = quantized_model(mode, block_size, rng, lora="after" if lora else None)
    model.save_weights(tmp_path / "m.weights.h5")
    policy = POLICIES[request.node.callspec.id.split("-", 1)[1]]
    other = make_model(
        dtype=policy, **({"lora_rank": 2, "lora_alpha": 6.0} if lora else {})
    )
    other.load_weights(tmp_path / "m.weights.h5")
    assert_same_variables(model, other)
    np.testing.assert_array_equal(predict(other), predict(model))


def test_lora_checkpoint_keeps_quantized_table_and_adapters_apart(tmp_path, rng):
    model = quantized_model("int4", 5, rng, lora="after")
    layer = tokens(model)
    model.save_weights(tmp_path / "m.weights.h5")
    stored = arrays_in_file(tmp_path / "m.weights.h5")
    expected = [
        raw(layer._embeddings),
        raw(layer.embeddings_scale),
        raw(layer.embeddings_zero),
        raw(layer.g_idx),
        raw(layer.lora_embeddings_a),
        raw(layer.lora_embeddings_b),
        np.array([6.0]),
    ]
    assert len(stored) == len(expected)
    for array, values in zip(stored, expected, strict=True):
        assert array.dtype == values.dtype
        np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS[:2], ids=CONFIG_IDS[:2])
def test_lora_training_on_quantized_table_resumes_exactly(
    mode, block_size, tmp_path, rng
):
    model = quantized_model(mode, block_size, rng, lora="after")
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    for _ in range(2):
        model.train_on_batch(IDS, TARGETS)
    model.save(tmp_path / "m.keras")
    resumed = keras.saving.load_model(tmp_path / "m.keras")
    before = [raw(v) for v in model.weights]
    for _ in range(2):
        model.train_on_batch(IDS, TARGETS)
        resumed.train_on_batch(IDS, TARGETS)
    for variable, other, old in zip(
        model.weights, resumed.weights, before, strict=True
    ):
        np.testing.assert_array_equal(raw(other), raw(variable), err_msg=variable.path)
        moved = not np.array_equal(raw(variable), old)
        assert moved == ("lora" in variable.path or "head" in variable.path), (
            variable.path
        )


def test_lora_checkpoint_into_quantized_layer_without_lora_is_merged(tmp_path, rng):
    model = quantized_model("int4", 5, rng, lora="after")
    model.save_weights(tmp_path / "m.weights.h5")
    other = make_model(dtype="int4/5_from_float32")
    other.load_weights(tmp_path / "m.weights.h5")
    tokens(model).merge_lora()
    assert_same_variables(model, other)


def test_quantized_checkpoint_into_lora_layer_restarts_adapters(tmp_path, rng):
    model = quantized_model("int8", None, rng)
    model.save_weights(tmp_path / "m.weights.h5")
    other = make_model(dtype="int8_from_float32", lora_rank=2)
    other.load_weights(tmp_path / "m.weights.h5")
    layer = tokens(other)
    assert not raw(layer.lora_embeddings_b).any()
    np.testing.assert_array_equal(
        raw(layer._embeddings), raw(tokens(model)._embeddings)
    )
    np.testing.assert_array_equal(predict(other), predict(model))


# Checkpoints cross with Keras's quantized Embedding.


@pytest.mark.parametrize(("mode", "block_size"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
def test_weights_cross_with_keras_quantized_embedding(
    mode, block_size, direction, tmp_path, rng, request
):
    source_cls, target_cls = keras.layers.Embedding, Embedding
    if direction == "ours_to_keras":
        source_cls, target_cls = target_cls, source_cls
    source = quantized_model(mode, block_size, rng, layer_cls=source_cls)
    source.save_weights(tmp_path / "w.weights.h5")
    policy = POLICIES[request.node.callspec.id.split("-", 1)[1]]
    target = make_model(target_cls, dtype=policy)
    target.load_weights(tmp_path / "w.weights.h5")
    assert_same_variables(source, target)
    assert_close_predictions(source, target)


def test_keras_quantized_model_file_loads_as_ours_after_replacing_class(tmp_path, rng):
    """A `.keras` file of Keras's quantized Embedding, its config given to ours."""
    source = quantized_model("int4", "default", rng, layer_cls=keras.layers.Embedding)
    config = tokens(source).get_config()
    layer = Embedding.from_config(config)
    layer.build()
    store = {}
    tokens(source).save_own_variables(store)
    layer.load_own_variables(store)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layer(IDS)), ops.convert_to_numpy(tokens(source)(IDS))
    )


def test_merged_quantized_lora_checkpoint_loads_into_keras(tmp_path, rng):
    model = quantized_model("int8", None, rng, lora="after")
    tokens(model).merge_lora()
    model.save_weights(tmp_path / "m.weights.h5")
    theirs = make_model(keras.layers.Embedding, dtype="int8_from_float32")
    theirs.load_weights(tmp_path / "m.weights.h5")
    assert_close_predictions(model, theirs)


# Checkpoints that do not fit: refused, the layer left as it was.


def store_of(model):
    store = {}
    tokens(model).save_own_variables(store)
    return store


@pytest.mark.parametrize(
    ("saved", "loading_policy", "message"),
    [
        (
            None,
            "int8_from_float32",
            r"Layer 'tokens' cannot load a checkpoint entry with 1 arrays: the "
            r"layer holds an int8-quantized table and loads 2 \(embeddings, "
            r"embeddings_scale\).*The checkpoint holds a float table: load it "
            r"into a layer that is not quantized, then call `layer.quantize",
        ),
        (
            ("int8", None),
            "float32",
            r"entry with 2 arrays: the layer holds a float table.*The checkpoint "
            r"holds a quantized table: build the layer with the dtype policy it "
            r"was saved with",
        ),
        (
            ("int4", 5),
            "float32",
            r"cannot load embeddings of dtype int8 from the checkpoint: the layer "
            r"holds a float table, with embeddings of dtype float32.*holds a "
            r"quantized table",
        ),
        (
            ("int4", 5),
            "int4/4_from_float32",
            r"cannot load embeddings_scale of shape \(50, 3\) from the checkpoint: "
            r"the layer expects \(50, 4\)\. Build the layer with the input_dim, "
            r"output_dim, dtype policy and quantization_config",
        ),
        (
            ("int8", None),
            "int4/-1_from_float32",
            r"cannot load embeddings of shape \(50, 13\) .* expects \(50, 7\)",
        ),
        (
            ("int4", None),
            "int4/5_from_float32",
            r"entry with 2 arrays: the layer holds an int4-quantized table in "
            r"groups of 5 and loads 4.*quantized with another mode or int4 "
            r"block_size",
        ),
    ],
    ids=[
        "float_into_int8",
        "int8_into_float",
        "int4_grouped_into_float",
        "other_block_size",
        "int8_into_int4",
        "per_row_into_grouped",
    ],
)
def test_mismatched_checkpoint_is_refused(saved, loading_policy, message, rng):
    if saved is None:
        store = store_of(make_model())
    else:
        store = store_of(quantized_model(*saved, rng))
    target = make_model(dtype=loading_policy)
    before = [raw(v) for v in tokens(target).weights]
    with pytest.raises(ValueError, match=message):
        tokens(target).load_own_variables(store)
    for variable, values in zip(tokens(target).weights, before, strict=True):
        np.testing.assert_array_equal(raw(variable), values)


def test_corrupt_group_index_is_refused(rng):
    store = store_of(quantized_model("int4", 5, rng))
    store["3"] = np.zeros(DIM, dtype="float32")
    target = make_model(dtype="int4/5_from_float32")
    with pytest.raises(ValueError, match=r"cannot load g_idx .* groups of 5 columns"):
        tokens(target).load_own_variables(store)


@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
def test_truncated_weights_file_is_refused(tmp_path, rng):
    model = quantized_model("int8", None, rng)
    model.save_weights(tmp_path / "m.weights.h5")
    with h5py.File(tmp_path / "m.weights.h5", "a") as f:
        del f[LAYER_IN_FILE]["1"]
    target = make_model(dtype="int8_from_float32")
    with pytest.raises(
        ValueError, match="cannot load a checkpoint entry with 1 arrays"
    ):
        target.load_weights(tmp_path / "m.weights.h5")
