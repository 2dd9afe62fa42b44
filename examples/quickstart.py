"""A tour of keras_ext_embedding.Embedding, run by `make demo`.

Set KERAS_BACKEND (tensorflow, jax or torch) before running to pick a backend.
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import keras_ext_embedding
from keras_ext_embedding import Embedding, InvalidIdError


def section(title):
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)))


def count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


keras.utils.set_random_seed(0)
print(
    f"keras_ext_embedding {keras_ext_embedding.__version__} on Keras "
    f"{keras.__version__}, backend: {keras.config.backend()}"
)

section("1. A drop-in keras.layers.Embedding")
model = keras.Sequential([Embedding(1000, 64)])
model.compile("rmsprop", "mse")
input_array = np.random.randint(1000, size=(32, 10))
output_array = model.predict(input_array, verbose=0)
print("ids of shape", input_array.shape, "-> vectors of shape", output_array.shape)

section("2. Masking padded sequences into an LSTM")
inputs = keras.Input((None,), dtype="int32")
embedded = Embedding(100, 8, mask_zero=True)(inputs)
encoder = keras.Model(inputs, keras.layers.LSTM(4)(embedded))
padded = np.array([[12, 7, 42, 0, 0]])
print("ids: ", padded[0].tolist())
print("mask:", (padded[0] != 0).tolist())
difference = np.abs(
    encoder.predict(padded, verbose=0) - encoder.predict(padded[:, :3], verbose=0)
)
print(f"LSTM output, padded vs unpadded: max abs difference {difference.max():.1e}")

section("3. Invalid ids get a clear error, the same on every backend")
layer = Embedding(1000, 4, name="tokens")
try:
    layer(np.array([[5, 1000]]))
except InvalidIdError as error:
    print("InvalidIdError:", error)
zeros = Embedding(1000, 4, invalid_ids="zeros")
print("invalid_ids='zeros' on ids [5, 1000, -1]:")
print(np.round(keras.ops.convert_to_numpy(zeros(np.array([5, 1000, -1]))), 4))

section("4. LoRA fine-tuning of a frozen vocabulary")
vocab, length = 5000, 12
rng = np.random.default_rng(0)
ids = rng.integers(1, vocab, size=(512, length))
# A toy target: does the sequence contain more low ids than high ids?
labels = ((ids < vocab // 2).mean(axis=1) > 0.5).astype("float32")
inputs = keras.Input((length,), dtype="int32")
tokens = Embedding(vocab, 32, name="tokens")
x = keras.layers.GlobalAveragePooling1D()(tokens(inputs))
classifier = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
print(f"before LoRA: {count(classifier.trainable_weights):,} trainable parameters")

tokens.enable_lora(rank=4, lora_alpha=8)
print(
    f"after enable_lora(rank=4): {count(classifier.trainable_weights):,} trainable"
    f" of {count(classifier.weights):,} parameters"
)
table_before = keras.ops.convert_to_numpy(tokens.non_trainable_weights[0]).copy()
classifier.compile(keras.optimizers.Adam(0.01), "binary_crossentropy")
history = classifier.fit(ids, labels, epochs=6, batch_size=64, verbose=0)
losses = ", ".join(f"{loss:.4f}" for loss in history.history["loss"])
print(f"loss per epoch: {losses}")
table_after = keras.ops.convert_to_numpy(tokens.non_trainable_weights[0])
print("base table unchanged by training:", np.array_equal(table_before, table_after))

section("5. Saving keeps the adapters; reloading needs no custom_objects")
with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "classifier.keras")
    classifier.save(path)
    reloaded = keras.saving.load_model(path)
    difference = np.abs(
        classifier.predict(ids, verbose=0) - reloaded.predict(ids, verbose=0)
    ).max()
    lora = reloaded.get_layer("tokens")
    print(f"reloaded: lora_rank={lora.lora_rank}, lora_alpha={lora.lora_alpha}")
    print(f"predictions, original vs reloaded: max abs difference {difference}")

section("6. merge_lora() for deployment")
before = classifier.predict(ids, verbose=0)
tokens.merge_lora()
after = classifier.predict(ids, verbose=0)
print("weights after merge:", [w.name for w in tokens.weights])
difference = np.abs(before - after).max()
print(f"predictions before vs after merge: max abs difference {difference:.1e}")
