"""Language models: ReversibleEmbedding and a keras-hub model, run by `make demo`.

(a) A tiny next-token model whose token embedding also projects its hidden
    states back onto the vocabulary (`layer(h, reverse=True)`), trained, then
    quantized to int8 with its logits checked against Keras's layer.
(b) A keras-hub GPT-2 (built from its constructor arguments, nothing
    downloaded) upgraded in one call with `replace_embeddings`: the same
    logits and generated tokens, LoRA on the token embedding through
    keras-hub's own `enable_lora`, and int8 with `Model.quantize`.

Runs on whichever backend Keras is configured for, e.g.
`KERAS_BACKEND=torch python examples/language_model.py`.
"""

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import ReversibleEmbedding, replace_embeddings

VOCAB, DIM, LENGTH = 500, 32, 12


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def max_abs_diff(a, b):
    a = ops.convert_to_numpy(ops.cast(a, "float32"))
    b = ops.convert_to_numpy(ops.cast(b, "float32"))
    return float(np.abs(a - b).max())


def next_token_data(rng, count):
    """Sequences that count up by a fixed step: each token predicts the next."""
    starts = rng.integers(0, VOCAB, size=(count, 1))
    steps = rng.integers(1, 4, size=(count, 1))
    tokens = (starts + steps * np.arange(LENGTH + 1)) % VOCAB
    return tokens[:, :-1].astype("int32"), tokens[:, 1:].astype("int32")


def tied_language_model():
    section("(a) one table for the input ids and the output logits")
    inputs = keras.Input((LENGTH,), dtype="int32")
    tokens = ReversibleEmbedding(VOCAB, DIM, name="tokens")
    hidden = keras.layers.Dense(DIM, activation="gelu")(tokens(inputs))
    logits = tokens(hidden, reverse=True)
    model = keras.Model(inputs, logits)
    print(f"ids {tuple(inputs.shape)} -> logits {tuple(logits.shape)}")
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = next_token_data(np.random.default_rng(0), 2048)
    history = model.fit(x, y, batch_size=64, epochs=4, verbose=0)
    losses = [round(v, 3) for v in history.history["loss"]]
    print("next-token loss per epoch:", losses)
    print(f"next-token accuracy: {history.history['accuracy'][-1]:.2f}")

    # The same table, int8, on our layer and on Keras's: Keras's numerics
    # (hidden states quantized per token, an exact integer product), without
    # its int8 copy of the whole table.
    hidden_states = np.random.default_rng(1).normal(size=(4, DIM)).astype("float32")
    keras_layer = keras.layers.ReversibleEmbedding(VOCAB, DIM)
    keras_layer.build()
    keras_layer.embeddings.assign(tokens.embeddings)
    float_logits = tokens(hidden_states, reverse=True)
    tokens.quantize("int8")
    keras_layer.quantize("int8")
    ours, theirs = (
        tokens(hidden_states, reverse=True),
        keras_layer(hidden_states, reverse=True),
    )
    print("weights after quantize('int8'):", [w.name for w in tokens.weights])
    print(
        f"int8 logits, ours vs Keras's: max abs difference {max_abs_diff(ours, theirs)}"
    )
    diff = max_abs_diff(ours, float_logits)
    print(f"int8 logits vs float logits: max abs difference {diff:.4f}")


def keras_hub_gpt2():
    section("(b) a keras-hub GPT-2, upgraded in one call")
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=32,
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    prompt = {
        "token_ids": np.array([[5, 17, 42, 7] + [0] * 8]),
        "padding_mask": np.array([[True] * 4 + [False] * 8]),
    }
    logits_before = causal_lm(prompt)
    tokens_before = causal_lm.generate(prompt, stop_token_ids=None)["token_ids"]

    replace_embeddings(causal_lm)
    token_embedding = causal_lm.backbone.token_embedding
    print("token embedding:", type(token_embedding).__module__)
    diff = max_abs_diff(causal_lm(prompt), logits_before)
    print(f"logits, Keras's layers vs ours: max abs difference {diff:.1e}")
    tokens_after = causal_lm.generate(prompt, stop_token_ids=None)["token_ids"]
    print("generated tokens:", tokens_after[0].tolist())
    print("same tokens as before:", bool(np.array_equal(tokens_before, tokens_after)))

    # LoRA on the token embedding through keras-hub's own API.
    backbone.enable_lora(4, target_layer_names=["token_embedding"])
    print("trainable:", [w.name for w in causal_lm.trainable_weights])
    table_before = ops.convert_to_numpy(token_embedding._embeddings)
    x, y = next_token_data(np.random.default_rng(2), 256)
    causal_lm.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )
    history = causal_lm.fit(
        {"token_ids": x, "padding_mask": np.ones_like(x, dtype=bool)},
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
    )
    print(
        "LoRA fine-tuning loss per epoch:",
        [round(v, 3) for v in history.history["loss"]],
    )
    unchanged = np.array_equal(
        table_before, ops.convert_to_numpy(token_embedding._embeddings)
    )
    print("token table unchanged by training:", unchanged)

    with warnings.catch_warnings():
        # Model.quantize warns about each layer it cannot quantize.
        warnings.simplefilter("ignore")
        causal_lm.quantize("int8")
    print("token embedding dtype policy:", token_embedding.dtype_policy.name)
    tokens_int8 = causal_lm.generate(prompt, stop_token_ids=None)["token_ids"]
    print("int8 model generates:", tokens_int8[0].tolist())


def main():
    keras.utils.set_random_seed(0)
    print(f"Keras {keras.__version__}, backend: {keras.config.backend()}")
    tied_language_model()
    keras_hub_gpt2()


if __name__ == "__main__":
    main()
