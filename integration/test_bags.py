"""Bags across backends, in fresh processes: `.keras` files of EmbeddingBag
and SharedEmbedding models (float, int8, int4 with LoRA, row-sparse training
mid-way) saved under one backend and loaded and trained under another, and
keras-rs `EmbedReduce` models upgraded by `replace_embeddings`.

The `bags_everywhere` fixture holds what scripts/bags.py wrote (run by the
`saved_scripts` fixture, conftest.py): each backend saves, then each backend
loads what every backend saved.
"""

import itertools
import json

import numpy as np
import pytest
from processes import BACKENDS

PAIRS = list(itertools.product(BACKENDS, BACKENDS))
MODELS = (
    "mean",
    "max_int8",
    "sqrtn_int4_lora",
    "sum_adam",
    "shared_adagrad",
    "keras_rs",
)
CLASSES = {
    "shared_adagrad": "keras_ext_embedding.shared_embedding.SharedEmbedding",
}
BAG_CLASS = "keras_ext_embedding.embedding_bag.EmbeddingBag"


@pytest.fixture(scope="module")
def bags_everywhere(saved_scripts):
    return saved_scripts / "bags"


def load_npz(path):
    with np.load(path) as data:
        return dict(data)


@pytest.mark.parametrize(("saver", "loader"), PAIRS)
@pytest.mark.parametrize("name", MODELS)
def test_bag_model_reloads_and_trains_on_every_backend(
    bags_everywhere, saver, loader, name
):
    reference = bags_everywhere / saver / "reference"
    loaded = bags_everywhere / saver / f"loaded_by_{loader}"
    np.testing.assert_allclose(
        np.load(loaded / f"{name}_predictions.npy"),
        np.load(reference / f"{name}_predictions.npy"),
        atol=1e-6,
    )
    weights = load_npz(loaded / f"{name}_weights.npz")
    expected = load_npz(reference / f"{name}_weights.npz")
    assert sorted(weights) == sorted(expected)
    for key in expected:  # bit for bit: tables, adapters, row-sparse slots
        np.testing.assert_array_equal(weights[key], expected[key], err_msg=key)
    # One SGD step after reloading == the same step in the saving process
    # (a row-sparse table steps with its own optimizer, from its slots).
    after = load_npz(loaded / f"{name}_after_step.npz")
    expected_after = load_npz(reference / f"{name}_after_step.npz")
    for key in expected_after:
        np.testing.assert_allclose(
            after[key], expected_after[key], atol=1e-6, err_msg=key
        )
    table = next(key for key in expected if key.endswith("items.embeddings"))
    if name in ("mean", "sum_adam", "shared_adagrad", "keras_rs"):
        assert not np.array_equal(after[table], expected[table])
    else:  # quantized: frozen
        np.testing.assert_array_equal(after[table], expected[table])

    layer = json.loads((loaded / f"{name}_layer.json").read_text())
    saved_layer = json.loads((reference / f"{name}_layer.json").read_text())
    assert layer == saved_layer
    assert layer["class"] == CLASSES.get(name, BAG_CLASS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_rs_embed_reduce_upgrades_with_the_same_outputs(bags_everywhere, backend):
    saved = bags_everywhere / backend
    np.testing.assert_allclose(
        np.load(saved / "reference" / "keras_rs_predictions.npy"),
        np.load(saved / "keras_rs_before_upgrade.npy"),
        rtol=1e-6,
        atol=1e-6,
    )
    layer = json.loads((saved / "reference" / "keras_rs_layer.json").read_text())
    assert layer["class"] == BAG_CLASS
    assert layer["config"]["combiner"] == "sqrtn"


def test_row_sparse_rows_absent_from_the_batch_never_moved(bags_everywhere):
    """The padding row and the rows of ids no batch held keep their values
    through two steps before saving and one after."""
    for backend in BACKENDS:
        saved = bags_everywhere / backend / "reference"
        before = load_npz(saved / "sum_adam_weights.npz")
        after = load_npz(saved / "sum_adam_after_step.npz")
        table = next(key for key in before if key.endswith("items.embeddings"))
        absent = [0, 8, 10]  # padding, and ids in no bag
        np.testing.assert_array_equal(after[table][absent], before[table][absent])
        present = [1, 2, 3, 4, 5, 6, 7, 9, 11]
        assert (np.abs(after[table][present] - before[table][present]).sum(1) > 0).all()
