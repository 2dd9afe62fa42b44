"""Saves and loads models under one backend; run once per backend by the tests.

    python cross_backend.py save DIR            # writes DIR/<backend>/...
    python cross_backend.py load DIR SAVER...   # loads DIR/<saver>/... of each
                                                # SAVER, writes
                                                # DIR/<saver>/loaded_by_<backend>/...

KERAS_BACKEND picks the backend. Everything is written as .npy/.npz/.json, so
the test process compares the backends without importing any of them.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

import keras_ext_embedding  # registers the layer: no custom_objects needed
from keras_ext_embedding import Embedding, InvalidIdError

BACKEND = keras.config.backend()
INPUT_DIM, OUTPUT_DIM = 12, 8
# Trailing zeros are padding: mask_zero must hide them from the encoder.
IDS = np.array([[1, 5, 9, 0, 0], [3, 3, 7, 11, 2]], dtype="int32")
UNPADDED = IDS[:1, :3]
TARGET = np.array([[0.5], [-1.0]], dtype="float32")
# Saved as whole models (.keras), each with Embedding(mask_zero=True).
# `quantize` is `(mode, int4 block_size)`: the table is quantized after build.
MODELS = {
    "lstm": {"encoder": "lstm"},
    "pooled": {"encoder": "pooled"},
    "lora": {"encoder": "lstm", "lora_rank": 4, "lora_alpha": 8},
    "int8": {"encoder": "lstm", "quantize": ("int8", None)},
    "int4_grouped": {"encoder": "pooled", "quantize": ("int4", 3)},
    "int4_lora": {"encoder": "lstm", "quantize": ("int4", None), "lora_rank": 2},
}

INT8, INT4_GROUPED = MODELS["int8"]["quantize"], MODELS["int4_grouped"]["quantize"]


def text_model(layer_cls, encoder="lstm", quantize=None, **kwargs):
    inputs = keras.Input((None,), dtype="int32", name="ids")
    layer = layer_cls(INPUT_DIM, OUTPUT_DIM, mask_zero=True, name="tokens", **kwargs)
    x = layer(inputs)
    if encoder == "lstm":
        x = keras.layers.LSTM(4, name="encoder")(x)
    else:
        x = keras.layers.GlobalAveragePooling1D(name="encoder")(x)
    outputs = keras.layers.Dense(1, name="head")(x)
    if quantize is not None:
        mode, block_size = quantize
        config = None
        if mode == "int4":
            config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        layer.quantize(mode, config=config)
    return keras.Model(inputs, outputs)


def weights_of(model):
    return {v.path.replace("/", "."): ops.convert_to_numpy(v) for v in model.weights}


def sgd_step(model):
    """One SGD step on the fixed batch, from a freshly compiled optimizer."""
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.train_on_batch(IDS, TARGET)


def describe(layer):
    return {
        "class": f"{type(layer).__module__}.{type(layer).__qualname__}",
        "mask_zero": layer.mask_zero,
        "lora_enabled": getattr(layer, "lora_enabled", False),
        "lora_rank": layer.lora_rank,
        "lora_alpha": layer.lora_alpha,
        "quantization_mode": layer.quantization_mode,
        "dtype_policy": layer.dtype_policy.name,
        "trainable": [w.name for w in layer.trainable_weights],
    }


def dump(directory, name, model):
    """Predictions, variables, layer facts, then variables after one step."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{name}_predictions.npy", model.predict(IDS, verbose=0))
    np.save(directory / f"{name}_unpadded.npy", model.predict(UNPADDED, verbose=0))
    np.savez(directory / f"{name}_weights.npz", **weights_of(model))
    layer = json.dumps(describe(model.get_layer("tokens")))
    (directory / f"{name}_layer.json").write_text(layer)
    sgd_step(model)
    np.savez(directory / f"{name}_after_step.npz", **weights_of(model))


def error_of(function):
    """What `function()` raised, as JSON-able facts; None if it returned."""
    try:
        function()
    except Exception as error:
        return {
            "type": type(error).__name__,
            "is_invalid_id_error": isinstance(error, InvalidIdError),
            "is_value_error": isinstance(error, ValueError),
            "message": str(error),
        }
    return None


def invalid_id_report():
    layer = Embedding(INPUT_DIM, OUTPUT_DIM, name="tokens")
    eager_cases = {
        # NumPy and lists are checked on the host before conversion.
        "numpy_int64": np.array([[1, 12]]),
        "list": [[0, 1], [12, 3]],
        "numpy_uint64": np.array([3, 2**63], dtype="uint64"),
        # Backend tensors are checked after reading their values.
        "tensor_int32": ops.convert_to_tensor(
            np.array([[[2, 3], [4, -3]]], dtype="int32")
        ),
        "tensor_float32": ops.convert_to_tensor(np.array([2.0, 1.5], dtype="float32")),
    }
    report = {
        "eager": {
            case: error_of(lambda ids=ids: layer(ids))
            for case, ids in eager_cases.items()
        }
    }
    inputs = keras.Input((3,), dtype="int32")
    model = keras.Model(inputs, layer(inputs))
    bad = np.array([[1, 12, -1]], dtype="int32")
    report["model_call"] = error_of(lambda: model(bad))
    # Compiled on TensorFlow and JAX; PyTorch's predict runs eagerly.
    report["predict_error"] = error_of(lambda: model.predict(bad, verbose=0))
    if report["predict_error"] is None:
        report["predict_rows"] = model.predict(bad, verbose=0)[0].tolist()
        report["table_row_1"] = ops.convert_to_numpy(layer.embeddings)[1].tolist()
    return report


def save(root):
    keras.utils.set_random_seed(7)
    out = root / BACKEND
    out.mkdir(parents=True, exist_ok=True)
    models = {name: text_model(Embedding, **kw) for name, kw in MODELS.items()}
    for _ in range(2):  # LoRA models are saved mid fine-tuning
        sgd_step(models["lora"])
        sgd_step(models["int4_lora"])
    for name, model in models.items():
        model.save(out / f"{name}.keras")

    theirs = text_model(keras.layers.Embedding)
    theirs.save_weights(out / "keras_layer.weights.h5")
    np.save(out / "keras_layer_predictions.npy", theirs.predict(IDS, verbose=0))
    ours = text_model(Embedding)
    ours.save_weights(out / "our_layer.weights.h5")
    np.save(out / "our_layer_predictions.npy", ours.predict(IDS, verbose=0))
    # Quantized checkpoints cross too: Keras's int8 into ours, ours (int4 in
    # groups of 3) into Keras's.
    theirs = text_model(keras.layers.Embedding, quantize=INT8)
    theirs.save_weights(out / "keras_int8.weights.h5")
    np.save(out / "keras_int8_predictions.npy", theirs.predict(IDS, verbose=0))
    ours = text_model(Embedding, quantize=INT4_GROUPED)
    ours.save_weights(out / "our_int4.weights.h5")
    np.save(out / "our_int4_predictions.npy", ours.predict(IDS, verbose=0))

    # The saving backend's own results, from the models still in memory.
    for name, model in models.items():
        dump(out / "reference", name, model)
    (out / "invalid.json").write_text(json.dumps(invalid_id_report()))


def load(root, *savers):
    for saver in savers:
        saved = root / saver
        out = saved / f"loaded_by_{BACKEND}"
        for name in MODELS:
            # `dump` compiles the model again: the file's compile config is
            # not what is compared here. Restored, a JAX saver's
            # `jit_compile=True` would send PyTorch's predict through
            # torch.compile, 20 s of CPU for these six models; scripts/bags.py
            # keeps that path (its row-sparse models load compiled).
            model = keras.saving.load_model(saved / f"{name}.keras", compile=False)
            dump(out, name, model)
        # Checkpoints cross between keras.layers.Embedding and ours.
        ours = text_model(Embedding)
        ours.load_weights(saved / "keras_layer.weights.h5")
        np.save(out / "keras_into_ours.npy", ours.predict(IDS, verbose=0))
        theirs = text_model(keras.layers.Embedding)
        theirs.load_weights(saved / "our_layer.weights.h5")
        np.save(out / "ours_into_keras.npy", theirs.predict(IDS, verbose=0))
        ours = text_model(Embedding, quantize=INT8)
        ours.load_weights(saved / "keras_int8.weights.h5")
        np.save(out / "keras_int8_into_ours.npy", ours.predict(IDS, verbose=0))
        theirs = text_model(keras.layers.Embedding, quantize=INT4_GROUPED)
        theirs.load_weights(saved / "our_int4.weights.h5")
        np.save(out / "our_int4_into_keras.npy", theirs.predict(IDS, verbose=0))


if __name__ == "__main__":
    command, root, savers = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    {"save": save, "load": load}[command](root, *savers)
    print(f"{command} under {BACKEND}: ok ({keras_ext_embedding.__version__})")
