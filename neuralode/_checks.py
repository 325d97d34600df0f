"""Checks of arguments given at construction, with errors that say what was wrong."""

import operator

import numpy as np


def as_int(owner: str, name: str, value, minimum: int = 1) -> int:
    """`value` as a Python int of at least `minimum` (NumPy integers accepted, bools
    not), or a `ValueError` naming `owner`'s argument `name`."""
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            pass
        else:
            if number >= minimum:
                return number
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{owner}: `{name}` must be {kind}, got {value!r}.")


def as_bool(owner: str, name: str, value) -> bool:
    """`value` if it is a bool (NumPy's too), or a `ValueError`."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{owner}: `{name}` must be True or False, got {value!r}.")
