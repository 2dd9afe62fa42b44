"""keras-hub Gemma and Llama, sharded with their own layout maps, upgraded.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        KERAS_BACKEND=jax python sharded_keras_hub.py OUT.json

Each tiny model (built from constructor arguments: nothing downloads) is
built on one device, and its greedy `generate` recorded. Then, under
`ModelParallel` with the backbone's own `get_layout_map` on a (2, 4) mesh
("batch", "model"), the same weights are built sharded, `replace_embeddings`
upgrades the token embedding, and `generate` runs again. keras-hub's map
has a rule for `token_embedding/embeddings` only (rows over "model", columns
over "batch"): Llama's untied `reverse_embeddings` has none, and with ours it
follows the table. Writes the layer's class, every one of its variables'
sharding specs, and whether the generated tokens match.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import keras_hub
import numpy as np
from sharded_variables import spec

from keras_ext_embedding import replace_embeddings

VOCAB, HIDDEN = 512, 32
rng = np.random.default_rng(1234)
PROMPT_MASK = np.zeros((2, 10), "int32")
PROMPT_MASK[0, :4] = PROMPT_MASK[1, :3] = 1
PROMPT_IDS = rng.integers(1, VOCAB, size=(2, 10)).astype("int32") * PROMPT_MASK


# Heads divisible by the 4 devices of "model", as keras-hub's maps shard them.
BACKBONE = dict(
    vocabulary_size=VOCAB,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=4,
    hidden_dim=HIDDEN,
    intermediate_dim=64,
)


def gemma():
    backbone = keras_hub.models.GemmaBackbone(**BACKBONE, head_dim=8)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def llama():
    # Untied: keras-hub's map has no rule for its `reverse_embeddings`.
    backbone = keras_hub.models.LlamaBackbone(**BACKBONE, tie_word_embeddings=False)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


MODELS = {"gemma": (gemma, keras_hub.models.GemmaBackbone)}
MODELS["llama"] = (llama, keras_hub.models.LlamaBackbone)


def generate(model):
    # Greedy (Llama's default samples at random).
    model.compile(sampler="greedy")
    outputs = model.generate(
        {"token_ids": PROMPT_IDS, "padding_mask": PROMPT_MASK}, stop_token_ids=None
    )
    return np.asarray(outputs["token_ids"])


def main(out):
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices)
    report = {}
    for name, (build, backbone_class) in MODELS.items():
        keras.utils.set_random_seed(0)
        single = build()
        weights = [np.asarray(keras.ops.convert_to_numpy(v)) for v in single.weights]
        single_tokens = generate(single)
        distribution = keras.distribution.ModelParallel(
            layout_map=backbone_class.get_layout_map(mesh),
            batch_dim_name="batch",
        )
        keras.distribution.set_distribution(distribution)
        try:
            model = build()
            model.set_weights(weights)
            stock_specs = {
                v.path: spec(v) for v in model.backbone.token_embedding.weights
            }
            replace_embeddings(model)
            layer = model.backbone.token_embedding
            report[name] = {
                "class": f"{type(layer).__module__}.{type(layer).__name__}",
                "stock_specs": stock_specs,
                "specs": {v.path: spec(v) for v in layer.weights},
                "same_tokens": bool(np.array_equal(generate(model), single_tokens)),
                "generated": int((single_tokens != PROMPT_IDS).sum()),
            }
        finally:
            keras.distribution.set_distribution(None)
    with open(out, "w") as file:
        json.dump(report, file, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
