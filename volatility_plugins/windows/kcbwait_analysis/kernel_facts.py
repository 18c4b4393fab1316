"""Per-image facts read from the kernel once per run: dispatcher address, enum names, 64-bitness."""

from __future__ import annotations

from dataclasses import dataclass, field

from volatility3.framework import constants, exceptions, interfaces, symbols
from volatility3.framework.layers import intel

KTHREAD_STATE_ENUMS = ("_KTHREAD_STATE", "KTHREAD_STATE")
KWAIT_REASON_ENUMS = ("_KWAIT_REASON", "KWAIT_REASON")
# KTHREAD.KernelStackResident (a ThreadFlags bit): 0 once the memory manager has swapped the
# thread's kernel stacks out (long user-mode waits); their pages are then in the page file.
RESIDENT_MEMBER = "KernelStackResident"


def is_64bit_kernel(
    context: interfaces.context.ContextInterface, kernel: interfaces.context.ModuleInterface
) -> bool:
    """True for an x64 kernel (Intel32e layer and a 64-bit symbol table)."""
    layer = context.layers[kernel.layer_name]
    if not isinstance(layer, intel.Intel32e):
        return False
    return symbols.symbol_table_is_64bit(
        context=context, symbol_table_name=kernel.symbol_table_name
    )


def enum_names(kernel: interfaces.context.ModuleInterface, candidates) -> dict[int, str]:
    """value -> name for the first enumeration of ``candidates`` the symbol table defines.

    The tables type KTHREAD.State/WaitReason as plain UCHAR, so the enum is looked up by name.
    Where two names share a value the first one listed by the table wins.
    """
    for name in candidates:
        if not kernel.has_enumeration(name):
            continue
        template = kernel.get_enumeration(name)
        result: dict[int, str] = {}
        for choice, value in template.vol.choices.items():
            result.setdefault(value, choice)
        return result
    return {}


def kernel_dispatcher_address(
    context: interfaces.context.ContextInterface, kernel: interfaces.context.ModuleInterface
) -> int | None:
    """ntdll!KiUserCallbackDispatcher as the kernel recorded it, or None.

    callback-machinery.md: builds up to 19041 keep it in the pointer variable
    ``KeUserCallbackDispatcher``; 20348 and later in ``PsNtdllExports``, an untyped symbol that
    is a ``_PS_NTDLL_EXPORTS`` in the tables that define that type.
    """
    if kernel.has_symbol("KeUserCallbackDispatcher"):
        address = kernel.get_symbol("KeUserCallbackDispatcher").address
        try:
            value = int(kernel.object(object_type="pointer", offset=address))
        except exceptions.InvalidAddressException:
            value = 0
        if value:
            return value
    if kernel.has_symbol("PsNtdllExports") and kernel.has_type("_PS_NTDLL_EXPORTS"):
        address = kernel.get_symbol("PsNtdllExports").address
        try:
            exports = kernel.object(object_type="_PS_NTDLL_EXPORTS", offset=address)
            value = int(exports.KiUserCallbackDispatcher)
        except exceptions.InvalidAddressException:
            value = 0
        if value:
            return value
    return None


def kernel_dispatcher_return(
    context: interfaces.context.ContextInterface, kernel: interfaces.context.ModuleInterface
) -> int | None:
    """Where a callback handler returns into KiUserCallbackDispatcher, as the kernel records
    it: ``_PS_NTDLL_EXPORTS.KiUserCallbackDispatcherReturn`` (20348 and later), else None."""
    if not (kernel.has_symbol("PsNtdllExports") and kernel.has_type("_PS_NTDLL_EXPORTS")):
        return None
    if not kernel.get_type("_PS_NTDLL_EXPORTS").has_member("KiUserCallbackDispatcherReturn"):
        return None
    address = kernel.get_symbol("PsNtdllExports").address
    try:
        exports = kernel.object(object_type="_PS_NTDLL_EXPORTS", offset=address)
        return int(exports.KiUserCallbackDispatcherReturn) or None
    except exceptions.InvalidAddressException:
        return None


def nesting_level_member(kernel: interfaces.context.ModuleInterface) -> str | None:
    """The KTHREAD member counting nested callbacks in this build."""
    kthread = kernel.get_type("_KTHREAD")
    for member in ("CallbackNestingLevel", "CallbackDepth"):
        if kthread.has_member(member):
            return member
    return None


@dataclass(frozen=True)
class KernelFacts:
    """Facts resolved once per image."""

    table_name: str
    dispatcher: int | None
    kernel_layer: str = ""
    dispatcher_return: int | None = None
    states: dict[int, str] = field(default_factory=dict)
    wait_reasons: dict[int, str] = field(default_factory=dict)
    nesting_member: str | None = None
    resident_member: str | None = None
    """The KTHREAD bit saying whether the kernel stack is resident (None: not in this table)."""

    @classmethod
    def resolve(
        cls, context: interfaces.context.ContextInterface, kernel_module_name: str
    ) -> KernelFacts:
        """Reads the facts from the kernel module named ``kernel_module_name``."""
        kernel = context.modules[kernel_module_name]
        return cls(
            table_name=kernel.symbol_table_name,
            kernel_layer=kernel.layer_name,
            dispatcher=kernel_dispatcher_address(context, kernel),
            dispatcher_return=kernel_dispatcher_return(context, kernel),
            states=enum_names(kernel, KTHREAD_STATE_ENUMS),
            wait_reasons=enum_names(kernel, KWAIT_REASON_ENUMS),
            nesting_member=nesting_level_member(kernel),
            resident_member=(
                RESIDENT_MEMBER if kernel.get_type("_KTHREAD").has_member(RESIDENT_MEMBER) else None
            ),
        )

    def type_name(self, name: str) -> str:
        return f"{self.table_name}{constants.BANG}{name}"
