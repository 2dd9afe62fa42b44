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
from quantization_reference import comparable_dtype

import keras_ext_embedding

KERAS_TESTS = pathlib.Path(keras.__file__).parent / "src" / "layers" / "core"
FILES = {
    "embedding_test.py": "Keras",
    "reversible_embedding_test.py": "Keras",
}
# keras's release wheels ship their tests; keras-nightly's wheel and sdist do
# not, so `make unit KERAS=nightly` has none of them to run.
WITHOUT_KERAS_TESTS = pytest.mark.skipif(
    not all((KERAS_TESTS / filename).is_file() for filename in FILES),
    reason=f"Keras {keras.__version__} is installed without its tests "
    f"({', '.join(FILES)} are not in {KERAS_TESTS})",
)

# `{test id: reason}`, or `{test id: (reason, backends)}` for a deviation
# on some backends only; a test id is `Class.method` (absl's parameterized
# names included, e.g. `EmbeddingTest.test_quantize_int`).
TRACED_COUNTER = (
    "one more non-trainable variable: the counter of invalid ids met by "
    "traced lookups (`layer.traced_invalid_ids`), state that JAX's "
    "`stateless_call` must carry so that compiled fit/evaluate can report "
    "them; `layer.weights` and checkpoints are Keras's (PyTorch reads every "
    "id on the host and has no counter)",
    ("tensorflow", "jax"),
)
DEVIATIONS = {
    "EmbeddingTest.test_quantize_by_setting_dtype_policy_int8": TRACED_COUNTER,
    "EmbeddingTest.test_quantize_by_setting_dtype_policy_int4": TRACED_COUNTER,
    **{
        "ReversibleEmbeddingTest.test_quantize_dtype_argument_"
        f"{mode}_{ties}_weights": TRACED_COUNTER
        for mode in ("int8", "int4")
        for ties in ("tie", "untie")
    },
    **{
        f"EmbeddingTest.test_quantize_lora_integration_{mode}": (
            "its TensorFlow-only export step calls the model eagerly on "
            "`tf.random.normal` floats as ids: ours raises `InvalidIdError` "
            "for ids that are not whole numbers, where Keras truncates them "
            "(and wraps the negative ones to the last rows)",
            ("tensorflow",),
        )
        for mode in ("int8", "int4")
    },
}


def _deviation(test_id):
    """The reason `test_id` deviates on this backend, or None."""
    entry = DEVIATIONS.get(test_id)
    if isinstance(entry, tuple):
        reason, backends = entry
        return reason if keras.config.backend() in backends else None
    return entry


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
            for test_id in DEVIATIONS:
                class_name, _, method = test_id.partition(".")
                reason = _deviation(test_id)
                if class_name == name and hasattr(value, method) and reason:
                    mark = pytest.mark.xfail(strict=True, reason=reason)
                    setattr(value, method, mark(getattr(value, method)))
    return classes


for _filename, _prefix in FILES.items():
    if (KERAS_TESTS / _filename).is_file():
        globals().update(_load(_filename, _prefix))


@WITHOUT_KERAS_TESTS
def test_the_swap_reaches_keras_tests():
    """The Keras tests above construct our classes, not Keras's."""
    module = sys.modules["keras_contract_embedding_test"]
    assert module.layers.Embedding is keras_ext_embedding.Embedding
    module = sys.modules["keras_contract_reversible_embedding_test"]
    assert module.layers.ReversibleEmbedding is keras_ext_embedding.ReversibleEmbedding
    assert module.layers.Dense is keras.layers.Dense


@WITHOUT_KERAS_TESTS
@pytest.mark.parametrize("test_id", sorted(DEVIATIONS))
def test_each_deviation_names_a_keras_test(test_id):
    class_name, _, method = test_id.partition(".")
    cls = globals()["Keras" + class_name]
    assert hasattr(cls, method), f"{test_id} is no longer one of Keras's tests"


# --- Keras's attributes, as a rule ---------------------------------------------------

STATES = {
    "float": lambda layer: None,
    "lora": lambda layer: layer.enable_lora(4),
    "int8": lambda layer: layer.quantize("int8"),
    "int8_lora": lambda layer: (layer.quantize("int8"), layer.enable_lora(2)),
    "int4_grouped": lambda layer: layer.quantize("int4"),
    "int4_per_row": lambda layer: layer.quantize(
        "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=None)
    ),
    "int4_minus_one": lambda layer: layer.quantize(
        "int4", config=keras.quantizers.Int4QuantizationConfig(block_size=-1)
    ),
    "int4_policy": lambda layer: setattr(layer, "dtype_policy", "int4_from_float32"),
    "int4_64_policy_built": None,  # built from the policy: see `_in_state`
}
# Attributes whose value may differ, with the reason.
OWN_VALUES = {
    # Our call takes `training` (row-sparse training steps only then).
    "_call_has_training_arg",
}
LAYERS = {
    "Embedding": {},
    "ReversibleEmbedding": {},
    "ReversibleEmbedding_untied": {"tie_weights": False},
}


def _in_state(module, kind, state):
    """A built layer of `module` (keras.layers or keras_ext_embedding) of
    `kind` (a key of LAYERS) in `state` (a key of STATES)."""
    cls = getattr(module, kind.partition("_")[0])
    kwargs = dict(LAYERS[kind], name="layer")
    if state == "int4_64_policy_built":
        layer = cls(20, 16, dtype="int4/64_from_float32", **kwargs)
        layer.build()
        return layer
    layer = cls(20, 16, **kwargs)
    layer.build()
    STATES[state](layer)
    return layer


def _plain(value):
    return value is None or isinstance(value, (bool, int, float, str, tuple))


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_attribute_of_keras_layer_is_ours_with_its_value(kind, state):
    """Whatever Keras's layer holds in a state (`vars()`: what its own code,
    tests and users' tools read, private names included), ours holds too,
    with the same value where the value is plain data; its variables have
    the same names, shapes and dtypes."""
    theirs = _in_state(keras.layers, kind, state)
    ours = _in_state(keras_ext_embedding, kind, state)
    missing = sorted(name for name in vars(theirs) if not hasattr(ours, name))
    assert not missing, f"missing on ours: {missing}"
    differ = {
        name: (value, getattr(ours, name))
        for name, value in vars(theirs).items()
        if _plain(value)
        and name not in OWN_VALUES
        and not isinstance(getattr(ours, name), keras.Variable)
        and getattr(ours, name) != value
    }
    assert not differ, f"(Keras's, ours): {differ}"

    def described(variables):
        # comparable_dtype: Keras 3.16 stores an untied int4 table's reverse
        # zero points as int8, ours as float32 (our checkpoint format).
        return [(v.name, tuple(v.shape), comparable_dtype(v)) for v in variables]

    assert described(ours.weights) == described(theirs.weights)
    counter = ours._traced_invalid_ids
    # The one intended difference of `variables` (DEVIATIONS): the counter,
    # on the backends that trace lookups.
    assert (counter is None) == (keras.config.backend() == "torch")
    assert described(
        v for v in ours.variables if counter is None or v is not counter.variable
    ) == described(theirs.variables)
