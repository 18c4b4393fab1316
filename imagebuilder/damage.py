"""Damage applied to a built image, and what windows.kcbwait must report for it.

Every function here edits the image through the builder's own address spaces (or its own PE
bytes) and records, in a ThreadExpectation or in the truth order, what the plugin must then say
by the rules of docs/output-contract.md ("Damaged images").  The builder decides those values
from what it wrote; it shares no code with the plugin.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import replace

from imagebuilder.conditions import private_patch
from imagebuilder.damage_spec import ProcessListDamage, ThreadDamage, ThreadListDamage
from imagebuilder.expectation import ThreadExpectation
from imagebuilder.kernel_layout import STACKS_START, Kernel
from imagebuilder.memory import PAGE, AddressSpace
from imagebuilder.pe_image import data_directory_offset
from imagebuilder.thread_layout import StackFacts
from imagebuilder.user_modules import ModuleImage

# Addresses the builder never maps: far beyond the kernel stacks it hands out, and a user
# address above every region a process layout uses.
UNMAPPED_KERNEL = STACKS_START + 0x40_0000_0000  # same PML4 slot, 256 GiB above
UNMAPPED_USER = 0x0000_7FF0_DEAD_0000
KERNEL_CS = 0x10  # a kernel-mode code selector (RPL 0)
# UCALLOUT_FRAME (x64; ReactOS ketypes.h): ULONG Length +0x28, ULONG ApiNumber +0x2C,
# MACHINE_FRAME.Rsp +0x48.
_LENGTH, _API_NUMBER, _MF_RSP = 0x28, 0x2C, 0x48
# A TEB whose limits span almost all of user space.
ABSURD_STACK = (0x10000, 0x7FFF_FFFF_0000)
# How far below the committed stack "rsp_outside_stack" puts Rsp (inside the thread's
# reserved but never committed stack range).
RSP_BELOW_STACK = 0x10000
# MachineFrame.Rsp of "ucallout_downward" / "ucallout_beyond_stack", relative to the frame /
# to StackBase.
DOWNWARD, BEYOND = 0x200, 0x10000
OVERWRITTEN_RETURN = 0x4141414141414141  # return_address_overwritten: in no module


def damage_unwind_data(memory, space: AddressSpace, module: ModuleImage, what: str, function=None):
    """``unwind_data_paged_out``: the pages of ``module``'s .pdata not present in this process.
    ``unwind_info_corrupt``: ``function``'s UNWIND_INFO gets version 4 in this process's copy
    (a private page).  Returns the RUNTIME_FUNCTION begin RVAs whose unwind data is then
    invalid (every entry sharing that record)."""
    if what == "unwind_data_paged_out":
        rva, size = module.pdata
        assert size, f"{module.name} has no .pdata"
        _page_out(space, module.base + rva, module.base + rva + size)
        return set()
    begin = module.pdb_symbols.get(function, module.exports.get(function))
    assert begin is not None and begin in module.unwind_records, (module.name, function)
    record = module.unwind_records[begin]
    first = module.data[record]
    private_patch(memory, space, module, record, bytes([(first & ~7) | 4]))
    return {b for b, r in module.unwind_records.items() if r == record}


def _page_out(space: AddressSpace, start: int, end: int) -> None:
    for page in range(start & ~(PAGE - 1), end, PAGE):
        space.page_out(page)


def apply_thread_damage(
    damage: tuple[ThreadDamage, ...],
    *,
    kernel: Kernel,
    space: AddressSpace,
    teb: int,
    facts: StackFacts,
    kthread: dict[str, int],
    exp: ThreadExpectation,
) -> None:
    """Breaks one user thread as ``damage`` says: memory now, KTHREAD fields through
    ``kthread`` (written by the caller), the builder's facts about the thread through ``exp``
    (expectation.thread_record then applies the contract's rules to them)."""
    k, w = kernel, kernel.writer
    for item in damage:
        kind = item.kind
        if kind == "trap_frame_null":
            kthread["TrapFrame"] = exp.kthread_trap_frame = 0
        elif kind == "trap_frame_unmapped":
            assert not k.space.is_mapped(UNMAPPED_KERNEL)
            kthread["TrapFrame"] = exp.kthread_trap_frame = UNMAPPED_KERNEL
        elif kind == "trap_frame_kernel":
            w.put(k.space, facts.trap_frame, "_KTRAP_FRAME", {"SegCs": KERNEL_CS})
            exp.user_mode = False
        elif kind == "teb_paged_out":
            _page_out(space, teb, teb + k.symbols.size("_TEB"))
        elif kind in ("stack_bounds_inverted", "stack_bounds_absurd"):
            limit, base = (
                (facts.stack_base, facts.stack_limit)
                if kind == "stack_bounds_inverted"
                else ABSURD_STACK
            )
            w.put(space, teb, "_TEB", {"NtTib.StackLimit": limit, "NtTib.StackBase": base})
            exp.stack_limit, exp.stack_base = limit, base
        elif kind == "user_stack_paged_out":
            _page_out(space, facts.stack_limit, facts.stack_base)
        elif kind == "rsp_outside_stack":
            rsp = facts.stack_limit - RSP_BELOW_STACK
            assert not space.is_mapped(rsp)
            w.put(k.space, facts.trap_frame, "_KTRAP_FRAME", {"Rsp": rsp})
            exp.rsp = rsp
        elif kind in ("ucallout_loop", "ucallout_downward", "ucallout_beyond_stack"):
            frame = facts.frames[0].frame
            target = {
                "ucallout_loop": frame,
                "ucallout_downward": frame - DOWNWARD,
                "ucallout_beyond_stack": facts.stack_base + BEYOND,
            }[kind]
            space.write(frame + _MF_RSP, struct.pack("<Q", target))
            exp.user_frames[frame] = replace(exp.user_frames[frame], rsp=target)
        elif kind == "length_max":
            frame = facts.frames[0].frame
            space.write(frame + _LENGTH, struct.pack("<I", 0xFFFFFFFF))
            exp.user_frames[frame] = replace(exp.user_frames[frame], length=0xFFFFFFFF)
        elif kind == "api_number":
            frame = facts.frames[item.level - 1].frame
            space.write(frame + _API_NUMBER, struct.pack("<I", item.value))
            exp.user_frames[frame] = replace(exp.user_frames[frame], api=item.value)
        elif kind == "nesting_level":
            kthread["CallbackNestingLevel"] = exp.nesting = item.value
        elif kind == "return_address_overwritten":
            # The return address into the level's second function (the one its outermost
            # function called), or its only one: a value in no module.
            slots = facts.return_slots[item.level]
            assert len(slots) >= 2, f"level {item.level} has no return address to overwrite"
            slot = slots[2] if len(slots) > 2 else slots[1]
            space.write(slot, struct.pack("<Q", OVERWRITTEN_RETURN))
        else:  # parse_thread_damage admits no other kind
            raise AssertionError(kind)


# docs/output-contract.md: ApiNumbers at or beyond this are not looked up ("invalid: ApiNumber").
MAX_CALLBACK_TABLE_ENTRIES = 0x400


def handler_lookup(
    space: AddressSpace, table: int
) -> Callable[[int], tuple[int | None, str | None, str | None]]:
    """ApiNumber -> (PEB.KernelCallbackTable[ApiNumber] as laid out, unreadable, invalid)."""

    def lookup(api: int) -> tuple[int | None, str | None, str | None]:
        if api >= MAX_CALLBACK_TABLE_ENTRIES:
            return None, None, "ApiNumber"
        if table == 0:
            return None, None, "KernelCallbackTable"
        address = table + 8 * api
        if not (space.is_mapped(address) and space.is_mapped(address + 7)):
            return None, "KernelCallbackTable", None
        return struct.unpack("<Q", space.read(address, 8))[0], None, None

    return lookup


def callback_table_value(kind: str | None, table: int, space: AddressSpace) -> int:
    """PEB.KernelCallbackTable after process damage ``kind`` (None: unchanged)."""
    if kind == "null":
        return 0
    if kind == "unmapped":
        assert not space.is_mapped(UNMAPPED_USER)
        return UNMAPPED_USER
    return table


# -- lists -----------------------------------------------------------------------------------
Target = int | str
"""Where a damaged Flink leads: an entry index, or "stop" (unmapped or not a thread)."""


def walk_order(count: int, flinks: dict[int, Target]) -> list[int]:
    """Indices of a ring's entries in the order the plugin lists them (docs/output-contract.md):
    the forward walk, stopping at the head, a revisit or a "stop" link; then entries only the
    (intact) backward walk reaches, in list order.  ``flinks`` overrides entry Flinks."""
    forward: list[int] = []
    index: Target = 0 if count else "head"
    while index != "head":
        if index == "stop" or index in forward:
            break
        assert isinstance(index, int)
        forward.append(index)
        index = flinks.get(index, index + 1 if index + 1 < count else "head")
    backward = [i for i in reversed(range(count)) if i not in forward]
    return forward + list(reversed(backward))


def thread_list_order(count: int, damage: ThreadListDamage | None, index_of: dict[int, int]):
    """Listing order of a process's ``count`` threads after ``damage`` (both rings)."""
    if damage is None:
        return list(range(count))
    at = index_of[damage.at]
    target: Target = index_of[damage.to] if damage.kind in ("cycle", "self_loop") else "stop"
    order = walk_order(count, {at: target})
    # A second damaged ring is walked after the first has found every entry: no change.
    return order


def redirect_thread_link(
    kernel: Kernel, damage: ThreadListDamage, ethreads: dict[int, int]
) -> None:
    """Rewrites the Flink of thread ``damage.at`` in the damaged ring(s)."""
    sym = kernel.symbols
    fields = {
        "ethread": sym.offset("_ETHREAD", "ThreadListEntry"),
        "kthread": sym.offset("_ETHREAD", "Tcb") + sym.offset("_KTHREAD", "ThreadListEntry"),
    }
    names = ("ethread", "kthread") if damage.lists == "both" else (damage.lists,)
    for name in names:
        offset = fields[name]
        if damage.kind in ("cycle", "self_loop"):
            target = ethreads[damage.to] + offset
        elif damage.kind == "unmapped":
            target = UNMAPPED_KERNEL
        else:  # "not_thread": a zeroed block (Type 0, null links): passed over, then a dead end
            target = _zeroed_block(kernel) + offset
        kernel.space.write(ethreads[damage.at] + offset, struct.pack("<Q", target))


def _zeroed_block(kernel: Kernel) -> int:
    """A pool block the size of an ETHREAD, all zero: not a thread, and its links lead to 0."""
    block = kernel.pool_object("_ETHREAD", b"Fake")
    kernel.space.write(block, bytes(kernel.symbols.size("_ETHREAD")))
    return block


def process_list_order(pids: list[int], damage: ProcessListDamage | None) -> list[int]:
    """PIDs in windows.pslist order after ``damage``: Volatility walks PsActiveProcessHead
    forward until a revisit or an unreadable link, then backward, yielding the processes the
    forward walk missed in the order it meets them (not reversed)."""
    if damage is None:
        return list(pids)
    at = pids.index(damage.at)
    target: Target = pids.index(damage.to) if damage.kind == "revisit" else "stop"
    forward: list[int] = []
    index: Target = 0
    while index != "head" and index != "stop" and index not in forward:
        assert isinstance(index, int)
        forward.append(index)
        index = target if index == at else (index + 1 if index + 1 < len(pids) else "head")
    backward = [i for i in reversed(range(len(pids))) if i not in forward]
    return [pids[i] for i in forward + backward]


def redirect_process_link(
    kernel: Kernel, damage: ProcessListDamage, eprocesses: dict[int, int]
) -> None:
    offset = kernel.symbols.offset("_EPROCESS", "ActiveProcessLinks")
    target = eprocesses[damage.to] + offset if damage.kind == "revisit" else UNMAPPED_KERNEL
    kernel.space.write(eprocesses[damage.at] + offset, struct.pack("<Q", target))


# -- ntdll's export directory -----------------------------------------------------------------
ABSURD_COUNT = 0x7FFFFFFF
ABSURD_RVA = 0xFFFFFF00
LYING_SIZE = 0x7FFFFFF0
ABSURD_RVA_EXPORT = "RtlAllocateHeap"  # an export with an address of its own
# IMAGE_EXPORT_DIRECTORY.NumberOfNames
_NUMBER_OF_NAMES = 0x18


def damage_ntdll(kind: str, ntdll: ModuleImage) -> tuple[ModuleImage, dict[str, int], str | None]:
    """(the damaged image, the exports the plugin can still use (name -> RVA), the problem
    the plugin must report: None, "invalid")."""
    data = bytearray(ntdll.data)
    rva, size = ntdll.export_dir
    layout = ntdll.export_layout
    usable = dict(ntdll.exports)
    problem: str | None = None
    if kind == "lying_header":
        struct.pack_into("<I", data, data_directory_offset(0) + 4, LYING_SIZE)
        usable, problem = {}, "invalid"
    elif kind == "absurd_counts":
        struct.pack_into("<I", data, rva + _NUMBER_OF_NAMES, ABSURD_COUNT)
        usable, problem = {}, "invalid"
    elif kind == "absurd_rvas":
        index = layout["function_rvas"].index(ntdll.exports[ABSURD_RVA_EXPORT])
        struct.pack_into("<I", data, layout["functions"] + 4 * index, ABSURD_RVA)
        del usable[ABSURD_RVA_EXPORT]
    elif kind == "unterminated_names":
        for name, name_rva in layout["name_rvas"].items():
            data[name_rva + len(name)] = ord("#")
        usable, problem = {}, "invalid"
    elif kind == "decoy_alias":
        pass  # built into the image by build_ntdll(decoy=True); symbols follow the contract
    else:
        raise AssertionError(kind)
    assert rva + size <= len(data)
    return replace(ntdll, data=bytes(data)), usable, problem
