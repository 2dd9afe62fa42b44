"""`make demo` runs the examples; each must work on every backend."""

import re

import pytest
from processes import BACKENDS, ROOT, needs_keras_hub_on_this_keras, run_under

QUICKSTART = ROOT / "examples" / "quickstart.py"
MOVIELENS = ROOT / "examples" / "movielens.py"
TWEETS = ROOT / "examples" / "tweets.py"
LANGUAGE_MODEL = ROOT / "examples" / "language_model.py"


@pytest.mark.parametrize("backend", BACKENDS)
def test_quickstart_runs(backend):
    assert QUICKSTART.is_file(), f"{QUICKSTART} is missing"
    output = run_under(backend, QUICKSTART, timeout=300)  # asserts exit code 0
    assert "(32, 10, 64)" in output
    assert f"backend: {backend}" in output
    assert "InvalidIdError: Layer 'tokens' received an invalid id 1000" in output
    assert "base table unchanged by training: True" in output
    assert "predictions, original vs reloaded: max abs difference 0.0" in output
    assert "dtype policy int4/128_from_float32" in output
    # The model really runs the int4 table after quantizing (a difference of
    # 0.0 here would mean a traced predict kept reading the float table), and
    # saving it loses nothing.
    (int4,) = re.findall(
        r"float vs int4 table: max abs difference (\d\.\d+)$", output, re.M
    )
    assert 1e-3 < float(int4) < 0.05
    assert "int4 model saved and reloaded: max abs difference 0.0\n" in output


@needs_keras_hub_on_this_keras  # the example ends with a keras-hub GPT-2
@pytest.mark.parametrize("backend", BACKENDS)
def test_language_model_example(backend):
    output = run_under(backend, LANGUAGE_MODEL, timeout=300)
    assert f"backend: {backend}" in output
    assert "ids (None, 12) -> logits (None, 12, 500)" in output
    (losses,) = re.findall(r"^next-token loss per epoch: \[(.*)\]$", output, re.M)
    losses = [float(loss) for loss in losses.split(", ")]
    assert losses[-1] < losses[0] - 1.0
    assert "int8 logits, ours vs Keras's: max abs difference 0.0\n" in output
    (int8,) = re.findall(
        r"int8 logits vs float logits: max abs difference (\S+)$", output, re.M
    )
    assert 1e-3 < float(int8) < 0.2  # the int8 table really runs
    assert "token embedding: keras_ext_embedding.reversible_embedding" in output
    (diff,) = re.findall(
        r"logits, Keras's layers vs ours: max abs difference (\S+)$", output, re.M
    )
    assert float(diff) < 1e-5
    assert "same tokens as before: True" in output
    assert "trainable: ['lora_embeddings_a', 'lora_embeddings_b']" in output
    (lora,) = re.findall(r"^LoRA fine-tuning loss per epoch: \[(.*)\]$", output, re.M)
    lora = [float(loss) for loss in lora.split(", ")]
    assert lora[-1] < lora[0]
    assert "token table unchanged by training: True" in output
    assert "token embedding dtype policy: int8_from_float32" in output


def rmse_of(output, row):
    (value,) = re.findall(rf"^  {re.escape(row)} +(\d\.\d+)$", output, re.M)
    return float(value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_movielens_recommender_beats_its_baselines(backend):
    # Longer than the others: four trainings, two of them with row-sparse
    # tables, which PyTorch steps eagerly (40 s on a quiet 2-core machine,
    # up to 390 s on a busy one).
    output = run_under(backend, MOVIELENS, timeout=600)
    assert "100,004 ratings, 671 users, 9,066 movies" in output
    assert "Epoch 4/4" in output  # Keras's progress lines
    older = rmse_of(output, "mean + user and movie biases, older ratings")
    everything = rmse_of(output, "mean + user and movie biases, older + recent")
    factorization = rmse_of(output, "Embedding factorization, older ratings")
    finetuned = rmse_of(output, "+ LoRA fine-tuning on the recent ratings")
    row_sparse = rmse_of(output, "Embedding factorization, row-sparse Adagrad")
    # Row-sparse factor tables (their own Adagrad, no L2) still learn
    # something the biases do not.
    assert row_sparse < older
    # Users as the bag of their rated movies (one SharedEmbedding table for
    # the history and the candidate, row-sparse) learn more than the biases.
    history = rmse_of(output, "SharedEmbedding history bag, row-sparse Adagrad")
    assert history < older - 0.005
    # The baseline is exact arithmetic: the same on every backend.
    assert (older, everything) == (0.9139, 0.8949)
    assert factorization < older
    assert finetuned < min(factorization, everything)
    assert "trainable parameters instead of 321,321" in output
    assert "saved and reloaded: max abs difference 0.0" in output


@pytest.mark.parametrize("backend", BACKENDS)
def test_tweets_classifier_beats_the_majority_class(backend):
    output = run_under(backend, TWEETS, timeout=300)
    assert "20,761 tweets, 16,609 to train and 4,152 to test" in output
    assert "Epoch 3/3" in output
    (majority,) = re.findall(
        r"^  always 'Twitter Web Client'  (\d\.\d+)$", output, re.M
    )
    (accuracy,) = re.findall(
        r"^  Embedding\(mask_zero=True\) -> GRU  (\d\.\d+)$", output, re.M
    )
    assert float(majority) == 0.5157
    assert float(accuracy) > float(majority) + 0.15
    # mask_zero reaches the GRU: trailing padding changes nothing.
    assert "8 more padding ids: predictions moved by at most 0.0e+00" in output
