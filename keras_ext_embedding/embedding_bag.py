from typing import Any, Literal

import keras
from numpy.typing import ArrayLike

from keras_ext_embedding import _bag_inputs, _pooling
from keras_ext_embedding._arguments import check_choice
from keras_ext_embedding.embedding import Embedding


@keras.saving.register_keras_serializable(package="keras_ext_embedding")
class EmbeddingBag(Embedding):
    """Looks up a bag of ids per example and pools their rows into one vector.

    The layer of multi-valued features (a movie's genres, a user's last
    items, a query's words and bigrams): each example holds a bag of ids,
    optionally weighted, and gets one vector of `output_dim`:

    - `"sum"`: `sum(w * e)`
    - `"mean"` (default): `sum(w * e) / sum(w)`
    - `"sqrtn"`: `sum(w * e) / sqrt(sum(w ** 2))`
    - `"max"`, `"min"`: the elementwise max (min) of `w * e`

    where `e` are the bag's rows and `w` its per-id `weights` (1 when none
    are given). Padding ids (`mask_zero=True` makes 0 the padding id,
    `padding_id=` names another) and positions masked upstream carry weight
    0: they never count, in any combiner, and never train. A bag without
    any id that counts gives zeros for every combiner, and so does a bag
    whose weights sum to 0 for `"mean"` and `"sqrtn"` (never NaN, never
    inf). Invalid ids follow `invalid_ids` as in `Embedding`: eagerly an
    `InvalidIdError` naming the bag and the position in it; traced (or with
    `invalid_ids="zeros"`), the id is dropped from its bag (weight 0).

    Every table form of `Embedding` pools the same way: LoRA gathers only
    the bags' rows of its adapter `A`, int8 and int4 tables dequantize only
    the gathered rows, and `optimizer=` trains the table row-sparsely
    (padding, masked and invalid ids never move a row). To look up several
    features in one table, in one call, see `SharedEmbedding`.

    A drop-in replacement for keras-rs `EmbedReduce` (same arguments,
    defaults, call and results), except that padding is excluded:
    `EmbedReduce` with `mask_zero=True` counts id 0 in its sum and mean.
    `replace_embeddings(model)` upgrades `EmbedReduce` layers.

    Examples:
        >>> layer = keras_ext_embedding.EmbeddingBag(
        ...     1000, 8, combiner="mean", mask_zero=True
        ... )
        >>> ids = np.array([[4, 20, 0], [7, 0, 0]])  # bags padded with 0
        >>> tuple(layer(ids).shape)
        (2, 8)
        >>> # Ragged bags, flat with their lengths (or offsets):
        >>> flat_ids = np.array([4, 20, 7, 9, 9])
        >>> tuple(layer(flat_ids, lengths=np.array([2, 0, 3])).shape)
        (3, 8)

    Args:
        input_dim: Integer. Size of the vocabulary,
            i.e. maximum integer index + 1.
        output_dim: Integer. Dimension of the dense embedding.
        embeddings_initializer: Initializer for the `embeddings`
            matrix (see `keras.initializers`).
        embeddings_regularizer: Regularizer function applied to
            the `embeddings` matrix (see `keras.regularizers`).
        embeddings_constraint: Constraint function applied to
            the `embeddings` matrix (see `keras.constraints`).
        mask_zero: Boolean. If `True`, id 0 is padding: it is left out of
            every bag. The output carries no mask (the bag axis is pooled).
        weights: Optional floating-point matrix of size
            `(input_dim, output_dim)`. The initial embeddings values to use.
        combiner: `"mean"` (default), `"sum"`, `"sqrtn"`, `"max"` or
            `"min"`: how a bag's rows are pooled, see above.
        padding_id: Optional integer in `[0, input_dim)`: the padding id,
            left out of every bag. `mask_zero=True` is `padding_id=0`.
        **kwargs: The other arguments of `keras_ext_embedding.Embedding`
            (`lora_rank`, `lora_alpha`, `quantization_config`,
            `invalid_ids`, `optimizer`) and base layer keyword arguments,
            such as `name` and `dtype`.

    Call arguments:
        inputs: The bags' ids, in one of these forms:
            - dense ids `(..., length)`, padded with the padding id or
              masked upstream, pooled over the last axis; 1-D ids
              `(batch,)` are bags of one id;
            - flat ids `(n,)`, the bags one after the other, with `lengths`
              or `offsets` (the form of `torch.nn.EmbeddingBag` and
              TorchRec);
            - a `tf.RaggedTensor` `(batch, None)` (TensorFlow), a
              `tf.SparseTensor` or a JAX `BCOO` `(batch, length)`: the
              entries present form each bag.
        weights: Optional per-id weights, in the same form and shape as the
            ids (for flat ids, `(n,)`). Trainable upstream weightings get
            gradients.
        lengths: Optional integer `(batch,)`: the number of ids of each bag
            of flat ids (0 for an empty bag). They must add up to `n`.
        offsets: Optional integer `(batch + 1,)`: where each bag of flat ids
            starts, and `n` last (CSR, torch's `include_last_offset=True`).
        mask: Optional boolean mask of dense ids, passed by Keras from the
            layer before: `False` positions do not count.
        training: As for `Embedding`: a row-sparse table trains in
            training calls only.

    Input shape:
        Dense `(d1, ..., dn, length)`, commonly `(batch_size, length)`;
        `(batch_size,)`; or flat `(n,)` with `lengths` `(batch_size,)`.

    Output shape:
        `(d1, ..., dn, output_dim)`, or `(batch_size, output_dim)`, in the
        layer's compute dtype, without a mask.
    """

    _quantizes_own_tables = True

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        embeddings_initializer: str | keras.initializers.Initializer = "uniform",
        embeddings_regularizer: str | keras.regularizers.Regularizer | None = None,
        embeddings_constraint: str | keras.constraints.Constraint | None = None,
        mask_zero: bool = False,
        weights: ArrayLike | None = None,
        combiner: Literal["mean", "sum", "sqrtn", "max", "min"] = "mean",
        padding_id: int | None = None,
        **kwargs: Any,
    ):
        check_choice("combiner", combiner, _pooling.COMBINERS)
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
        self.combiner = combiner
        self.padding_id = _bag_inputs.padding_id_argument(
            padding_id, mask_zero, input_dim
        )
        # The layer consumes a mask from upstream and pools it away.
        self.supports_masking = True

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
        # Keras passes the ids' mask from upstream as `mask`, or, when the
        # call has another tensor argument (`weights`), as `inputs_mask`.
        mask = inputs_mask if mask is None else mask
        bags = _bag_inputs.bags(
            inputs, weights, lengths, offsets, mask, self._padding(), self.name
        )
        rows, valid = self._gather(
            bags.ids, training, kept=bags.kept, locate=bags.locate
        )
        kept = _pooling.both(bags.kept, valid)
        return bags.pool(rows, kept, self.combiner)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape, lengths_shape=None):
        if lengths_shape is not None:
            return (lengths_shape[0], self.output_dim)
        if len(input_shape) == 0:
            raise ValueError(_bag_inputs.scalar_ids_message(self.name))
        if len(input_shape) == 1:
            return (input_shape[0], self.output_dim)
        return (*input_shape[:-1], self.output_dim)

    def compute_output_spec(
        self,
        inputs,
        weights=None,
        lengths=None,
        offsets=None,
        mask=None,
        inputs_mask=None,
    ):
        if lengths is not None:
            shape = (lengths.shape[0], self.output_dim)
        elif offsets is not None:
            batch = offsets.shape[0]
            shape = (None if batch is None else batch - 1, self.output_dim)
        else:
            shape = self.compute_output_shape(inputs.shape)
        return keras.KerasTensor(shape, dtype=self.compute_dtype)

    def get_config(self):
        config = {**super().get_config(), "combiner": self.combiner}
        # As keras-rs `EmbedReduce`'s config when no padding id is named.
        if self.padding_id is not None:
            config["padding_id"] = self.padding_id
        return config

    def _host_locate(self, args, kwargs):
        return _bag_inputs.host_locator(args, kwargs)

    def _padding(self):
        """The padding id, or None."""
        return _bag_inputs.padding(self.mask_zero, self.padding_id)
