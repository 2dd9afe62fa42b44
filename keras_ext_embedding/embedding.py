import warnings

import keras
import numpy as np
from keras import ops

from keras_ext_embedding import _checkpoint, _ids
from keras_ext_embedding._arguments import (
    check_choice,
    check_positive_int,
    check_positive_number,
)
from keras_ext_embedding.errors import InvalidIdError

INVALID_IDS_MODES = ("raise", "zeros")
UNBUILT_EMBEDDINGS = "You must build the layer before accessing `embeddings`."


@keras.saving.register_keras_serializable(package="keras_ext_embedding")
class Embedding(keras.layers.Layer):
    """Turns nonnegative integers (indexes) into dense vectors of fixed size.

    e.g. `[[4], [20]] -> [[0.25, 0.1], [0.6, -0.2]]`

    A drop-in replacement for `keras.layers.Embedding`: the same arguments,
    variables, config and checkpoints, with these differences on every
    backend (TensorFlow, JAX, PyTorch):

    - Invalid ids (negative, `>= input_dim`, or floats that are not whole
      numbers) never give NaN, a wrapped row or a crash. When the ids can be
      read (eager execution, including `Model.fit`/`predict` on PyTorch,
      which Keras runs eagerly), the layer raises
      `keras_ext_embedding.InvalidIdError` (a `ValueError`) naming the first
      invalid id, its position and the valid range. When the ids are traced
      (`jax.jit`, `tf.function`, the compiled steps of `Model.fit`/`predict`
      on TensorFlow and JAX), nothing can raise, so each invalid position
      gets an all-zero vector. `invalid_ids="zeros"` asks for zeros always:
      no check and no device-to-host sync, for pipelines that validate ids
      upstream.
    - Integer ids of any width are used as they are; float ids are accepted
      when they hold whole numbers (`keras.Input` defaults to float32), and
      refused when their dtype cannot hold every id below `input_dim` exactly.
    - With LoRA, the forward pass gathers only the looked-up rows of the
      adapters (`A[ids] @ B`) instead of rebuilding the
      `input_dim x output_dim` table, and saving keeps the adapters beside the
      table so fine-tuning resumes where it stopped. `merge_lora()` folds them
      in for deployment.

    Example:

    >>> model = keras.Sequential()
    >>> model.add(keras_ext_embedding.Embedding(1000, 64))
    >>> # The model takes an integer matrix of size (batch, input_length); the
    >>> # largest id should be no larger than 999 (vocabulary size).
    >>> input_array = np.random.randint(1000, size=(32, 10))
    >>> model.compile("rmsprop", "mse")
    >>> output_array = model.predict(input_array, verbose=0)
    >>> print(output_array.shape)
    (32, 10, 64)

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
        mask_zero: Boolean, whether or not the input value 0 is a special
            "padding" value that should be masked out. If `True`, all
            subsequent layers in the model need to support masking, and
            index 0 cannot be used in the vocabulary (`input_dim` should
            equal size of vocabulary + 1).
        weights: Optional floating-point matrix of size
            `(input_dim, output_dim)`. The initial embeddings values to use.
        lora_rank: Optional positive integer. If set, the layer's forward pass
            implements LoRA (Low-Rank Adaptation) with the provided rank: the
            table is frozen and a trainable low-rank delta `A @ B` is added.
            You can also call `layer.enable_lora(rank)` on a built layer.
        lora_alpha: Optional positive number. The delta is scaled by
            `lora_alpha / lora_rank`. Defaults to `lora_rank`. Kept through
            build, `get_config` and reloading.
        quantization_config: Reserved for quantization, which this layer does
            not support yet; must be `None`.
        invalid_ids: `"raise"` (default) or `"zeros"`. How ids outside
            `[0, input_dim)` or non-whole float ids are handled, see above.
        **kwargs: Base layer keyword arguments, such as `name`, `dtype`,
            `trainable` and `activity_regularizer`.

    Call arguments:
        inputs: Ids of any rank (a scalar, 1-D, N-D, an empty batch), as a
            tensor, a NumPy array or a nested list; also a TensorFlow
            `SparseTensor` or JAX `BCOO` (missing entries are id 0, as in
            Keras) and a TensorFlow `RaggedTensor` (ragged output).

    Input shape:
        Any shape `(d1, ..., dn)`, commonly `(batch_size, input_length)`.

    Output shape:
        `(d1, ..., dn, output_dim)`, in the layer's compute dtype.
    """

    def __init__(
        self,
        input_dim,
        output_dim,
        embeddings_initializer="uniform",
        embeddings_regularizer=None,
        embeddings_constraint=None,
        mask_zero=False,
        weights=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        invalid_ids="raise",
        **kwargs,
    ):
        check_positive_int("input_dim", input_dim)
        check_positive_int("output_dim", output_dim)
        if lora_rank is not None:
            check_positive_int("lora_rank", lora_rank)
        if lora_alpha is not None:
            check_positive_number("lora_alpha", lora_alpha)
        check_choice("invalid_ids", invalid_ids, INVALID_IDS_MODES)
        if quantization_config is not None:
            raise NotImplementedError(
                "keras_ext_embedding.Embedding does not support quantization "
                "yet. Received: quantization_config="
                f"{quantization_config!r}. Remove the argument, or use "
                "keras.layers.Embedding for a quantized table."
            )
        input_length = kwargs.pop("input_length", None)
        if input_length is not None:
            warnings.warn(
                "Argument `input_length` is deprecated. Just remove it.",
                stacklevel=2,
            )
        super().__init__(**kwargs)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.embeddings_constraint = keras.constraints.get(embeddings_constraint)
        self.mask_zero = mask_zero
        self.supports_masking = mask_zero
        # Ids are never cast to the compute dtype: float16 would round them.
        self.autocast = False
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else lora_rank
        self.lora_enabled = False
        self.quantization_config = quantization_config
        self.invalid_ids = invalid_ids
        self._lora_a_initializer = None

        if weights is not None:
            self.build()
            if isinstance(weights, (list, tuple)) and len(weights) == 1:
                weights = weights[0]
            weights = np.asarray(weights)
            self._check_table_shape(weights, "`weights`")
            self._set_table(weights)

    def build(self, input_shape=None):
        if self.built:
            return
        self._embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            name="embeddings",
            regularizer=self.embeddings_regularizer,
            constraint=self.embeddings_constraint,
            trainable=True,
        )
        self.built = True
        if self.lora_rank:
            self.enable_lora(self.lora_rank, lora_alpha=self.lora_alpha)

    @property
    def embeddings(self):
        """The table; with LoRA enabled, the table merged with its adapters."""
        if not self.built:
            raise AttributeError(UNBUILT_EMBEDDINGS)
        if not self.lora_enabled:
            return self._embeddings
        delta = ops.matmul(self.lora_embeddings_a, self.lora_embeddings_b)
        merged = ops.add(self._embeddings, self._lora_scale * delta)
        return ops.cast(merged, self.compute_dtype)

    def __getattr__(self, name):
        # Reached when the `embeddings` property raised AttributeError. On
        # PyTorch, torch.nn.Module.__getattr__ would replace its message by
        # "object has no attribute"; keep the one that says what to do.
        if name == "embeddings":
            raise AttributeError(UNBUILT_EMBEDDINGS)
        parent = getattr(super(), "__getattr__", None)
        if parent is None:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )
        return parent(name)

    def __call__(self, inputs, *args, **kwargs):
        # NumPy ids and Python lists are checked and made integer on the host,
        # before conversion to a backend tensor could narrow or round them.
        if isinstance(inputs, (np.ndarray, np.generic, list, int, float)):
            inputs = _ids.host_ids(
                inputs,
                self.input_dim,
                self.name,
                check=self.invalid_ids == "raise",
            )
        try:
            return super().__call__(inputs, *args, **kwargs)
        except InvalidIdError as error:
            # Keras re-raises an error from call() as a new one whose message
            # appends the backend's repr of the inputs, so the text would
            # differ by backend. The original, the same everywhere, is the
            # new error's __context__.
            original = error.__context__
            if isinstance(original, InvalidIdError):
                raise original from None
            raise

    def call(self, inputs):
        if hasattr(inputs, "with_flat_values"):
            # A tf.RaggedTensor: look up its flat values, keep its row splits.
            return inputs.with_flat_values(self._lookup(inputs.flat_values))
        if hasattr(inputs, "dense_shape") or hasattr(inputs, "todense"):
            # Sparse ids (tf.SparseTensor, jax BCOO) are densified as Keras
            # does: a missing entry is id 0.
            inputs = ops.convert_to_tensor(inputs, sparse=False)
        return self._lookup(inputs)

    def compute_mask(self, inputs, mask=None):
        if not self.mask_zero:
            return None
        return ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.output_dim)

    def compute_output_spec(self, inputs):
        output_shape = self.compute_output_shape(inputs.shape)
        ragged = getattr(inputs, "ragged", False)
        return keras.KerasTensor(output_shape, dtype=self.compute_dtype, ragged=ragged)

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Freezes the table and adds trainable LoRA adapters of `rank`.

        The forward pass becomes `table[ids] + (lora_alpha / rank) *
        (A[ids] @ B)`, computed on the looked-up rows only. `A` has shape
        `(input_dim, rank)` and `B` `(rank, output_dim)`, both float32.

        Example:

        >>> layer = keras_ext_embedding.Embedding(50_000, 128)
        >>> layer.build()
        >>> layer.enable_lora(8, lora_alpha=16)
        >>> [w.name for w in layer.trainable_weights]
        ['lora_embeddings_a', 'lora_embeddings_b']

        Args:
            rank: Positive integer. Rank of the adapters.
            lora_alpha: Optional positive number scaling the delta by
                `lora_alpha / rank`. Defaults to `rank`.
            a_initializer: Initializer of `A`.
            b_initializer: Initializer of `B`; zeros make the delta start
                at zero.
        """
        if self.embeddings_constraint:
            raise ValueError(
                "Lora is incompatible with embedding constraints. "
                "In order to enable lora on this layer, remove the "
                "`embeddings_constraint` argument."
            )
        if not self.built:
            raise ValueError("Cannot enable lora on a layer that isn't yet built.")
        if self.lora_enabled:
            raise ValueError(
                "lora is already enabled. This can only be done once per layer."
            )
        check_positive_int("rank", rank)
        if lora_alpha is not None:
            check_positive_number("lora_alpha", lora_alpha)
        # A built layer locks its variable tracker; adapters are added later.
        self._tracker.unlock()
        # Adapters stay float32 whatever the policy: low-precision adapters
        # underflow during fine-tuning.
        self._lora_a_initializer = keras.initializers.get(a_initializer)
        self.lora_embeddings_a = self.add_weight(
            name="lora_embeddings_a",
            shape=(self.input_dim, rank),
            initializer=self._lora_a_initializer,
            dtype="float32",
            regularizer=self.embeddings_regularizer,
        )
        self.lora_embeddings_b = self.add_weight(
            name="lora_embeddings_b",
            shape=(rank, self.output_dim),
            initializer=keras.initializers.get(b_initializer),
            dtype="float32",
            regularizer=self.embeddings_regularizer,
        )
        self._embeddings.trainable = False
        self._tracker.lock()
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank

    def merge_lora(self):
        """Folds the LoRA adapters into the table and removes them.

        The deployment step after fine-tuning: the table becomes
        `table + (lora_alpha / rank) * A @ B` in its own dtype, the adapters
        are deleted, and the table is trainable again. Outputs are unchanged
        (up to the table dtype's rounding). Recompile a model after merging.

        Example:

        >>> layer = keras_ext_embedding.Embedding(1000, 16, lora_rank=4)
        >>> layer.build()
        >>> layer.merge_lora()
        >>> layer.lora_enabled, [w.name for w in layer.trainable_weights]
        (False, ['embeddings'])
        """
        if not self.lora_enabled:
            raise ValueError(
                f"Layer '{self.name}' has no LoRA adapters to merge. Call "
                "`enable_lora(rank)` and fine-tune before `merge_lora()`."
            )
        merged = ops.add(
            ops.cast(self._embeddings, "float32"),
            self._lora_scale
            * ops.matmul(self.lora_embeddings_a, self.lora_embeddings_b),
        )
        self._embeddings.assign(ops.cast(merged, self._embeddings.dtype))
        # A function traced before the merge (a TensorFlow predict function)
        # still reads the adapters it captured: with B at zero it reads the
        # merged table alone instead of adding the delta twice.
        self.lora_embeddings_b.assign(ops.zeros(self.lora_embeddings_b.shape))
        self._tracker.unlock()
        del self.lora_embeddings_a
        del self.lora_embeddings_b
        self._tracker.lock()
        self._embeddings.trainable = True
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None
        self._lora_a_initializer = None

    def save_own_variables(self, store):
        if not self.built:
            return
        store["0"] = self._embeddings
        if self.lora_enabled:
            store["1"] = self.lora_embeddings_a
            store["2"] = self.lora_embeddings_b
            store["3"] = np.asarray([self.lora_alpha], dtype="float64")

    def load_own_variables(self, store):
        if not self.built:
            if len(store.keys()):
                raise ValueError(
                    f"Layer '{self.name}' was never built and thus has no "
                    "variables, but the weights file lists "
                    f"{len(store.keys())} for it. Build the layer (call it "
                    "once, or `layer.build()`) before loading weights."
                )
            return
        entries = _checkpoint.read_entries(store, self.name)
        table = entries[0]
        self._check_table_shape(table, "the table")
        if len(entries) == _checkpoint.PLAIN_ENTRIES:
            self._set_table(table)
            if self.lora_enabled:
                self._reset_lora()
            return
        lora_a, lora_b, lora_alpha = entries[1], entries[2], float(entries[3][0])
        rank = lora_a.shape[-1]
        _checkpoint.check_shape(
            self.name,
            "lora_embeddings_a",
            lora_a,
            (self.input_dim, rank),
            "The checkpoint belongs to a layer of another vocabulary size.",
        )
        _checkpoint.check_shape(
            self.name,
            "lora_embeddings_b",
            lora_b,
            (rank, self.output_dim),
            "The checkpoint belongs to a layer of another output_dim.",
        )
        if not self.lora_enabled:
            self._set_table(_checkpoint.merged_table(table, lora_a, lora_b, lora_alpha))
            return
        if rank != self.lora_rank or lora_alpha != self.lora_alpha:
            raise ValueError(
                f"Layer '{self.name}' has LoRA rank={self.lora_rank}, "
                f"lora_alpha={self.lora_alpha:g}, but the checkpoint holds "
                f"adapters of rank={rank}, lora_alpha={lora_alpha:g}. Build "
                "the layer with the checkpoint's `lora_rank` and `lora_alpha`, "
                "or load it into a layer without LoRA to get the merged table."
            )
        self._set_table(table)
        self.lora_embeddings_a.assign(lora_a)
        self.lora_embeddings_b.assign(lora_b)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "embeddings_initializer": keras.initializers.serialize(
                self.embeddings_initializer
            ),
            "embeddings_regularizer": keras.regularizers.serialize(
                self.embeddings_regularizer
            ),
            "activity_regularizer": keras.regularizers.serialize(
                self.activity_regularizer
            ),
            "embeddings_constraint": keras.constraints.serialize(
                self.embeddings_constraint
            ),
            "mask_zero": self.mask_zero,
            "quantization_config": None,
        }
        # As in Keras, LoRA keys appear only when LoRA is on, and so does the
        # non-default `invalid_ids`: a default config loads into
        # keras.layers.Embedding unchanged.
        if self.lora_rank:
            config["lora_rank"] = self.lora_rank
            config["lora_alpha"] = self.lora_alpha
        if self.invalid_ids != "raise":
            config["invalid_ids"] = self.invalid_ids
        return {**base_config, **config}

    @property
    def _lora_scale(self):
        return self.lora_alpha / self.lora_rank

    def _lookup(self, ids):
        dtype = _ids.check_ids_dtype(ids.dtype, self.input_dim, self.name)
        checked = self.invalid_ids == "raise" and _ids.eager_check(
            ids, self.input_dim, self.name
        )
        # Checked ids are all valid; otherwise invalid positions (possible
        # only when traced or with invalid_ids="zeros") read row 0 and are
        # zeroed below.
        valid = None if checked else _ids.valid_mask(ids, dtype, self.input_dim)
        index = _ids.gather_index(ids, dtype, valid, self.input_dim)
        outputs = ops.take(self._embeddings, index, axis=0)
        if self.lora_enabled:
            lora_rows = ops.take(self.lora_embeddings_a, index, axis=0)
            # Scaling B (rank x output_dim) costs less than scaling the rows.
            lora_b = self.lora_embeddings_b
            if self._lora_scale != 1:
                lora_b = ops.multiply(lora_b, self._lora_scale)
            outputs = ops.add(outputs, ops.matmul(lora_rows, lora_b))
        if self._lookup_dtype() != self.compute_dtype:
            outputs = ops.cast(outputs, self.compute_dtype)
        if valid is not None:
            outputs = _ids.zero_invalid_rows(outputs, valid)
        return outputs

    def _lookup_dtype(self):
        """The dtype of looked-up rows before the cast to the compute dtype."""
        if not self.lora_enabled:
            return self._embeddings.dtype
        return keras.backend.result_type(self._embeddings.dtype, "float32")

    def _check_table_shape(self, table, what):
        _checkpoint.check_shape(
            self.name,
            what,
            table,
            (self.input_dim, self.output_dim),
            "Build the layer with the input_dim and output_dim the table was made for.",
        )

    def _set_table(self, table):
        self._embeddings.assign(ops.cast(table, self._embeddings.dtype))

    def _reset_lora(self):
        """Starts the adapters afresh: A from its initializer, B at zero."""
        a = self.lora_embeddings_a
        b = self.lora_embeddings_b
        a.assign(self._lora_a_initializer(a.shape, dtype=a.dtype))
        b.assign(ops.zeros(b.shape, dtype=b.dtype))
