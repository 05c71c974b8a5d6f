"""What counts as a number in a setting: shared by the torch side and the runtime (torch-free)."""

from __future__ import annotations

import sys
import typing


def is_whole_number(value: object) -> bool:
    """An int and not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: typing.Any) -> bool:
    """A whole number or a float that is a finite float (not NaN, not infinite, not an int past the float range)."""
    return (is_whole_number(value) or isinstance(value, float)) and abs(value) <= sys.float_info.max
