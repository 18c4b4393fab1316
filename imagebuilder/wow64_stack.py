"""The 32-bit side of a WoW64 thread's stack (docs/output-contract.md, "WoW64 threads").

wow64cpu keeps the thread's x86 context in WOW64_CPURESERVED {USHORT Flags; USHORT Machine;
x86 CONTEXT at +4}, named by the 64-bit TEB's TlsSlots[1] (WOW64_TLS_CPURESERVED).  The 32-bit
code runs on a 32-bit stack below 4 GiB with an EBP chain: [Ebp] = the caller's Ebp,
[Ebp+4] = the return address.  The builder writes a context stopped in the 32-bit ntdll, and a
chain of three frames through the 32-bit user32 and ntdll ending with a saved Ebp of 0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagebuilder.memory import PAGE
from imagebuilder.module_image import ModuleImage
from imagebuilder.process_layout import Vad

WOW64_TLS_CPURESERVED = 1
IMAGE_FILE_MACHINE_I386 = 0x14C
# x86 CONTEXT (winnt.h): Ebp +0xB4, Eip +0xB8, Esp +0xC4; WOW64_CPURESERVED puts it at +4.
CONTEXT_OFFSET, CONTEXT_EBP, CONTEXT_EIP, CONTEXT_ESP = 4, 0xB4, 0xB8, 0xC4
CONTEXT_SIZE = 0x2CC
WOW64_STACKS = 0x0040_0000  # per thread a 64 KiB region below 4 GiB
WOW64_STACK_SPAN = 0x10000
MAX_FRAMES = 256


@dataclass(frozen=True)
class Wow64Stack:
    context: int  # WOW64_CPURESERVED
    eip: int
    esp: int
    ebp: int
    links: tuple[tuple[int, int, int], ...]  # (Ebp, saved Ebp, return address) per frame


def lay_out_wow64_stack(
    kernel: Any,
    space: Any,
    vads: list[Vad],
    teb: int,
    index: int,
    images: tuple[ModuleImage, ...],
) -> Wow64Stack:
    """Writes the thread's CPURESERVED block, its TLS slot and its 32-bit stack."""
    ntdll32, user32 = images[0], images[1]
    region = WOW64_STACKS + WOW64_STACK_SPAN * index
    vads.append(Vad(region, region + WOW64_STACK_SPAN - 1))
    context = region + 0x100
    base = region + WOW64_STACK_SPAN  # the 32-bit stack's base
    text = PAGE  # .text of the 32-bit images

    def code(module: ModuleImage, offset: int) -> int:
        assert text + offset < module.size
        return module.base + text + offset

    # Frames from the outermost: ntdll (thread start), user32, user32; the context is stopped
    # in ntdll (a system-call stub).
    returns = [code(ntdll32, 0x1C5), code(user32, 0x2A3), code(user32, 0x91)]
    ebps, cursor = [], base - 0x40
    for size in (0x30, 0x58, 0x24):
        cursor -= size & ~3
        ebps.append(cursor)
    # ebps[0] is the outermost frame's Ebp: its saved Ebp is 0, or (every other thread) its
    # saved Ebp is another frame's and its return address 0, either of which ends the chain.
    links = []
    for i, ebp in enumerate(ebps):
        saved = ebps[i - 1] if i else 0
        ret = returns[i]
        if i == 0 and index % 2:
            saved, ret = base - 0x20, 0
        links.append((ebp, saved, ret))
    for ebp, saved, ret in links:
        space.write(ebp, struct.pack("<II", saved, ret))
    innermost = ebps[-1]
    esp = innermost - 0x1C
    eip = code(ntdll32, 0x40C)
    block = bytearray(CONTEXT_OFFSET + CONTEXT_SIZE)
    struct.pack_into("<HH", block, 0, 0, IMAGE_FILE_MACHINE_I386)
    for offset, value in ((CONTEXT_EBP, innermost), (CONTEXT_EIP, eip), (CONTEXT_ESP, esp)):
        struct.pack_into("<I", block, CONTEXT_OFFSET + offset, value)
    space.write(context, bytes(block))
    for page in range(region, base, PAGE):
        space.ensure(page, PAGE)
    tls = kernel.symbols.offset("_TEB", "TlsSlots") + 8 * WOW64_TLS_CPURESERVED
    space.write(teb + tls, struct.pack("<Q", context))
    # Innermost link first, as the chain is followed.
    return Wow64Stack(context, eip, esp, innermost, tuple(reversed(links)))


def wow64_rows(
    stack: Wow64Stack,
    tls_slot: int,
    readable: Callable[[int, int], bool],
    images: tuple[ModuleImage, ...],
) -> Callable[[], list[dict[str, Any]]]:
    """The 32-bit rows by the contract, from what lay_out_wow64_stack wrote; ``tls_slot`` is
    the address of TlsSlots[1].  A note for the last 64-bit row comes back as a row with
    only ``notes`` (the caller moves it)."""

    def symbol(eip: int) -> str | None:
        for image in images:
            if image.contains(eip):
                return f"{image.path.rsplit(chr(92), 1)[-1]}+{eip - image.base:#x}"
        return None

    def row(eip: int, esp: int) -> dict[str, Any]:
        return {
            "frame": None,
            "callback_level": None,
            "rip": eip,
            "symbol": symbol(eip),
            "rsp": esp,
            "how": "frame pointer",
            "notes": "",
        }

    def rows() -> list[dict[str, Any]]:
        context = stack.context + CONTEXT_OFFSET
        if not readable(tls_slot, 8) or not all(
            readable(context + o, 4) for o in (CONTEXT_EBP, CONTEXT_EIP, CONTEXT_ESP)
        ):
            return [{"notes": "unreadable: WoW64 context"}]
        out = [row(stack.eip, stack.esp)]
        links = {ebp: (saved, ret) for ebp, saved, ret in stack.links}
        ebp, previous = stack.ebp, None
        while len(out) < MAX_FRAMES:
            if ebp == 0 or ebp % 4 or ebp >= 1 << 32 or (previous is not None and ebp <= previous):
                break
            if not readable(ebp, 8):
                out[-1]["notes"] = f"unreadable: stack {ebp:#x}"
                break
            saved, ret = links[ebp]
            if ret == 0:
                break
            out.append(row(ret, ebp + 8))
            previous, ebp = ebp, saved
        return out

    return rows
