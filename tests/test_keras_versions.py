"""Files saved under one Keras version load under another.

`tests/data/keras_versions/<keras version>/` holds a `.keras` file of a small
model for each table format of our layers, and the outputs the saving process
computed (`outputs.npz`), written under that Keras by

    KERAS_BACKEND=jax python tests/test_keras_versions.py

(the pinned Keras from `.venv`, a 3.16 nightly from `.venv-nightly`). Every
run loads all of them, whatever Keras is installed: each must give its saved
outputs. A file saved again here holds the entries each of them holds, so
each of those Keras versions loads what this one writes.
"""

import json
import pathlib
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest
from keras import ops

from keras_ext_embedding import Embedding, ReversibleEmbedding

DATA = pathlib.Path(__file__).resolve().parent / "data" / "keras_versions"
VERSIONS = sorted(path.name for path in DATA.iterdir() if path.is_dir())
VOCAB, DIM = 20, 8
IDS = np.array([[1, 2, 3, 0], [7, 7, 19, 4]], dtype="int32")
CASES = (
    "float-lora",
    "int8",
    "int4-per-row",
    "int4-block4-lora",
    "reversible-untied-int4-block4",
    "reversible-tied-int8",
)


def quantize(layer, case):
    if "int8" in case:
        layer.quantize("int8")
    elif "int4" in case:
        block_size = -1 if "per-row" in case else 4
        layer.quantize(
            "int4",
            config=keras.quantizers.Int4QuantizationConfig(block_size=block_size),
        )


def make_model(case):
    """A model of one of our layers in `case`'s format, with random values."""
    rng = np.random.default_rng(CASES.index(case))
    ids = keras.Input((IDS.shape[1],), dtype="int32")
    if case.startswith("reversible"):
        tie = "untied" not in case
        layer = ReversibleEmbedding(VOCAB, DIM, tie_weights=tie, name="tokens")
        outputs = layer(layer(ids), reverse=True)
    else:
        layer = Embedding(VOCAB, DIM, name="tokens")
        outputs = layer(ids)
    model = keras.Model(ids, outputs)
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    quantize(layer, case)
    if "lora" in case:
        layer.enable_lora(2, lora_alpha=6.0)
        for variable in (layer.lora_embeddings_a, layer.lora_embeddings_b):
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def write(directory):
    """Saves every case's model and outputs under the installed Keras."""
    directory.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for case in CASES:
        model = make_model(case)
        model.save(directory / f"{case}.keras")
        outputs[case] = ops.convert_to_numpy(model(IDS))
    np.savez(directory / "outputs.npz", **outputs)


def weight_entries(path):
    """`{dataset path: array}` of the weights inside a `.keras` file."""
    entries = {}

    def collect(name, item):
        if isinstance(item, h5py.Dataset):
            entries[name] = item[()]

    with (
        zipfile.ZipFile(path) as archive,
        archive.open("model.weights.h5") as file,
        h5py.File(file, "r") as weights,
    ):
        weights.visititems(collect)
    return entries


def layer_config(path):
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    (layer,) = [
        layer for layer in config["config"]["layers"] if layer["name"] == "tokens"
    ]
    return layer["config"]


def test_files_of_each_pinned_and_nightly_keras_are_here():
    assert len(VERSIONS) >= 2, VERSIONS
    for version in VERSIONS:
        names = {path.name for path in (DATA / version).iterdir()}
        assert names == {f"{case}.keras" for case in CASES} | {"outputs.npz"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("version", VERSIONS)
def test_file_saved_under_each_keras_loads_with_its_outputs(version, case):
    path = DATA / version / f"{case}.keras"
    model = keras.saving.load_model(path)
    layer = model.get_layer("tokens")
    assert type(layer) is (
        ReversibleEmbedding if case.startswith("reversible") else Embedding
    )
    expected = np.load(DATA / version / "outputs.npz")[case]
    # Written under JAX; lookups give the same bits on every backend, logits
    # (a sum over DIM products) the same within float32 rounding.
    np.testing.assert_allclose(
        ops.convert_to_numpy(model(IDS)), expected, rtol=1e-6, atol=1e-6
    )
    if case != "float-lora":
        assert keras.backend.standardize_dtype(layer._embeddings.dtype) == "int8"
    assert layer.lora_enabled == ("lora" in case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("version", VERSIONS)
def test_file_saved_here_holds_what_each_keras_wrote(version, case, tmp_path):
    """Loaded and saved again under the installed Keras, a file holds the same
    weight entries (names, dtypes, values) and the same layer config as the
    one that Keras version wrote, which that version loads."""
    path = DATA / version / f"{case}.keras"
    keras.saving.load_model(path).save(tmp_path / "again.keras")
    theirs, ours = weight_entries(path), weight_entries(tmp_path / "again.keras")
    assert list(ours) == list(theirs)
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype, name
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    ours_config = layer_config(tmp_path / "again.keras")
    theirs_config = layer_config(path)
    # The base layer's keys are Keras's own (it reads its older files); the
    # layer's own keys must be the same.
    base = set(keras.layers.Layer(name="tokens").get_config())
    for key in set(ours_config) | set(theirs_config):
        if key not in base:
            assert ours_config.get(key) == theirs_config.get(key), key


if __name__ == "__main__":
    write(DATA / keras.version())
    sys.exit(0)
