"""The ETHREAD/KTHREAD fields the analysis reads, decoded from one read per thread.

Every thread costs nine member reads (TID, State, WaitReason, CallbackNestingLevel,
KernelStackResident, Process, TrapFrame, InitialStack, Teb).  Through Volatility's object
model each is an object construction and a layer read, which made them a third of the whole
analysis; so their formats (offset, size, signedness, pointer or bit field) are taken once per
image from the kernel's symbol table, the span that holds them is read once per thread, and
each is decoded exactly as Volatility's Integer, Pointer (masked to the layer's address mask)
and BitField would.  When that span cannot be read in one piece (a page of it missing), or the
table describes a member in a form not handled here, the fields are read one by one through the
objects, so one unreadable field still costs only that field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from volatility3.framework import exceptions, interfaces, objects
from volatility3.framework.objects import templates
from volatility3.plugins.windows.kcbwait_analysis import memory, results

# (name used here, structure, member path from _ETHREAD)
_TID = "tid"
_KTHREAD_FIELDS = ("State", "WaitReason", "Process", "TrapFrame", "InitialStack", "Teb")


@dataclass(frozen=True)
class MemberFormat:
    """Where one field lies in _ETHREAD and how its bytes become its value."""

    offset: int
    length: int
    signed: bool = False
    pointer: bool = False
    bits: tuple[int, int] | None = None

    def decode(self, data: bytes, start: int, mask: int) -> int:
        raw = int.from_bytes(
            data[self.offset - start : self.offset - start + self.length],
            "little",
            signed=self.signed,
        )
        if self.pointer:
            return raw & mask
        if self.bits is not None:
            low, high = self.bits
            return (raw >> low) & ((1 << (high - low)) - 1)
        return raw


def _format(
    kernel: interfaces.context.ModuleInterface, structure: str, member: str, base: int
) -> MemberFormat | None:
    """The format of ``structure.member`` placed ``base`` bytes into _ETHREAD, or None."""
    members = kernel.get_type(structure).vol.members
    if member not in members:
        return None
    offset, template = members[member]
    if isinstance(template, templates.ReferenceTemplate):
        return None
    vol = template.vol
    object_class = vol.get("object_class")
    if object_class is objects.BitField:
        data_format = vol["base_type"].vol.get("data_format")
        bits = (vol["start_bit"], vol["end_bit"])
    else:
        data_format = vol.get("data_format")
        bits = None
    if data_format is None or data_format.byteorder != "little":
        return None
    return MemberFormat(
        base + offset,
        data_format.length,
        data_format.signed,
        isinstance(object_class, type) and issubclass(object_class, objects.Pointer),
        bits,
    )


@dataclass(frozen=True)
class ThreadLayout:
    """The formats of every field ThreadFields reads, and the span of _ETHREAD holding them."""

    fields: dict[str, MemberFormat]
    start: int
    end: int

    @classmethod
    def resolve(
        cls,
        kernel: interfaces.context.ModuleInterface,
        nesting_member: str | None,
        resident_member: str | None,
    ) -> ThreadLayout | None:
        """The layout from the kernel's symbol table, or None when some field's form is not
        one decoded here (the analysis then reads fields through objects)."""
        try:
            ethread = kernel.get_type("_ETHREAD").vol.members
            tcb = ethread["Tcb"][0]
            cid = ethread["Cid"][0]
            fields: dict[str, MemberFormat | None] = {
                _TID: _format(kernel, "_CLIENT_ID", "UniqueThread", cid)
            }
            names = list(_KTHREAD_FIELDS)
            names += [m for m in (nesting_member, resident_member) if m is not None]
            for name in names:
                fields[name] = _format(kernel, "_KTHREAD", name, tcb)
        except (KeyError, AttributeError, exceptions.SymbolError):
            return None
        if any(fields[name] is None for name in (_TID, *_KTHREAD_FIELDS)):
            return None
        known = {name: f for name, f in fields.items() if f is not None}
        start = min(f.offset for f in known.values())
        end = max(f.offset + f.length for f in known.values())
        return cls(known, start, end)


class ThreadFields:
    """The KTHREAD/ETHREAD fields the analysis reads; a field that cannot be read is None and,
    for a column, named in ``unreadable``."""

    def __init__(
        self,
        thread: interfaces.objects.ObjectInterface,
        nesting_member: str | None,
        resident_member: str | None,
        layout: ThreadLayout | None = None,
        context: interfaces.context.ContextInterface | None = None,
    ):
        self.unreadable: set[results.Field] = set()
        values = None
        if layout is not None and context is not None:
            values = _read_span(context, thread, layout)
        if values is not None:
            self.tid = values[_TID]
            self.state = values["State"]
            self.wait_reason = values["WaitReason"]
            self.nesting_level = values.get(nesting_member) if nesting_member else None
            resident = values.get(resident_member) if resident_member else None
            self.kernel_stack_resident = None if resident is None else bool(resident)
            self.process = values["Process"]
            self.trap_frame = values["TrapFrame"]
            self.initial_stack = values["InitialStack"]
            self.teb = values["Teb"]
            return
        self._read_members(thread, nesting_member, resident_member)

    def _read_members(
        self,
        thread: interfaces.objects.ObjectInterface,
        nesting_member: str | None,
        resident_member: str | None,
    ) -> None:
        """Each field on its own, through Volatility's objects."""
        tcb = memory.try_read(lambda: thread.Tcb)
        self.tid = self._int(lambda: thread.Cid.UniqueThread, results.Field.TID)
        self.state = self._int(lambda: tcb.State, results.Field.STATE) if tcb is not None else None
        self.wait_reason = (
            self._int(lambda: tcb.WaitReason, results.Field.WAIT_REASON)
            if tcb is not None
            else None
        )
        self.nesting_level = None
        if tcb is not None and nesting_member is not None:
            self.nesting_level = self._int(
                lambda: tcb.member(nesting_member), results.Field.NESTING_LEVEL
            )
        self.kernel_stack_resident: bool | None = None
        if tcb is not None and resident_member is not None:
            resident = self._int(lambda: tcb.member(resident_member), None)
            self.kernel_stack_resident = None if resident is None else bool(resident)
        self.process = None
        if tcb is not None and tcb.has_member("Process"):
            self.process = self._int(lambda: tcb.Process, None)
        self.trap_frame = self._int(lambda: tcb.TrapFrame, None) if tcb is not None else None
        self.initial_stack = self._int(lambda: tcb.InitialStack, None) if tcb is not None else None
        self.teb = self._int(lambda: tcb.Teb, None) if tcb is not None else None
        if tcb is None:
            self.unreadable.update(
                (results.Field.STATE, results.Field.WAIT_REASON, results.Field.NESTING_LEVEL)
            )

    def _int(self, getter: Callable, column: results.Field | None) -> int | None:
        value = memory.try_read(lambda: int(getter()))
        if value is None and column is not None:
            self.unreadable.add(column)
        return value


def _read_span(
    context: interfaces.context.ContextInterface,
    thread: interfaces.objects.ObjectInterface,
    layout: ThreadLayout,
) -> dict[str, int] | None:
    """Every field decoded from one read of the thread's span, or None if it cannot be read.
    Pointers are masked with the thread's own (native) layer's mask, as Volatility's do."""
    try:
        layer = context.layers[thread.vol.native_layer_name]
        data = layer.read(thread.vol.offset + layout.start, layout.end - layout.start)
    except (exceptions.InvalidAddressException, KeyError):
        return None
    mask = layer.address_mask
    return {name: f.decode(data, layout.start, mask) for name, f in layout.fields.items()}
