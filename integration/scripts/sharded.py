"""Trains one small model on 1 device and under keras.distribution, on JAX.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        KERAS_BACKEND=jax python sharded.py OUT.json

For each case (a float table, the table with LoRA, an int8 table with LoRA,
and a language-model head: a `ReversibleEmbedding` whose logits are the
model's output, untied and tied with LoRA),
the same model from the same initial weights takes the same SGD steps three
times: on one device, under `DataParallel` over 8 devices, and under
`ModelParallel` on a (2, 4) mesh whose "model" axis shards the table and
LoRA's `A` by rows, and an untied `reverse_embeddings` by vocabulary columns
(`keras_ext_embedding.shard_embeddings`). Writes the
largest differences of the final weights and predictions from the
single-device run, which variables trained, how each table variable was laid
out, and the row a traced lookup gives an invalid id.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import keras
import numpy as np

from keras_ext_embedding import (
    Embedding,
    EmbeddingBag,
    ReversibleEmbedding,
    shard_embeddings,
)

VOCAB, DIM, LENGTH, BATCH, STEPS = 64, 16, 6, 16, 4
CASES = {
    "float": {},
    "lora": {"lora_rank": 4},
    "int8_lora": {"quantize": "int8", "lora_rank": 4},
    "reversible_untied": {"reversible": True, "tie_weights": False},
    "reversible_lora": {"reversible": True, "lora_rank": 4},
    # Bags of the ids (padding 0 left out), pooled in the sharded lookup.
    "bag_mean": {"bag": "mean"},
    "bag_max_lora": {"bag": "max", "lora_rank": 4},
}


def data(case):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(STEPS * BATCH, LENGTH)).astype("int32")
    width = VOCAB if CASES[case].get("reversible") else 4
    targets = rng.normal(size=(STEPS * BATCH, width)).astype("float32")
    return ids, targets


def make_model(case):
    kwargs = dict(CASES[case])
    mode = kwargs.pop("quantize", None)
    lora_rank = kwargs.pop("lora_rank", None)
    inputs = keras.Input((LENGTH,), dtype="int32")
    combiner = kwargs.pop("bag", None)
    if combiner is not None:
        layer = EmbeddingBag(
            VOCAB, DIM, combiner=combiner, mask_zero=True, name="tokens"
        )
        outputs = keras.layers.Dense(4, name="head")(layer(inputs))
    elif kwargs.pop("reversible", False):
        # The logits of the last position, projected by the same layer.
        layer = ReversibleEmbedding(VOCAB, DIM, name="tokens", **kwargs)
        x = keras.layers.Dense(DIM, name="hidden")(layer(inputs))
        outputs = layer(x[:, -1], reverse=True)
    else:
        layer = Embedding(VOCAB, DIM, name="tokens")
        x = keras.layers.GlobalAveragePooling1D()(layer(inputs))
        outputs = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    for variable in model.weights:
        variable.assign(rng.normal(scale=0.3, size=variable.shape).astype("float32"))
    if mode:
        layer.quantize(mode)
    if lora_rank:
        layer.enable_lora(lora_rank)
        layer.lora_embeddings_a.assign(
            rng.normal(size=(VOCAB, lora_rank)).astype("float32")
        )
        layer.lora_embeddings_b.assign(
            rng.normal(scale=0.1, size=(lora_rank, DIM)).astype("float32")
        )
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def run(case, distribution):
    keras.distribution.set_distribution(distribution)
    try:
        model = make_model(case)
        initial = {
            v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights
        }
        ids, targets = data(case)
        model.fit(ids, targets, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        weights = {
            v.path: np.asarray(keras.ops.convert_to_numpy(v)) for v in model.weights
        }
        predictions = np.asarray(model.predict(ids, batch_size=BATCH, verbose=0))
        layouts = {
            v.path: str(getattr(v.value.sharding, "spec", "single device"))
            for v in model.weights
            if v.path.startswith("tokens/")
        }
        # A lookup with an invalid id, traced: zeros, also when sharded (a
        # bag drops the id: its vector is the bag's without it, whose
        # difference is reported).
        bad = ids[:BATCH].copy()
        bad[0, 0] = VOCAB
        layer = model.get_layer("tokens")
        lookup = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x)[0])
        state = (
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
        )
        rows = np.asarray(lookup(*state, bad))
        if "bag" in CASES[case]:
            without = bad.copy()
            without[0, 0] = 0  # the padding id
            rows = rows - np.asarray(lookup(*state, without))
            rows = rows[:, None]
        trained = sorted(
            k for k in weights if not np.array_equal(weights[k], initial[k])
        )
        return weights, predictions, layouts, float(np.abs(rows[0, 0]).max()), trained
    finally:
        keras.distribution.set_distribution(None)


def main(out):
    devices = keras.distribution.list_devices()
    assert len(devices) == 8, devices
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    layout_map = shard_embeddings(keras.distribution.LayoutMap(mesh), "tokens")
    distributions = {
        "data_parallel": keras.distribution.DataParallel(devices=devices),
        "model_parallel": keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        ),
    }
    report = {"devices": len(devices)}
    for case in CASES:
        single = run(case, None)
        report[case] = {"single": {"invalid_row": single[3], "trained": single[4]}}
        for name, distribution in distributions.items():
            weights, predictions, layouts, invalid, trained = run(case, distribution)
            report[case][name] = {
                "weights_max_diff": max(
                    float(np.abs(weights[k].astype("float64") - single[0][k]).max())
                    for k in single[0]
                ),
                "trained": trained,
                "predictions_max_diff": float(np.abs(predictions - single[1]).max()),
                "layouts": layouts,
                "invalid_row": invalid,
            }
    with open(out, "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
