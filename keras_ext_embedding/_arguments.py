"""Validation of constructor and method arguments, with Keras-style messages."""

import numbers


def check_positive_int(name, value):
    """Raises `ValueError` unless `value` is a positive int (bools refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer. "
            f"Received: {name}={value} (of type {type(value).__name__})."
        )


def check_positive_number(name, value):
    """Raises `ValueError` unless `value` is a positive real number."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0:
        raise ValueError(
            f"`{name}` must be a positive number. "
            f"Received: {name}={value} (of type {type(value).__name__})."
        )


def check_choice(name, value, choices):
    """Raises `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}."
        )
