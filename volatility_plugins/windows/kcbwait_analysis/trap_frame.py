"""Reading x64 _KTRAP_FRAMEs.

A system call from user mode builds a _KTRAP_FRAME at ``KTHREAD.InitialStack -
sizeof(_KTRAP_FRAME)`` of the stack current at that moment and points ``KTHREAD.TrapFrame`` at it;
its Rip/Rsp are the user-mode instruction and stack pointers, its SegCs the user code selector
0x33 (callback-machinery.md, step 1).  Field offsets and the structure size come from the
kernel's symbol table, never from constants here.
"""

from __future__ import annotations

from dataclasses import dataclass

from volatility3.framework import exceptions, interfaces

# Ring 3: the requested privilege level in the low two bits of a code selector.
USER_RPL = 3


def is_user_mode(seg_cs: int) -> bool:
    """A trap frame belongs to a user-mode entry when its saved CS has RPL 3.

    The KTRAP_FRAME's own PreviousMode byte is deliberately not used: it holds the mode the
    thread had *before* the trap (saved for restoration on exit), and callback-machinery.md only
    specifies SegCs for user-mode frames.
    """
    return (seg_cs & USER_RPL) == USER_RPL


@dataclass(frozen=True)
class TrapFrame:
    """The parts of one _KTRAP_FRAME the analysis uses."""

    address: int
    rip: int
    rsp: int
    seg_cs: int
    rbp: int | None = None
    """The user Rbp the system-call entry saved (None when unreadable): the frame register
    of a frame-pointer function the thread was in (windows.kcbstack)."""

    @property
    def user_mode(self) -> bool:
        return is_user_mode(self.seg_cs)


def trap_frame_size(kernel: interfaces.context.ModuleInterface) -> int:
    """sizeof(_KTRAP_FRAME) from the symbol table (0x190 on every Windows 10/11 x64 build)."""
    return kernel.get_type("_KTRAP_FRAME").size


def read_trap_frame(kernel: interfaces.context.ModuleInterface, address: int) -> TrapFrame | None:
    """Reads the _KTRAP_FRAME at the absolute kernel address ``address``.

    Returns None if the address is null or any field is unreadable.
    """
    if not address:
        return None
    try:
        frame = kernel.object(object_type="_KTRAP_FRAME", offset=address, absolute=True)
        rip, rsp, seg_cs = int(frame.Rip), int(frame.Rsp), int(frame.SegCs)
    except exceptions.InvalidAddressException:
        return None
    try:
        rbp: int | None = int(frame.Rbp)
    except (exceptions.InvalidAddressException, AttributeError):
        rbp = None
    return TrapFrame(address, rip, rsp, seg_cs, rbp)
