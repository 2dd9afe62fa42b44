"""Errors raised by keras_ext_embedding."""


class InvalidIdError(ValueError):
    """An id passed to `Embedding` is not a valid row of its table.

    Raised eagerly for a negative id, an id >= `input_dim`, or a float id that
    is not a whole number; the message names the layer, the first offending
    id, its position and the valid range. It subclasses `ValueError`, so code
    that catches `ValueError` keeps working.
    """
