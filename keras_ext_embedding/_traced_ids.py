"""Invalid ids met by traced lookups: counted in the graph, reported by Keras.

An eager lookup with `invalid_ids="raise"` raises at the first invalid id
(`_ids`). A traced one (the compiled steps of `fit` / `evaluate` / `predict`
on TensorFlow and JAX, a `tf.function` or `jax.jit` step of one's own) cannot:
its ids have no values until the program runs, and public `keras.ops` has no
op that raises from inside a program. So the lookup gives zeros there and
adds the number of invalid positions to a counter, a scalar variable that the
program updates like any other state:

- TensorFlow assigns it inside the function;
- JAX carries it in the non-trainable state of `stateless_call`, which
  Keras's trainer (and a step of one's own built on `stateless_call`) hands
  back after the step.

Nobody would read a counter they do not know about, so the layer also holds
a `keras.metrics.Metric`, `Report`. Keras collects a layer's metrics into its
model's, and reads every metric's `result()` on the host at the end of each
epoch of `fit` and at the end of `evaluate`, after the step's state is back
in the variables. There, a counter above zero raises `InvalidIdError` with
the count. Inside a compiled step the result is an empty dict: no key is
added to the logs, and `evaluate`'s list of results is Keras's. `predict`
reads no metric: its count waits in the counter (`layer.traced_invalid_ids`),
and the next `fit` or `evaluate` warns about it when Keras resets the
metrics.

Only calls that can carry state count: calls with a `training` argument (the
steps Keras runs, and steps of one's own that pass it) whose counter is part
of the trace. An export's serving function (no `training`), or `jax.jit` over
a model call outside `stateless_call` (where an assignment would leak a
tracer into the variable), only give zeros. `invalid_ids="zeros"` adds no op.
"""

import warnings

import keras
from keras import ops

from keras_ext_embedding import _ids
from keras_ext_embedding.errors import InvalidIdError


class TracedInvalidIds:
    """The counter of one layer: invalid ids its traced lookups met since the
    last report."""

    def __init__(self, layer):
        self.layer = layer
        # A plain `keras.Variable` held outside the layer's tracker: it is
        # state (the layer adds it to `layer.variables`, so `stateless_call`
        # carries it), not a weight (`layer.weights` and checkpoints stay
        # Keras's). An initializer, not a value: a layer first built inside
        # a stateless scope (a JAX trainer's) may only defer its variables.
        self.variable = keras.Variable(
            "zeros", shape=(), dtype="int32", trainable=False, name="traced_invalid_ids"
        )

    def add(self, valid, training):
        """Counts the invalid positions of a traced lookup (`valid` is its
        mask of valid ids), where the call can carry the count."""
        if training is None:
            return
        if _host_value(self.variable) is not None:
            # JAX outside `stateless_call`: the counter is not part of the
            # trace, and assigning it a traced value would leak the tracer.
            return
        invalid = ops.sum(ops.cast(ops.logical_not(valid), "int32"))
        self.variable.assign_add(invalid)

    def value(self):
        """The count, read on the host; None inside a traced program."""
        value = _host_value(self.variable)
        return None if value is None else int(value)

    def take(self):
        """The count (None when traced), zeroed once read."""
        count = self.value()
        if count:
            self.variable.assign(0)
        return count

    def message(self, count, since):
        layer = self.layer
        return (
            f"Layer '{layer.name}' looked up {count} invalid "
            f"{'id' if count == 1 else 'ids'} in traced calls {since}: ids "
            f"outside [0, {layer.input_dim - 1}] (input_dim={layer.input_dim}) "
            "or floats that are not whole numbers. A traced lookup cannot "
            "raise at the id, so each of those positions got an all-zero "
            "vector. Fix the ids (run eagerly, `model.compile(..., "
            "run_eagerly=True)`, to raise at the first one with its position), "
            "or construct the layer with `invalid_ids='zeros'` to look up "
            "zeros without this report."
        )


class Report(keras.metrics.Metric):
    """Raises at the end of an epoch or an `evaluate` whose traced lookups
    met invalid ids; adds nothing to the logs otherwise."""

    def __init__(self, counter):
        super().__init__(name=f"{counter.layer.name}_traced_invalid_ids")
        self.counter = counter
        # Read only to tell a `result()` traced inside a compiled step (where
        # Keras passes the metrics' state in, so this value is traced too,
        # and JAX has detached the layer's variables) from one on the host.
        self.probe = self.add_variable(
            shape=(), initializer="zeros", dtype="int32", name="probe"
        )

    def update_state(self, *args, **kwargs):
        """The lookups count; nothing to update here."""

    def result(self):
        if _host_value(self.probe) is None:
            return {}
        count = self.counter.take()
        if count:
            raise InvalidIdError(
                self.counter.message(
                    count,
                    "since the last report (this epoch of fit, this evaluate, "
                    "or steps of your own)",
                )
            )
        return {}

    def reset_state(self):
        count = self.counter.take()
        if count:
            warnings.warn(
                self.counter.message(
                    count,
                    "before this fit or evaluate (a predict, or steps of your own)",
                ),
                stacklevel=2,
            )


def _host_value(variable):
    """A scalar variable's value as NumPy, or None where it is traced.

    No op runs on it: inside a `jax.jit` trace even an op on a concrete
    array gives a tracer.
    """
    try:
        return _ids.read_on_host(variable.value)
    except (TypeError, RuntimeError):
        return None
