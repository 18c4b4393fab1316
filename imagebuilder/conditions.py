"""Conditions of real machines, written into a built thread or process.

Each kind (declared and validated in conditions_spec.py) edits memory through the builder's
own address spaces and records what it wrote in the thread's ThreadExpectation, so that
expectation.thread_record can apply docs/output-contract.md to it ("Conditions of real
machines").  Nothing here decides what the plugin reports.
"""

from __future__ import annotations

import random
import struct

from imagebuilder.conditions_spec import ProcessCondition, ThreadCondition
from imagebuilder.expectation import KernelLevel, ThreadExpectation, UserFrame
from imagebuilder.kernel_layout import Kernel
from imagebuilder.memory import PAGE, AddressSpace, PhysicalMemory
from imagebuilder.thread_layout import (
    UCALLOUT_FRAME_SIZE,
    USER_CS,
    USER_EFLAGS,
    USER_SS,
    StackFacts,
    StackPlan,
)
from imagebuilder.user_modules import DISPATCH_HOOK_RVA, ModuleImage

# Handler locals a stale frame (0x58 bytes, its input, its return slot and some slack) or a
# forged Rsp's target needs.
STALE_ROOM = 0x200
# Handler locals that put neighbouring levels' frames on different pages (a page and a frame).
SEPARATE_PAGES = PAGE + 0x100
# Freed stack kept inside the TEB bounds below the current Rsp for a stale frame there.
BELOW_RSP_ROOM = 0x400
# forged_trap_rsp: T(k-1).Rsp rewritten to this far below the real frame, into the handler's
# locals (junk the builder writes itself, so it knows every byte the plugin decodes there).
FORGED_RSP_DELTA = 0x100
# forged_callout_trap_frame: KCALLOUT_FRAME.TrapFrame pointed this far below the real T(k-1)
# (a fake trap frame deeper on the same kernel stack).
FORGED_TRAP_DELTA = 0x400
# forged_trap_rip: T(k-1).Rip moved to the next system-call stub's return point
# (user_modules.STUB_SPACING apart).
FORGED_RIP_DELTA = 0x20
STALE_APIS = (2, 3, 5, 9, 17)  # ApiNumbers of stale frames: common user32 callbacks
# Where the hook code goes in its module (inside the .text of a plain module), and the
# x64 `jmp qword ptr [rip+0]` followed by the absolute target.
HOOK_CODE_RVA = DISPATCH_HOOK_RVA
_JMP_ABS = b"\xff\x25\x00\x00\x00\x00"


def condition_rng(seed: int, pid: int, tid: int) -> random.Random:
    """A generator of its own per thread: conditions never shift another thread's bytes."""
    return random.Random(f"conditions:{seed}:{pid}:{tid}")


def stack_plan(conditions: tuple[ThreadCondition, ...], levels: int) -> StackPlan:
    """What the thread's conditions need from the stack layout."""
    gaps: dict[int, int] = {}
    hollow: set[int] = set()
    below = 0

    def gap(level: int, size: int) -> None:
        if 1 <= level <= levels:
            gaps[level] = max(gaps.get(level, 0), size)

    for c in conditions:
        if c.kind == "stale_frame" and c.at == "handler_locals":
            gap(c.level, STALE_ROOM)
        elif c.kind == "stale_frame" and c.at == "above_rsp":
            gap(levels, STALE_ROOM)  # the innermost handler's locals (idle: above the caller)
        elif c.kind == "stale_frame":
            below = BELOW_RSP_ROOM
        elif c.kind == "user_frame_paged_out":
            gap(c.level - 1, SEPARATE_PAGES)
            gap(c.level, SEPARATE_PAGES)
        elif c.kind == "deep_handler_stack":
            gap(c.level, c.size)
            hollow.add(c.level)
        elif c.kind == "forged_trap_rsp":
            gap(c.level, STALE_ROOM)
    return StackPlan(gaps, frozenset(hollow), below)


def apply_thread_conditions(
    conditions: tuple[ThreadCondition, ...],
    *,
    kernel: Kernel,
    space: AddressSpace,
    rng: random.Random,
    facts: StackFacts,
    kthread: dict[str, int],
    exp: ThreadExpectation,
    dispatcher_return: int,
    dispatcher_range: tuple[int, int],
) -> None:
    """Writes the thread's conditions into memory (KTHREAD fields through ``kthread``, written
    by the caller) and records what was written in ``exp``."""
    for c in conditions:
        if c.kind == "stale_frame":
            _stale_frame(c, space, rng, facts, exp, dispatcher_return)
        elif c.kind == "kernel_stack_swapped":
            # KTHREAD.KernelStackResident 0 and every page of every segment not present,
            # as a page-file PTE (the memory manager's outswapped kernel stack).
            kthread["KernelStackResident"] = 0
            for base, limit in facts.segments:
                for page in range(limit, base, PAGE):
                    kernel.space.page_out(page)
            exp.resident = False
        elif c.kind == "user_frame_paged_out":
            _page_out_frame(space, facts, c.level)
        elif c.kind == "deep_handler_stack":
            frame = facts.frames[c.level - 1].frame
            assert frame - 8 - facts.user_rsps[c.level] >= c.size
        elif c.kind == "forged_callout_trap_frame":
            level = exp.levels[c.level - 1]
            level.callout_trap_frame = level.trap_frame - FORGED_TRAP_DELTA
            kernel.writer.put(
                kernel.space,
                facts.callout_frames[c.level - 1],
                "_KEXCEPTION_FRAME",
                {"TrapFrame": level.callout_trap_frame},
            )
        elif c.kind == "forged_trap_rip":
            level = exp.levels[c.level - 1]
            level.trap_rip += FORGED_RIP_DELTA
            kernel.writer.put(
                kernel.space, level.trap_frame, "_KTRAP_FRAME", {"Rip": level.trap_rip}
            )
        elif c.kind == "forged_trap_rsp":
            _forged_rsp(kernel, space, rng, facts, exp.levels[c.level - 1], exp, dispatcher_range)
        elif c.kind == "stale_trap_frame":
            _stale_trap_frame(kernel, facts, kthread, exp)
        else:  # parse_thread_conditions admits no other kind
            raise AssertionError(c.kind)


def _stale_frame(
    c: ThreadCondition,
    space: AddressSpace,
    rng: random.Random,
    facts: StackFacts,
    exp: ThreadExpectation,
    dispatcher_return: int,
) -> None:
    """A UCALLOUT_FRAME left by a callback that has returned, with its return slot."""
    levels = len(facts.frames)
    length = 16 * rng.randint(1, 4)
    size = UCALLOUT_FRAME_SIZE + length
    if c.at == "below_rsp":
        # Where a callback from the current system call put its frame (callback-machinery.md
        # step 2), in stack freed when it returned: MachineFrame = T(K)'s Rip/Rsp.
        rsp, rip = facts.rsp, facts.syscall_rips[-1]
        frame = (rsp - size) & ~0xF
        bottom, top = facts.stack_limit + 8, rsp
    else:
        # In live stack: above the current Rsp, or in a handler's locals (the locals of the
        # functions its level runs through, nothing an unwind reads); its MachineFrame names
        # a system call made a little higher on the same stack.
        level = levels if c.at == "above_rsp" else c.level
        bottom, top = max(facts.free[level], key=lambda r: r[1] - r[0])
        bottom += 8
        rip = facts.syscall_rips[level]
        frame = (top - size - 0x40) & ~0xF
        rsp = frame + size + 0x20  # 8 mod 16 (size is), as inside a system-call stub
        rsp = min(rsp, facts.stack_base)
    assert bottom <= frame - 8 and frame + size <= top and rsp <= facts.stack_base
    api = rng.choice(STALE_APIS)
    buffer = frame + UCALLOUT_FRAME_SIZE
    space.write(buffer, rng.randbytes(length))
    _write_frame(space, frame, dispatcher_return, (0, 0, 0, 0, buffer), length, api, rip, rsp)
    exp.user_frames[frame] = UserFrame(frame, api, buffer, length, rip, rsp, dispatcher_return)


def _write_frame(
    space: AddressSpace,
    frame: int,
    return_address: int,
    homes: tuple[int, int, int, int, int],
    length: int,
    api: int,
    rip: int,
    rsp: int,
) -> None:
    """UCALLOUT_FRAME (P1Home..P4Home, Buffer, Length, ApiNumber, MACHINE_FRAME) and the
    return slot below it."""
    space.write(
        frame - 8,
        struct.pack("<QQQQQQII", return_address, *homes, length, api)
        + struct.pack("<QQQQQ", rip, USER_CS, USER_EFLAGS, rsp, USER_SS),
    )


def _page_out_frame(space: AddressSpace, facts: StackFacts, level: int) -> None:
    """The pages holding level ``level``'s frame and return slot, paged out; the stack plan
    keeps every other level's frame off them."""
    frame = facts.frames[level - 1].frame
    pages = set(range((frame - 8) & ~(PAGE - 1), frame + UCALLOUT_FRAME_SIZE, PAGE))
    for other in facts.frames:
        if other.level != level:
            span = range((other.frame - 8) & ~(PAGE - 1), other.frame + UCALLOUT_FRAME_SIZE, PAGE)
            assert not pages & set(span), "levels share a page"
    for page in sorted(pages):
        space.page_out(page)


def _forged_rsp(
    kernel: Kernel,
    space: AddressSpace,
    rng: random.Random,
    facts: StackFacts,
    level: KernelLevel,
    exp: ThreadExpectation,
    dispatcher_range: tuple[int, int],
) -> None:
    """T(k-1).Rsp rewritten into level k's handler locals, where the builder writes junk of
    its own choosing (small numbers and zeros, as handler locals hold)."""
    # Into the largest free locals of the level, at most FORGED_RSP_DELTA below the frame.
    low, high = max(facts.free[level.level], key=lambda r: r[1] - r[0])
    forged = min(level.frame - FORGED_RSP_DELTA, (high - 0x58) & ~0xF)
    assert low <= forged - 8 and forged + 0x58 <= high and forged % 16 == 0
    q = [_junk(rng, dispatcher_range) for _ in range(12)]  # return slot + 11 qwords
    space.write(forged - 8, struct.pack("<12Q", *q))
    # Frame at q[1:]: Buffer q[5], Length/ApiNumber the halves of q[6], MachineFrame.Rip q[7],
    # MachineFrame.Rsp q[10].
    exp.user_frames[forged] = UserFrame(
        forged, q[6] >> 32, q[5], q[6] & 0xFFFFFFFF, q[7], q[10], q[0]
    )
    kernel.writer.put(kernel.space, level.trap_frame, "_KTRAP_FRAME", {"Rsp": forged})
    level.frame = forged


def _stale_trap_frame(
    kernel: Kernel, facts: StackFacts, kthread: dict[str, int], exp: ThreadExpectation
) -> None:
    """A Running thread whose KTHREAD.TrapFrame still names the trap frame of a callout
    segment it has freed (the field is only maintained on entry from user mode)."""
    sym, w = kernel.symbols, kernel.writer
    base, limit = kernel.kernel_stack()
    initial = base - sym.size("_KSTACK_CONTROL")
    w.put(kernel.space, initial, "_KSTACK_CONTROL", {"StackBase": base, "ActualLimit": limit})
    stale = initial - sym.size("_KTRAP_FRAME")
    old_rsp = facts.user_rsps[-1] - 0x200
    w.put(
        kernel.space,
        stale,
        "_KTRAP_FRAME",
        {
            "Rip": facts.syscall_rips[0],
            "Rsp": old_rsp,
            "SegCs": USER_CS,
            "SegSs": USER_SS,
            "EFlags": USER_EFLAGS,
            "PreviousMode": 1,
        },
        optional=True,
    )
    kthread["TrapFrame"] = exp.kthread_trap_frame = stale
    exp.state = "Running"


def _junk(rng: random.Random, avoid: tuple[int, int]) -> int:
    while True:
        value = rng.choice((rng.getrandbits(16), rng.getrandbits(32), 0))
        if not avoid[0] <= value < avoid[1]:
            return value


# -- process conditions --------------------------------------------------------------------
def hook_dispatcher(
    memory: PhysicalMemory,
    space: AddressSpace,
    ntdll: ModuleImage,
    hook: ModuleImage,
    dispatcher_return: int,
) -> int:
    """An EDR's or a rootkit's hook on KiUserCallbackDispatcher in one process: the
    dispatcher's first bytes jump into ``hook``, whose code calls the handler itself and
    jumps back after the call.  Both pages become the process's own copies (copy-on-write,
    as a patched image page is), so other processes keep the clean ntdll.  Returns where the
    handlers now return: into the hook, not into the dispatcher."""
    dispatcher = ntdll.address("KiUserCallbackDispatcher")
    call_end = dispatcher_return - dispatcher  # the dispatcher's code up to its handler call
    rva = ntdll.exports["KiUserCallbackDispatcher"]
    hook_code = hook.base + HOOK_CODE_RVA
    code = ntdll.data[rva : rva + call_end] + _JMP_ABS + struct.pack("<Q", dispatcher_return)
    private_patch(memory, space, hook, HOOK_CODE_RVA, code)
    private_patch(memory, space, ntdll, rva, _JMP_ABS + struct.pack("<Q", hook_code))
    return hook_code + call_end


def private_patch(
    memory: PhysicalMemory, space: AddressSpace, module: ModuleImage, rva: int, data: bytes
) -> None:
    page_rva = rva & ~(PAGE - 1)
    assert rva + len(data) <= page_rva + PAGE
    page = bytearray(module.data[page_rva : page_rva + PAGE])
    page[rva - page_rva : rva - page_rva + len(data)] = data
    private = memory.alloc()
    memory.write(private, bytes(page))
    space.map_page(module.base + page_rva, private)


def process_hook(conditions: tuple[ProcessCondition, ...]) -> str | None:
    """The module holding the process's dispatcher hook, if it has one."""
    return next((c.module for c in conditions if c.kind == "hooked_dispatcher"), None)
