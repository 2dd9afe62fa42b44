"""The layer's own outputs, saved under one backend and reloaded under each.

    python layer_outputs.py save DIR            # writes DIR/<backend>/<case>.keras,
                                                # .weights.h5, the saver's outputs
    python layer_outputs.py load DIR SAVER...   # for each SAVER, writes
                                                # DIR/<saver>/loaded_by_<backend>/

Each model is `Input -> Embedding -> output`, so what is compared is the rows
and the mask the layer gives, with nothing after it to round differently per
backend. The `reversible_*` cases are `Input -> ReversibleEmbedding ->
the same layer with reverse=True`: their output is the logits of the
looked-up rows, which read both tables. Outputs are written as float32
(exact for bfloat16 rows).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import Embedding, ReversibleEmbedding

BACKEND = keras.config.backend()
VOCAB, DIM = 50, 12
IDS = np.array([[3, 17, 49, 0, 0], [1, 1, 2, 25, 7]], dtype="int32")
# (constructor arguments, quantization (mode, int4 block size), LoRA rank)
CASES = {
    "plain": ({}, None, None),
    "mask_zero": ({"mask_zero": True}, None, None),
    "lora": ({"mask_zero": True}, None, 4),
    "mixed_bfloat16": ({"dtype": "mixed_bfloat16"}, None, None),
    "int8": ({}, ("int8", None), None),
    "int4": ({"mask_zero": True}, ("int4", 4), None),
    "int4_lora": ({}, ("int4", None), 2),
    "reversible_untied": ({"tie_weights": False, "logit_soft_cap": 5.0}, None, None),
    "reversible_lora": ({}, None, 2),
    "reversible_int8_untied": ({"tie_weights": False}, ("int8", None), None),
    "reversible_int4_untied": ({"tie_weights": False}, ("int4", 4), None),
    "reversible_int4_lora": ({}, ("int4", None), 2),
}


def make_model(case, quantized_policy=None):
    kwargs, _, lora_rank = CASES[case]
    kwargs = dict(kwargs)
    if quantized_policy:
        kwargs["dtype"] = quantized_policy
    if lora_rank and quantized_policy:
        # Built quantized, LoRA comes from the constructor (a float layer
        # gets it after its table is set, see load()).
        kwargs["lora_rank"] = lora_rank
        kwargs["lora_alpha"] = 2.0 * lora_rank
    inputs = keras.Input((None,), dtype="int32")
    if case.startswith("reversible"):
        layer = ReversibleEmbedding(VOCAB, DIM, name="tokens", **kwargs)
        outputs = layer(layer(inputs), reverse=True)
    else:
        outputs = Embedding(VOCAB, DIM, name="tokens", **kwargs)(inputs)
    return keras.Model(inputs, outputs)


def saved_model(case):
    """The saver's model: random table, quantized, LoRA with random B."""
    _, quantization, lora_rank = CASES[case]
    model = make_model(case)
    layer = model.get_layer("tokens")
    rng = np.random.default_rng(sorted(CASES).index(case))
    layer.embeddings.assign(rng.normal(size=(VOCAB, DIM)).astype("float32"))
    if getattr(layer, "tie_weights", True) is False:
        layer.reverse_embeddings.assign(rng.normal(size=(DIM, VOCAB)).astype("float32"))
    if quantization:
        mode, block_size = quantization
        config = None
        if mode == "int4":
            config = keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        layer.quantize(mode, config=config)
    if lora_rank:
        layer.enable_lora(lora_rank, lora_alpha=2.0 * lora_rank)
        layer.lora_embeddings_b.assign(
            rng.normal(size=(lora_rank, DIM)).astype("float32")
        )
    return model


def write(directory, name, model):
    directory.mkdir(parents=True, exist_ok=True)
    # One predict: each batch shape compiles its own program on JAX and
    # TensorFlow. Its rows are saved as float32 (exact for bfloat16 rows),
    # with the dtype predict gave them.
    predicted = np.asarray(model.predict(IDS, verbose=0))
    np.save(directory / f"{name}_rows.npy", predicted.astype("float32"))
    mask = model.get_layer("tokens").compute_mask(ops.convert_to_tensor(IDS))
    if mask is not None:
        np.save(directory / f"{name}_mask.npy", ops.convert_to_numpy(mask))
    layer = model.get_layer("tokens")
    facts = {
        "dtype_policy": layer.dtype_policy.name,
        "lora_enabled": layer.lora_enabled,
        "output_dtype": keras.backend.standardize_dtype(predicted.dtype),
    }
    (directory / f"{name}_facts.json").write_text(json.dumps(facts))


def save(root):
    out = root / BACKEND
    out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        model = saved_model(case)
        model.save(out / f"{case}.keras")
        model.save_weights(out / f"{case}.weights.h5")
        (out / f"{case}_policy.txt").write_text(
            model.get_layer("tokens").dtype_policy.name
        )
        write(out / "reference", case, model)


def load(root, *savers):
    for saver in savers:
        saved = root / saver
        out = saved / f"loaded_by_{BACKEND}"
        for case in CASES:
            loaded = keras.saving.load_model(saved / f"{case}.keras")
            write(out, f"{case}_keras", loaded)
            policy = (saved / f"{case}_policy.txt").read_text()
            quantized = policy if CASES[case][1] else None
            fresh = make_model(case, quantized_policy=quantized)
            if CASES[case][2] and not quantized:
                fresh.get_layer("tokens").enable_lora(
                    CASES[case][2], lora_alpha=2.0 * CASES[case][2]
                )
            fresh.load_weights(saved / f"{case}.weights.h5")
            write(out, f"{case}_weights", fresh)


if __name__ == "__main__":
    command, root, savers = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    {"save": save, "load": load}[command](root, *savers)
    print(f"{command} under {BACKEND}: ok")
