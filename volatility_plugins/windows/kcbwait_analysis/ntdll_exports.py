"""Facts about ntdll.dll that the callback analysis needs, resolved once per mapped image.

* The ``NtCallbackReturn``/``ZwCallbackReturn`` stub ranges decide the ``at-return`` reason
  (docs/output-contract.md: from the export's address up to ntdll's next export, at most 0x20
  bytes; some ntdll builds export only ``NtCallbackReturn``, callback-machinery.md).
* ``KiUserCallbackDispatcher``'s function range: the kernel returns to user mode at the
  dispatcher, which calls ``PEB.KernelCallbackTable[ApiNumber]`` and so leaves a return address
  into itself just below each UCALLOUT_FRAME (callback-machinery.md, step 4).  The range comes from
  ntdll's .pdata RUNTIME_FUNCTION that covers the dispatcher, else a small fixed span.

ntdll is mapped at the same base in every process of a boot, so these facts are computed once per
(base, path) by the caller's cache, never per thread.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Tuple

from volatility3.framework import interfaces
from volatility3.plugins.windows.kcbwait_analysis import pe_exports, read_stats, runtime_functions

NTDLL_NAME = "ntdll.dll"
CALLBACK_RETURN_EXPORTS = ("NtCallbackReturn", "ZwCallbackReturn")
DISPATCHER_EXPORT = "KiUserCallbackDispatcher"
# docs/output-contract.md: the stub spans up to the next export, "at most 0x20 bytes".
MAX_STUB_SIZE = 0x20
# Without a RUNTIME_FUNCTION the dispatcher is assumed this long.  ReactOS' dispatch.S and
# Windows 10/11 dispatchers place their `call` well inside the first 0x100 bytes.
DISPATCHER_FALLBACK_SIZE = 0x100
# x64 RUNTIME_FUNCTION: ULONG BeginAddress, EndAddress, UnwindData (RVAs).
RUNTIME_FUNCTION_SIZE = 12
# ntdll's .pdata is ~0x10000-0x20000 bytes; anything above this is corrupt.
MAX_EXCEPTION_DIRECTORY = 0x80000

AddressRange = Tuple[int, int]
"""Half-open [start, end) range of virtual addresses."""


def callback_return_ranges(exports: pe_exports.ModuleExports) -> tuple[AddressRange, ...]:
    """The [start, end) ranges of the NtCallbackReturn / ZwCallbackReturn stubs.

    Each runs from the export's address to the next higher export of ntdll, capped at
    MAX_STUB_SIZE bytes.
    """
    ranges = []
    for name in CALLBACK_RETURN_EXPORTS:
        start = exports.address_of(name)
        if start is None:
            continue
        following = exports.next_above(start)
        end = start + MAX_STUB_SIZE
        if following is not None:
            end = min(end, following)
        if (start, end) not in ranges:
            ranges.append((start, end))
    return tuple(ranges)


def address_in_ranges(address: int, ranges: tuple[AddressRange, ...]) -> bool:
    """True if ``address`` lies in any half-open range."""
    return any(start <= address < end for start, end in ranges)


def find_runtime_function(pdata: bytes, rva: int) -> AddressRange | None:
    """[BeginAddress, EndAddress) of the RUNTIME_FUNCTION in ``pdata`` that covers ``rva``.

    Entries are normally sorted, but a linear pass tolerates unsorted tables; entries that were
    unreadable (all zero) never match.
    """
    count = min(len(pdata), MAX_EXCEPTION_DIRECTORY) // RUNTIME_FUNCTION_SIZE
    for index in range(count):
        begin, end, _unwind = struct.unpack_from("<III", pdata, index * RUNTIME_FUNCTION_SIZE)
        if begin <= rva < end:
            return begin, end
    return None


def dispatcher_function_range(
    dispatcher: int, image_base: int | None, pdata: bytes | None
) -> AddressRange:
    """The address range whose qwords count as return addresses into the dispatcher.

    The RUNTIME_FUNCTION covering the dispatcher if there is one (its start may sit before the
    export), else [dispatcher, dispatcher + DISPATCHER_FALLBACK_SIZE).
    """
    if image_base is not None and pdata and dispatcher >= image_base:
        found = find_runtime_function(pdata, dispatcher - image_base)
        if found is not None:
            begin, end = found
            return image_base + begin, image_base + end
    return dispatcher, dispatcher + DISPATCHER_FALLBACK_SIZE


def read_exception_directory(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    stats: read_stats.ReadStats | None = None,
) -> bytes | None:
    """Reads the .pdata (IMAGE_DIRECTORY_ENTRY_EXCEPTION) of the image at ``base``.

    Unreadable pages are left zero (their entries then match nothing); returns None if the
    headers are unreadable or invalid, or the exception directory is absent, larger than
    MAX_EXCEPTION_DIRECTORY or outside the image.  Only the directory's own bytes are read.
    """
    return read_unwind_directory(context, layer_name, base, stats)[0]


def read_unwind_directory(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    stats: read_stats.ReadStats | None = None,
) -> tuple[bytes | None, runtime_functions.DirectoryState]:
    """The exception directory as ``read_exception_directory`` reads it, and whether all of
    it was read: an image whose headers say it has none is COMPLETE (only leaf functions)."""
    headers, _problem = pe_exports.read_headers(context, layer_name, base, stats)
    return unwind_directory_of(context, layer_name, base, headers, stats)


def unwind_directory_of(
    context: interfaces.context.ContextInterface,
    layer_name: str,
    base: int,
    headers: pe_exports.ImageHeaders | None,
    stats: read_stats.ReadStats | None = None,
) -> tuple[bytes | None, runtime_functions.DirectoryState]:
    """``read_unwind_directory`` with the image's headers already read (None: unreadable)."""
    incomplete = runtime_functions.DirectoryState.INCOMPLETE
    if headers is None:
        return None, incomplete
    directory = headers.exception
    if directory.size == 0 and directory.rva == 0:
        return None, runtime_functions.DirectoryState.COMPLETE
    if not pe_exports.directory_in_image(headers, directory, MAX_EXCEPTION_DIRECTORY):
        return None, incomplete
    buffer = bytearray(directory.size)
    complete = pe_exports.read_pages_into(context, layer_name, base + directory.rva, buffer, stats)
    return bytes(buffer), (runtime_functions.DirectoryState.COMPLETE if complete else incomplete)


@dataclass(frozen=True)
class NtdllFacts:
    """What the analysis knows about one mapped ntdll image."""

    base: int | None
    exports: pe_exports.ModuleExports | None
    callback_return_ranges: tuple[AddressRange, ...]
    dispatcher: int | None
    dispatcher_range: AddressRange | None
    exports_problem: str | None = None
    dispatcher_return: int | None = None
    """_PS_NTDLL_EXPORTS.KiUserCallbackDispatcherReturn (20348 and later)."""
    """None, pe_exports.UNREADABLE, or pe_exports.INVALID when the export directory is unusable
    or names neither NtCallbackReturn nor ZwCallbackReturn (at-return cannot be decided)."""


def is_dispatcher_return(facts: NtdllFacts, value: int) -> bool | None:
    """Whether ``value`` (the qword below a UCALLOUT_FRAME) returns into the dispatcher; None
    when neither the kernel nor ntdll says where the dispatcher is."""
    if facts.dispatcher_return is not None and value == facts.dispatcher_return:
        return True
    if facts.dispatcher_range is None:
        return None
    low, high = facts.dispatcher_range
    return low <= value < high


def build_facts(
    base: int | None,
    size: int,
    exports: pe_exports.ModuleExports | None,
    pdata: bytes | None,
    kernel_dispatcher: int | None,
    exports_problem: str | None = None,
    kernel_dispatcher_return: int | None = None,
) -> NtdllFacts:
    """Combines one ntdll image's exports and .pdata with the kernel's dispatcher address.

    The kernel's own record of the dispatcher (KeUserCallbackDispatcher / PsNtdllExports) is
    preferred when it points into this image; otherwise the export of the same name is used.
    """
    dispatcher = None
    if kernel_dispatcher and (base is None or base <= kernel_dispatcher < base + size):
        dispatcher = kernel_dispatcher
    elif exports is not None and exports.address_of(DISPATCHER_EXPORT):
        dispatcher = exports.address_of(DISPATCHER_EXPORT)
    elif kernel_dispatcher:
        dispatcher = kernel_dispatcher
    dispatcher_range = None
    if dispatcher is not None:
        dispatcher_range = dispatcher_function_range(dispatcher, base, pdata)
    ranges = callback_return_ranges(exports) if exports is not None else ()
    if exports is None and exports_problem is None:
        exports_problem = pe_exports.UNREADABLE
    elif exports is not None and not ranges:
        exports_problem = pe_exports.INVALID
    return NtdllFacts(
        base=base,
        exports=exports,
        callback_return_ranges=ranges,
        dispatcher=dispatcher,
        dispatcher_range=dispatcher_range,
        exports_problem=exports_problem,
        dispatcher_return=kernel_dispatcher_return,
    )
