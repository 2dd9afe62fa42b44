"""One row-sparse lookup per training step, or a clear error.

A row-sparse lookup's gradient is the whole stepped table (`_row_sparse`),
and Keras's optimizer assigns the sum of a variable's gradients. A layer
looked up twice in one step (a layer shared by two inputs, or called twice
in a model's `call`) would therefore be assigned two stepped tables added
together: every row doubled, the step counter at `2 * step + 2`. Nothing in
the graph can see that sum, so `StepGuard` watches the lookups and their
gradient rules from Python and raises before the step is built.

When a rule runs tells the two kinds of backend apart, without naming one:
- JAX traces a `custom_gradient`'s rule during its lookup. Every lookup of
  one step reads the same value of the step counter (the trainer's state
  for this step), and the next step reads a new one, so two rules that see
  the same value belong to one step.
- TensorFlow and PyTorch run the rules after every lookup of the step,
  when the gradient is taken. Each lookup is then followed by one rule; a
  second rule with no lookup since the last one belongs to the same step.
"""

import contextlib


class StepGuard:
    def __init__(self, layer_name, rule_name):
        self.layer_name = layer_name
        self.rule_name = rule_name
        self.lookups_since_rule = 0
        self.in_lookup = False
        # Held, not just its id: an id can be reused once its value is freed.
        self.last_counter_value = None

    @contextlib.contextmanager
    def lookup(self):
        """The span of one lookup (`with guard.lookup(): ...`)."""
        self.lookups_since_rule += 1
        self.in_lookup = True
        try:
            yield
        finally:
            self.in_lookup = False

    def rule(self, counter_value):
        """Called first by the gradient rule of a lookup that read
        `counter_value`, the step counter's value object."""
        if self.in_lookup:
            second = counter_value is self.last_counter_value
            self.last_counter_value = counter_value
        else:
            second = self.lookups_since_rule == 0
            self.lookups_since_rule = 0
        if second:
            raise ValueError(self.message())

    def message(self):
        return (
            f"Layer '{self.layer_name}' (optimizer='{self.rule_name}', "
            "row-sparse training) was looked up twice in one training step: "
            "it is shared by two inputs, called twice in a model's "
            "`call`, or its gradient was taken twice from the same weights "
            "(gradient accumulation). Each lookup's gradient is the whole "
            "stepped table, so the optimizer would assign the sum of two "
            "stepped tables. Look every id up in one call instead: "
            "`keras_ext_embedding.SharedEmbedding(..., features={'history': "
            "'mean', 'candidate': None})` looks several features up in one "
            "table with one gather, each pooled or not; or concatenate the "
            "ids, `rows = layer(keras.ops.concatenate([ids_a, ids_b], "
            "axis=1))`, and split `rows` (keras.ops.split); or give each "
            "input a layer of its own; or drop `optimizer=` to train the table "
            "densely with the model's optimizer."
        )
