"""Runs of equal ids in a batch: the ids sorted, and where each id's run
starts, so that what belongs to one id (its gradients) is summed once.

TensorFlow's gradient of a gather is an `IndexedSlices` that repeats an id
once per occurrence, and Keras's optimizers square each repetition on its
own (`ops.square(IndexedSlices)`), so Adagrad and Adam train a repeated id
wrongly there; JAX and PyTorch sum the repetitions into a dense gradient
first. `take_once` gathers so that the gradient names each id once, and a
row-sparse step (`_row_sparse`) sums a run's gradients before stepping it.
"""

import keras
from keras import ops

from keras_ext_embedding import _ids


class Runs:
    """The runs of equal values of an integer `index` (any shape), in
    sorted order: `order` (the sorting permutation of the flat index),
    `sorted_ids`, `is_new` (True where a run starts) and `run` (the run
    number of each sorted position)."""

    def __init__(self, index):
        flat = ops.reshape(index, (-1,))
        self.count = ops.shape(flat)[0]
        self.order = ops.argsort(flat)
        self.sorted_ids = ops.take(flat, self.order)
        # The id before each sorted id (before the first: one less, so that
        # it starts a run; an empty batch gives empty arrays).
        previous = ops.concatenate(
            [ops.subtract(self.sorted_ids[:1], 1), self.sorted_ids[:-1]]
        )
        self.is_new = ops.not_equal(self.sorted_ids, previous)
        self.run = ops.subtract(ops.cumsum(ops.cast(self.is_new, "int32")), 1)

    def sorted(self, values):
        """`values` (one row per flat position) in sorted order."""
        return ops.take(values, self.order, axis=0)

    def total(self, values):
        """At each sorted position, the sum of `values` over its run."""
        sums = ops.segment_sum(values, self.run, num_segments=self.count)
        return ops.take(sums, self.run, axis=0)

    def any(self, flags):
        """At each sorted position, whether `flags` holds anywhere in its run."""
        hits = ops.segment_max(
            ops.cast(flags, "int32"), self.run, num_segments=self.count
        )
        return ops.greater(ops.take(hits, self.run), 0)

    def first(self):
        """At each sorted position, the sorted position where its run starts."""
        positions = ops.arange(self.count, dtype="int32")
        starts = ops.where(self.is_new, positions, 0)
        firsts = ops.segment_max(starts, self.run, num_segments=self.count)
        return ops.take(firsts, self.run)


def take_once(table, index):
    """`take(table, index, axis=0)` whose gradient names each id once.

    The table is gathered at the sorted ids, and every position reads the
    row gathered at its run's first position: the gradient of the other
    gathered rows is zero, so the table's gradient holds each id's summed
    gradient once (and zeros, which Keras's optimizers square to zero).
    """
    runs = Runs(index)
    rows = ops.take(table, runs.sorted_ids, axis=0)
    rows = ops.take(rows, runs.first(), axis=0)
    rows = ops.take(rows, ops.argsort(runs.order), axis=0)
    return ops.reshape(rows, (*ops.shape(index), table.shape[-1]))


class RowReader:
    """How a lookup gathers rows of a trainable table variable: while
    `training` (Keras's flag) or not, for eager or traced `ids` (`checked`:
    the ids were read on the host, so they are eager), and whether the
    layer also reads the whole table (`read_whole`: a tied reverse
    projection)."""

    def __init__(self, training=None, ids=None, checked=False, read_whole=False):
        self.training = training
        self.ids = ids
        self.checked = checked
        self.read_whole = read_whole

    @property
    def eager(self):
        return self.checked or (self.ids is not None and _ids.is_concrete(self.ids))

    def rows(self, variable, index):
        """The rows of `variable` at `index`.

        On TensorFlow the read matters (measured at 1M x 128, 64 x 32 ids):
        - traced (`predict`, `fit`'s step, export), `take(variable.value)`
          gathers from the `tf.Variable` itself, a sparse read: 0.6 ms, also
          after an optimizer's sparse update (`IndexedSlices`) made the
          variable copy-on-read, where `take(variable)` reads, and then
          copies, the whole table (Keras's layer: 1.8 -> 68 ms after one SGD
          step);
        - eager, `take(variable)` reads the table without a copy (1.6 ms;
          `take(variable.value)` costs 75 ms there, Keras's `take` reading
          the variable's shape densely) until the variable turns
          copy-on-read: after any sparse access, a traced lookup's sparse
          read included. From then on an eager lookup copies the table
          (74 ms), as Keras's does after a sparse update: no public op
          reads a variable sparsely in eager mode.
        - traced, when the layer also reads the whole table (a tied
          reverse projection), `take(variable)`: the sparse read would turn
          the variable copy-on-read, and the projection's dense read would
          then copy the table on every call (keras-hub's `generate` on a
          128k x 256 Gemma table: +9 ms, 2x Keras's time per token).
        While training on TensorFlow (`training=True`, as `fit` and
        `train_on_batch` call a model), `take_once` keeps Keras's optimizers
        from squaring each repetition of an id separately; JAX and PyTorch
        already sum repetitions, and read a variable and its value alike.
        """
        if keras.config.backend() != "tensorflow":
            return ops.take(variable, index, axis=0)
        table = variable if self.eager or self.read_whole else variable.value
        if self.training:
            return take_once(table, index)
        return ops.take(table, index, axis=0)
