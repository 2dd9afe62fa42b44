"""Keras's own tests of its Embedding layers, run against ours.

The drop-in's contract: `keras/src/layers/core/embedding_test.py` and
`reversible_embedding_test.py` are read from the installed Keras (so a new
Keras brings its new tests), and their `layers.Embedding` and
`layers.ReversibleEmbedding` are ours; everything else they use is Keras's.
What we do differently on purpose is listed in `DEVIATIONS`, each with its
reason: those tests are expected to fail (strictly: one that starts passing
fails, and the entry goes). Every other test must pass, on every backend.
"""

import pathlib
import sys
import types

import keras
import pytest

import keras_ext_embedding

KERAS_TESTS = pathlib.Path(keras.__file__).parent / "src" / "layers" / "core"
FILES = {
    "embedding_test.py": "Keras",
    "reversible_embedding_test.py": "Keras",
}

# `{test id: reason}`; a test id is `Class.method` (absl's parameterized
# names included, e.g. `EmbeddingTest.test_quantize_int`).
DEVIATIONS = {}

# Keras runs these tests without turning warnings into errors (its training
# tests feed generators with `shuffle=True`, which warns): so do we here.
pytestmark = pytest.mark.filterwarnings("default")


class _OurLayers(types.ModuleType):
    """`keras.src.layers`, with Keras's two embedding classes swapped for
    ours."""

    def __init__(self):
        super().__init__("layers")
        from keras.src import layers

        self._keras = layers

    def __getattr__(self, name):
        if name in ("Embedding", "ReversibleEmbedding"):
            return getattr(keras_ext_embedding, name)
        return getattr(self._keras, name)


def _load(filename, prefix):
    path = KERAS_TESTS / filename
    module = types.ModuleType(f"keras_contract_{path.stem}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    module.layers = _OurLayers()
    classes = {}
    for name, value in vars(module).items():
        if isinstance(value, type) and name.endswith("Test"):
            classes[prefix + name] = value
    return classes


for _filename, _prefix in FILES.items():
    globals().update(_load(_filename, _prefix))


def test_the_swap_reaches_keras_tests():
    """The Keras tests above construct our classes, not Keras's."""
    module = sys.modules["keras_contract_embedding_test"]
    assert module.layers.Embedding is keras_ext_embedding.Embedding
    module = sys.modules["keras_contract_reversible_embedding_test"]
    assert module.layers.ReversibleEmbedding is keras_ext_embedding.ReversibleEmbedding
    assert module.layers.Dense is keras.layers.Dense


@pytest.mark.parametrize("test_id", sorted(DEVIATIONS))
def test_each_deviation_names_a_keras_test(test_id):
    class_name, _, method = test_id.partition(".")
    cls = globals()["Keras" + class_name]
    assert hasattr(cls, method), f"{test_id} is no longer one of Keras's tests"
