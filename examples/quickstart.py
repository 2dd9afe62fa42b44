"""A tour of keras_ext_embedding.Embedding, run by `make demo`.

Runs on whichever backend Keras is configured for; pick one with the
environment variable, e.g. `KERAS_BACKEND=jax python examples/quickstart.py`
(tensorflow, jax or torch). Everything is synthetic: no downloads, fixed seeds.
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from keras import ops

import keras_ext_embedding
from keras_ext_embedding import Embedding, InvalidIdError


def section(title):
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def parameter_count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


def table_variable(layer):
    """The layer's own table variable (`layer.embeddings` is merged with LoRA)."""
    return next(w for w in layer.weights if w.name == "embeddings")


def max_abs_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def format_losses(history):
    return ", ".join(f"{loss:.4f}" for loss in history.history["loss"])


def seed_example():
    section("(a) A drop-in keras.layers.Embedding")
    model = keras.Sequential()
    model.add(Embedding(1000, 64))
    # The model takes an integer matrix of size (batch, input_length); the
    # largest id must be below 1000 (the vocabulary size).
    input_array = np.random.randint(1000, size=(32, 10))
    model.compile("rmsprop", "mse")
    output_array = model.predict(input_array, verbose=0)
    print(f"ids of shape {input_array.shape} -> vectors of shape {output_array.shape}")


def masking_into_lstm():
    section("(b) mask_zero=True: padding is invisible to an LSTM")
    inputs = keras.Input((None,), dtype="int32")
    tokens = Embedding(100, 8, mask_zero=True)
    encoder = keras.Model(inputs, keras.layers.LSTM(4)(tokens(inputs)))
    padded = np.array([[12, 7, 42, 0, 0]])
    unpadded = padded[:, :3]
    mask = ops.convert_to_numpy(tokens.compute_mask(padded))
    print("ids: ", padded[0].tolist())
    print("mask:", mask[0].tolist())
    with_padding = encoder.predict(padded, verbose=0)
    without_padding = encoder.predict(unpadded, verbose=0)
    print("LSTM output, padded:  ", np.round(with_padding[0], 5))
    print("LSTM output, unpadded:", np.round(without_padding[0], 5))
    diff = max_abs_diff(with_padding, without_padding)
    print(f"padded vs unpadded: max abs difference {diff}")


def invalid_ids():
    section("(c) Invalid ids: a clear error, or zeros if you ask for them")
    layer = Embedding(1000, 4, name="tokens")
    try:
        layer(np.array([[5, 1000]]))
    except InvalidIdError as error:
        print(f"{type(error).__name__}: {error}")

    zeros = Embedding(1000, 4, invalid_ids="zeros")
    ids = np.array([5, 1000, -1])
    print(f"invalid_ids='zeros', ids {ids.tolist()}:")
    print(np.round(ops.convert_to_numpy(zeros(ids)), 4))


def lora_fine_tuning():
    section("(d) LoRA fine-tuning of a trained vocabulary")
    vocab, length = 2000, 12
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, size=(1024, length))
    # Pre-training task: does a sequence hold more low ids than high ones?
    pretrain_labels = ((ids < vocab // 2).mean(axis=1) > 0.5).astype("float32")
    # Fine-tuning task, a different one: more even ids than odd ones?
    finetune_labels = ((ids % 2 == 0).mean(axis=1) > 0.5).astype("float32")

    inputs = keras.Input((length,), dtype="int32")
    tokens = Embedding(vocab, 32, name="tokens")
    x = keras.layers.GlobalAveragePooling1D()(tokens(inputs))
    outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    classifier = keras.Model(inputs, outputs)
    classifier.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    history = classifier.fit(ids, pretrain_labels, epochs=3, batch_size=64, verbose=0)
    print("pre-training losses:", format_losses(history))

    def report(when):
        trainable = parameter_count(classifier.trainable_weights)
        total = parameter_count(classifier.weights)
        print(f"{when + ':':<19} {trainable:>6,} trainable of {total:,} parameters")

    report("before enable_lora")
    tokens.enable_lora(rank=4, lora_alpha=8)
    report("after enable_lora")
    print("trainable in 'tokens':", [w.name for w in tokens.trainable_weights])

    table_before = ops.convert_to_numpy(table_variable(tokens)).copy()
    classifier.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    history = classifier.fit(ids, finetune_labels, epochs=5, batch_size=64, verbose=0)
    print("fine-tuning with LoRA, loss per epoch:", format_losses(history))
    table_after = ops.convert_to_numpy(table_variable(tokens))
    unchanged = np.array_equal(table_before, table_after)
    print("base table unchanged by training:", unchanged)
    return classifier, ids


def merge(classifier, ids, directory):
    section("(e) merge_lora() for deployment")
    # Keep a fine-tuning checkpoint first: it stores the adapters unmerged.
    checkpoint = os.path.join(directory, "finetuned.keras")
    classifier.save(checkpoint)
    before = classifier.predict(ids, verbose=0)
    tokens = classifier.get_layer("tokens")
    tokens.merge_lora()
    # The trainable variables changed: recompile for a fresh optimizer.
    classifier.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
    after = classifier.predict(ids, verbose=0)
    print("weights of 'tokens' after merge:", [w.name for w in tokens.weights])
    diff = max_abs_diff(before, after)
    print(f"predictions before vs after merge: max abs difference {diff}")
    return checkpoint, before


def save_and_reload(classifier, ids, checkpoint, finetuned_predictions, directory):
    section("(f) Saving to .keras and reloading (no custom_objects)")
    path = os.path.join(directory, "deployed.keras")
    classifier.save(path)
    # Serving needs no optimizer state: compile=False skips restoring it.
    deployed = keras.saving.load_model(path, compile=False)
    diff = max_abs_diff(
        classifier.predict(ids, verbose=0), deployed.predict(ids, verbose=0)
    )
    print(f"merged model saved to {os.path.basename(path)} and reloaded")
    print(f"predictions, original vs reloaded: max abs difference {diff}")

    # The checkpoint saved before merging reloads with its adapters, ready to
    # resume fine-tuning.
    finetuned = keras.saving.load_model(checkpoint)
    tokens = finetuned.get_layer("tokens")
    diff = max_abs_diff(finetuned_predictions, finetuned.predict(ids, verbose=0))
    print(
        f"fine-tuning checkpoint {os.path.basename(checkpoint)} reloaded: "
        f"lora_rank={tokens.lora_rank}, lora_alpha={tokens.lora_alpha}, "
        f"trainable {[w.name for w in tokens.trainable_weights]}"
    )
    print(f"predictions, before merge vs reloaded: max abs difference {diff}")


def quantize_for_serving(classifier, ids, directory):
    section("(g) int4 quantization: a smaller table, the same lookups")
    tokens = classifier.get_layer("tokens")
    float_bytes = variable_bytes(tokens)
    before = classifier.predict(ids, verbose=0)
    # Keras's default int4: a scale and a zero point per group of 128 values.
    # Model.quantize, not tokens.quantize: besides quantizing the layer it
    # drops the model's traced predict and train functions, so the next
    # predict runs the int4 lookup and the float table is freed. (A layer's
    # own quantize keeps an already traced predict right too, through a
    # float copy of the int4 table; training after either needs a compile.)
    # `filters` picks the layer by name and keeps the Dense head in float.
    classifier.quantize("int4", filters="tokens")
    print(
        f"'tokens' quantized: dtype policy {tokens.dtype_policy.name}, "
        f"variables {[w.name for w in tokens.weights]}"
    )
    print(
        f"table bytes: {float_bytes:,} float32 -> {variable_bytes(tokens):,} "
        f"int4 ({float_bytes / variable_bytes(tokens):.1f}x smaller)"
    )
    after = classifier.predict(ids, verbose=0)
    diff = max_abs_diff(before, after)
    print(f"predictions, float vs int4 table: max abs difference {diff:.4f}")
    path = os.path.join(directory, "int4.keras")
    classifier.save(path)
    reloaded = keras.saving.load_model(path, compile=False)
    diff = max_abs_diff(after, reloaded.predict(ids, verbose=0))
    print(f"int4 model saved and reloaded: max abs difference {diff}")


def variable_bytes(layer):
    return sum(
        int(np.prod(w.shape))
        * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
        for w in layer.weights
    )


def main():
    keras.utils.set_random_seed(0)
    print(
        f"keras_ext_embedding {keras_ext_embedding.__version__}, Keras "
        f"{keras.__version__}, backend: {keras.config.backend()}"
    )
    seed_example()
    masking_into_lstm()
    invalid_ids()
    classifier, ids = lora_fine_tuning()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint, finetuned_predictions = merge(classifier, ids, directory)
        save_and_reload(classifier, ids, checkpoint, finetuned_predictions, directory)
        quantize_for_serving(classifier, ids, directory)


if __name__ == "__main__":
    main()
