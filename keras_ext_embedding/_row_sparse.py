"""Row-sparse training: a table trained by its own optimizer, row by row.

`Embedding(..., optimizer="adam")` gives the table (or, with LoRA, the
adapter `A`) an update rule of its own. A step reads the rows the batch
looked up, sums the gradients of repeated ids, steps those rows and their
optimizer slots, and leaves every other row alone, so its cost follows the
batch, not the vocabulary.

The route is public Keras only (keras-rs's pattern for JAX SparseCore):
- the table, its slots and a step counter are variables with
  `overwrite_with_gradient=True`: Keras's optimizer assigns their
  "gradients" to them, before any clipping, decay or `update_step`;
- a `keras.ops.custom_gradient` on the lookup returns, as each variable's
  gradient, its updated value: the old value with the stepped rows
  scattered in.

Under XLA (JAX's `jit`, TensorFlow's `jit_compile=True`) the scatter writes
into the donated buffer in place. Without XLA, TensorFlow's
`tensor_scatter_nd_update` copies each variable once per step, and
PyTorch's functional scatter and the optimizer's `assign` copy it twice:
still several times cheaper than a dense Adam step, but proportional to the
vocabulary (docs/guides/training_big_tables.md has the figures).

The rules are Keras's `SGD`, `Adagrad` and `Adam` restricted to the rows,
operation for operation: SGD and Adagrad give the dense result (a row whose
gradient is zero does not move under either), Adam is lazy Adam (the
semantics of TF Addons' `LazyAdam` and `torch.optim.SparseAdam`): the rows
and moments of ids absent from a batch do not move, and bias correction
uses the table's own step counter.
"""

import copy

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import _layout, _runs, _step_guard

SLOTS = {"sgd": (), "adagrad": ("accumulator",), "adam": ("momentum", "velocity")}
OPTIMIZER_CLASSES = {
    "sgd": keras.optimizers.SGD,
    "adagrad": keras.optimizers.Adagrad,
    "adam": keras.optimizers.Adam,
}
# Options of the optimizer that a row-sparse rule cannot honour, with their
# default (what the option must be left at) and what to do instead.
REFUSED_OPTIONS = {
    "momentum": (0.0, "use optimizer='adam' for a rule with momentum"),
    "nesterov": (False, "use optimizer='adam' for a rule with momentum"),
    "amsgrad": (False, "use plain (lazy) Adam"),
    "weight_decay": (None, "regularize the model's other weights instead"),
    "clipnorm": (None, "clip the gradients of the model's other weights"),
    "clipvalue": (None, "clip the gradients of the model's other weights"),
    "global_clipnorm": (None, "clip the gradients of the model's other weights"),
    "use_ema": (False, "keep EMA off for the table's optimizer"),
    "gradient_accumulation_steps": (None, "use a larger batch instead"),
    "loss_scale_factor": (None, "train in float32 or mixed_bfloat16"),
}


def check_layer_arguments(layer_name, regularizer, constraint):
    """Refuses what a row-sparse table cannot take: a regularizer's dense
    gradient would add to the stepped table, and a constraint would never
    run (the optimizer assigns the table without constraining it)."""
    for argument, value in (
        ("embeddings_regularizer", regularizer),
        ("embeddings_constraint", constraint),
    ):
        if value is not None:
            raise ValueError(
                f"Layer '{layer_name}': `{argument}` cannot be combined with "
                "`optimizer=` (the table is stepped row by row by its own "
                f"optimizer). Remove `{argument}`, or pass optimizer=None to "
                "train the table densely with the model's optimizer."
            )


def check_dtype_policy(layer_name, policy):
    """Refuses float16 loss scaling: `LossScaleOptimizer` scales the loss, so
    the table's own step would be scaled with it."""
    if policy.compute_dtype == "float16":
        raise ValueError(
            f"Layer '{layer_name}': a table with `optimizer=` cannot train "
            f"under the dtype policy '{policy.name}': float16 training scales "
            "the loss (LossScaleOptimizer), and the table's own step would "
            "be scaled with it. Use 'mixed_bfloat16' or 'float32', or pass "
            "optimizer=None."
        )


class RowSparseRule:
    """The update rule of the `optimizer` argument: its name, learning rate
    (a float or a `LearningRateSchedule`) and hyperparameters, read from the
    Keras optimizer's public config (no optimizer object is kept: a layer
    attribute holding one would be saved as part of the layer).
    """

    def __init__(self, name, config):
        self.name = name
        self.config = config
        rate = config["learning_rate"]
        if isinstance(rate, dict):
            rate = keras.optimizers.schedules.deserialize(rate)
        self.learning_rate = rate

    @property
    def slot_names(self):
        """The names of the slots each trained variable gets."""
        return SLOTS[self.name]

    def slot_initial_value(self, slot):
        if slot == "accumulator":
            return self.config["initial_accumulator_value"]
        return 0.0

    def rate(self, iteration):
        """The learning rate of the step after `iteration` steps, float32."""
        rate = self.learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            rate = rate(iteration)
        return ops.cast(rate, "float32")

    def step(self, rows, gradient, slots, iteration):
        """`(new_rows, new_slots)`: Keras's `update_step` on these rows, in
        its order of operations (float32)."""
        lr = self.rate(iteration)
        if self.name == "sgd":
            return ops.subtract(rows, ops.multiply(gradient, lr)), []
        epsilon = self.config["epsilon"]
        if self.name == "adagrad":
            (accumulator,) = slots
            accumulator = ops.add(accumulator, ops.square(gradient))
            update = ops.divide(
                ops.multiply(lr, gradient), ops.sqrt(ops.add(accumulator, epsilon))
            )
            return ops.subtract(rows, update), [accumulator]
        beta_1, beta_2 = self.config["beta_1"], self.config["beta_2"]
        momentum, velocity = slots
        local_step = ops.add(iteration, 1.0)
        beta_1_power = ops.power(ops.cast(beta_1, "float32"), local_step)
        beta_2_power = ops.power(ops.cast(beta_2, "float32"), local_step)
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        momentum = ops.add(
            momentum, ops.multiply(ops.subtract(gradient, momentum), 1 - beta_1)
        )
        velocity = ops.add(
            velocity,
            ops.multiply(ops.subtract(ops.square(gradient), velocity), 1 - beta_2),
        )
        update = ops.divide(
            ops.multiply(momentum, alpha), ops.add(ops.sqrt(velocity), epsilon)
        )
        return ops.subtract(rows, update), [momentum, velocity]


def resolve(optimizer, layer_name):
    """The `RowSparseRule` of the `optimizer` argument (None: dense training
    by the model's optimizer), or `ValueError` saying what to change."""
    if optimizer is None:
        return None
    if isinstance(optimizer, dict):
        # Keras's deserialization rewrites the config it is given.
        optimizer = keras.optimizers.deserialize(copy.deepcopy(optimizer))
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in OPTIMIZER_CLASSES:
            raise ValueError(
                f"Layer '{layer_name}': `optimizer` must be None (train the "
                "table with the model's optimizer), one of 'sgd', 'adagrad', "
                "'adam', or a `keras.optimizers.SGD`, `Adagrad` or `Adam` "
                f"instance. Received: optimizer={optimizer!r}."
            )
        optimizer = OPTIMIZER_CLASSES[name]()
    # Keras's optimizers, or the backend's class Keras makes of them (a
    # PyTorch SGD is a subclass): a subclass with its own `update_step` is
    # another rule, which the table would not follow.
    name = next(
        (
            n
            for n, cls in OPTIMIZER_CLASSES.items()
            if isinstance(optimizer, cls)
            and type(optimizer).update_step is cls.update_step
        ),
        None,
    )
    if name is None:
        raise ValueError(
            f"Layer '{layer_name}': a row-sparse table trains with "
            "`keras.optimizers.SGD`, `Adagrad` or `Adam` (or 'sgd', 'adagrad', "
            "'adam'); other optimizers and subclasses are not supported. "
            f"Received: optimizer={optimizer!r} (of type "
            f"{type(optimizer).__name__}). Pass optimizer=None to train the "
            "table densely with the model's optimizer."
        )
    config = optimizer.get_config()
    for option, (default, advice) in REFUSED_OPTIONS.items():
        value = config.get(option, default)
        if option in config and value not in (default, 0, 0.0, None, False):
            raise ValueError(
                f"Layer '{layer_name}': the table's optimizer cannot honour "
                f"`{option}={value!r}` (a row-sparse update steps only the "
                f"looked-up rows). Leave `{option}` at its default: {advice}."
            )
    rate = config["learning_rate"]
    if not isinstance(rate, (float, int, dict)):
        raise ValueError(
            f"Layer '{layer_name}': the table's optimizer needs a float "
            "learning rate or a `keras.optimizers.schedules."
            f"LearningRateSchedule`. Received: learning_rate={rate!r}."
        )
    return RowSparseRule(name, config)


def serialize(rule):
    """The `optimizer` entry of a layer's config."""
    cls = OPTIMIZER_CLASSES[rule.name]
    config = dict(rule.config)
    if isinstance(rule.learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        config["learning_rate"] = keras.optimizers.schedules.serialize(
            rule.learning_rate
        )
    return keras.optimizers.serialize(cls.from_config(config))


def config_copy(config):
    """A deep copy of a serialized optimizer, as plain dicts and lists.

    The layer's tracker wraps the dicts of its `optimizer` attribute, and
    `copy.deepcopy` of a wrapped dict would copy the tracker: the layer and
    everything it holds."""
    if isinstance(config, dict):
        return {key: config_copy(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_copy(value) for value in config]
    return config


class RowSparseState:
    """The slots and step counter of one trained variable (`target`: the
    table's `embeddings`, or LoRA's `lora_embeddings_a`), and the lookup
    whose gradient steps its rows."""

    def __init__(self, layer, rule, target):
        self.layer = layer
        self.rule = rule
        self.target = target
        self.variable = None
        self.slots = []
        self.iteration = None
        self.guard = _step_guard.StepGuard(layer.name, rule.name)

    def build(self, variable):
        """Creates the slots beside `variable` and marks all of them to be
        overwritten by their gradients."""
        layer = self.layer
        self.variable = variable
        variable.overwrite_with_gradient = True
        # The slots are laid out as the variable they step (sharded with
        # the table), the step counter on every device.
        self.slots = [
            _layout.add_weight(
                layer,
                None,
                (variable, None),
                name=f"{self.target}_{slot}",
                shape=variable.shape,
                initializer=keras.initializers.Constant(
                    self.rule.slot_initial_value(slot)
                ),
                dtype="float32",
                autocast=False,
                overwrite_with_gradient=True,
            )
            for slot in self.rule.slot_names
        ]
        # float32, as keras-rs's: a gradient must be a float. It counts
        # every step exactly up to 2**24.
        self.iteration = _layout.add_weight(
            layer,
            (),
            name=f"{self.target}_iteration",
            shape=(),
            initializer="zeros",
            dtype="float32",
            autocast=False,
            overwrite_with_gradient=True,
        )
        # Attributes of the layer under their names, as LoRA's adapters:
        # `layer.embeddings_momentum`, `layer.embeddings_iteration`, ...
        for value in self.variables():
            setattr(layer, value.name, value)

    def variables(self):
        """The slots, then the step counter."""
        return [*self.slots, self.iteration]

    def stored(self):
        """`(key, variable)` of the checkpoint entries, named by variable."""
        return [(variable.name, variable) for variable in self.variables()]

    def reset(self):
        """Fresh slots and a step counter at zero (a checkpoint without
        them: Keras's, or one saved without `optimizer=`)."""
        for slot, variable in zip(self.rule.slot_names, self.slots, strict=True):
            value = self.rule.slot_initial_value(slot)
            _layout.assign(variable, np.full(variable.shape, value, dtype="float32"))
        self.iteration.assign(0.0)

    def assign_stored(self, arrays):
        """Assigns a checkpoint's slots and step counter (`None`: the
        checkpoint has none, the state starts afresh)."""
        if arrays is None:
            self.reset()
            return
        for variable, array in zip(self.variables(), arrays, strict=True):
            _layout.assign(variable, array)

    def remove(self):
        """Untracks the slots and step counter (LoRA merged away)."""
        for value in self.variables():
            delattr(self.layer, value.name)
        self.variable.overwrite_with_gradient = False
        self.variable, self.slots, self.iteration = None, [], None

    @property
    def trains(self):
        """Whether the variable trains (not frozen for LoRA)."""
        return self.variable.trainable

    def rows(self, index, touched):
        """`take(variable, index)` whose gradient is the stepped variable.

        `touched` (boolean, the shape of `index`, or None for all) marks the
        positions whose ids the step may move: invalid ids and masked
        padding read row 0 without training it.
        """
        variable = self.variable
        rule, width = self.rule, variable.shape[-1]
        counter_value = self.iteration.value

        @ops.custom_gradient
        def lookup(table, iteration, *slots):
            def grad(*args, upstream=None):
                self.guard.rule(counter_value)
                # TensorFlow and JAX pass the upstream gradient positionally,
                # PyTorch by keyword (after the inputs).
                upstream = args[0] if upstream is None else upstream
                runs = _runs.Runs(index)
                gradient = runs.sorted(
                    ops.reshape(ops.cast(upstream, "float32"), (-1, width))
                )
                if touched is not None:
                    moves = runs.sorted(ops.reshape(touched, (-1,)))
                    gradient = ops.where(ops.expand_dims(moves, -1), gradient, 0.0)
                    moves = runs.any(moves)
                # Each copy of an id gets its run's summed gradient and writes
                # the same stepped row: the scatter is deterministic.
                gradient = runs.total(gradient)
                sorted_ids = runs.sorted_ids
                rows = ops.take(table, sorted_ids, axis=0)
                slot_rows = [ops.take(slot, sorted_ids, axis=0) for slot in slots]
                new_rows, new_slot_rows = rule.step(
                    rows, gradient, slot_rows, iteration
                )
                if touched is not None:
                    keep = ops.expand_dims(moves, -1)
                    new_rows = ops.where(keep, new_rows, rows)
                    new_slot_rows = [
                        ops.where(keep, new, old)
                        for new, old in zip(new_slot_rows, slot_rows, strict=True)
                    ]
                at = ops.expand_dims(sorted_ids, -1)
                new_table = ops.scatter_update(
                    table, at, ops.cast(new_rows, table.dtype)
                )
                new_slots = [
                    ops.scatter_update(slot, at, rows)
                    for slot, rows in zip(slots, new_slot_rows, strict=True)
                ]
                return (new_table, ops.add(iteration, 1.0), *new_slots)

            return ops.take(table, index, axis=0), grad

        # The variables' values as tensors (a reshape to their own shape
        # reads them), not the variables: PyTorch's autograd function tracks
        # tensors only, TensorFlow's custom gradient refuses variables read
        # inside it, and a TensorFlow gather from the variable itself would
        # be a sparse read, which turns it copy-on-read (every later dense
        # read copies it).
        inputs = [variable, self.iteration, *self.slots]
        with self.guard.lookup():
            return lookup(*[ops.reshape(v, v.shape) for v in inputs])
