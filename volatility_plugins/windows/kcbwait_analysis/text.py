"""Strings taken from the image, exact for machines and escaped for terminals.

Process and module names come from memory an attacker may control: they can hold control
characters, ANSI escape sequences (which would repaint an investigator's terminal), bidi
overrides, or UTF-16 that is not valid (unpaired surrogates, which would even make a UTF-8
terminal write fail).  docs/output-contract.md: such names are exact in JSON and escaped in text
renderers.  Volatility's JSON renderers pass a ``str`` cell through unchanged (``json.dumps``
then writes ``\\u001b`` or ``\\udc00`` exactly), while its text renderers (quick, pretty, csv)
format every default cell with ``f"{value}"``; so a ``str`` subclass whose ``__format__``
escapes gives each renderer what it needs without the plugin knowing which one runs.
"""

# Backslash is escaped too, so that an escape in the output is never ambiguous.
from __future__ import annotations

_BACKSLASH = "\\"


def escape(text: str) -> str:
    """``text`` with every non-printable character (``str.isprintable``: C0/C1 controls, DEL,
    format characters such as bidi overrides, unpaired surrogates, unassigned code points) and
    backslash written as ``\\xNN``, ``\\uNNNN``, ``\\UNNNNNNNN`` or ``\\\\``."""
    if text.isprintable() and _BACKSLASH not in text:
        return text
    out = []
    for char in text:
        if char == _BACKSLASH:
            out.append(_BACKSLASH * 2)
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


class DisplayText(str):
    """A string from the image: ``str()``/JSON give it exactly, ``format()`` escaped."""

    __slots__ = ()

    def __format__(self, format_spec: str) -> str:
        return format(escape(str(self)), format_spec)


def display(text: str | None) -> DisplayText | None:
    """``text`` as a DisplayText (None stays None)."""
    if text is None:
        return None
    return DisplayText(text)


def latin1(data: bytes) -> str:
    """Bytes of an ANSI string up to its first NUL, each byte as the code point of the same
    value, so that no byte is lost or replaced (EPROCESS.ImageFileName, export names)."""
    return data.split(b"\0", 1)[0].decode("latin-1")


def utf16(data: bytes) -> str:
    """UTF-16LE as stored, keeping unpaired surrogates (``surrogatepass``) instead of replacing
    them; an odd trailing byte cannot be a UTF-16 unit and is dropped."""
    return data[: len(data) & ~1].decode("utf-16-le", errors="surrogatepass")
