from typing import Any, Literal

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import _checkpoint, _tables
from keras_ext_embedding.embedding import Embedding


@keras.saving.register_keras_serializable(package="keras_ext_embedding")
class ReversibleEmbedding(Embedding):
    """An embedding layer which can project backwards to the input dim.

    A drop-in replacement for `keras.layers.ReversibleEmbedding`, the token
    embedding and output projection of language models (keras-hub's GPT-2,
    BERT, Gemma, Llama...): the same arguments, variables, config and
    checkpoints. `layer(ids)` looks up rows as our `Embedding` does (invalid
    ids, LoRA rows, gather-first int4); `layer(h, reverse=True)` projects
    hidden states onto the vocabulary: `h @ embeddings^T` with tied weights
    (the default), `h @ reverse_embeddings` with `tie_weights=False`.

    The reverse projection reads each table once and never builds an
    `input_dim x output_dim` temporary (Keras transposes the float table on
    every eager call, merges LoRA into a new table, and unpacks and
    dequantizes a whole int4 table):

    - Float: one table-first matmul, `(W @ h^T)^T` (no transposed table).
    - LoRA (tied): `h @ W^T + (lora_alpha / rank) * (h @ B^T) @ A^T`, in every
      table format. Keras 3.15 adds the adapters to the float tied
      projection only, not to a quantized one (keras-team/keras#23630;
      Keras 3.16 adds them in every format too). With untied
      weights `reverse_embeddings` is frozen while LoRA trains (Keras leaves
      the whole head trainable) and gets no adapters.
    - int8: Keras's numerics, bit for bit: the hidden states quantized by
      `inputs_quantizer` (AbsMax per token), an exact integer product, then
      both scales. int4, per row or grouped: weight-only, as in Keras, within
      float32 rounding of its logits. Quantized tables are read in vocabulary
      chunks of a few MiB.

    The logits are in `reverse_dtype` when set, else in the layer's compute
    dtype, in every mode (`compute_output_spec` says so; Keras's follow the
    input's dtype and ignore `reverse_dtype` when quantized). With
    `logit_soft_cap`, they become `tanh(logits / cap) * cap`, last.

    Examples:
        >>> layer = keras_ext_embedding.ReversibleEmbedding(100, 32)
        >>> token_ids = np.random.randint(100, size=(16, 50))
        >>> hidden_states = layer(token_ids)
        >>> tuple(hidden_states.shape)
        (16, 50, 32)
        >>> logits = layer(hidden_states, reverse=True)
        >>> tuple(logits.shape)
        (16, 50, 100)

    Args:
        input_dim: Integer. Size of the vocabulary,
            i.e. maximum integer index + 1.
        output_dim: Integer. Dimension of the dense embedding.
        tie_weights: Boolean, whether or not the matrix for embedding and
            the matrix for the `reverse` projection should share the same
            weights. If `False`, a separate trainable `reverse_embeddings`
            `(output_dim, input_dim)` projects back.
        embeddings_initializer: Initializer for the `embeddings`
            matrix (see `keras.initializers`), and for `reverse_embeddings`.
        embeddings_regularizer: Regularizer function applied to
            the `embeddings` matrix (see `keras.regularizers`).
        embeddings_constraint: Constraint function applied to
            the `embeddings` matrix (see `keras.constraints`).
        mask_zero: Boolean, whether or not the input value 0 is a special
            "padding" value that should be masked out. The mask is attached to
            the looked-up rows, never to the logits.
        reverse_dtype: The dtype for the reverse projection computation and
            its logits. Defaults to the `compute_dtype` of the layer.
        logit_soft_cap: If `logit_soft_cap` is set and `reverse=True`, the
            output logits will be scaled by
            `tanh(logits / logit_soft_cap) * logit_soft_cap`. This narrows the
            range of output logits and can improve training.
        **kwargs: The other arguments of `keras_ext_embedding.Embedding`:
            `weights` (the table; with `tie_weights=False` also
            `[embeddings, reverse_embeddings]`), `lora_rank`, `lora_alpha`,
            `quantization_config`, `invalid_ids`, and base layer keyword
            arguments such as `name`, `dtype` and `trainable`.

    Call arguments:
        inputs: Token ids (as for `Embedding`), or with `reverse=True` float
            hidden states whose last dimension is `output_dim`.
        reverse: Boolean. If `True` the layer will perform a linear projection
            from `output_dim` to `input_dim`, instead of a normal embedding
            call. Default to `False`.

    Input shape:
        Ids of any shape `(d1, ..., dn)`; with `reverse=True`,
        `(d1, ..., dn, output_dim)`.

    Output shape:
        `(d1, ..., dn, output_dim)`; with `reverse=True`,
        `(d1, ..., dn, input_dim)`.
    """

    _quantizes_own_tables = True

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        tie_weights: bool = True,
        embeddings_initializer: str | keras.initializers.Initializer = "uniform",
        embeddings_regularizer: str | keras.regularizers.Regularizer | None = None,
        embeddings_constraint: str | keras.constraints.Constraint | None = None,
        mask_zero: bool = False,
        reverse_dtype: str | None = None,
        logit_soft_cap: float | None = None,
        **kwargs: Any,
    ):
        if not isinstance(tie_weights, bool):
            raise ValueError(
                "`tie_weights` must be True or False. Received: "
                f"tie_weights={tie_weights!r} (of type {type(tie_weights).__name__})."
            )
        if logit_soft_cap is not None and (
            isinstance(logit_soft_cap, bool)
            or not isinstance(logit_soft_cap, (int, float))
            or not logit_soft_cap > 0
        ):
            raise ValueError(
                "`logit_soft_cap` must be None or a positive number. Received: "
                f"logit_soft_cap={logit_soft_cap!r}."
            )
        if reverse_dtype is not None:
            reverse_dtype = _float_dtype(reverse_dtype)
        if tie_weights and kwargs.get("optimizer") is not None:
            # The tied projection's dense gradient would add to the stepped
            # table that the row-sparse lookup returns as its gradient.
            raise ValueError(
                "A tied `ReversibleEmbedding` cannot train its table with "
                "`optimizer=`: the reverse projection reads every row, so its "
                "gradient is dense. Pass tie_weights=False (the forward table "
                "then trains row-sparsely, `reverse_embeddings` with the "
                "model's optimizer), or optimizer=None."
            )
        # Before the base's __init__, which builds the tables when given
        # `weights`.
        self.tie_weights = tie_weights
        self._reverse_table = (
            None if tie_weights else _tables.FloatTable(self, _tables.REVERSE)
        )
        self._reversing = False
        # Keras's attribute: how a quantized layer quantizes hidden states
        # before the reverse projection (set by `quantized_build`).
        self.inputs_quantizer = None
        super().__init__(
            input_dim,
            output_dim,
            embeddings_initializer=embeddings_initializer,
            embeddings_regularizer=embeddings_regularizer,
            embeddings_constraint=embeddings_constraint,
            mask_zero=mask_zero,
            **kwargs,
        )
        self.reverse_dtype = reverse_dtype
        self.logit_soft_cap = logit_soft_cap

    def __call__(self, inputs, *args, **kwargs):
        reverse = kwargs.get("reverse", args[0] if args else False)
        if not reverse:
            return super().__call__(inputs, *args, **kwargs)
        # Hidden states are not ids: no host-side id check. Their shape and
        # dtype are checked here, where the error is not wrapped in Keras's
        # call context. The flag tells compute_mask, which Keras calls
        # without the call's arguments, that the logits carry no mask.
        if hasattr(inputs, "shape") and hasattr(inputs, "dtype"):
            self._check_hidden_dtype(inputs.dtype)
            self._check_hidden_shape(tuple(inputs.shape))
        self._reversing = True
        try:
            return keras.layers.Layer.__call__(self, inputs, *args, **kwargs)
        finally:
            self._reversing = False

    def call(self, inputs, reverse=False, training=None):
        if not reverse:
            return super().call(inputs, training=training)
        return self._project(inputs)

    def _reads_table_whole(self):
        return self.tie_weights

    def compute_mask(self, inputs, mask=None):
        if self._reversing:
            return None
        return super().compute_mask(inputs, mask)

    def compute_output_shape(self, input_shape, reverse=False):
        if not reverse:
            return super().compute_output_shape(input_shape)
        self._check_hidden_shape(input_shape)
        return (*input_shape[:-1], self.input_dim)

    def compute_output_spec(self, inputs, reverse=False):
        if not reverse:
            return super().compute_output_spec(inputs)
        self._check_hidden_dtype(inputs.dtype)
        output_shape = self.compute_output_shape(inputs.shape, reverse=True)
        return keras.KerasTensor(output_shape, dtype=self._logits_dtype())

    def quantize(
        self,
        mode: Literal["int8", "int4"] | None = None,
        type_check: bool = True,
        config: keras.quantizers.QuantizationConfig | None = None,
    ) -> None:
        """Quantizes the table (and an untied `reverse_embeddings`) to int8 or
        int4, as `keras.layers.ReversibleEmbedding` does.

        The same variables, dtype policy and checkpoint layout as Keras (see
        `Embedding.quantize`); an untied reverse table is quantized per
        vocabulary entry, in the same format as the lookup's table. After
        `quantize("int8")` the reverse projection quantizes the hidden
        states as Keras does (`inputs_quantizer`); int4 is weight-only.

        Examples:
            >>> layer = keras_ext_embedding.ReversibleEmbedding(
            ...     1000, 64, tie_weights=False)
            >>> layer.build()
            >>> layer.quantize("int8")
            >>> for weight in layer.weights:
            ...     print(weight.name, weight.dtype)
            embeddings int8
            embeddings_scale float32
            reverse_embeddings int8
            reverse_embeddings_scale float32

        Args:
            mode: `"int8"` or `"int4"`.
            type_check: As in Keras: subclasses must pass `False` to confirm
                they read the quantized variables correctly.
            config: Optional `keras.quantizers.Int8QuantizationConfig` or
                `Int4QuantizationConfig`.
        """
        super().quantize(mode, type_check=type_check, config=config)

    def quantized_build(self, embeddings_shape, mode, config=None):
        """Creates the quantized variables, named and shaped as in Keras."""
        super().quantized_build(embeddings_shape, mode, config)
        if not self.tie_weights:
            table = _tables.quantized_table(self, mode, config, _tables.REVERSE)
            table.build()
            self._reverse_table = table
        # A config names its activation quantizer (int8's default is AbsMax
        # per token, int4's none). Without one (a layer built from a
        # quantized dtype policy alone, as when loading a weights file),
        # int8 quantizes hidden states and int4 does not: the logits are
        # those of the layer that was quantized and saved. Keras 3.15
        # quantizes them for int4 too there, so its reloaded int4 layer's
        # logits differ from the saved one's (Keras 3.16 does as ours).
        if config is not None:
            self.inputs_quantizer = config.activation_quantizer
        elif mode == "int8":
            self.inputs_quantizer = keras.quantizers.AbsMaxQuantizer(axis=-1)
        else:
            self.inputs_quantizer = None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "tie_weights": self.tie_weights,
                "reverse_dtype": self.reverse_dtype,
                "logit_soft_cap": self.logit_soft_cap,
            }
        )
        return config

    def _tables(self):
        """The lookup's table, then an untied reverse table: Keras's order."""
        if self._reverse_table is None:
            return [self._table]
        return [self._table, self._reverse_table]

    def _tables_description(self):
        if self._reverse_table is None:
            return f"{self._table.description} (tie_weights=True)"
        return (
            f"{self._table.description} and {self._reverse_table.description} "
            "(tie_weights=False)"
        )

    def _assign_weights(self, weights):
        """`weights` is the table, or with untied weights also a list of the
        table and `reverse_embeddings` `(output_dim, input_dim)`."""
        pair = (
            isinstance(weights, (list, tuple))
            and len(weights) == 2
            and all(np.ndim(array) == 2 for array in weights)
        )
        if not pair:
            super()._assign_weights(weights)
            return
        if self._reverse_table is None:
            raise ValueError(
                f"Layer '{self.name}' has tied weights: `weights` is its one "
                "table, of shape (input_dim, output_dim), but it received two "
                "arrays. Pass the table alone, or `tie_weights=False` with "
                "[embeddings, reverse_embeddings]."
            )
        table, reverse = (np.asarray(array) for array in weights)
        super()._assign_weights(table)
        _checkpoint.check_shape(
            self.name,
            "`weights[1]` (reverse_embeddings)",
            reverse,
            (self.output_dim, self.input_dim),
            "Pass reverse_embeddings as Keras stores it, (output_dim, input_dim).",
        )
        self._reverse_table.assign_stored([reverse])

    def _project(self, hidden):
        self._check_hidden_dtype(hidden.dtype)
        self._check_hidden_shape(tuple(hidden.shape))
        dtype = self._logits_dtype()
        if self.tie_weights:
            logits = self._table.project(hidden, dtype, self.inputs_quantizer)
            if self._adapters is not None:
                delta = self._adapters.project(hidden)
                logits = ops.cast(ops.add(ops.cast(logits, "float32"), delta), dtype)
        else:
            logits = self._reverse_table.project(hidden, dtype, self.inputs_quantizer)
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def _logits_dtype(self):
        return self.reverse_dtype or self.compute_dtype

    def _check_hidden_shape(self, shape):
        if not shape or (shape[-1] is not None and shape[-1] != self.output_dim):
            raise ValueError(
                f"Layer '{self.name}' projects hidden states of size "
                f"output_dim={self.output_dim} onto its vocabulary with "
                f"`reverse=True`, but received hidden states of shape "
                f"{tuple(shape)}. Pass a tensor whose last dimension is "
                f"{self.output_dim}."
            )

    def _check_hidden_dtype(self, dtype):
        dtype = keras.backend.standardize_dtype(dtype)
        if "float" not in dtype:
            raise ValueError(
                f"Layer '{self.name}' called with `reverse=True` projects float "
                f"hidden states onto its vocabulary, but received {dtype} "
                "values. Call it without `reverse` to look up token ids."
            )


def _float_dtype(dtype):
    try:
        name = keras.backend.standardize_dtype(dtype)
    except ValueError:
        name = None
    if name is None or "float" not in name:
        raise ValueError(
            "`reverse_dtype` must be None or a float dtype such as 'float32' "
            f"or 'bfloat16'. Received: reverse_dtype={dtype!r}."
        )
    return name
