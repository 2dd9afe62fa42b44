"""Row-sparse training: `Embedding(..., optimizer=...)`.

Every training test replays the steps in float64 NumPy: the rows a batch
looked up, their gradients summed per id, Keras's SGD / Adagrad / Adam rule
applied to those rows only. Also: equality with dense training, invalid ids
and padding, LoRA, saving and resuming, config, refused options,
quantization and `ReversibleEmbedding`.

Helpers are local so this file depends only on the package and public Keras API.
"""

import json
import re
from dataclasses import dataclass, field

import h5py
import keras
import numpy as np
import pytest
from keras import ops
from layer_test_case import check_config_round_trip

from keras_ext_embedding import Embedding, ReversibleEmbedding

BACKEND = keras.config.backend()
VOCAB, DIM, LENGTH, BATCH, STEPS = 40, 4, 6, 4, 4
# Keras's defaults, which a string `optimizer` gets.
SGD_DEFAULTS = {"learning_rate": 0.01}
ADAGRAD_DEFAULTS = {
    "learning_rate": 0.001,
    "initial_accumulator_value": 0.1,
    "epsilon": 1e-7,
}
ADAM_DEFAULTS = {
    "learning_rate": 0.001,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-7,
}
SLOTS = {"sgd": (), "adagrad": ("accumulator",), "adam": ("momentum", "velocity")}
OPTIMIZER_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "adagrad": keras.optimizers.Adagrad,
    "adam": keras.optimizers.Adam,
}
# jit_compile only changes how TensorFlow runs the step.
JIT_COMPILE = [False, True] if BACKEND == "tensorflow" else ["auto"]


def decay():
    return keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=2, decay_rate=0.5
    )


def decayed(iteration):
    """`decay()` at `iteration`, as Keras evaluates it before the step."""
    return 0.1 * 0.5 ** (iteration / 2)


# --- A float64 NumPy reference of the rules. ---


@dataclass
class Rule:
    """A rule as the reference applies it: its name, hyperparameters and
    learning rate (a function of the step counter before the step)."""

    name: str
    hyper: dict = field(default_factory=dict)
    rate: object = None

    def __post_init__(self):
        defaults = {
            "sgd": SGD_DEFAULTS,
            "adagrad": ADAGRAD_DEFAULTS,
            "adam": ADAM_DEFAULTS,
        }[self.name]
        self.hyper = {**defaults, **self.hyper}
        if self.rate is None:
            rate = self.hyper["learning_rate"]
            self.rate = lambda iteration: rate

    def initial_slot(self, slot):
        if slot == "accumulator":
            return self.hyper["initial_accumulator_value"]
        return 0.0


class Replay:
    """One variable (the table, or LoRA's A) trained row-sparsely by `rule`:
    its values, slots and step counter in float64."""

    def __init__(self, rule, values):
        self.rule = rule
        self.values = np.asarray(values, dtype="float64").copy()
        self.slots = {
            slot: np.full_like(self.values, rule.initial_slot(slot))
            for slot in SLOTS[rule.name]
        }
        self.iteration = 0

    def step(self, ids, gradients, touched=None):
        """One step: `gradients[..., :]` is the gradient of the row looked
        up at each position of `ids`; `touched` (boolean, the shape of
        `ids`) marks the positions that may train their row."""
        ids = np.asarray(ids).reshape(-1)
        gradients = np.asarray(gradients, dtype="float64").reshape(ids.size, -1)
        if touched is not None:
            touched = np.asarray(touched).reshape(-1)
            ids, gradients = ids[touched], gradients[touched]
        summed = np.zeros_like(self.values)
        np.add.at(summed, ids, gradients)
        rows = np.unique(ids)
        g = summed[rows]
        hyper, lr = self.rule.hyper, self.rule.rate(self.iteration)
        w = self.values
        if self.rule.name == "sgd":
            w[rows] -= g * lr
        elif self.rule.name == "adagrad":
            acc = self.slots["accumulator"]
            acc[rows] += g**2
            w[rows] -= lr * g / np.sqrt(acc[rows] + hyper["epsilon"])
        else:
            m, v = self.slots["momentum"], self.slots["velocity"]
            b1, b2 = hyper["beta_1"], hyper["beta_2"]
            t = self.iteration + 1
            # As Keras: the powers of the betas cast to float32 (1 - 0.999**t
            # cancels, its float32 rounding shows), the moments' factors
            # 1 - beta in Python floats.
            b1_power, b2_power = np.float32(b1) ** t, np.float32(b2) ** t
            alpha = lr * np.sqrt(1 - b2_power) / (1 - b1_power)
            m[rows] += (g - m[rows]) * (1 - b1)
            v[rows] += (g**2 - v[rows]) * (1 - b2)
            w[rows] -= m[rows] * alpha / (np.sqrt(v[rows]) + hyper["epsilon"])
        self.iteration += 1


def mse_gradient(outputs, targets):
    """dLoss/dOutputs of Keras's "mse": a mean over the last axis, then over
    the batch and every other axis (sum_over_batch_size)."""
    return 2.0 * (outputs - targets) / outputs.size


# --- Helpers. ---


def raw(variable):
    """A variable's values in its own dtype, for bitwise comparisons."""
    return np.array(ops.convert_to_numpy(variable))


def weight(layer, name):
    matches = [w for w in layer.weights if w.name == name]
    assert len(matches) == 1, [w.name for w in layer.weights]
    return matches[0]


def names(variables):
    return [v.name for v in variables]


class DropMask(keras.layers.Layer):
    """Passes its input on without the mask, so that the loss counts the
    padding positions (and gives them a nonzero gradient)."""

    def call(self, inputs):
        # A new tensor: the input carries the mask as an attribute.
        return ops.multiply(inputs, 1.0)

    def compute_mask(self, inputs, mask=None):
        return None


def zipf_ids(rng, n=BATCH * STEPS, low=0, vocab=VOCAB):
    """Ids in [low, vocab), Zipf-like: many repeats, many rows never drawn."""
    return ((rng.zipf(1.5, size=(n, LENGTH)) - 1) % (vocab - low) + low).astype("int32")


def targets_like(rng, n=BATCH * STEPS, width=DIM):
    return rng.normal(size=(n, LENGTH, width)).astype("float32")


def random_table(rng, shape=(VOCAB, DIM), scale=0.3):
    return (rng.normal(size=shape) * scale).astype("float32")


def batches(ids, targets):
    for start in range(0, len(ids), BATCH):
        yield ids[start : start + BATCH], targets[start : start + BATCH]


def model_of(layer, model_optimizer=None, jit_compile="auto", head=()):
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), layer, *head])
    model.compile(
        optimizer=model_optimizer or keras.optimizers.SGD(0.0),
        loss="mse",
        jit_compile=jit_compile,
    )
    return model


def fit(model, ids, targets):
    model.fit(ids, targets, batch_size=BATCH, shuffle=False, epochs=1, verbose=0)


def replay_table(rule, table, ids, targets, valid=None, touched=None):
    """The reference of `fit` on an `Embedding` alone, batch by batch."""
    reference = Replay(rule, table)
    for start in range(0, len(ids), BATCH):
        batch = slice(start, start + BATCH)
        index = (
            np.where(valid[batch], ids[batch], 0) if valid is not None else ids[batch]
        )
        outputs = reference.values[index]
        if valid is not None:
            outputs = np.where(valid[batch][..., None], outputs, 0.0)
        gradient = mse_gradient(outputs, targets[batch])
        moves = valid if touched is None else touched
        reference.step(index, gradient, None if moves is None else moves[batch])
    return reference


def assert_trained_as(layer, reference, target="embeddings"):
    """The variable `target`, its slots and step counter match `reference`."""
    np.testing.assert_allclose(
        raw(weight(layer, target)), reference.values, rtol=1e-5, atol=1e-6
    )
    for slot, expected in reference.slots.items():
        # Velocities are ~1e-7: tolerate relative to each slot's scale.
        np.testing.assert_allclose(
            raw(weight(layer, f"{target}_{slot}")),
            expected,
            rtol=1e-5,
            atol=1e-5 * np.abs(expected).max(),
            err_msg=slot,
        )
    assert raw(weight(layer, f"{target}_iteration")) == reference.iteration


def assert_rows_untouched(layer, rule, initial, rows, target="embeddings"):
    """`rows` of `target` are bit for bit `initial`, their slots at their
    initial value."""
    assert len(rows) > 0
    np.testing.assert_array_equal(raw(weight(layer, target))[rows], initial[rows])
    for slot in SLOTS[rule.name]:
        values = raw(weight(layer, f"{target}_{slot}"))[rows]
        np.testing.assert_array_equal(
            values, np.full_like(values, rule.initial_slot(slot)), err_msg=slot
        )


def state(layer):
    """Every variable of the layer, by name."""
    return {w.name: raw(w) for w in layer.weights}


def assert_same_state(actual, expected, exact=True):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        if exact:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
        else:
            np.testing.assert_allclose(
                actual[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name
            )


# --- 1. fit against the NumPy replay. ---

CASES = {
    "sgd": (lambda: keras.optimizers.SGD(0.5), Rule("sgd", {"learning_rate": 0.5})),
    "sgd-string": (lambda: "SGD", Rule("sgd")),
    "sgd-decay": (
        lambda: keras.optimizers.SGD(learning_rate=decay()),
        Rule("sgd", rate=decayed),
    ),
    "adagrad-string": (lambda: "Adagrad", Rule("adagrad")),
    "adagrad-hyper": (
        lambda: keras.optimizers.Adagrad(
            0.2, initial_accumulator_value=0.3, epsilon=1e-3
        ),
        Rule(
            "adagrad",
            {"learning_rate": 0.2, "initial_accumulator_value": 0.3, "epsilon": 1e-3},
        ),
    ),
    "adagrad-decay": (
        lambda: keras.optimizers.Adagrad(learning_rate=decay()),
        Rule("adagrad", rate=decayed),
    ),
    "adam-string": (lambda: "adam", Rule("adam")),
    "adam-hyper": (
        lambda: keras.optimizers.Adam(0.05, beta_1=0.7, beta_2=0.9, epsilon=1e-3),
        Rule(
            "adam",
            {"learning_rate": 0.05, "beta_1": 0.7, "beta_2": 0.9, "epsilon": 1e-3},
        ),
    ),
    "adam-decay": (
        lambda: keras.optimizers.Adam(learning_rate=decay(), beta_1=0.8),
        Rule("adam", {"beta_1": 0.8}, rate=decayed),
    ),
}


@pytest.mark.parametrize("jit_compile", JIT_COMPILE, ids=lambda j: f"jit={j}")
@pytest.mark.parametrize("case", list(CASES))
def test_fit_matches_numpy_replay(case, jit_compile, rng):
    make_optimizer, rule = CASES[case]
    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)
    layer = Embedding(VOCAB, DIM, optimizer=make_optimizer(), name="tokens")
    model = model_of(layer, jit_compile=jit_compile)
    weight(layer, "embeddings").assign(table)

    fit(model, ids, targets)

    assert_trained_as(layer, replay_table(rule, table, ids, targets))
    assert_rows_untouched(layer, rule, table, np.setdiff1d(np.arange(VOCAB), ids))
    # Every looked-up row moved.
    looked_up = np.unique(ids)
    moved = np.any(raw(weight(layer, "embeddings")) != table, axis=1)
    np.testing.assert_array_equal(np.flatnonzero(moved), looked_up)


class AddBias(keras.layers.Layer):
    """`inputs + bias`: a variable the model's optimizer trains."""

    def build(self, input_shape):
        self.bias = self.add_weight(
            shape=(input_shape[-1],), initializer="zeros", name="bias"
        )

    def call(self, inputs):
        return inputs + self.bias


def test_model_optimizer_clipping_and_decay_do_not_reach_the_table(rng):
    """The model's SGD (learning rate, weight decay, global clipnorm) trains
    the bias alone: the table's stepped values are not clipped, decayed or
    counted in the global norm."""
    rate, decay_rate, clip = 0.5, 0.1, 1e-3
    ids, targets = zipf_ids(rng), targets_like(rng)
    table, bias = random_table(rng), random_table(rng, (DIM,))
    layer = Embedding(VOCAB, DIM, optimizer="adam", name="tokens")
    model = model_of(
        layer,
        keras.optimizers.SGD(rate, weight_decay=decay_rate, global_clipnorm=clip),
        head=[AddBias(name="head")],
    )
    assert names(model.trainable_weights) == [
        "embeddings",
        "embeddings_momentum",
        "embeddings_velocity",
        "embeddings_iteration",
        "bias",
    ]
    weight(layer, "embeddings").assign(table)
    model.get_layer("head").bias.assign(bias)

    fit(model, ids, targets)

    reference = Replay(Rule("adam"), table)
    bias_reference = bias.astype("float64")
    for batch_ids, batch_targets in batches(ids, targets):
        gradient = mse_gradient(
            reference.values[batch_ids] + bias_reference, batch_targets
        )
        bias_gradient = gradient.sum(axis=(0, 1))
        bias_gradient *= clip / max(np.linalg.norm(bias_gradient), clip)
        bias_reference = (
            bias_reference - rate * decay_rate * bias_reference - rate * bias_gradient
        )
        reference.step(batch_ids, gradient)
    assert_trained_as(layer, reference)
    np.testing.assert_allclose(
        raw(model.get_layer("head").bias), bias_reference, rtol=1e-5, atol=1e-7
    )


def test_frozen_layer_does_not_train(rng):
    ids, targets = zipf_ids(rng), targets_like(rng, width=2)
    layer = Embedding(VOCAB, DIM, optimizer="adam", name="tokens")
    layer.trainable = False
    model = model_of(
        layer, keras.optimizers.SGD(0.1), head=[keras.layers.Dense(2, name="head")]
    )
    assert names(model.trainable_weights) == ["kernel", "bias"]
    before = state(layer)
    fit(model, ids, targets)
    assert_same_state(state(layer), before)


def test_mixed_bfloat16_trains_float32_table_row_sparsely(rng):
    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)
    layer = Embedding(
        VOCAB, DIM, optimizer="sgd", dtype="mixed_bfloat16", name="tokens"
    )
    model = model_of(layer)
    assert [w.dtype for w in layer.weights] == ["float32", "float32"]
    weight(layer, "embeddings").assign(table)
    fit(model, ids, targets)
    assert raw(weight(layer, "embeddings_iteration")) == STEPS
    untouched = np.setdiff1d(np.arange(VOCAB), ids)
    np.testing.assert_array_equal(
        raw(weight(layer, "embeddings"))[untouched], table[untouched]
    )
    # bfloat16 outputs give gradients accurate to ~1e-2.
    delta = raw(weight(layer, "embeddings")) - table
    expected = replay_table(Rule("sgd"), table, ids, targets).values - table
    np.testing.assert_allclose(
        delta, expected, rtol=0.1, atol=0.1 * np.abs(expected).max()
    )


# --- 2. Against dense training by the model's optimizer. ---


@pytest.mark.parametrize("rule", ["sgd", "adagrad"])
def test_sgd_and_adagrad_equal_dense_training(rule, rng):
    make = {
        "sgd": lambda: keras.optimizers.SGD(0.5),
        "adagrad": lambda: keras.optimizers.Adagrad(
            0.2, initial_accumulator_value=0.3, epsilon=1e-3
        ),
    }[rule]
    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)

    sparse = Embedding(VOCAB, DIM, optimizer=make(), name="tokens")
    fit_model = model_of(sparse)
    weight(sparse, "embeddings").assign(table)
    fit(fit_model, ids, targets)

    dense = Embedding(VOCAB, DIM, name="tokens")
    dense_model = model_of(dense, make())
    weight(dense, "embeddings").assign(table)
    fit(dense_model, ids, targets)

    np.testing.assert_allclose(
        raw(weight(sparse, "embeddings")), raw(dense.embeddings), rtol=1e-6, atol=1e-6
    )
    if rule == "adagrad":
        (accumulator,) = [
            v for v in dense_model.optimizer.variables if tuple(v.shape) == (VOCAB, DIM)
        ]
        np.testing.assert_allclose(
            raw(weight(sparse, "embeddings_accumulator")),
            raw(accumulator),
            rtol=1e-6,
            atol=1e-6,
        )


def test_adam_is_lazy_unlike_dense_adam():
    """Step 1 (all moments zero) equals dense Adam; on step 2 the rows of
    step 1 that step 2 does not look up keep their values and moments under
    lazy Adam, while dense Adam moves them by their momentum."""
    rng = np.random.default_rng(1)
    first = np.array([[1, 2, 3, 4, 5, 6], [1, 1, 2, 7, 8, 9]], dtype="int32")
    second = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 12, 5, 13, 14]], dtype="int32")
    only_first = np.setdiff1d(first, second)
    table = random_table(rng)
    targets = [targets_like(rng, n=2) for _ in range(2)]

    sparse = Embedding(VOCAB, DIM, optimizer=keras.optimizers.Adam(0.01), name="t")
    sparse_model = model_of(sparse)
    dense = Embedding(VOCAB, DIM, name="t")
    dense_model = model_of(dense, keras.optimizers.Adam(0.01))
    for layer in (sparse, dense):
        weight(layer, "embeddings").assign(table)

    for step, ids in enumerate((first, second)):
        before = state(sparse)
        sparse_model.train_on_batch(ids, targets[step])
        dense_model.train_on_batch(ids, targets[step])
        sparse_table, dense_table = (
            raw(weight(sparse, "embeddings")),
            raw(dense.embeddings),
        )
        if step == 0:
            np.testing.assert_allclose(sparse_table, dense_table, rtol=1e-6, atol=1e-6)
            continue
        for name in ("embeddings", "embeddings_momentum", "embeddings_velocity"):
            np.testing.assert_array_equal(
                state(sparse)[name][only_first], before[name][only_first], err_msg=name
            )
        assert np.all(np.abs(dense_table[only_first] - sparse_table[only_first]) > 1e-5)
        # Every other row: the same step (the same bias correction at step 2).
        others = np.setdiff1d(np.arange(VOCAB), only_first)
        np.testing.assert_allclose(
            sparse_table[others], dense_table[others], rtol=1e-6, atol=1e-6
        )


# --- 3. Invalid ids and padding never train a row. ---


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_invalid_ids_never_train_row_zero(rule, rng):
    """Batch 1 looks up id 0 (so Adam's row 0 has momentum); the later
    batches hold -1 and VOCAB + 3, read from row 0 as zeros: row 0 and its
    slots stay as batch 1 left them."""
    ids = zipf_ids(rng, low=1)
    ids[:BATCH, 0] = 0
    ids[BATCH:, 1] = -1
    ids[BATCH::2, 3] = VOCAB + 3
    valid = (ids >= 0) & (ids < VOCAB)
    targets = targets_like(rng) + 1.0  # Nonzero at the invalid positions too.
    table = random_table(rng)
    layer = Embedding(
        VOCAB,
        DIM,
        optimizer=OPTIMIZER_CLASSES[rule](learning_rate=0.05),
        invalid_ids="zeros",
        name="tokens",
    )
    model = model_of(layer)
    weight(layer, "embeddings").assign(table)

    after_first = None
    for step, (batch_ids, batch_targets) in enumerate(batches(ids, targets)):
        model.train_on_batch(batch_ids, batch_targets)
        if step == 0:
            after_first = state(layer)

    reference = replay_table(
        Rule(rule, {"learning_rate": 0.05}), table, ids, targets, valid=valid
    )
    assert_trained_as(layer, reference)
    for name, values in after_first.items():
        if name != "embeddings_iteration":
            np.testing.assert_array_equal(
                state(layer)[name][0], values[0], err_msg=name
            )
    if rule == "adam":
        assert np.all(after_first["embeddings_momentum"][0] != 0)
    assert_rows_untouched(
        layer,
        Rule(rule),
        table,
        np.setdiff1d(np.arange(VOCAB), ids[valid]),
    )


def test_invalid_ids_only_leave_row_zero_and_its_moments_bit_identical(rng):
    """Id 0 is never valid. Adam's moments start nonzero everywhere (as
    after earlier training): a zero gradient would decay them and move the
    row, so row 0 stays put only if the invalid ids do not step it."""
    ids = zipf_ids(rng, low=1)
    ids[:, 2] = -1
    ids[::3, 4] = VOCAB + 3
    valid = (ids >= 0) & (ids < VOCAB)
    targets = targets_like(rng) + 1.0
    table = random_table(rng)
    momentum = random_table(rng, scale=0.01)
    velocity = np.square(random_table(rng, scale=0.01))
    layer = Embedding(VOCAB, DIM, optimizer="adam", invalid_ids="zeros", name="tokens")
    model = model_of(layer)
    for name, values in (
        ("embeddings", table),
        ("embeddings_momentum", momentum),
        ("embeddings_velocity", velocity),
    ):
        weight(layer, name).assign(values)

    fit(model, ids, targets)

    reference = Replay(Rule("adam"), table)
    reference.slots = {
        "momentum": momentum.astype("float64"),
        "velocity": velocity.astype("float64"),
    }
    for start in range(0, len(ids), BATCH):
        batch = slice(start, start + BATCH)
        index = np.where(valid[batch], ids[batch], 0)
        outputs = np.where(valid[batch][..., None], reference.values[index], 0.0)
        reference.step(
            index, mse_gradient(outputs, targets[batch]), touched=valid[batch]
        )
    assert_trained_as(layer, reference)
    untouched = np.setdiff1d(np.arange(VOCAB), ids[valid])
    assert 0 in untouched
    for name, values in (
        ("embeddings", table),
        ("embeddings_momentum", momentum),
        ("embeddings_velocity", velocity),
    ):
        np.testing.assert_array_equal(
            raw(weight(layer, name))[untouched], values[untouched], err_msg=name
        )


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "adam"])
def test_masked_padding_never_trains_row_zero(rule, rng):
    """With the mask dropped before the loss, the padding positions have a
    nonzero gradient; it must not reach row 0."""
    ids = zipf_ids(rng, low=1)
    ids[:, -2:] = 0
    ids[::2, 1] = 0
    targets = targets_like(rng) + 1.0
    table = random_table(rng)
    layer = Embedding(VOCAB, DIM, optimizer=rule, mask_zero=True, name="tokens")
    model = model_of(layer, head=[DropMask()])
    weight(layer, "embeddings").assign(table)

    reference = Replay(Rule(rule), table)
    for batch_ids, batch_targets in batches(ids, targets):
        outputs = reference.values[batch_ids]
        # The loss is the unmasked mse: the padding positions count.
        loss = model.train_on_batch(batch_ids, batch_targets)
        np.testing.assert_allclose(
            loss, np.mean((outputs - batch_targets) ** 2), rtol=1e-5
        )
        reference.step(
            batch_ids, mse_gradient(outputs, batch_targets), touched=batch_ids != 0
        )

    assert_trained_as(layer, reference)
    assert_rows_untouched(layer, Rule(rule), table, [0])
    assert_rows_untouched(layer, Rule(rule), table, np.setdiff1d(np.arange(VOCAB), ids))


# --- 4. LoRA: A trains row-sparsely, B with the model's optimizer. ---


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_lora_a_trains_row_sparsely_and_b_with_the_model(rule, rng):
    rank, alpha, rate_b = 2, 4.0, 0.3
    scale = alpha / rank
    ids, targets = zipf_ids(rng), targets_like(rng)
    layer = Embedding(
        VOCAB, DIM, lora_rank=rank, lora_alpha=alpha, optimizer=rule, name="tokens"
    )
    model = model_of(layer, keras.optimizers.SGD(rate_b))
    assert names(model.trainable_weights) == [
        "lora_embeddings_a",
        "lora_embeddings_b",
        *[f"lora_embeddings_a_{slot}" for slot in SLOTS[rule]],
        "lora_embeddings_a_iteration",
    ]
    table = random_table(rng)
    a = random_table(rng, (VOCAB, rank))
    b = random_table(rng, (rank, DIM))
    for name, values in (
        ("embeddings", table),
        ("lora_embeddings_a", a),
        ("lora_embeddings_b", b),
    ):
        weight(layer, name).assign(values)
    table_state = {k: v for k, v in state(layer).items() if k.startswith("embeddings")}

    fit(model, ids, targets)

    reference = Replay(Rule(rule), a)
    b_reference = b.astype("float64")
    for batch_ids, batch_targets in batches(ids, targets):
        a_rows = reference.values[batch_ids]
        outputs = table[batch_ids] + scale * a_rows @ b_reference
        gradient = mse_gradient(outputs, batch_targets)
        b_gradient = scale * np.einsum("blr,bld->rd", a_rows, gradient)
        reference.step(batch_ids, scale * gradient @ b_reference.T)
        b_reference = b_reference - rate_b * b_gradient

    assert_trained_as(layer, reference, target="lora_embeddings_a")
    np.testing.assert_allclose(
        raw(layer.lora_embeddings_b), b_reference, rtol=1e-5, atol=1e-6
    )
    assert not np.array_equal(raw(layer.lora_embeddings_b), b)
    # The frozen table and its state do not move.
    for name, values in table_state.items():
        np.testing.assert_array_equal(raw(weight(layer, name)), values, err_msg=name)
    untouched = np.setdiff1d(np.arange(VOCAB), ids)
    assert_rows_untouched(layer, Rule(rule), a, untouched, target="lora_embeddings_a")
    moved = np.any(raw(layer.lora_embeddings_a) != a, axis=1)
    np.testing.assert_array_equal(np.flatnonzero(moved), np.unique(ids))


def test_enable_and_merge_lora_move_the_row_sparse_state(rng):
    ids, targets = zipf_ids(rng, n=BATCH), targets_like(rng, n=BATCH)
    layer = Embedding(VOCAB, DIM, optimizer="adagrad", name="tokens")
    model = model_of(layer)
    fit(model, ids, targets)

    # The frozen table keeps no slots (two table-sized variables that would
    # never train, on every device of a sharded table); A gets its own.
    layer.enable_lora(2)
    assert names(layer.weights) == [
        "embeddings",
        "lora_embeddings_a",
        "lora_embeddings_b",
        "lora_embeddings_a_accumulator",
        "lora_embeddings_a_iteration",
    ]
    assert names(layer.trainable_weights) == [
        "lora_embeddings_a",
        "lora_embeddings_b",
        "lora_embeddings_a_accumulator",
        "lora_embeddings_a_iteration",
    ]
    assert names(layer.non_trainable_weights) == ["embeddings"]
    assert not weight(layer, "embeddings").overwrite_with_gradient
    assert not hasattr(layer, "embeddings_accumulator")
    np.testing.assert_array_equal(
        raw(weight(layer, "lora_embeddings_a_accumulator")),
        np.full((VOCAB, 2), 0.1, dtype="float32"),
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    fit(model, ids, targets)
    assert raw(weight(layer, "lora_embeddings_a_iteration")) == 1

    layer.merge_lora()
    assert names(layer.weights) == [
        "embeddings",
        "embeddings_accumulator",
        "embeddings_iteration",
    ]
    assert names(layer.trainable_weights) == names(layer.weights)
    # The merged table trains on from fresh slots and a step counter at 0.
    np.testing.assert_array_equal(
        raw(weight(layer, "embeddings_accumulator")),
        np.full((VOCAB, DIM), 0.1, dtype="float32"),
    )
    assert raw(weight(layer, "embeddings_iteration")) == 0
    merged = raw(weight(layer, "embeddings"))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    fit(model, ids, targets)
    assert raw(weight(layer, "embeddings_iteration")) == 1
    untouched = np.setdiff1d(np.arange(VOCAB), ids)
    np.testing.assert_array_equal(
        raw(weight(layer, "embeddings"))[untouched], merged[untouched]
    )
    assert not np.array_equal(raw(weight(layer, "embeddings")), merged)


# --- 5. Saving and resuming. ---


def trained_layer_model(optimizer, table, ids, targets, **kwargs):
    layer = Embedding(VOCAB, DIM, optimizer=optimizer, name="tokens", **kwargs)
    model = model_of(layer)
    weight(layer, "embeddings").assign(table)
    if len(ids):
        fit(model, ids, targets)
    return layer, model


def rule_of(config):
    """What a serialized optimizer trains with: its class, hyperparameters
    and learning rate (a schedule's own config), not its generated name."""
    options = {k: v for k, v in config["config"].items() if k != "name"}
    rate = options.pop("learning_rate")
    if isinstance(rate, dict):
        rate = (rate["class_name"], rate["config"])
    return config["class_name"], options, rate


def adam_with_decay():
    return keras.optimizers.Adam(learning_rate=decay(), beta_1=0.8)


@pytest.mark.parametrize("optimizer", ["adagrad", "adam-decay"])
def test_weights_file_resume_equals_uninterrupted(optimizer, tmp_path, rng):
    make = (lambda: "adagrad") if optimizer == "adagrad" else adam_with_decay
    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)
    half = 2 * BATCH
    uninterrupted, _ = trained_layer_model(make(), table, ids, targets)

    _, model = trained_layer_model(make(), table, ids[:half], targets[:half])
    path = tmp_path / "half.weights.h5"
    model.save_weights(path)
    resumed = Embedding(VOCAB, DIM, optimizer=make(), name="tokens")
    resumed_model = model_of(resumed)
    resumed_model.load_weights(path)
    assert raw(weight(resumed, "embeddings_iteration")) == 2
    fit(resumed_model, ids[half:], targets[half:])

    assert_same_state(state(resumed), state(uninterrupted), exact=False)
    assert raw(weight(resumed, "embeddings_iteration")) == STEPS


def test_keras_file_resume_equals_uninterrupted(tmp_path, rng):
    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)
    half = 2 * BATCH
    uninterrupted, _ = trained_layer_model(adam_with_decay(), table, ids, targets)

    _, model = trained_layer_model(adam_with_decay(), table, ids[:half], targets[:half])
    path = tmp_path / "half.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    resumed = loaded.get_layer("tokens")
    assert type(resumed) is Embedding
    assert rule_of(resumed.get_config()["optimizer"]) == rule_of(
        model.get_layer("tokens").optimizer
    )
    fit(loaded, ids[half:], targets[half:])

    assert_same_state(state(resumed), state(uninterrupted), exact=False)


def test_checkpoint_without_optimizer_gives_fresh_state_and_back(tmp_path, rng):
    ids, targets = zipf_ids(rng, n=BATCH), targets_like(rng, n=BATCH)
    table = random_table(rng)
    # A layer with trained slots, to see them reset by the load.
    with_state, with_model = trained_layer_model(
        keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.3),
        random_table(rng),
        ids,
        targets,
    )
    plain, plain_model = trained_layer_model(None, table, [], [])
    plain_path = tmp_path / "plain.weights.h5"
    plain_model.save_weights(plain_path)

    with_model.load_weights(plain_path)
    np.testing.assert_array_equal(raw(weight(with_state, "embeddings")), table)
    np.testing.assert_array_equal(
        raw(weight(with_state, "embeddings_accumulator")),
        np.full((VOCAB, DIM), 0.3, dtype="float32"),
    )
    assert raw(weight(with_state, "embeddings_iteration")) == 0

    fit(with_model, ids, targets)
    trained_path = tmp_path / "trained.weights.h5"
    with_model.save_weights(trained_path)
    plain_model.load_weights(trained_path)
    assert names(plain.weights) == ["embeddings"]
    np.testing.assert_array_equal(
        raw(plain.embeddings), raw(weight(with_state, "embeddings"))
    )


def test_keras_embedding_checkpoint_loads_with_fresh_state(tmp_path, rng):
    table = random_table(rng)
    keras_model = keras.Sequential(
        [
            keras.Input((LENGTH,), dtype="int32"),
            keras.layers.Embedding(VOCAB, DIM, name="tokens"),
        ]
    )
    keras_model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    keras_model.get_layer("tokens").embeddings.assign(table)
    path = tmp_path / "keras.weights.h5"
    keras_model.save_weights(path)

    layer = Embedding(VOCAB, DIM, optimizer="adam", name="tokens")
    model = model_of(layer)
    model.load_weights(path)
    assert_fresh_adam_state(layer, table)


def test_store_layout_names_the_slots(rng):
    layer, _ = trained_layer_model("adam", random_table(rng), [], [])
    store = {}
    layer.save_own_variables(store)
    assert list(store) == [
        "0",
        "embeddings_momentum",
        "embeddings_velocity",
        "embeddings_iteration",
    ]


def test_checkpoint_of_another_optimizer_warns_and_starts_afresh(tmp_path, rng):
    ids, targets = zipf_ids(rng, n=BATCH), targets_like(rng, n=BATCH)
    _, adagrad_model = trained_layer_model("adagrad", random_table(rng), ids, targets)
    path = tmp_path / "adagrad.weights.h5"
    adagrad_model.save_weights(path)
    with h5py.File(path, "r") as f:
        assert sorted(f["layers/embedding/vars"].keys()) == [
            "0",
            "embeddings_accumulator",
            "embeddings_iteration",
        ]
        saved_table = f["layers/embedding/vars/0"][()]

    adam, adam_model = trained_layer_model("adam", random_table(rng), ids, targets)
    message = (
        "Layer 'tokens': the checkpoint holds embeddings_iteration but not "
        "embeddings_momentum, embeddings_velocity: it was saved with another "
        "`optimizer`. The row-sparse optimizer state starts afresh."
    )
    with pytest.warns(UserWarning, match=re.escape(message)):
        adam_model.load_weights(path)
    assert_fresh_adam_state(adam, saved_table)


def assert_fresh_adam_state(layer, table):
    """The layer holds `table` and Adam slots as a fresh layer has them."""
    np.testing.assert_array_equal(raw(weight(layer, "embeddings")), table)
    for name in ("embeddings_momentum", "embeddings_velocity"):
        np.testing.assert_array_equal(
            raw(weight(layer, name)), np.zeros((VOCAB, DIM), "float32")
        )
    assert raw(weight(layer, "embeddings_iteration")) == 0


def test_partial_slot_store_warns(rng):
    ids, targets = zipf_ids(rng, n=BATCH), targets_like(rng, n=BATCH)
    layer, _ = trained_layer_model("adam", random_table(rng), ids, targets)
    assert np.any(raw(weight(layer, "embeddings_momentum")) != 0)
    table = random_table(rng)
    store = {"0": table, "embeddings_momentum": np.ones((VOCAB, DIM), "float32")}
    message = (
        "Layer 'tokens': the checkpoint holds embeddings_momentum but not "
        "embeddings_velocity, embeddings_iteration: it was saved with another "
        "`optimizer`. The row-sparse optimizer state starts afresh."
    )
    with pytest.warns(UserWarning, match=re.escape(message)):
        layer.load_own_variables(store)
    assert_fresh_adam_state(layer, table)


def test_slot_shape_mismatch_is_refused_and_layer_unchanged(rng):
    layer, _ = trained_layer_model("adagrad", random_table(rng), [], [])
    before = state(layer)
    store = {
        "0": random_table(rng),
        "embeddings_accumulator": np.ones((3, DIM), "float32"),
        "embeddings_iteration": np.array(5.0, "float32"),
    }
    message = (
        "Layer 'tokens' cannot load embeddings_accumulator of shape (3, 4) from "
        "the checkpoint: the layer expects (40, 4). The checkpoint belongs to "
        "a layer of another shape."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        layer.load_own_variables(store)
    assert_same_state(state(layer), before)


def test_lora_slots_round_trip_through_the_store(rng):
    ids, targets = zipf_ids(rng, n=BATCH), targets_like(rng, n=BATCH)
    layer, _ = trained_layer_model("adam", random_table(rng), ids, targets, lora_rank=2)
    store = {}
    layer.save_own_variables(store)
    # The frozen table has no slots: A's alone are stored.
    assert [key for key in store if not key.isdigit()] == [
        "lora_embeddings_a_momentum",
        "lora_embeddings_a_velocity",
        "lora_embeddings_a_iteration",
    ]
    other = Embedding(VOCAB, DIM, optimizer="adam", lora_rank=2, name="tokens")
    other.build()
    other.load_own_variables(store)
    assert_same_state(state(other), state(layer))
    assert raw(weight(other, "lora_embeddings_a_iteration")) == 1


# --- 6. Config. ---


def test_string_optimizer_config_round_trip():
    layer = Embedding(VOCAB, DIM, optimizer="AdaGrad", name="tokens")
    config = layer.get_config()
    assert config["optimizer"] == "adagrad"
    check_config_round_trip(layer)
    assert Embedding.from_config(config).optimizer == "adagrad"


def test_optimizer_instance_config_round_trip_trains_identically(rng):
    layer = Embedding(VOCAB, DIM, optimizer=adam_with_decay(), name="tokens")
    config = layer.get_config()
    text = json.dumps(config, sort_keys=True)  # Plain JSON.
    serialized = config["optimizer"]
    assert serialized["class_name"] == "Adam"
    assert serialized["config"]["beta_1"] == 0.8
    assert serialized["config"]["learning_rate"]["class_name"] == "ExponentialDecay"
    # From copies of the config: `from_config` on the dict itself changes it
    # (see test_from_config_leaves_the_layers_config_unchanged).
    rebuilt = Embedding.from_config(json.loads(text))
    assert json.dumps(rebuilt.get_config(), sort_keys=True) == text
    revived = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(layer)))
    )
    assert type(revived) is Embedding
    assert json.dumps(revived.get_config(), sort_keys=True) == text

    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)
    results = []
    for each in (layer, rebuilt):
        model = model_of(each)
        weight(each, "embeddings").assign(table)
        fit(model, ids, targets)
        results.append(state(each))
    assert_same_state(results[1], results[0])
    # And it is the decayed lazy Adam of the reference.
    assert_trained_as(
        rebuilt,
        replay_table(Rule("adam", {"beta_1": 0.8}, rate=decayed), table, ids, targets),
    )


def test_from_config_leaves_the_layers_config_unchanged():
    layer = Embedding(VOCAB, DIM, optimizer=adam_with_decay(), name="tokens")
    text = json.dumps(layer.get_config(), sort_keys=True)
    check_config_round_trip(layer)
    assert json.dumps(layer.get_config(), sort_keys=True) == text


def test_default_config_has_no_optimizer_and_loads_into_keras_embedding():
    config = Embedding(VOCAB, DIM, name="tokens").get_config()
    assert "optimizer" not in config
    keras_layer = keras.layers.Embedding.from_config(config)
    assert (keras_layer.input_dim, keras_layer.output_dim) == (VOCAB, DIM)


# --- 7. Refused options. ---


def option_error(option, value, advice):
    return (
        f"Layer 'tokens': the table's optimizer cannot honour `{option}={value}` "
        "(a row-sparse update steps only the looked-up rows). Leave "
        f"`{option}` at its default: {advice}."
    )


MOMENTUM = "use optimizer='adam' for a rule with momentum"
CLIP = "clip the gradients of the model's other weights"

REFUSED = {
    "regularizer": (
        lambda: Embedding(
            VOCAB, DIM, optimizer="sgd", embeddings_regularizer="l2", name="tokens"
        ),
        "Layer 'tokens': `embeddings_regularizer` cannot be combined with "
        "`optimizer=` (the table is stepped row by row by its own optimizer). "
        "Remove `embeddings_regularizer`, or pass optimizer=None to train the "
        "table densely with the model's optimizer.",
    ),
    "constraint": (
        lambda: Embedding(
            VOCAB, DIM, optimizer="sgd", embeddings_constraint="non_neg", name="tokens"
        ),
        "Layer 'tokens': `embeddings_constraint` cannot be combined with "
        "`optimizer=` (the table is stepped row by row by its own optimizer). "
        "Remove `embeddings_constraint`, or pass optimizer=None to train the "
        "table densely with the model's optimizer.",
    ),
    "rmsprop-string": (
        lambda: Embedding(VOCAB, DIM, optimizer="rmsprop", name="tokens"),
        "Layer 'tokens': `optimizer` must be None (train the table with the "
        "model's optimizer), one of 'sgd', 'adagrad', 'adam', or a "
        "`keras.optimizers.SGD`, `Adagrad` or `Adam` instance. Received: "
        "optimizer='rmsprop'.",
    ),
    "sgd-momentum": (
        lambda: Embedding(
            VOCAB, DIM, optimizer=keras.optimizers.SGD(momentum=0.9), name="tokens"
        ),
        option_error("momentum", 0.9, MOMENTUM),
    ),
    "sgd-nesterov": (
        lambda: Embedding(
            VOCAB, DIM, optimizer=keras.optimizers.SGD(nesterov=True), name="tokens"
        ),
        option_error("nesterov", True, MOMENTUM),
    ),
    "adam-amsgrad": (
        lambda: Embedding(
            VOCAB, DIM, optimizer=keras.optimizers.Adam(amsgrad=True), name="tokens"
        ),
        option_error("amsgrad", True, "use plain (lazy) Adam"),
    ),
    "weight-decay": (
        lambda: Embedding(
            VOCAB,
            DIM,
            optimizer=keras.optimizers.Adam(weight_decay=0.01),
            name="tokens",
        ),
        option_error(
            "weight_decay", 0.01, "regularize the model's other weights instead"
        ),
    ),
    "clipnorm": (
        lambda: Embedding(
            VOCAB, DIM, optimizer=keras.optimizers.SGD(clipnorm=1.0), name="tokens"
        ),
        option_error("clipnorm", 1.0, CLIP),
    ),
    "clipvalue": (
        lambda: Embedding(
            VOCAB, DIM, optimizer=keras.optimizers.Adagrad(clipvalue=0.5), name="tokens"
        ),
        option_error("clipvalue", 0.5, CLIP),
    ),
    "global-clipnorm": (
        lambda: Embedding(
            VOCAB,
            DIM,
            optimizer=keras.optimizers.Adam(global_clipnorm=2.0),
            name="tokens",
        ),
        option_error("global_clipnorm", 2.0, CLIP),
    ),
    "ema": (
        lambda: Embedding(
            VOCAB, DIM, optimizer=keras.optimizers.Adam(use_ema=True), name="tokens"
        ),
        option_error("use_ema", True, "keep EMA off for the table's optimizer"),
    ),
    "gradient-accumulation": (
        lambda: Embedding(
            VOCAB,
            DIM,
            optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2),
            name="tokens",
        ),
        option_error("gradient_accumulation_steps", 2, "use a larger batch instead"),
    ),
    "loss-scale-factor": (
        lambda: Embedding(
            VOCAB,
            DIM,
            optimizer=keras.optimizers.Adam(loss_scale_factor=128.0),
            name="tokens",
        ),
        option_error("loss_scale_factor", 128.0, "train in float32 or mixed_bfloat16"),
    ),
    "tied-reversible": (
        lambda: ReversibleEmbedding(VOCAB, DIM, optimizer="adagrad", name="tokens"),
        "A tied `ReversibleEmbedding` cannot train its table with `optimizer=`: "
        "the reverse projection reads every row, so its gradient is dense. Pass "
        "tie_weights=False (the forward table then trains row-sparsely, "
        "`reverse_embeddings` with the model's optimizer), or optimizer=None.",
    ),
}
for _policy in ("mixed_float16", "float16"):
    REFUSED[_policy] = (
        lambda policy=_policy: Embedding(
            VOCAB, DIM, optimizer="adam", dtype=policy, name="tokens"
        ),
        f"Layer 'tokens': a table with `optimizer=` cannot train under the dtype "
        f"policy '{_policy}': float16 training scales the loss "
        "(LossScaleOptimizer), and the table's own step would be scaled with "
        "it. Use 'mixed_bfloat16' or 'float32', or pass optimizer=None.",
    )


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_option(case):
    make, message = REFUSED[case]
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_global_mixed_float16_policy_is_refused():
    keras.config.set_dtype_policy("mixed_float16")
    with pytest.raises(ValueError, match=re.escape("policy 'mixed_float16'")):
        Embedding(VOCAB, DIM, optimizer="sgd", name="tokens")


class MyAdam(keras.optimizers.Adam):
    def update_step(self, gradient, variable, learning_rate):
        return super().update_step(gradient, variable, learning_rate)


@pytest.mark.parametrize(
    "make_optimizer",
    [keras.optimizers.RMSprop, MyAdam],
    ids=["rmsprop-instance", "adam-subclass"],
)
def test_other_optimizer_instances_are_refused(make_optimizer):
    optimizer = make_optimizer()
    message = (
        "Layer 'tokens': a row-sparse table trains with `keras.optimizers.SGD`, "
        "`Adagrad` or `Adam` (or 'sgd', 'adagrad', 'adam'); other optimizers and "
        f"subclasses are not supported. Received: optimizer={optimizer!r} (of "
        f"type {type(optimizer).__name__}). Pass optimizer=None to train the "
        "table densely with the model's optimizer."
    )
    with pytest.raises(ValueError) as info:
        Embedding(VOCAB, DIM, optimizer=optimizer, name="tokens")
    assert str(info.value) == message


# --- 8. Quantization drops the table's state. ---


def test_quantize_drops_the_slots_and_predicts_as_a_plain_layer(rng):
    ids, targets = zipf_ids(rng), targets_like(rng)
    layer, model = trained_layer_model("adam", random_table(rng), ids, targets)
    trained_table = raw(weight(layer, "embeddings"))
    layer.quantize("int8")
    assert names(layer.weights) == ["embeddings", "embeddings_scale"]
    assert layer.dtype_policy.name == "int8_from_float32"
    assert layer.trainable_weights == []

    plain = Embedding(VOCAB, DIM, name="tokens")
    plain_model = model_of(plain)
    plain.embeddings.assign(trained_table)
    plain.quantize("int8")
    np.testing.assert_array_equal(
        np.asarray(model.predict(ids, verbose=0)),
        np.asarray(plain_model.predict(ids, verbose=0)),
    )


# --- 9. An untied ReversibleEmbedding. ---


def test_untied_reversible_trains_forward_row_sparsely(rng):
    rate = 0.3
    inputs = keras.Input((LENGTH,), dtype="int32")
    layer = ReversibleEmbedding(
        VOCAB, DIM, tie_weights=False, optimizer="adagrad", name="tokens"
    )
    logits = layer(layer(inputs), reverse=True)
    model = keras.Model(inputs, logits)
    model.compile(optimizer=keras.optimizers.SGD(rate), loss="mse")
    assert names(model.trainable_weights) == [
        "embeddings",
        "reverse_embeddings",
        "embeddings_accumulator",
        "embeddings_iteration",
    ]
    table = random_table(rng)
    reverse = random_table(rng, (DIM, VOCAB))
    weight(layer, "embeddings").assign(table)
    weight(layer, "reverse_embeddings").assign(reverse)
    ids, targets = zipf_ids(rng), targets_like(rng, width=VOCAB)

    fit(model, ids, targets)

    reference = Replay(Rule("adagrad"), table)
    reverse_reference = reverse.astype("float64")
    for batch_ids, batch_targets in batches(ids, targets):
        hidden = reference.values[batch_ids]
        gradient = mse_gradient(hidden @ reverse_reference, batch_targets)
        reverse_gradient = np.einsum("bld,blv->dv", hidden, gradient)
        reference.step(batch_ids, gradient @ reverse_reference.T)
        reverse_reference = reverse_reference - rate * reverse_gradient

    assert_trained_as(layer, reference)
    assert_rows_untouched(
        layer, Rule("adagrad"), table, np.setdiff1d(np.arange(VOCAB), ids)
    )
    np.testing.assert_allclose(
        raw(weight(layer, "reverse_embeddings")),
        reverse_reference,
        rtol=1e-5,
        atol=1e-6,
    )
    assert not np.array_equal(raw(weight(layer, "reverse_embeddings")), reverse)


# --- A layer looked up twice in one step. ---

TWICE = "looked up twice in one training step"


def shared_functional_model(layer, jit_compile="auto"):
    first = keras.Input((3,), dtype="int32")
    second = keras.Input((3,), dtype="int32")
    outputs = keras.layers.Add()([layer(first), layer(second)])
    model = keras.Model([first, second], outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile
    )
    return model


class CallsTwice(keras.Model):
    def __init__(self, layer):
        super().__init__()
        self.tokens = layer

    def call(self, ids):
        return self.tokens(ids) + self.tokens(ops.flip(ids, axis=1))


TWO_ID_BATCHES = [np.array([[1, 2, 3]], "int32"), np.array([[4, 5, 6]], "int32")]


@pytest.mark.parametrize("jit_compile", JIT_COMPILE)
def test_shared_layer_looked_up_twice_in_a_step_is_refused(jit_compile):
    layer = Embedding(VOCAB, DIM, optimizer="sgd", name="tokens")
    model = shared_functional_model(layer, jit_compile)
    table = raw(weight(layer, "embeddings"))
    with pytest.raises(ValueError, match=TWICE) as error:
        model.train_on_batch(TWO_ID_BATCHES, np.ones((1, 3, DIM), "float32"))
    assert "Layer 'tokens' (optimizer='sgd'" in str(error.value)
    assert "keras.ops.concatenate([ids_a, ids_b], axis=1)" in str(error.value)
    # Refused before the step: nothing was assigned.
    np.testing.assert_array_equal(raw(weight(layer, "embeddings")), table)
    assert raw(weight(layer, "embeddings_iteration")) == 0


def test_subclassed_model_calling_the_layer_twice_is_refused():
    layer = Embedding(VOCAB, DIM, optimizer="adam", name="tokens")
    model = CallsTwice(layer)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    with pytest.raises(ValueError, match=TWICE):
        model.train_on_batch(TWO_ID_BATCHES[0], np.ones((1, 3, DIM), "float32"))
    assert raw(weight(layer, "embeddings_iteration")) == 0


def test_shared_table_looked_up_once_trains_as_dense_sgd(rng):
    """The fix the error names: one lookup of both inputs' ids, then a split."""

    def two_tower(layer, optimizer):
        first = keras.Input((3,), dtype="int32")
        second = keras.Input((3,), dtype="int32")
        rows = layer(keras.layers.Concatenate(axis=1)([first, second]))
        a, b = keras.layers.Lambda(lambda r: ops.split(r, 2, axis=1))(rows)
        model = keras.Model([first, second], keras.layers.Add()([a, b]))
        model.compile(optimizer=optimizer, loss="mse")
        return model

    table = random_table(rng)
    inputs = [zipf_ids(rng, 16)[:, :3] for _ in range(2)]
    targets = targets_like(rng, 16)[:, :3]
    sparse = Embedding(VOCAB, DIM, optimizer=keras.optimizers.SGD(0.5))
    sparse_model = two_tower(sparse, keras.optimizers.SGD(0.0))
    dense = Embedding(VOCAB, DIM)
    dense_model = two_tower(dense, keras.optimizers.SGD(0.5))
    for layer, model in ((sparse, sparse_model), (dense, dense_model)):
        weight(layer, "embeddings").assign(table)
        model.fit(inputs, targets, batch_size=4, shuffle=False, verbose=0)

    np.testing.assert_allclose(
        raw(weight(sparse, "embeddings")), raw(dense.embeddings), rtol=1e-6, atol=1e-6
    )
    assert raw(weight(sparse, "embeddings_iteration")) == 4
    assert not np.array_equal(raw(dense.embeddings), table)


def test_lookups_outside_training_between_steps_are_not_a_second_lookup(rng):
    """Calls with `training=None` and no gradient, `predict`, `evaluate` and
    several `fit` calls in a row: each step still looks up once."""
    layer = Embedding(VOCAB, DIM, optimizer="sgd", name="tokens")
    model = model_of(layer)
    ids, targets = zipf_ids(rng), targets_like(rng)
    for _ in range(2):
        layer(ids[:BATCH])
        layer(ids[:BATCH], training=True)
        model.predict(ids, verbose=0)
        model.evaluate(ids, targets, verbose=0)
        fit(model, ids, targets)
    assert raw(weight(layer, "embeddings_iteration")) == 2 * STEPS


@pytest.mark.skipif(
    BACKEND == "torch", reason="Keras's PyTorch trainer needs steps_per_execution=1"
)
def test_several_steps_per_execution_each_look_up_once(rng):
    """`steps_per_execution=2` traces two steps into one function (JAX
    unrolls them): each step's lookup reads its own step counter."""
    layer = Embedding(VOCAB, DIM, optimizer="sgd", name="tokens")
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32"), layer])
    model.compile(
        optimizer=keras.optimizers.SGD(0.0), loss="mse", steps_per_execution=2
    )
    ids, targets = zipf_ids(rng), targets_like(rng)
    table = random_table(rng)
    weight(layer, "embeddings").assign(table)
    fit(model, ids, targets)
    assert raw(weight(layer, "embeddings_iteration")) == STEPS
    assert_trained_as(layer, replay_table(Rule("sgd"), table, ids, targets))
