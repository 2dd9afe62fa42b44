"""The forms a bag layer's ids come in, made into one of two layouts.

Dense ids `(..., length)` become `DenseBags`; flat ids with `lengths` or
`offsets`, a `tf.RaggedTensor`, a `tf.SparseTensor` and a JAX `BCOO` become
`FlatBags` (`_pooling`). Ragged and sparse tensors are read through the
attributes they carry (`flat_values`/`row_splits`, `indices`/`values`/
`data`), as `Embedding` reads a ragged tensor's, never through a backend
module. What does not fit (weights of another form, a scalar id, offsets
that do not cover the ids) is refused with the shapes received.
"""

import numpy as np
from keras import ops

from keras_ext_embedding import _ids
from keras_ext_embedding._pooling import DenseBags, FlatBags, both


def padding_id_argument(padding_id, mask_zero, input_dim):
    """The `padding_id` argument checked, as a plain int (a NumPy integer
    would not serialize) or None."""
    if padding_id is None:
        return None
    if (
        not isinstance(padding_id, (int, np.integer))
        or isinstance(padding_id, bool)
        or not 0 <= padding_id < input_dim
    ):
        raise ValueError(
            "`padding_id` must be an id of the table, an integer in "
            f"[0, {input_dim - 1}] (input_dim={input_dim}). Received: "
            f"padding_id={padding_id!r} (of type {type(padding_id).__name__})."
        )
    if mask_zero and padding_id != 0:
        raise ValueError(
            "`mask_zero=True` makes 0 the padding id, and `padding_id` names "
            f"another: a layer has one padding id. Received: mask_zero=True, "
            f"padding_id={padding_id}. Remove one of the two arguments."
        )
    return int(padding_id)


def padding(mask_zero, padding_id):
    """The id that a bag leaves out: 0 with `mask_zero`, else `padding_id`."""
    return 0 if mask_zero else padding_id


def scalar_ids_message(layer_name):
    return (
        f"Layer '{layer_name}' pools bags of ids and received a scalar id. "
        "Pass ids of shape (batch, length), or (batch,) for bags of one id."
    )


def form(inputs):
    """`"ragged"` (a `tf.RaggedTensor`), `"sparse"` (a `tf.SparseTensor`, a
    JAX `BCOO`) or `"dense"`, told by the attributes the inputs carry."""
    if hasattr(inputs, "flat_values") and hasattr(inputs, "row_splits"):
        return "ragged"
    if hasattr(inputs, "indices") and (
        hasattr(inputs, "dense_shape") or hasattr(inputs, "todense")
    ):
        return "sparse"
    return "dense"


def bags(inputs, weights, lengths, offsets, mask, padding, layer_name):
    """The bags of a call, as `DenseBags` or `FlatBags`."""
    if lengths is not None or offsets is not None:
        return _flat_bags(inputs, weights, lengths, offsets, mask, padding, layer_name)
    kind = form(inputs)
    if kind == "ragged":
        return _ragged_bags(inputs, weights, padding, layer_name)
    if kind == "sparse":
        return _sparse_bags(inputs, weights, padding, layer_name)
    return _dense_bags(inputs, weights, mask, padding, layer_name)


def host_locator(args, kwargs):
    """For NumPy ids checked before the call: the words naming an invalid
    id's bag, read from the call's `lengths` or `offsets` (keyword or
    positional after `weights`)."""
    lengths = kwargs.get("lengths", args[1] if len(args) > 1 else None)
    offsets = kwargs.get("offsets", args[2] if len(args) > 2 else None)
    if lengths is None and offsets is None:
        return DenseBags.locate

    def locate(position):
        bag, place = _flat_place(position[0], lengths, offsets)
        return f"in bag {bag} at position {place}"

    return locate


def _dense_bags(inputs, weights, mask, padding, layer_name):
    ids = ops.convert_to_tensor(inputs)
    if len(ids.shape) == 0:
        raise ValueError(scalar_ids_message(layer_name))
    if weights is not None:
        weights = ops.convert_to_tensor(weights)
        _check_same_shape(weights.shape, ids.shape, "ids", layer_name)
    if mask is not None:
        mask = ops.convert_to_tensor(mask)
        _check_same_shape(mask.shape, ids.shape, "ids", layer_name, "mask")
    if len(ids.shape) == 1:
        # Bags of one id each, as in keras-rs EmbedReduce.
        ids = ops.expand_dims(ids, -1)
        weights = None if weights is None else ops.expand_dims(weights, -1)
        mask = None if mask is None else ops.expand_dims(mask, -1)
    kept = _padding_kept(ids, padding)
    if mask is not None:
        kept = both(kept, ops.cast(mask, "bool"))
    return DenseBags(ids, weights, kept)


def _flat_bags(inputs, weights, lengths, offsets, mask, padding, layer_name):
    if lengths is not None and offsets is not None:
        raise ValueError(
            f"Layer '{layer_name}' received both `lengths` and `offsets`; they "
            "say the same thing. Pass one of them."
        )
    ids = ops.convert_to_tensor(inputs)
    if len(ids.shape) != 1:
        raise ValueError(
            f"Layer '{layer_name}' received `lengths` or `offsets` with ids "
            f"of shape {tuple(ids.shape)}: flat ids, the bags one after the "
            "other, must be 1-D. Flatten them, or pass dense ids "
            "(batch, length) without `lengths` and `offsets`."
        )
    if lengths is not None:
        lengths = ops.cast(ops.convert_to_tensor(lengths), "int32")
        _check_rank_one(lengths, "lengths", layer_name)
        offsets = ops.concatenate([ops.zeros((1,), "int32"), ops.cumsum(lengths)])
    else:
        offsets = ops.cast(ops.convert_to_tensor(offsets), "int32")
        _check_rank_one(offsets, "offsets", layer_name)
    host_offsets = _check_layout_on_host(ids, lengths, offsets, layer_name)
    if weights is not None:
        weights = ops.convert_to_tensor(weights)
        _check_same_shape(weights.shape, ids.shape, "flat ids", layer_name)
    if mask is not None:
        mask = ops.cast(mask, "bool")
    if host_offsets is not None:
        dense = _dense_from_flat(ids, weights, mask, host_offsets, padding)
        if dense is not None:
            return dense
    num_bags = ops.shape(offsets)[0] - 1
    count = ops.shape(ids)[0]
    # The bag of each position: how many bags end at or before it, a
    # cumulative count of the bags' ends. (`ops.searchsorted` of the
    # positions in the ends says the same, but costs 100x more under XLA:
    # 36 ms against 0.4 ms for 26,875 ids in 1,024 bags.)
    ends = ops.clip(offsets[1:], 0, count)
    marks = ops.scatter_update(
        ops.zeros((count + 1,), "int32"),
        ops.expand_dims(ends, -1),
        ops.ones_like(ends),
        reduction="add",
    )
    bag_of = ops.cumsum(marks[:-1])
    # Positions past the last offset (possible only for traced layouts, the
    # eager ones are checked) belong to no bag.
    positions = ops.arange(count, dtype="int32")
    kept = ops.less(positions, offsets[-1])
    bag_of = ops.where(kept, bag_of, 0)
    kept = both(kept, _padding_kept(ids, padding))
    kept = both(kept, mask)
    return FlatBags(
        ids,
        bag_of,
        num_bags,
        weights,
        kept,
        lambda position: _flat_place(position, None, offsets),
    )


# Flat bags whose layout is read on the host (eager calls) are laid out as
# dense bags `(batch, longest)` when that at most doubles the positions: a
# dense pool is one reduction, fused with the gather, where segment sums
# scatter (Keras's PyTorch segment_sum, 24 ms for 26,875 ids of dim 64,
# against 5 ms for the padded take and sum).
DENSE_LAYOUT_GROWTH = 2


def _dense_from_flat(ids, weights, mask, offsets, padding):
    """`DenseBags` holding the flat bags of host `offsets`, or None when the
    padding would more than double the positions."""
    lengths = np.diff(offsets)
    count = int(offsets[-1])
    if count == 0:
        return None
    longest = int(lengths.max())
    if len(lengths) * longest > DENSE_LAYOUT_GROWTH * count:
        return None
    places = np.arange(longest)
    present = places[None, :] < lengths[:, None]
    positions = np.where(present, offsets[:-1, None] + places[None, :], 0)
    positions = ops.convert_to_tensor(positions.astype("int32"))
    kept = ops.convert_to_tensor(present)
    dense_ids = ops.take(ids, positions)
    kept = both(kept, _padding_kept(dense_ids, padding))
    if mask is not None:
        kept = both(kept, ops.take(mask, positions))
    if weights is not None:
        weights = ops.take(weights, positions)
    return DenseBags(dense_ids, weights, kept)


def _ragged_bags(inputs, weights, padding, layer_name):
    if len(inputs.shape) != 2:
        raise ValueError(
            f"Layer '{layer_name}' pools ragged ids of shape (batch, None) and "
            f"received a ragged tensor of shape {inputs.shape}. Merge the "
            "inner dimensions first."
        )
    if weights is not None:
        if not hasattr(weights, "flat_values"):
            raise ValueError(
                f"Layer '{layer_name}' received ragged ids and weights of "
                f"type {type(weights).__name__}: weights come in the ids' "
                "form, a ragged tensor with the same row lengths."
            )
        _check_same_layout(inputs.row_splits, weights.row_splits, layer_name)
        weights = weights.flat_values
    return _flat_bags(
        inputs.flat_values,
        weights,
        None,
        inputs.row_splits,
        None,
        padding,
        layer_name,
    )


def _sparse_bags(inputs, weights, padding, layer_name):
    if len(inputs.shape) != 2:
        raise ValueError(
            f"Layer '{layer_name}' pools sparse ids of shape (batch, length) "
            f"and received a sparse tensor of shape {tuple(inputs.shape)}."
        )
    values = _sparse_values(inputs)
    indices = ops.cast(inputs.indices, "int32")
    num_bags = inputs.shape[0]
    if num_bags is None:
        num_bags = ops.cast(inputs.dense_shape[0], "int32")
    if len(indices.shape) == 3:
        # A JAX BCOO batched along its rows (`n_batch=1`, as Keras's data
        # adapters slice one): `indices` `(batch, nse, 1)` holds each row's
        # columns, `data` `(batch, nse)` its values; a padding entry's
        # column is out of bounds.
        columns = indices[..., 0]
        kept = ops.reshape(ops.less(columns, inputs.shape[1]), (-1,))
        rows = ops.arange(num_bags, dtype="int32")[:, None]
        bag_of = ops.reshape(ops.broadcast_to(rows, ops.shape(columns)), (-1,))
        values = ops.reshape(values, (-1,))
        places = ops.reshape(columns, (-1,))
    else:
        bag_of, places = indices[:, 0], indices[:, 1]
        # An unbatched BCOO may carry padding entries out of bounds too.
        kept = ops.less(bag_of, num_bags)
        bag_of = ops.where(kept, bag_of, 0)
    kept = both(kept, _padding_kept(values, padding))
    if weights is not None:
        if not hasattr(weights, "indices"):
            raise ValueError(
                f"Layer '{layer_name}' received sparse ids and weights of type "
                f"{type(weights).__name__}: weights come in the ids' form, a "
                "sparse tensor with the same indices."
            )
        _check_same_layout(inputs.indices, weights.indices, layer_name)
        weights = ops.reshape(_sparse_values(weights), (-1,))
        _check_same_shape(weights.shape, values.shape, "sparse ids' values", layer_name)

    def locate_on_host(position):
        bag = _ids.read_on_host(bag_of)[position]
        return int(bag), int(_ids.read_on_host(places)[position])

    return FlatBags(values, bag_of, num_bags, weights, kept, locate_on_host)


def _sparse_values(tensor):
    """The values of a `tf.SparseTensor` (`values`) or JAX `BCOO` (`data`)."""
    return tensor.values if hasattr(tensor, "dense_shape") else tensor.data


def _padding_kept(ids, padding):
    return None if padding is None else ops.not_equal(ids, padding)


def _flat_place(position, lengths, offsets):
    """The bag and the place in it of flat position `position`, read on
    the host."""
    if offsets is None:
        lengths = np.asarray(_ids.read_on_host(ops.convert_to_tensor(lengths)))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
    else:
        offsets = np.asarray(_ids.read_on_host(ops.convert_to_tensor(offsets)))
    bag = int(np.searchsorted(offsets[1:], position, side="right"))
    return bag, position - int(offsets[bag])


def _check_layout_on_host(ids, lengths, offsets, layer_name):
    """Eagerly, `lengths` must be nonnegative and `offsets` nondecreasing,
    from 0 to the number of ids: a mismatch would move ids between bags or
    drop them. Returns the offsets read on the host, or None for a traced
    layout, which cannot be read (its uncovered ids are dropped)."""
    try:
        offsets_on_host = np.asarray(_ids.read_on_host(offsets))
        count = _ids.read_on_host(ops.shape(ids)[0])
    except (TypeError, RuntimeError):
        return None
    count = int(count)
    if lengths is not None:
        lengths_on_host = _ids.read_on_host(lengths)
        if (lengths_on_host < 0).any():
            raise ValueError(
                f"Layer '{layer_name}' received negative bag `lengths`: "
                f"{lengths_on_host.tolist()[:20]}. A length counts a bag's ids "
                "(0 for an empty bag)."
            )
        if int(offsets_on_host[-1]) != count:
            raise ValueError(
                f"Layer '{layer_name}' received bag `lengths` adding up to "
                f"{int(offsets_on_host[-1])} for {count} flat ids. The lengths "
                "must add up to the number of ids."
            )
        return offsets_on_host
    if (
        offsets_on_host.shape[0] == 0
        or int(offsets_on_host[0]) != 0
        or int(offsets_on_host[-1]) != count
        or (np.diff(offsets_on_host) < 0).any()
    ):
        raise ValueError(
            f"Layer '{layer_name}' received `offsets` "
            f"{offsets_on_host.tolist()[:20]} for {count} flat ids. Offsets "
            "hold batch_size + 1 nondecreasing entries: where each bag starts, "
            "from 0, and the number of ids last (CSR, as torch.nn.EmbeddingBag "
            "with include_last_offset=True). For torch's offsets without the "
            "last entry, append the number of ids."
        )
    return offsets_on_host


def _check_same_layout(ids_layout, weights_layout, layer_name):
    """Eagerly, ragged or sparse weights must place their values where the
    ids are (the same row splits, or indices): weights laid out otherwise
    would be paired with other ids."""
    try:
        ids_layout = _ids.read_on_host(ids_layout)
        weights_layout = _ids.read_on_host(weights_layout)
    except (TypeError, RuntimeError):
        return  # traced: the layout cannot be read
    if ids_layout.shape != weights_layout.shape or (ids_layout != weights_layout).any():
        raise ValueError(
            f"Layer '{layer_name}' received weights laid out differently from "
            "the ids (other row lengths, or other sparse indices): each "
            "weight must sit where its id is. Build the weights with the "
            "ids' layout, e.g. `ids.with_flat_values(values)` for ragged ids."
        )


def _check_rank_one(tensor, name, layer_name):
    if len(tensor.shape) != 1:
        raise ValueError(
            f"Layer '{layer_name}' received `{name}` of shape "
            f"{tuple(tensor.shape)}; it must be 1-D."
        )


def _check_same_shape(shape, ids_shape, what, layer_name, name="weights"):
    shape, ids_shape = tuple(shape), tuple(ids_shape)
    compatible = len(shape) == len(ids_shape) and all(
        a is None or b is None or a == b for a, b in zip(shape, ids_shape, strict=True)
    )
    if not compatible:
        raise ValueError(
            f"Layer '{layer_name}' received `{name}` of shape {shape} for "
            f"{what} of shape {ids_shape}: each id has one entry, so the "
            "shapes must be equal."
        )
