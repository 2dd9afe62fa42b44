"""Trains embedding tables under one backend; run once per backend by the tests.

    python training.py train DIR            # writes DIR/<backend>/...
    python training.py resume DIR SAVER...  # resumes DIR/<saver>/<case>.keras
                                            # of each SAVER, writes
                                            # DIR/<saver>/resumed_by_<backend>/

Every case starts from the same table and trains on the same batches of
Zipf ids (many repeats, many rows never looked up), `STEPS` batches in all;
`train` also saves each model after `SAVE_AFTER` batches, and `resume`
loads that file and trains the remaining batches. KERAS_BACKEND picks the
backend; tables and slots are written as .npz for the test process.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import keras_ext_embedding  # noqa: F401 (registers the layer for load_model)
from keras_ext_embedding import Embedding

BACKEND = keras.config.backend()
VOCAB, DIM, LENGTH, BATCH = 60, 6, 8, 8
STEPS, SAVE_AFTER = 6, 3
# (layer class, layer arguments, model optimizer). The table's own
# optimizers (`table_optimizer`) use non-default hyperparameters and a
# schedule: they must travel through the .keras file.
CASES = {
    "keras_dense_adagrad": ("keras", {}, "adagrad"),
    "keras_dense_adam": ("keras", {}, "adam"),
    "dense_sgd": ("ours", {}, "sgd"),
    "dense_adagrad": ("ours", {}, "adagrad"),
    "dense_adam": ("ours", {}, "adam"),
    "row_sparse_sgd": ("ours", {"optimizer": "sgd"}, "adam"),
    "row_sparse_adagrad": ("ours", {"optimizer": "adagrad_0.3"}, "adam"),
    "row_sparse_adam": ("ours", {"optimizer": "adam_decayed"}, "adam"),
    "lora_row_sparse_adam": ("ours", {"optimizer": "adam", "lora_rank": 2}, "sgd"),
}
# The cases whose whole optimizer state is the layer's (row-sparse tables;
# LoRA's B under SGD, which has none): a reload resumes them exactly.
RESUMABLE = [case for case in CASES if case.startswith(("row_sparse", "lora"))]
RATES = {"sgd": 0.5, "adagrad": 0.3, "adam": 0.05}


def table_optimizer(name):
    """The layer's `optimizer` argument of a case."""
    if name == "adagrad_0.3":
        return keras.optimizers.Adagrad(0.3)
    if name == "adam_decayed":
        schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 2, 0.5)
        return keras.optimizers.Adam(schedule, beta_1=0.8)
    return name


def data():
    rng = np.random.default_rng(0)
    ids = np.minimum(rng.zipf(1.4, size=(STEPS * BATCH, LENGTH)), VOCAB - 1)
    targets = rng.normal(size=(STEPS * BATCH, 1)).astype("float32")
    table = rng.normal(size=(VOCAB, DIM)).astype("float32")
    head = rng.normal(size=(DIM, 1)).astype("float32")
    return ids.astype("int32"), targets, table, head


def model_of(case):
    kind, arguments, optimizer = CASES[case]
    arguments = dict(arguments)
    if "optimizer" in arguments:
        arguments["optimizer"] = table_optimizer(arguments["optimizer"])
    _, _, table, head = data()
    cls = keras.layers.Embedding if kind == "keras" else Embedding
    layer = cls(VOCAB, DIM, weights=[table], name="tokens", **arguments)
    model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            layer,
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(1, use_bias=False, name="head"),
        ]
    )
    model.get_layer("head").kernel.assign(head)
    if getattr(layer, "lora_enabled", False):
        # The same A everywhere (each backend's random generator differs).
        rng = np.random.default_rng(1)
        layer.lora_embeddings_a.assign(rng.normal(size=layer.lora_embeddings_a.shape))
    # Only the embedding trains: a resumed run then needs no state of the
    # model's optimizer (except LoRA's B, under a stateless SGD).
    model.get_layer("head").trainable = False
    compile_model(model, optimizer)
    return model


def compile_model(model, optimizer):
    optimizer = keras.optimizers.get(
        {"class_name": optimizer, "config": {"learning_rate": RATES[optimizer]}}
    )
    model.compile(optimizer, "mse")


def train(model, first, last):
    ids, targets, _, _ = data()
    for step in range(first, last):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        model.train_on_batch(ids[rows], targets[rows])


def state(model):
    layer = model.get_layer("tokens")
    return {w.name: np.asarray(keras.ops.convert_to_numpy(w)) for w in layer.weights}


def main(command, root, *savers):
    root = Path(root)
    if command == "train":
        out = root / BACKEND
        out.mkdir(parents=True, exist_ok=True)
        for case in CASES:
            model = model_of(case)
            train(model, 0, SAVE_AFTER)
            model.save(out / f"{case}.keras")
            train(model, SAVE_AFTER, STEPS)
            np.savez(out / f"{case}.npz", **state(model))
        return
    for saver in savers:
        out = root / saver / f"resumed_by_{BACKEND}"
        out.mkdir(parents=True, exist_ok=True)
        for case in RESUMABLE:
            # Compiled afresh: Keras saves a PyTorch model's optimizer as
            # PyTorch's class (module keras.src.backend.torch.optimizers),
            # which then fails to train under JAX or TensorFlow. A
            # row-sparse table keeps its own optimizer state in the layer.
            model = keras.saving.load_model(
                root / saver / f"{case}.keras", compile=False
            )
            compile_model(model, CASES[case][2])
            train(model, SAVE_AFTER, STEPS)
            np.savez(out / f"{case}.npz", **state(model))


if __name__ == "__main__":
    main(*sys.argv[1:])
