import contextlib
import functools
import warnings
from typing import Any, Literal

import keras
import numpy as np
from keras import ops
from numpy.typing import ArrayLike

from keras_ext_embedding import (
    _checkpoint,
    _ids,
    _layout,
    _lora,
    _quantization,
    _row_sparse,
    _runs,
    _tables,
    _traced_ids,
)
from keras_ext_embedding._arguments import (
    check_choice,
    check_positive_int,
    check_positive_number,
)
from keras_ext_embedding.errors import InvalidIdError

INVALID_IDS_MODES = ("raise", "zeros")
UNBUILT_EMBEDDINGS = "You must build the layer before accessing `embeddings`."


@functools.cache
def _with_float32(dtype):
    """The dtype of `dtype` rows plus float32 LoRA rows (Keras's promotion,
    asked once: it costs microseconds a call)."""
    return keras.backend.result_type(dtype, "float32")


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
      on TensorFlow and JAX), nothing can raise at the id, so each invalid
      position gets an all-zero vector, and is counted in the graph:
      `fit` and `evaluate` raise `InvalidIdError` with the count at the end
      of the epoch or evaluation that met any, and `traced_invalid_ids`
      holds the count (after `predict`, or a step of one's own).
      `invalid_ids="zeros"` asks for zeros always: no error, no count and
      no device-to-host copy, for pipelines that validate ids upstream
      (on TensorFlow and JAX, eager ids already in host memory are checked
      there, so that a batch of valid ids costs only the gather).
    - Integer ids of any width are used as they are; float ids are accepted
      when they hold whole numbers (`keras.Input` defaults to float32), and
      refused when their dtype cannot hold every id below `input_dim` exactly.
    - With LoRA, the forward pass gathers only the looked-up rows of the
      adapters (`A[ids] @ B`) instead of rebuilding the
      `input_dim x output_dim` table, and saving keeps the adapters beside the
      table so fine-tuning resumes where it stopped. `merge_lora()` folds them
      in for deployment.
    - Quantized tables (`quantize("int8")`, `quantize("int4")`, or an
      `int8_from_*`/`int4_from_*` dtype policy) keep Keras's variables and
      checkpoint format, but a lookup gathers the quantized rows first and
      dequantizes only those (Keras 3.15 unpacks the whole int4 table on
      every call). LoRA works on a quantized table, and saving keeps the quantized
      table and the adapters apart instead of re-quantizing a merge.

    Examples:
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
        quantization_config: Optional `Int8QuantizationConfig` or
            `Int4QuantizationConfig` (of `keras.quantizers`), used when the
            layer is built with a quantized dtype policy
            (`dtype="int8_from_float32"`, `"int4/64_from_float32"`, ...):
            the int4 `block_size` (`None` for one scale per row) and a custom
            `weight_quantizer`, as in Keras. `layer.quantize(mode,
            config=...)` sets it.
        invalid_ids: `"raise"` (default) or `"zeros"`. How ids outside
            `[0, input_dim)` or non-whole float ids are handled, see above.
        optimizer: Optional. `None` (default): the table trains densely
            with the model's optimizer, as in Keras. `"sgd"`, `"adagrad"`,
            `"adam"` or a `keras.optimizers.SGD`, `Adagrad` or `Adam`
            instance (learning-rate schedules included): the table trains
            row-sparsely with this optimizer of its own, independent of the
            model's, stepping only the rows a batch looked up (repeated ids
            summed first), so a step costs the batch, not the vocabulary.
            SGD and Adagrad give the dense result; Adam is lazy Adam (as
            `LazyAdam` and `torch.optim.SparseAdam`: rows of ids absent
            from a batch, and their moments, do not move). With LoRA, the
            adapter `A` trains this way and `B` with the model's optimizer.
            The model optimizer's clipping, weight decay and learning-rate
            callbacks do not reach the table. Invalid ids and masked
            padding never train a row. Such a layer is looked up once per
            training step: a second lookup (a table shared by two
            features) raises a `ValueError`; concatenate the features' ids
            into one call instead. See the guide "Training big tables".
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

    # Quantizes with `type_check=True` (see `quantize`).
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
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        quantization_config: keras.quantizers.QuantizationConfig | None = None,
        invalid_ids: Literal["raise", "zeros"] = "raise",
        optimizer: str | keras.optimizers.Optimizer | None = None,
        **kwargs: Any,
    ):
        check_positive_int("input_dim", input_dim)
        check_positive_int("output_dim", output_dim)
        if lora_rank is not None:
            check_positive_int("lora_rank", lora_rank)
        if lora_alpha is not None:
            check_positive_number("lora_alpha", lora_alpha)
        check_choice("invalid_ids", invalid_ids, INVALID_IDS_MODES)
        _quantization.check_config(quantization_config)
        layer_name = kwargs.get("name") or type(self).__name__
        row_sparse_rule = _row_sparse.resolve(optimizer, layer_name)
        if row_sparse_rule is not None:
            _row_sparse.check_layer_arguments(
                layer_name, embeddings_regularizer, embeddings_constraint
            )
        input_length = kwargs.pop("input_length", None)
        if input_length is not None:
            warnings.warn(
                "Argument `input_length` is deprecated. Just remove it.",
                stacklevel=2,
            )
        super().__init__(**kwargs)
        if row_sparse_rule is not None:
            _row_sparse.check_dtype_policy(self.name, self.dtype_policy)
        mode = self.quantization_mode
        if quantization_config is not None and mode not in (
            None,
            quantization_config.mode,
        ):
            raise ValueError(
                f"`quantization_config` is for mode '{quantization_config.mode}' "
                f"but the dtype policy '{self.dtype_policy.name}' quantizes to "
                f"'{mode}'. Pass a config and a dtype policy of the same mode."
            )
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
        # As passed (a name) or serialized (an optimizer): the layer keeps
        # no optimizer object, which saving would walk as part of the layer.
        self.optimizer = (
            None
            if row_sparse_rule is None
            else optimizer.lower()
            if isinstance(optimizer, str)
            else _row_sparse.serialize(row_sparse_rule)
        )
        self._row_sparse_rule = row_sparse_rule
        # The row-sparse training state of the table and of LoRA's A (slots
        # and step counter), while they train with `optimizer`.
        self._table_training = None
        self._lora_training = None
        # The table's format (its variables, rows, checkpoint entries) and,
        # while LoRA is enabled, the adapters: the pieces a lookup composes.
        self._table = _tables.FloatTable(self)
        self._adapters = None
        # Keras's flag, read by `quantize` and the dtype_policy setter.
        self._is_quantized = False
        # The count of invalid ids met by traced lookups (made in `build`).
        self._traced_invalid_ids = None

        if weights is not None:
            self.build()
            self._assign_weights(weights)

    def build(self, input_shape=None):
        if self.built:
            return
        if keras.config.backend() != "torch":
            # PyTorch reads the ids on the host even under torch.compile (the
            # read breaks its graph): its lookups raise at the id and never
            # count, so it gets no counter (`state_dict()` stays Keras's).
            self._traced_invalid_ids = _traced_ids.TracedInvalidIds(self)
            # Held in the layer's metrics, not as an attribute: Keras reads
            # it at the end of each epoch and evaluation (`_traced_ids`), and
            # saving walks attributes, not metrics.
            self._metrics.append(_traced_ids.Report(self._traced_invalid_ids))
        if self.quantization_mode is not None:
            self.quantized_build(
                (self.input_dim, self.output_dim),
                mode=self.quantization_mode,
                config=self.quantization_config,
            )
        else:
            for table in self._tables():
                table.build()
            self._build_table_training()
        self.built = True
        if self.lora_rank:
            self.enable_lora(self.lora_rank, lora_alpha=self.lora_alpha)

    @property
    def embeddings(self):
        """The table; with LoRA enabled, the table merged with its adapters.

        On a quantized layer, the stored integer values as
        `keras.layers.Embedding` returns them (int8; int4 unpacked to int8),
        without the adapters.
        """
        if not self.built:
            raise AttributeError(UNBUILT_EMBEDDINGS)
        return self._table.embeddings(self._adapters)

    @property
    def traced_invalid_ids(self):
        """How many invalid ids traced lookups met since the last report.

        With `invalid_ids="raise"`, a traced lookup (a compiled step of
        `fit`, `evaluate` or `predict` on TensorFlow and JAX, a `tf.function`
        or `stateless_call` step of one's own passing `training`) gives
        zeros at invalid ids and counts them here. `fit` and `evaluate` raise
        `InvalidIdError` at the end of the epoch or evaluation that met any;
        after `predict`, read the count here (the next `fit` or `evaluate`
        warns about it). 0 before the layer is built, and always on
        PyTorch, whose lookups read the ids and raise at the first invalid
        one.
        """
        if self._traced_invalid_ids is None:
            return 0
        return self._traced_invalid_ids.value()

    @property
    def variables(self):
        # Keras's variables and the traced invalid-id counter: state that
        # `stateless_call` carries, but no weight (`layer.weights` and
        # checkpoints are Keras's).
        variables = super().variables
        if self._traced_invalid_ids is None:
            return variables
        return [*variables, self._traced_invalid_ids.variable]

    @property
    def lora_kernel_a(self):
        """`lora_embeddings_a` under the name keras-hub's
        `Backbone.save_lora_weights` and `load_lora_weights` read."""
        return self.lora_embeddings_a

    @property
    def lora_kernel_b(self):
        """`lora_embeddings_b` under the name keras-hub reads."""
        return self.lora_embeddings_b

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
                locate=self._host_locate(args, kwargs),
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

    @property
    def dtype_policy(self):
        # Keras's getter, inline: torch.compile traces neither
        # `Layer.dtype_policy.fget` nor `super().dtype_policy`, and broke
        # the graph here.
        return self._dtype_policy

    @dtype_policy.setter
    def dtype_policy(self, value):
        # Keras sets a quantized policy before quantizing the table; when
        # quantize() refuses (int8 with float16 compute), the float table
        # would be left under a quantized policy. Put the old policy back.
        previous = getattr(self, "_dtype_policy", None)
        try:
            keras.layers.Layer.dtype_policy.fset(self, value)
        except Exception:
            if previous is not None:
                self._dtype_policy = previous
            raise

    def call(self, inputs, training=None):
        if hasattr(inputs, "with_flat_values"):
            # A tf.RaggedTensor: look up its flat values, keep its row splits.
            return inputs.with_flat_values(self._lookup(inputs.flat_values, training))
        if hasattr(inputs, "dense_shape") or hasattr(inputs, "todense"):
            # Sparse ids (tf.SparseTensor, jax BCOO) are densified as Keras
            # does: a missing entry is id 0.
            inputs = ops.convert_to_tensor(inputs, sparse=False)
        return self._lookup(inputs, training)

    def quantized_call(self, inputs, *args, **kwargs):
        # Keras routes a layer with a quantized dtype policy here instead of
        # call(); a quantized lookup takes the same path (id checks, ragged
        # and sparse ids), only its rows are read differently.
        mode = self.quantization_mode
        if mode not in _quantization.MODES:
            raise self._quantization_mode_error(mode)
        return self.call(inputs, *args, **kwargs)

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
        rank: int,
        lora_alpha: float | None = None,
        a_initializer: str | keras.initializers.Initializer = "he_uniform",
        b_initializer: str | keras.initializers.Initializer = "zeros",
    ) -> None:
        """Freezes the table and adds trainable LoRA adapters of `rank`.

        The forward pass becomes `table[ids] + (lora_alpha / rank) *
        (A[ids] @ B)`, computed on the looked-up rows only. `A` has shape
        `(input_dim, rank)` and `B` `(rank, output_dim)`, both float32.

        On a layer of a model that was already compiled, call
        `model.compile(...)` again before `fit`: Keras's train function and
        optimizer keep the trainable variables they were built with, out of
        the layer's reach (on TensorFlow the table would keep training and
        the adapters never move; on JAX and PyTorch `fit` raises). `predict`
        and `evaluate` need no recompile: `B` starts at zero, so a function
        traced before gives the rows the layer holds.

        Examples:
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
            # Keras's message first: its tests match it.
            raise ValueError(
                f"lora is already enabled on layer '{self.name}', with rank "
                f"{self.lora_rank} (lora_alpha={self.lora_alpha}): it can be "
                "enabled only once per layer. To enable LoRA again (received: "
                f"rank={rank!r}), call `merge_lora()` first: it folds the "
                "adapters into the table and removes them."
            )
        check_positive_int("rank", rank)
        if lora_alpha is not None:
            check_positive_number("lora_alpha", lora_alpha)
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank
        # A built layer locks its variable tracker; adapters are added later.
        self._tracker.unlock()
        self._adapters = _lora.LoraAdapters(self, a_initializer)
        self._adapters.build(b_initializer)
        for table in self._tables():
            table.freeze()
        if self._table_training is not None:
            # A frozen table keeps no optimizer slots: two table-sized
            # variables that would never train. `merge_lora` makes fresh ones.
            self._table_training.remove()
            self._table_training = None
        if self._row_sparse_rule is not None:
            self._lora_training = _row_sparse.RowSparseState(
                self, self._row_sparse_rule, "lora_embeddings_a"
            )
            self._lora_training.build(self._adapters.a)
        self._tracker.lock()
        self.lora_enabled = True

    def merge_lora(self) -> None:
        """Folds the LoRA adapters into the table and removes them.

        The deployment step after fine-tuning: the table becomes
        `table + (lora_alpha / rank) * A @ B` in its own dtype, the adapters
        are deleted, and the table is trainable again. Outputs are unchanged
        (up to the table dtype's rounding).

        On a quantized layer the table is dequantized, merged in float32 and
        quantized again with the layer's mode and config (the same int4
        `block_size` and weight quantizer): a lossy step, each value moves by
        up to half a quantization step, and the table stays frozen. To keep
        fine-tuning without that loss, save the layer instead: checkpoints
        keep the quantized table and the adapters apart.

        A function traced before the merge (a TensorFlow `predict`) keeps
        giving the layer's rows: it reads the merged table and `B`, zeroed.
        Recompile a model after merging, before `fit`: its trainable
        variables changed.

        Examples:
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
        self._table.add_delta(self._adapters.delta())
        # A function traced before the merge (a TensorFlow predict function)
        # still reads the adapters it captured: with B at zero it reads the
        # merged table alone instead of adding the delta twice.
        self.lora_embeddings_b.assign(ops.zeros(self.lora_embeddings_b.shape))
        self._tracker.unlock()
        self._adapters.remove()
        if self._lora_training is not None:
            self._lora_training.remove()
            self._lora_training = None
        self._adapters = None
        for table in self._tables():
            table.unfreeze()
        self._build_table_training()
        self._tracker.lock()
        self.lora_enabled = False
        self.lora_rank = None
        self.lora_alpha = None

    def quantize(
        self,
        mode: Literal["int8", "int4"] | None = None,
        type_check: bool = True,
        config: keras.quantizers.QuantizationConfig | None = None,
    ) -> None:
        """Quantizes the table to int8 or int4, as `keras.layers.Embedding` does.

        The same variables and dtype policy as Keras (`int8_from_float32`,
        `int4/{block_size}_from_float32`, ...): int8 keeps one scale per
        row; int4 packs two values per byte, with one scale per row
        (`block_size=None`) or, by default, a scale and zero point per group
        of 128 values. The quantized table is frozen; LoRA adapters, enabled
        before or after, stay float32 and trainable. `Model.quantize(...)`
        calls this on every Embedding of the model.

        On a model that already ran, prefer `model.quantize(mode,
        filters=...)`: it also drops the model's traced functions, so the
        next `predict` runs the quantized lookup and the float table is
        freed. Called on the layer alone, a function traced before (a
        TensorFlow `predict` or `evaluate`) still gives the quantized rows,
        from the dequantized table this method writes into the float
        variable that function captured. Either way, recompile before `fit`:
        Keras's optimizer keeps the trainable variables it was built with.

        Examples:
            >>> layer = keras_ext_embedding.Embedding(1000, 64)
            >>> layer.build()
            >>> layer.quantize("int8")
            >>> layer.dtype_policy.name, [w.name for w in layer.weights]
            ('int8_from_float32', ['embeddings', 'embeddings_scale'])

        Args:
            mode: `"int8"` or `"int4"`.
            type_check: As in Keras: subclasses must pass `False` to confirm
                they read the quantized variables correctly.
            config: Optional `keras.quantizers.Int8QuantizationConfig` or
                `Int4QuantizationConfig` (custom `weight_quantizer`, int4
                `block_size`).
        """
        mode, config = self._check_quantize_arguments(mode, config)
        if type_check and not type(self).__dict__.get("_quantizes_own_tables"):
            # Keras's rule: a subclass must pass `type_check=False` to say it
            # reads the quantized variables correctly. Each class of this
            # package says so by setting `_quantizes_own_tables` in its body.
            raise self._not_implemented_error(self.quantize)
        if mode not in _quantization.MODES:
            raise self._quantization_mode_error(mode)
        if self.quantization_mode == mode and (
            mode == "int8" or hasattr(self._policy(), "block_size")
        ):
            # Reached from the dtype_policy setter, which sets the policy
            # first. A policy that names an int4 block size
            # (`int4/64_from_float32`) is what a reload builds, so it wins
            # (Keras 3.15 passes its default config, groups of 128, whatever
            # the policy names). A plain `int4_from_float32` takes the config
            # Keras passes, as Keras's own layer does: groups of 128 on 3.15,
            # one scale per row (what a reload of that name builds) later.
            config = self._default_config(mode)
        config = config or _quantization.keras_default_config(mode)
        arrays = [
            _quantization.quantize_table(
                ops.convert_to_numpy(table.float_table()), mode, config, self.name
            )
            for table in self._tables()
        ]
        self.quantization_config = config
        float_variables = [table.variable for table in self._tables()]
        # A built layer locks its variable tracker; the quantized variables
        # replace the float ones here. (Keras 3.15 also unlocked it around
        # every layer's `quantize`; later Keras only around its own
        # quantization, which this method replaces.)
        self._tracker.unlock()
        try:
            for table in self._tables():
                table.remove()
            if self._table_training is not None:
                # A quantized table is frozen: its slots go with the float
                # table.
                self._table_training.remove()
                self._table_training = None
            self.quantized_build((self.input_dim, self.output_dim), mode, config)
        finally:
            self._tracker.lock()
        for table, table_arrays in zip(self._tables(), arrays, strict=True):
            table.assign_quantized(table_arrays)
        if keras.config.backend() == "tensorflow":
            # A TensorFlow function traced before this call (Keras's predict
            # or evaluate function) keeps reading the float variables it
            # captured. Holding the dequantized tables, it gives the
            # quantized rows, bit for bit, until the model retraces
            # (`Model.quantize` and `compile` make it) and the variables are
            # freed. Lookups pay nothing for it. JAX's trainer passes the
            # current variables to its jitted functions and PyTorch's runs
            # eagerly: nothing there reads the old variables, so they skip the
            # full-table write.
            for variable, table in zip(float_variables, self._tables(), strict=True):
                variable.assign(ops.cast(table.stored_float(), variable.dtype))
        if self.dtype_policy.quantization_mode is None:
            policy_name = mode
            if mode == "int4":
                block_size = self._table.block_size
                policy_name = f"int4/{-1 if block_size is None else block_size}"
            self.dtype_policy = keras.dtype_policies.get(
                f"{policy_name}_from_{self.dtype_policy.name}"
            )

    def quantized_build(self, embeddings_shape, mode, config=None):
        """Creates the quantized variables, named and shaped as in Keras."""
        if mode not in _quantization.MODES:
            raise self._quantization_mode_error(mode)
        if tuple(embeddings_shape) != (self.input_dim, self.output_dim):
            raise ValueError(
                f"Layer '{self.name}' has a table of shape "
                f"{(self.input_dim, self.output_dim)} (input_dim, output_dim) "
                "and cannot build quantized variables for "
                f"embeddings_shape={tuple(embeddings_shape)}."
            )
        table = _tables.quantized_table(self, mode, config)
        table.build()
        self._table = table
        self._is_quantized = True
        if mode == "int4":
            # Keras's attributes of an int4 layer, read by its own code and
            # tests: the block size as the config gave it (-1 stays -1), or
            # the dtype policy's (-1 read as None), and the unpacked width.
            self._int4_block_size = (
                config.block_size
                if isinstance(config, keras.quantizers.Int4QuantizationConfig)
                else self._policy_block_size()
            )
            self._orig_output_dim = self.output_dim

    def save_own_variables(self, store):
        if not self.built:
            return
        entries = [
            variable for table in self._tables() for _, variable in table.stored()
        ]
        if self._adapters is not None:
            entries += self._adapters.stored()
        for index, entry in enumerate(entries):
            store[str(index)] = entry
        # Row-sparse slots and step counters under their names, after the
        # numbered entries Keras reads.
        for training in self._trainings():
            for key, variable in training.stored():
                store[key] = variable

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
        # Everything is checked before anything is assigned: a refused
        # checkpoint leaves the layer as it was.
        tables = self._tables()
        stored = [pair for table in tables for pair in table.stored()]
        store, named = _checkpoint.split_named(store)
        trainings = self._trainings()
        training_entries = [
            _checkpoint.read_named(self.name, named, training.stored())
            for training in trainings
        ]
        entries = _checkpoint.read_entries(
            store,
            self.name,
            stored,
            self._tables_description(),
            self._table.shape_hint,
        )
        bases, start = [], 0
        for table in tables:
            count = len(table.stored())
            bases.append(entries[start : start + count])
            start += count
            table.check_stored(bases[-1])
        lora = entries[start:]
        for training, arrays in zip(trainings, training_entries, strict=True):
            training.assign_stored(arrays)
        if not lora:
            for table, base in zip(tables, bases, strict=True):
                table.assign_stored(base)
            if self._adapters is not None:
                self._adapters.reset()
            return
        lora_a, lora_b, lora_alpha = lora[0], lora[1], float(lora[2][0])
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
        if self._adapters is None:
            # The adapters belong to the lookup's table; a reverse table is
            # loaded as it is.
            tables[0].assign_merged(bases[0], lora_a, lora_b, lora_alpha)
            for table, base in zip(tables[1:], bases[1:], strict=True):
                table.assign_stored(base)
            return
        if rank != self.lora_rank or lora_alpha != self.lora_alpha:
            raise ValueError(
                f"Layer '{self.name}' has LoRA rank={self.lora_rank}, "
                f"lora_alpha={self.lora_alpha:g}, but the checkpoint holds "
                f"adapters of rank={rank}, lora_alpha={lora_alpha:g}. Build "
                "the layer with the checkpoint's `lora_rank` and `lora_alpha`, "
                "or load it into a layer without LoRA to get the merged table."
            )
        for table, base in zip(tables, bases, strict=True):
            table.assign_stored(base)
        _layout.assign(self.lora_embeddings_a, lora_a)
        _layout.assign(self.lora_embeddings_b, lora_b)

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
            "quantization_config": keras.saving.serialize_keras_object(
                self.quantization_config
            ),
        }
        # As in Keras, LoRA keys appear only when LoRA is on, and so does the
        # non-default `invalid_ids`: a default config loads into
        # keras.layers.Embedding unchanged.
        if self.lora_rank:
            config["lora_rank"] = self.lora_rank
            config["lora_alpha"] = self.lora_alpha
        if self.invalid_ids != "raise":
            config["invalid_ids"] = self.invalid_ids
        if self.optimizer is not None:
            # A copy: Keras's deserialization rewrites a config in place.
            config["optimizer"] = _row_sparse.config_copy(self.optimizer)
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        quantization_config = config.get("quantization_config")
        if isinstance(quantization_config, dict):
            config["quantization_config"] = keras.saving.deserialize_keras_object(
                quantization_config
            )
        return super().from_config(config)

    def _tables(self):
        """The layer's tables, in checkpoint order: the lookup's table."""
        return [self._table]

    def _trainings(self):
        """The row-sparse training states of the layer's variables."""
        return [t for t in (self._table_training, self._lora_training) if t]

    def _row_sparse_variables(self):
        """The slots and step counters of the row-sparse training states."""
        return [v for training in self._trainings() for v in training.variables()]

    def _build_table_training(self):
        """Gives the float lookup table its row-sparse slots (with
        `optimizer=`)."""
        if self._row_sparse_rule is None or self._table.quantized:
            return
        self._table_training = _row_sparse.RowSparseState(
            self, self._row_sparse_rule, "embeddings"
        )
        self._table_training.build(self._table.variable)

    def _tables_description(self):
        """What the layer holds, for error messages."""
        return self._table.description

    def _assign_weights(self, weights):
        """Sets the table from the constructor's `weights` (the table, or a
        list holding it)."""
        if isinstance(weights, (list, tuple)) and len(weights) == 1:
            weights = weights[0]
        weights = np.asarray(weights)
        self._check_table_shape(weights, "`weights`")
        self._table.assign_float(weights)

    def _lookup(self, ids, training=None):
        outputs, valid = self._gather(ids, training)
        if valid is not None:
            outputs = _ids.zero_invalid_rows(outputs, valid)
        return outputs

    def _gather(self, ids, training=None, kept=None, locate=None):
        """The rows of `ids` in the compute dtype, and the mask of valid ids
        (None when every id is known to be valid). Invalid positions
        (possible only when traced or with `invalid_ids="zeros"`) read row 0;
        the caller zeroes or drops them.

        `kept` (boolean, the shape of `ids`, or None) marks the positions
        that count (a bag's padding and masked positions do not): only
        those train a row-sparse table. `locate` names an invalid id's
        position in the error (a bag and the position in it).
        """
        dtype = _ids.check_ids_dtype(ids.dtype, self.input_dim, self.name)
        checked = _ids.eager_check(
            ids, self.input_dim, self.name, locate, self.invalid_ids == "raise"
        )
        index, valid = _ids.gather_index(ids, dtype, self.input_dim, checked)
        counter = self._traced_invalid_ids
        if valid is not None and counter is not None and self.invalid_ids == "raise":
            counter.add(valid, training)
        touched = self._touched(index, valid, kept)
        reader = _runs.RowReader(training, ids, checked, self._reads_table_whole())
        table_training = self._row_sparse_step(self._table_training, training)
        if table_training is not None:
            outputs = table_training.rows(index, touched)
        else:
            outputs = self._table.rows(index, reader)
        if self._adapters is not None:
            lora_training = self._row_sparse_step(self._lora_training, training)
            delta = self._adapters.rows(index, reader, lora_training, touched)
            outputs = ops.add(outputs, delta)
        if self._lookup_dtype() != self.compute_dtype:
            outputs = ops.cast(outputs, self.compute_dtype)
        return outputs, valid

    def _host_locate(self, args, kwargs):
        """How an invalid NumPy id's position is named in the error, from the
        call's other arguments (None: by its position in the ids)."""
        return None

    def _reads_table_whole(self):
        """Whether a call other than the lookup reads the whole table (and
        LoRA's `A`): a tied `ReversibleEmbedding`'s reverse projection."""
        return False

    def _row_sparse_step(self, state, training):
        """`state` (a row-sparse training state, or None) if this call steps
        its variable. Not when the variable is frozen, nor with
        `training=False` (`predict`, `evaluate`): an inference lookup reads
        rows as any other. Any other call may be under a gradient tape (a
        custom training loop), where a plain gather's gradient would be
        assigned to the table as its new value."""
        if state is None or not state.trains or training is False:
            return None
        return state

    def _touched(self, index, valid, kept=None):
        """The positions whose ids a row-sparse step may move: valid ids that
        are kept (by default, not masked padding); None: all of them."""
        if not self._trainings():
            return None
        if kept is None and self.mask_zero:
            kept = ops.not_equal(index, 0)
        if kept is None or valid is None:
            return valid if kept is None else kept
        return ops.logical_and(valid, kept)

    def _lookup_dtype(self):
        """The dtype of looked-up rows before the cast to the compute dtype."""
        if self._adapters is None:
            return self._table.row_dtype
        return _with_float32(self._table.row_dtype)

    def _check_table_shape(self, table, what):
        _checkpoint.check_shape(
            self.name,
            what,
            table,
            (self.input_dim, self.output_dim),
            _tables.FLOAT_SHAPE_HINT,
        )

    def _check_quantize_arguments(self, mode, config):
        """`quantize`'s `(mode, config)`, checked by Keras with its errors: a
        mode or config Keras does not know, a config of another mode, an
        unbuilt or already quantized layer, int8 with float16 compute.

        Keras 3.15 makes these checks in a wrapper it puts around every
        layer's `quantize`; later Keras makes them in `Layer.quantize`
        itself, which this layer overrides. That base method checks, then
        refuses a layer that describes no quantization geometry of Keras's,
        as this one (it quantizes its own tables), with
        `NotImplementedError`; Keras 3.15's refuses at once. Calling it
        checks on every version, and on 3.15 again what passed once.
        """
        with contextlib.suppress(NotImplementedError):
            keras.layers.Layer.quantize(self, mode, config=config)
        if isinstance(config, str):
            # Keras's shorthand: `quantize(config="int8")`.
            return config, None
        if config is not None:
            return config.mode, config
        return mode, None

    def _default_config(self, mode):
        """The config when none is passed: the layer's `quantization_config`
        if it is for `mode`, else what the dtype policy names. For a built
        layer, the config its table was quantized with (`assign_float` and
        merging LoRA quantize again with it)."""
        config = self.quantization_config
        if config is not None and config.mode == mode:
            return config
        if mode == "int8":
            return keras.quantizers.Int8QuantizationConfig()
        return keras.quantizers.Int4QuantizationConfig(
            block_size=self._policy_block_size()
        )

    def _policy(self):
        """The layer's own dtype policy (its entry of a `DTypePolicyMap`)."""
        policy = self._dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and self.path:
            policy = policy[self.path]
        return policy

    def _policy_block_size(self):
        """The int4 block size named by the dtype policy (`int4/64_from_...`)."""
        block_size = getattr(self._policy(), "block_size", None)
        return None if block_size == -1 else block_size

    def _quantization_mode_error(self, mode):
        return NotImplementedError(
            f"Invalid quantization mode. Expected one of {_quantization.MODES}. "
            f"Received: quantization_mode={mode}"
        )
