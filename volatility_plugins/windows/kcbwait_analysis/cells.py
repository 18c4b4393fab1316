"""TreeGrid cells of the kcbwait plugins: a value, or why it is absent."""

from __future__ import annotations

from volatility3.framework import renderers
from volatility3.framework.renderers import format_hints


def cell(value, field=None, unreadable=frozenset(), hex_value: bool = False):
    """The value (as Hex when ``hex_value``), or UnreadableValue when ``field`` is among the
    values memory kept from being read, else NotApplicableValue."""
    if value is None:
        if field is not None and field in unreadable:
            return renderers.UnreadableValue()
        return renderers.NotApplicableValue()
    if hex_value:
        return format_hints.Hex(value)
    return value
