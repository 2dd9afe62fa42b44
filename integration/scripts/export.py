"""Exports a model for serving, then serves it with the artifact's own runtime.

    python export.py export DIR            # under KERAS_BACKEND: writes DIR/<backend>/
    python export.py serve DIR BACKEND...  # no keras: loads those backends'
                                           # artifacts in DIR with tf.saved_model /
                                           # onnxruntime, writes outputs

Artifacts: a TensorFlow SavedModel (`model.export(format="tf_saved_model")`)
from TensorFlow and JAX, and ONNX (`format="onnx"`) from all three backends,
each for a layer with `invalid_ids="raise"` and one with `"zeros"`, and for
language-model heads: a `ReversibleEmbedding` whose reverse projection gives
the model's logits (float tied with a soft cap, int8 untied, int4 grouped
with LoRA), and bag models (`EmbeddingBag`, mean and int8 max).
The exporting process writes the Keras model's own outputs beside them.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

VOCAB, DIM = 50, 32
IDS = np.array([[1, 2, 3, 0, 0], [4, 5, 49, 7, 0]], dtype="int32")
# Ids past the vocabulary and negative: zero rows wherever the graph has the
# layer's masking.
BAD = np.array([[1, VOCAB, 3, 0, 0], [4, -1, 49, 7, 0]], dtype="int32")
FORMATS = {
    "tensorflow": ("tf_saved_model", "onnx"),
    "jax": ("tf_saved_model", "onnx"),
    "torch": ("onnx",),
}
MODES = ("raise", "zeros")
# name: (constructor arguments, quantization mode and int4 block size, LoRA rank)
LM_HEADS = {
    "lm_float": ({"logit_soft_cap": 3.0}, None, None),
    "lm_float_untied": ({"tie_weights": False}, None, None),
    "lm_int8_untied": ({"tie_weights": False}, ("int8", None), None),
    # 10 hidden states in 8 groups of 4: each chunk dequantized; in 2 groups
    # of 16, per-group partial logits where the export runs the layer
    # eagerly (PyTorch's: bytes with a flipped sign bit, no nibbles
    # unpacked), dequantized chunks where it traces. Untied per-row int4:
    # both forms on the transposed reverse table.
    "lm_int4_lora": ({}, ("int4", 4), 2),
    "lm_int4_partials": ({}, ("int4", 16), None),
    "lm_int4_per_row_untied": ({"tie_weights": False}, ("int4", -1), None),
}


# Bag models: EmbeddingBag (padding 0 left out) -> Dense. name: (combiner,
# quantization mode).
BAGS = {"bag_mean": ("mean", None), "bag_max_int8": ("max", "int8")}


def bag_model(name):
    import keras

    from keras_ext_embedding import EmbeddingBag

    combiner, mode = BAGS[name]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((IDS.shape[1],), dtype="int32", name="ids")
    layer = EmbeddingBag(
        VOCAB,
        DIM,
        combiner=combiner,
        mask_zero=True,
        invalid_ids="zeros",
        name="bag",
    )
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(layer(inputs)))
    if mode:
        layer.quantize(mode)
    return model


def lm_head(name):
    """ids -> ReversibleEmbedding -> Dense -> the same layer, reverse=True."""
    import keras

    from keras_ext_embedding import ReversibleEmbedding

    kwargs, quantization, lora_rank = LM_HEADS[name]
    keras.utils.set_random_seed(0)
    # Sequences of any length, as a language model takes them: the export
    # traces two unknown (JAX: symbolic) sizes.
    inputs = keras.Input((None,), dtype="int32", name="ids")
    layer = ReversibleEmbedding(
        VOCAB, DIM, invalid_ids="zeros", name="tokens", **kwargs
    )
    hidden = keras.layers.Dense(DIM, name="hidden")(layer(inputs))
    model = keras.Model(inputs, layer(hidden, reverse=True))
    if quantization:
        mode, block_size = quantization
        config = None
        if mode == "int4":
            config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        layer.quantize(mode, config=config)
    if lora_rank:
        layer.enable_lora(lora_rank)
        rng = np.random.default_rng(0)
        layer.lora_embeddings_b.assign(
            rng.normal(size=(lora_rank, DIM)).astype("float32")
        )
        # Rebuilt from its config, the layer creates its adapters when it is
        # built: PyTorch's ONNX export cannot trace variables added to a
        # built Keras layer (Keras's own Embedding fails there alike).
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        model = clone
    return model


def export(root):
    import keras

    from keras_ext_embedding import Embedding

    backend = keras.config.backend()
    out = root / backend
    out.mkdir(parents=True, exist_ok=True)
    for mode in MODES:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((IDS.shape[1],), dtype="int32", name="ids")
        layer = Embedding(VOCAB, DIM, mask_zero=True, invalid_ids=mode, name="tokens")
        x = keras.layers.GlobalAveragePooling1D()(layer(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        np.save(out / f"{mode}_keras.npy", model.predict(IDS, verbose=0))
        model(IDS)  # Keras's ONNX export wants a model called eagerly once
        # What the layer gives invalid ids when it cannot raise: zero rows.
        layer.invalid_ids = "zeros"
        np.save(out / f"{mode}_keras_bad.npy", model.predict(BAD, verbose=0))
        layer.invalid_ids = mode
        for fmt in FORMATS[backend]:
            suffix = ".onnx" if fmt == "onnx" else ""
            model.export(str(out / f"{mode}_{fmt}{suffix}"), format=fmt, verbose=False)
    for name in BAGS:
        model = bag_model(name)
        np.save(out / f"{name}_keras.npy", model.predict(IDS, verbose=0))
        np.save(out / f"{name}_keras_bad.npy", model.predict(BAD, verbose=0))
        model(IDS)
        for fmt in FORMATS[backend]:
            suffix = ".onnx" if fmt == "onnx" else ""
            model.export(str(out / f"{name}_{fmt}{suffix}"), format=fmt, verbose=False)
    for name in LM_HEADS:
        model = lm_head(name)
        np.save(out / f"{name}_keras.npy", model.predict(IDS, verbose=0))
        model(IDS)
        for fmt in FORMATS[backend]:
            suffix = ".onnx" if fmt == "onnx" else ""
            model.export(str(out / f"{name}_{fmt}{suffix}"), format=fmt, verbose=False)


def run_artifact(path, ids):
    """Outputs, or the error the runtime raised, as JSON-able facts."""
    try:
        if path.suffix == ".onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path))
            name = session.get_inputs()[0].name
            return np.asarray(session.run(None, {name: ids})[0]).tolist()
        import tensorflow as tf

        # Kept in a name: the function's variables live as long as `loaded`.
        loaded = tf.saved_model.load(str(path))
        return loaded.serve(tf.constant(ids)).numpy().tolist()
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error)[:500]}


def serve(root, *backends):
    report = {}
    for backend in backends:
        for mode in MODES:
            for fmt in FORMATS[backend]:
                suffix = ".onnx" if fmt == "onnx" else ""
                path = root / backend / f"{mode}_{fmt}{suffix}"
                report[f"{backend}/{mode}/{fmt}"] = {
                    "ids": run_artifact(path, IDS),
                    "bad": run_artifact(path, BAD),
                }
        for name in BAGS:
            for fmt in FORMATS[backend]:
                suffix = ".onnx" if fmt == "onnx" else ""
                path = root / backend / f"{name}_{fmt}{suffix}"
                report[f"{backend}/{name}/{fmt}"] = {
                    "ids": run_artifact(path, IDS),
                    "bad": run_artifact(path, BAD),
                }
        for name in LM_HEADS:
            for fmt in FORMATS[backend]:
                suffix = ".onnx" if fmt == "onnx" else ""
                path = root / backend / f"{name}_{fmt}{suffix}"
                report[f"{backend}/{name}/{fmt}"] = run_artifact(path, IDS)
    (root / "served.json").write_text(json.dumps(report))


if __name__ == "__main__":
    command, root, backends = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    {"export": export, "serve": serve}[command](root, *backends)
    print(f"{command}: ok")
