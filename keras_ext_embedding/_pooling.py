"""Bags of ids and their pooling: one vector per bag, the same on every backend.

A bag is the ids of one multi-valued feature of one example (a user's last
items, a query's words), each with a weight `w` (1 unless given). With `e` the
looked-up rows, the combiners are

    sum   = sum(w * e)
    mean  = sum(w * e) / sum(w)
    sqrtn = sum(w * e) / sqrt(sum(w ** 2))
    max   = elementwise max of w * e          min = elementwise min of w * e

over the positions that count. Padding, masked and invalid (traced) positions
do not count: they carry weight 0 and are left out of max and min, so they
never change a bag's vector nor receive a gradient. A bag where nothing
counts gives zeros for every combiner (never NaN, never -inf), and so does a
bag whose weights sum to 0 for mean and sqrtn.

Two layouts hold bags, each pooling with the reductions that suit it:
- `DenseBags`: ids `(..., length)`, a bag per row of the last axis, pooled
  by reducing that axis (fused by XLA into the gather).
- `FlatBags`: the ids of all bags one after the other `(n,)` with the bag of
  each position (ragged and sparse inputs, lengths or offsets), pooled with
  segment sums. Shapes stay static under `jax.jit` and XLA: the number of
  bags and of ids are the inputs' sizes, never values.

The max gradient reaches the position holding the maximum of each output
dimension; positions tied at the maximum share it equally, as the backends'
own max gradients do.
"""

from keras import ops

COMBINERS = ("sum", "mean", "sqrtn", "max", "min")


def both(a, b):
    """`a and b` for optional boolean masks (None: all True)."""
    if a is None:
        return b
    if b is None:
        return a
    return ops.logical_and(a, b)


class DenseBags:
    """Bags along the last axis of dense ids `(..., length)`.

    `weights` (the ids' shape, or None) and `kept` (boolean, the ids' shape,
    or None: every position counts) describe each position.
    """

    def __init__(self, ids, weights=None, kept=None):
        self.ids = ids
        self.weights = weights
        self.kept = kept

    @staticmethod
    def locate(position):
        """Words naming an id's `position` in the ids: its bag and place
        (1-D ids are bags of one)."""
        if len(position) == 1:
            return f"in bag {position[0]} at position 0"
        bag = position[:-1]
        bag = bag[0] if len(bag) == 1 else bag
        return f"in bag {bag} at position {position[-1]}"

    def pool(self, rows, kept, combiner):
        """Pools `rows` `(..., length, dim)` into `(..., dim)`; `kept` marks
        the positions that count (None: all of them)."""
        if 0 in rows.shape[:-1]:
            # No position at all (every bag empty), or no bag: nothing to
            # reduce (a max over nothing is refused by some backends).
            return ops.zeros((*ops.shape(rows)[:-2], rows.shape[-1]), rows.dtype)
        return _pool(
            rows,
            _column(self.weights, rows.dtype),
            _column(kept, None),
            combiner,
            total=lambda x: ops.sum(x, axis=-2),
            largest=lambda x: ops.max(x, axis=-2),
            size=ops.cast(ops.shape(rows)[-2], rows.dtype),
        )


class FlatBags:
    """Bags laid one after the other: `ids` `(n,)`, and `bag_of` `(n,)`, the
    bag of each position (nondecreasing or not), among `num_bags` bags.

    `locate_on_host` maps a position to its bag and place, reading the
    layout on the host; it is called only to word an error.
    """

    def __init__(self, ids, bag_of, num_bags, weights, kept, locate_on_host):
        self.ids = ids
        self.bag_of = bag_of
        self.num_bags = num_bags
        self.weights = weights
        self.kept = kept
        self._locate_on_host = locate_on_host

    def locate(self, position):
        bag, place = self._locate_on_host(position[0])
        return f"in bag {bag} at position {place}"

    def pool(self, rows, kept, combiner):
        """Pools `rows` `(n, dim)` into `(num_bags, dim)`."""
        bag_of, num_bags = self.bag_of, self.num_bags
        if isinstance(num_bags, int) and num_bags == 0:
            # No bag (PyTorch's segment sum reads 0 segments as "unknown").
            return ops.zeros((0, rows.shape[-1]), rows.dtype)
        return _pool(
            rows,
            _column(self.weights, rows.dtype),
            _column(kept, None),
            combiner,
            total=lambda x: ops.segment_sum(x, bag_of, num_segments=num_bags),
            largest=lambda x: ops.segment_max(x, bag_of, num_segments=num_bags),
            size=None,
        )


def _column(values, dtype):
    """Per-position values `(..., length)` as `(..., length, 1)`, to
    broadcast over the rows' last axis."""
    if values is None:
        return None
    if dtype is not None:
        values = ops.cast(values, dtype)
    return ops.expand_dims(values, -1)


def _pool(rows, weights, kept, combiner, total, largest, size):
    """The combiners, written once over two reductions: `total` sums over
    each bag, `largest` takes its elementwise max. `size` is every bag's
    length when all bags have one (dense ids), else None."""
    # The weight of each position: 0 where it does not count, so that padding
    # and invalid ids drop out of every sum and of its gradient.
    if kept is not None:
        weights = ops.where(kept, 1 if weights is None else weights, 0)
        weights = ops.cast(weights, rows.dtype)
    weighted = rows if weights is None else ops.multiply(rows, weights)
    if combiner in ("max", "min"):
        return _extreme(weighted, kept, combiner, total, largest, size)
    summed = total(weighted)
    if combiner == "sum":
        return summed
    if weights is None:
        # Every position counts with weight 1: sum(w) = sum(w ** 2) = length.
        divisor = size if size is not None else total(ops.ones_like(rows[..., :1]))
        if combiner == "sqrtn":
            divisor = ops.sqrt(divisor)
    elif combiner == "mean":
        divisor = total(weights)
    else:
        divisor = total(ops.square(weights))
    # sum(w) = 0 (an empty bag, or weights that cancel) gives zeros: the
    # divisor is swapped for 1 first (before the square root of sqrtn, whose
    # derivative at 0 is infinite), so no NaN reaches the gradient either.
    nonzero = ops.not_equal(divisor, 0)
    divisor = ops.where(nonzero, divisor, 1)
    if combiner == "sqrtn" and weights is not None:
        divisor = ops.sqrt(divisor)
    return ops.where(nonzero, ops.divide(summed, divisor), 0)


def _extreme(weighted, kept, combiner, total, largest, size):
    """Elementwise max (or min) of `weighted` over each bag's positions that
    count; zeros for a bag without any."""
    # min(x) = -max(-x): one reduction serves both.
    values = weighted if combiner == "max" else ops.negative(weighted)
    if kept is not None:
        # Positions that do not count can never win.
        values = ops.where(kept, values, float("-inf"))
    best = largest(values)
    if kept is not None:
        present = total(ops.cast(kept, weighted.dtype))
    elif size is None:
        present = total(ops.ones_like(weighted[..., :1]))
    else:
        present = None  # dense bags of one common length > 0
    if present is not None:
        best = ops.where(ops.greater(present, 0), best, 0)
    return best if combiner == "max" else ops.negative(best)
