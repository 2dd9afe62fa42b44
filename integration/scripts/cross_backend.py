"""Saves and loads models under one backend; run once per backend by the tests.

    python cross_backend.py save DIR    # writes DIR/<backend>/...
    python cross_backend.py load DIR    # loads every DIR/<saver>/..., writes
                                        # DIR/<saver>/loaded_by_<backend>/...

KERAS_BACKEND picks the backend; everything is written as .npy/.json so the
test process compares the backends without importing any of them.
"""

import json
import os
import sys
from pathlib import Path

import keras
import numpy as np

import keras_ext_embedding  # registers the layer: no custom_objects needed
from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()
IDS = np.array([[1, 5, 9, 0, 0], [3, 3, 7, 11, 2]], dtype="int32")
TARGET = np.array([[0.5], [-1.0]], dtype="float32")


def text_model(layer_cls, **kwargs):
    inputs = keras.Input((None,), dtype="int32")
    x = layer_cls(12, 8, name="tokens", **kwargs)(inputs)
    x = keras.layers.LSTM(4, name="encoder")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    return keras.Model(inputs, outputs)


def weights_of(model):
    return {
        v.path.replace("/", "."): keras.ops.convert_to_numpy(v) for v in model.weights
    }


def sgd_step(model):
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.train_on_batch(IDS, TARGET)


def dump(directory, name, model):
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{name}_predictions.npy", model.predict(IDS, verbose=0))
    np.savez(directory / f"{name}_weights.npz", **weights_of(model))
    sgd_step(model)
    np.savez(directory / f"{name}_after_step.npz", **weights_of(model))


def invalid_id_report():
    layer = Embedding(12, 8, name="tokens")
    try:
        layer(np.array([[1, 12]]))
        message = None
    except InvalidIdError as error:
        message = str(error)
    compiled = None
    if BACKEND in ("tensorflow", "jax"):
        model = keras.Sequential([keras.Input((3,), dtype="int32"), layer])
        out = model.predict(np.array([[1, 12, -1]]), verbose=0)
        compiled = out[0, 1:].tolist()
    return {"eager_message": message, "compiled_invalid_rows": compiled}


def save(root):
    keras.utils.set_random_seed(7)
    out = root / BACKEND
    out.mkdir(parents=True, exist_ok=True)

    plain = text_model(Embedding, mask_zero=True)
    plain.save(out / "plain.keras")

    lora = text_model(Embedding, mask_zero=True, lora_rank=4, lora_alpha=8)
    for _ in range(2):
        sgd_step(lora)
    lora.save(out / "lora.keras")

    theirs = text_model(keras.layers.Embedding, mask_zero=True)
    theirs.save_weights(out / "keras_layer.weights.h5")
    np.save(out / "keras_layer_predictions.npy", theirs.predict(IDS, verbose=0))
    ours = text_model(Embedding, mask_zero=True)
    ours.save_weights(out / "our_layer.weights.h5")
    np.save(out / "our_layer_predictions.npy", ours.predict(IDS, verbose=0))

    # Reference results of the saving backend itself, computed after saving.
    dump(out / "reference", "plain", plain)
    dump(out / "reference", "lora", lora)
    (out / "invalid.json").write_text(json.dumps(invalid_id_report()))


def load(root):
    for saved in sorted(p for p in root.iterdir() if p.is_dir()):
        out = saved / f"loaded_by_{BACKEND}"
        for name in ("plain", "lora"):
            dump(out, name, keras.saving.load_model(saved / f"{name}.keras"))
        # Checkpoints cross between keras.layers.Embedding and ours.
        ours = text_model(Embedding, mask_zero=True)
        ours.load_weights(saved / "keras_layer.weights.h5")
        np.save(out / "keras_into_ours.npy", ours.predict(IDS, verbose=0))
        theirs = text_model(keras.layers.Embedding, mask_zero=True)
        theirs.load_weights(saved / "our_layer.weights.h5")
        np.save(out / "ours_into_keras.npy", theirs.predict(IDS, verbose=0))


if __name__ == "__main__":
    command, root = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    {"save": save, "load": load}[command](root)
    print(f"{command} under {BACKEND}: ok ({keras_ext_embedding.__version__})")
