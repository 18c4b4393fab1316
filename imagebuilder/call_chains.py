"""Which functions each level of a thread's user stack runs through (stack_functions.py).

Level 0: ntdll!RtlUserThreadStart -> kernel32!BaseThreadInitThunk -> the EXE's WinMain ->
user32's system-call routine (or kernel32's wait routine for an ntdll system call) -> the stub.
Level k: the table handler (its return address KiUserCallbackDispatcher's) -> a user32
dispatch routine -> the EXE's WndProc -> user32's system-call routine -> the stub; the
innermost handler resting in NtCallbackReturn called it itself.  A module the process does not
load is left out; a handler the builder has no call sites for (a leaf handler, a hijacked
entry, another module's routine) leaves the stub directly under the return slot.
"""

from __future__ import annotations

from imagebuilder import stack_functions as sf
from imagebuilder.module_image import ModuleImage
from imagebuilder.thread_layout import Chain, FrameShape, frame_shape

CALLBACK_RETURN_WAITS = ("NtCallbackReturn", "ZwCallbackReturn")


def shape_of(modules: list[ModuleImage], address: int) -> FrameShape:
    """The frame of the function ``address`` returns into, from the unwind ops the builder
    gave its RUNTIME_FUNCTION."""
    module = next(m for m in modules if m.contains(address))
    rva = address - module.base
    begin = module.functions.entry(rva)
    assert begin is not None, f"{module.name}+{rva:#x} is in no RUNTIME_FUNCTION"
    primary = module.functions.primary(rva)
    sets_rbp = any(r == primary and f.sets_rbp for r, f in module.stack_functions.values())
    return frame_shape(module.unwind_ops[begin], sets_rbp)


def _chain(modules: list[ModuleImage], returns: list[int]) -> Chain:
    return Chain(tuple(returns), tuple(shape_of(modules, r) for r in returns))


def _named(modules: list[ModuleImage], name: str) -> ModuleImage | None:
    return next((m for m in modules if m.name.lower() == name), None)


def _call(module: ModuleImage | None, function: str, callee: str) -> list[int]:
    if module is None or function not in module.stack_functions:
        return []
    rva, f = module.stack_functions[function]
    return [module.base + rva + f.calls[callee]]


def dispatch_routine(gap: int, choice: int) -> str:
    """The dispatch routine whose frame gives the handler's locals at least ``gap`` bytes."""
    if gap == 0:
        return sf.ORDINARY_DISPATCH[choice % len(sf.ORDINARY_DISPATCH)]
    if gap <= sf.ROOMY_ALLOCATION:
        return sf.DISPATCH_ROOMY
    if gap <= sf.DEEP_ALLOCATION:
        return sf.DISPATCH_DEEP
    assert gap <= sf.HUGE_ALLOCATION, hex(gap)
    return sf.DISPATCH_HUGE


def level_zero(modules: list[ModuleImage], exe: ModuleImage, stub: int) -> Chain:
    ntdll = _named(modules, "ntdll.dll")
    kernel32 = _named(modules, "kernel32.dll")
    user32 = _named(modules, "user32.dll")
    win32u = _named(modules, "win32u.dll")
    everything = [exe, *modules]
    returns = _call(ntdll, sf.THREAD_START, sf.THREAD_THUNK)
    returns += _call(kernel32, sf.THREAD_THUNK, sf.WINMAIN)
    returns += _call(exe, sf.WINMAIN, sf.SYSTEM_CALL)
    if win32u is not None and win32u.contains(stub):
        returns += _call(user32, sf.SYSTEM_CALL, "syscall")
    else:
        returns += _call(kernel32, sf.KERNEL32_WAIT, "syscall")
    return _chain(everything, returns)


def callback_level(
    modules: list[ModuleImage],
    exe: ModuleImage,
    handler: int,
    *,
    resting: bool,
    gap: int,
    choice: int,
) -> Chain:
    """Level k's chain below its return slot; ``resting``: the innermost level of a thread
    in NtCallbackReturn."""
    user32 = _named(modules, "user32.dll")
    everything = [exe, *modules]
    if user32 is None or not user32.contains(handler):
        return Chain()
    rva = handler - user32.base
    if resting:
        after = user32.handler_returns.get(rva)
        return _chain(everything, [user32.base + after]) if after is not None else Chain()
    sites = user32.handler_calls.get(rva)
    if sites is None:
        return Chain()
    routine = dispatch_routine(gap, choice)
    returns = [user32.base + sites[routine]]
    returns += _call(user32, routine, sf.WINPROC)
    returns += _call(exe, sf.WINPROC, sf.SYSTEM_CALL)
    returns += _call(user32, sf.SYSTEM_CALL, "syscall")
    return _chain(everything, returns)


def call_returns(module: ModuleImage) -> set[int]:
    """Addresses right after a call instruction the builder placed in ``module`` and puts on
    stacks: stack functions' call sites, handlers' calls, the dispatcher's two calls."""
    found = set()
    for rva, f in module.stack_functions.values():
        found.update(module.base + rva + o for o in f.calls.values())
    for calls in module.handler_calls.values():
        found.update(module.base + r for r in calls.values())
    found.update(module.base + r for r in module.handler_returns.values())
    for key in ("dispatcher_return", "dispatcher_callback_return"):
        if key in module.extras:
            found.add(module.base + module.extras[key])
    return found
