from typing import Any

import keras
import numpy as np
from keras import ops
from numpy.typing import ArrayLike

from keras_ext_embedding import _bag_inputs, _ids, _pooling
from keras_ext_embedding.embedding import Embedding


@keras.saving.register_keras_serializable(package="keras_ext_embedding")
class SharedEmbedding(Embedding):
    """One table looked up by several features, in one gather.

    The table of a recommender's items serves several features at once: the
    bag of items a user saw, pooled into one vector, and the candidate item,
    a sequence of one; a text model's word table serves a title and a body.
    `features` names them, each with its combiner (`"sum"`, `"mean"`,
    `"sqrtn"`, `"max"`, `"min"`, as in `EmbeddingBag`) or `None` to leave
    it unpooled (rows as `Embedding` gives them). A call takes a dict of ids
    and returns a dict of outputs, and gathers the ids of all features in
    one lookup: a table with `optimizer=` trains row-sparsely from all of
    them in one step (two calls of one such table in a step are refused),
    and a table costs one gather per step, not one per feature.

    The table, its arguments and its checkpoints are `Embedding`'s: LoRA,
    int8 and int4 tables, `invalid_ids` and `optimizer=` work the same way.
    Pooled features follow `EmbeddingBag` (padding and masked positions
    left out, empty bags give zeros); unpooled features get zeros at
    invalid ids (traced) and a Keras mask with `mask_zero=True`.

    Examples:
        >>> items = keras_ext_embedding.SharedEmbedding(
        ...     1000, 16, features={"history": "mean", "candidate": None},
        ...     mask_zero=True,
        ... )
        >>> outputs = items({
        ...     "history": np.array([[4, 20, 0], [7, 0, 0]]),
        ...     "candidate": np.array([[3], [9]]),
        ... })
        >>> {name: tuple(x.shape) for name, x in outputs.items()}
        {'history': (2, 16), 'candidate': (2, 1, 16)}

    Args:
        input_dim: Integer. Size of the vocabulary,
            i.e. maximum integer index + 1.
        output_dim: Integer. Dimension of the dense embedding.
        features: Dict from each feature's name to its combiner, or to
            `None` for a feature left unpooled. A call takes these keys.
        embeddings_initializer: Initializer for the `embeddings` matrix.
        embeddings_regularizer: Regularizer applied to the `embeddings`.
        embeddings_constraint: Constraint applied to the `embeddings`.
        mask_zero: Boolean. If `True`, id 0 is padding: left out of pooled
            bags, and masked in unpooled outputs.
        weights: Optional floating-point matrix of size
            `(input_dim, output_dim)`. The initial embeddings values to use.
        padding_id: Optional integer in `[0, input_dim)`: the padding id of
            the pooled features (see `EmbeddingBag`).
        **kwargs: The other arguments of `keras_ext_embedding.Embedding`
            (`lora_rank`, `lora_alpha`, `quantization_config`,
            `invalid_ids`, `optimizer`) and base layer keyword arguments.

    Call arguments:
        inputs: Dict from feature name to its ids, in any form
            `EmbeddingBag` takes for a pooled feature (dense, flat with
            `lengths`/`offsets`, ragged, sparse), and dense ids of any shape
            for an unpooled one.
        weights: Optional dict from pooled feature name to per-id weights.
        lengths: Optional dict from pooled feature name to the lengths of
            its flat ids' bags.
        offsets: Optional dict from pooled feature name to the offsets of
            its flat ids' bags.
        mask: Passed by Keras: a dict of masks of the inputs from upstream.
        training: As for `Embedding`.

    Output:
        Dict from feature name to `(batch, output_dim)` for a pooled feature
        and `(*ids.shape, output_dim)` for an unpooled one.
    """

    _quantizes_own_tables = True

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        features: dict[str, str | None],
        embeddings_initializer: str | keras.initializers.Initializer = "uniform",
        embeddings_regularizer: str | keras.regularizers.Regularizer | None = None,
        embeddings_constraint: str | keras.constraints.Constraint | None = None,
        mask_zero: bool = False,
        weights: ArrayLike | None = None,
        padding_id: int | None = None,
        **kwargs: Any,
    ):
        _check_features(features)
        super().__init__(
            input_dim,
            output_dim,
            embeddings_initializer=embeddings_initializer,
            embeddings_regularizer=embeddings_regularizer,
            embeddings_constraint=embeddings_constraint,
            mask_zero=mask_zero,
            weights=weights,
            **kwargs,
        )
        self.features = dict(features)
        self.padding_id = _bag_inputs.padding_id_argument(
            padding_id, mask_zero, input_dim
        )
        self.supports_masking = True

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, dict):
            self._check_names(inputs, "inputs")
            # NumPy ids are checked and made integer on the host, as
            # `Embedding` does, before conversion could narrow them.
            inputs = {
                name: self._host_ids(name, ids, kwargs)
                if isinstance(ids, (np.ndarray, list))
                else ids
                for name, ids in inputs.items()
            }
        return super().__call__(inputs, *args, **kwargs)

    def call(
        self,
        inputs,
        weights=None,
        lengths=None,
        offsets=None,
        mask=None,
        training=None,
        inputs_mask=None,
    ):
        # Keras passes the masks of the ids as `inputs_mask` when the call
        # has another tensor argument (`weights`), else as `mask`.
        mask = inputs_mask if mask is None else mask
        self._check_names(inputs, "inputs")
        extras = {"weights": weights, "lengths": lengths, "offsets": offsets}
        for argument, values in extras.items():
            self._check_pooled_names(values, argument)
        padding = _bag_inputs.padding(self.mask_zero, self.padding_id)
        parts = {}
        for name, combiner in self.features.items():
            ids, feature_mask = inputs[name], _entry(mask, name)
            if combiner is None:
                parts[name] = _Sequence(ids, feature_mask, padding, self.mask_zero)
            else:
                parts[name] = _bag_inputs.bags(
                    ids,
                    _entry(weights, name),
                    _entry(lengths, name),
                    _entry(offsets, name),
                    feature_mask,
                    padding,
                    f"{self.name}' feature '{name}",
                )
        # One gather for every feature: flat ids side by side.
        names = list(parts)
        flat_ids = [ops.reshape(parts[name].ids, (-1,)) for name in names]
        sizes = [ops.shape(ids)[0] for ids in flat_ids]
        dtype = keras.backend.result_type(*[ids.dtype for ids in flat_ids])
        all_ids = ops.concatenate([ops.cast(ids, dtype) for ids in flat_ids])
        kept = None
        if any(parts[name].kept is not None for name in names):
            kept = ops.concatenate(
                [ops.reshape(_kept_or_true(parts[name]), (-1,)) for name in names]
            )
        rows, valid = self._gather(
            all_ids, training, kept=kept, locate=_Locator(names, parts, sizes)
        )
        outputs, start = {}, 0
        for name, size in zip(names, sizes, strict=True):
            part = parts[name]
            feature_rows = ops.slice(rows, (start, 0), (size, self.output_dim))
            feature_valid = (
                None if valid is None else ops.slice(valid, (start,), (size,))
            )
            start = start + size
            shape = ops.shape(part.ids)
            feature_rows = ops.reshape(feature_rows, (*shape, self.output_dim))
            if feature_valid is not None:
                feature_valid = ops.reshape(feature_valid, shape)
            combiner = self.features[name]
            if combiner is None:
                outputs[name] = part.output(feature_rows, feature_valid)
            else:
                feature_kept = _pooling.both(part.kept, feature_valid)
                outputs[name] = part.pool(feature_rows, feature_kept, combiner)
        return outputs

    def compute_mask(self, inputs, mask=None):
        return {
            name: (
                ops.not_equal(inputs[name], 0)
                if combiner is None and self.mask_zero
                else None
            )
            for name, combiner in self.features.items()
        }

    def compute_output_spec(
        self,
        inputs,
        weights=None,
        lengths=None,
        offsets=None,
        mask=None,
        inputs_mask=None,
    ):
        outputs = {}
        for name, combiner in self.features.items():
            ids = inputs[name]
            if combiner is None:
                shape = (*ids.shape, self.output_dim)
            elif _entry(lengths, name) is not None:
                shape = (_entry(lengths, name).shape[0], self.output_dim)
            elif _entry(offsets, name) is not None:
                batch = _entry(offsets, name).shape[0]
                shape = (None if batch is None else batch - 1, self.output_dim)
            elif len(ids.shape) == 1:
                shape = (ids.shape[0], self.output_dim)
            else:
                shape = (*ids.shape[:-1], self.output_dim)
            outputs[name] = keras.KerasTensor(shape, dtype=self.compute_dtype)
        return outputs

    def get_config(self):
        config = {**super().get_config(), "features": dict(self.features)}
        if self.padding_id is not None:
            config["padding_id"] = self.padding_id
        return config

    def _host_ids(self, name, ids, kwargs):
        locate = None
        if self.features[name] is not None:
            per_feature = {
                key: _entry(kwargs.get(key), name) for key in ("lengths", "offsets")
            }
            locate = _bag_inputs.host_locator((), per_feature)
        else:
            locate = _sequence_locate
        feature_locate = locate and (
            lambda position: f"of feature '{name}' {locate(position)}"
        )
        return _ids.host_ids(
            ids,
            self.input_dim,
            self.name,
            check=self.invalid_ids == "raise",
            locate=feature_locate,
        )

    def _check_names(self, values, argument):
        if not isinstance(values, dict) or set(values) != set(self.features):
            received = sorted(values) if isinstance(values, dict) else values
            raise ValueError(
                f"Layer '{self.name}' looks up the features "
                f"{sorted(self.features)} and takes `{argument}` as a dict "
                f"with exactly those keys. Received: {argument}={received!r}."
            )

    def _check_pooled_names(self, values, argument):
        if values is None:
            return
        pooled = sorted(name for name, c in self.features.items() if c is not None)
        if not isinstance(values, dict) or not set(values) <= set(pooled):
            received = sorted(values) if isinstance(values, dict) else values
            raise ValueError(
                f"Layer '{self.name}' takes `{argument}` as a dict keyed by "
                f"its pooled features, {pooled}. Received: "
                f"{argument}={received!r}."
            )


class _Sequence:
    """An unpooled feature: its rows as `Embedding` gives them."""

    def __init__(self, ids, mask, padding, mask_zero):
        if _bag_inputs.form(ids) != "dense":
            raise ValueError(
                "An unpooled feature takes dense ids; received a "
                f"{type(ids).__name__}. Pool it (give it a combiner), or "
                "densify its ids."
            )
        self.ids = ops.convert_to_tensor(ids)
        # What trains a row-sparse table: not the padding, nor what is masked.
        kept = ops.not_equal(self.ids, 0) if mask_zero else None
        if mask is not None:
            kept = _pooling.both(kept, ops.cast(mask, "bool"))
        self.kept = kept

    @staticmethod
    def locate(position):
        return _sequence_locate(position)

    def output(self, rows, valid):
        if valid is None:
            return rows
        return _ids.zero_invalid_rows(rows, valid)


class _Locator:
    """Names an invalid id of the concatenated ids by its feature and its
    place there."""

    def __init__(self, names, parts, sizes):
        self.names, self.parts, self.sizes = names, parts, sizes

    def __call__(self, position):
        flat, start = position[0], 0
        for name, size in zip(self.names, self.sizes, strict=True):
            size = int(_ids.read_on_host(size))
            if flat < start + size:
                part = self.parts[name]
                shape = tuple(int(d) for d in ops.shape(part.ids))
                local = tuple(int(i) for i in np.unravel_index(flat - start, shape))
                return f"of feature '{name}' {part.locate(local)}"
            start += size
        return f"at position {position}"


def _sequence_locate(position):
    return f"at position {position}"


def _entry(values, name):
    return None if values is None else values.get(name)


def _kept_or_true(part):
    if part.kept is not None:
        return part.kept
    return ops.ones(ops.shape(part.ids), "bool")


def _check_features(features):
    if not isinstance(features, dict) or not features:
        raise ValueError(
            "`features` must be a non-empty dict from feature name to its "
            "combiner (or None for an unpooled feature). Received: "
            f"features={features!r}."
        )
    for name, combiner in features.items():
        if not isinstance(name, str):
            raise ValueError(
                f"`features` keys are the features' names (strings). Received "
                f"the key {name!r}."
            )
        if combiner is not None and combiner not in _pooling.COMBINERS:
            raise ValueError(
                f"`features['{name}']` must be one of {_pooling.COMBINERS} or "
                f"None (unpooled). Received: {combiner!r}."
            )
