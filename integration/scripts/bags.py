"""Bag models saved under one backend and loaded under another; keras-rs
`EmbedReduce` models upgraded by `replace_embeddings`. Run once per backend.

    python bags.py save DIR             # writes DIR/<backend>/...
    python bags.py load DIR SAVER...    # writes DIR/<saver>/loaded_by_<backend>/

KERAS_BACKEND picks the backend; everything is written as .npy/.npz/.json.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import keras_rs
import numpy as np
from keras import ops

import keras_ext_embedding  # registers the layers: no custom_objects needed
from keras_ext_embedding import EmbeddingBag, SharedEmbedding, replace_embeddings

BACKEND = keras.config.backend()
INPUT_DIM, OUTPUT_DIM, LENGTH = 12, 8, 5
# Bags padded with 0 (and 3 for the `padding_id=3` model), with repeated ids
# and an empty bag.
IDS = np.array(
    [[1, 5, 9, 0, 0], [3, 3, 7, 11, 2], [0, 0, 0, 0, 0], [4, 4, 4, 6, 0]],
    dtype="int32",
)
WEIGHTS = np.array(
    [[0.5, 2.0, 1.0, 0, 0], [1, 1, 3, 0.25, 2], [0, 0, 0, 0, 0], [1, 2, 3, 4, 0]],
    dtype="float32",
)
CANDIDATES = np.array([[2], [8], [0], [11]], dtype="int32")
TARGET = np.array([[0.5], [-1.0], [0.25], [2.0]], dtype="float32")
# The bag models: (EmbeddingBag arguments, per-id weights?, quantize
# (mode, int4 block size) after build, LoRA rank after quantizing).
BAG_MODELS = {
    "mean": ({"combiner": "mean", "mask_zero": True}, False, None, None),
    "max_int8": ({"combiner": "max", "padding_id": 3}, False, ("int8", None), None),
    "sqrtn_int4_lora": (
        {"combiner": "sqrtn", "mask_zero": True},
        True,
        ("int4", 2),
        2,
    ),
    "sum_adam": (
        {"combiner": "sum", "mask_zero": True, "optimizer": "adam"},
        True,
        None,
        None,
    ),
}
MODELS = (*BAG_MODELS, "shared_adagrad", "keras_rs")


def bag_model(name):
    arguments, weighted, quantize, lora_rank = BAG_MODELS[name]
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    inputs = [ids]
    layer = EmbeddingBag(INPUT_DIM, OUTPUT_DIM, name="items", **arguments)
    if weighted:
        weights = keras.Input((LENGTH,), name="weights")
        inputs.append(weights)
        x = layer(ids, weights)
    else:
        x = layer(ids)
    model = keras.Model(inputs, keras.layers.Dense(1, name="head")(x))
    if quantize is not None:
        mode, block_size = quantize
        config = None
        if mode == "int4":
            config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        layer.quantize(mode, config=config)
    if lora_rank is not None:
        layer.enable_lora(lora_rank)
    return model


def shared_model():
    history = keras.Input((LENGTH,), dtype="int32", name="history")
    candidate = keras.Input((1,), dtype="int32", name="candidate")
    items = SharedEmbedding(
        INPUT_DIM,
        OUTPUT_DIM,
        features={"history": "mean", "candidate": None},
        mask_zero=True,
        optimizer="adagrad",
        name="items",
    )
    outputs = items({"history": history, "candidate": candidate})
    score = keras.layers.Dot(axes=1, name="score")(
        [outputs["history"], keras.layers.Reshape((OUTPUT_DIM,))(outputs["candidate"])]
    )
    return keras.Model({"history": history, "candidate": candidate}, score)


def keras_rs_model():
    """A keras-rs model, upgraded; the predictions before and after."""
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    weights = keras.Input((LENGTH,), name="weights")
    # No padding: EmbedReduce counts id 0, ours leaves it out.
    layer = keras_rs.layers.EmbedReduce(
        INPUT_DIM, OUTPUT_DIM, combiner="sqrtn", name="items"
    )
    model = keras.Model(
        [ids, weights], keras.layers.Dense(1, name="head")(layer(ids, weights))
    )
    before = model.predict(inputs_of("keras_rs"), verbose=0)
    replace_embeddings(model)
    return model, before


def inputs_of(name):
    if name == "shared_adagrad":
        return {"history": IDS, "candidate": CANDIDATES}
    if name == "keras_rs" or BAG_MODELS[name][1]:
        return [IDS, WEIGHTS]
    return IDS


def weights_of(model):
    return {v.path.replace("/", "."): ops.convert_to_numpy(v) for v in model.weights}


def sgd_step(model, name):
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.train_on_batch(inputs_of(name), TARGET)


def describe(layer):
    return {
        "class": f"{type(layer).__module__}.{type(layer).__qualname__}",
        "config": {
            key: layer.get_config().get(key)
            for key in ("combiner", "padding_id", "mask_zero", "features", "optimizer")
        },
        "quantization_mode": layer.quantization_mode,
        "trainable": [w.name for w in layer.trainable_weights],
    }


def dump(directory, name, model):
    directory.mkdir(parents=True, exist_ok=True)
    np.save(
        directory / f"{name}_predictions.npy", model.predict(inputs_of(name), verbose=0)
    )
    np.savez(directory / f"{name}_weights.npz", **weights_of(model))
    (directory / f"{name}_layer.json").write_text(
        json.dumps(describe(model.get_layer("items")))
    )
    sgd_step(model, name)
    np.savez(directory / f"{name}_after_step.npz", **weights_of(model))


def save(root):
    keras.utils.set_random_seed(7)
    out = root / BACKEND
    out.mkdir(parents=True, exist_ok=True)
    models = {name: bag_model(name) for name in BAG_MODELS}
    models["shared_adagrad"] = shared_model()
    models["keras_rs"], before = keras_rs_model()
    np.save(out / "keras_rs_before_upgrade.npy", before)
    # Row-sparse tables are saved mid-training, slots and step counters set.
    for name in ("sum_adam", "shared_adagrad"):
        for _ in range(2):
            sgd_step(models[name], name)
    for name, model in models.items():
        model.save(out / f"{name}.keras")
    for name, model in models.items():
        dump(out / "reference", name, model)


def load(root, *savers):
    for saver in savers:
        saved = root / saver
        out = saved / f"loaded_by_{BACKEND}"
        for name in MODELS:
            # With the file's compile config: the models a JAX saver compiled
            # keep `jit_compile=True`, so PyTorch predicts them through
            # torch.compile, row-sparse tables included, as a user's would.
            dump(out, name, keras.saving.load_model(saved / f"{name}.keras"))


if __name__ == "__main__":
    command, root, savers = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    {"save": save, "load": load}[command](root, *savers)
    print(f"{command} under {BACKEND}: ok ({keras_ext_embedding.__version__})")
