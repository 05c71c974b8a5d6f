"""What counts as a number in a setting: shared by the torch side and the runtime (torch-free)."""

from __future__ import annotations

import math


def is_whole_number(value: object) -> bool:
    """An int and not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A whole number, or a float that is neither NaN nor infinite."""
    return is_whole_number(value) or (isinstance(value, float) and math.isfinite(value))
