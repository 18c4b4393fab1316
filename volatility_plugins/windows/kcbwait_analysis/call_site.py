"""Whether a value on a stack is a return address: the bytes before it end with a call.

A scan for return addresses (used where unwind data is missing) must not take every pointer
into code for one: a return address is always preceded by the call instruction that pushed it.
The x64 forms compilers emit for calls are few: a relative call, an indirect call through the
import address table or a CFG dispatch slot (RIP-relative), and calls through a register or a
register-based slot.  Each pattern is (distance before the address, opcode prefix bytes, mask
for the last byte), after Intel's SDM, CALL (opcodes E8 and FF /2).
"""

from __future__ import annotations

# Bytes read before a candidate: the longest pattern below (48 FF 15 disp32).
LOOKBEHIND = 7

# (distance, leading bytes, mask applied to the byte after them, value it must have)
_PATTERNS = (
    (5, b"\xe8", None, None),  # call rel32
    (6, b"\xff\x15", None, None),  # call [rip+disp32]
    (7, b"\x48\xff\x15", None, None),  # rex.w call [rip+disp32]
    (2, b"\xff", 0xF8, 0xD0),  # call r64 (rax..rdi)
    (3, b"\x41\xff", 0xF8, 0xD0),  # call r8..r15
    (3, b"\xff", 0xF8, 0x50),  # call [r64+disp8]
    (6, b"\xff", 0xF8, 0x90),  # call [r64+disp32]
)


def follows_call(before: bytes) -> bool:
    """True when ``before`` (the LOOKBEHIND bytes just below a candidate return address)
    ends with one of the call forms above."""
    if len(before) != LOOKBEHIND:
        return False
    for distance, lead, mask, value in _PATTERNS:
        start = LOOKBEHIND - distance
        if before[start : start + len(lead)] != lead:
            continue
        if mask is None or (before[start + len(lead)] & mask) == value:
            return True
    return False
