"""Where a process's PEB.KernelCallbackTable points, which entries are rewritten, and its
KPROCESS.InstrumentationCallback (scenario fields: imagebuilder/tables_spec.py).

A table hijack on a real machine either rewrites entries of the table in place (the owner's
pages become private copy-on-write copies of the process) or copies the whole table somewhere
the attacker can write and points PEB.KernelCallbackTable at the copy.  Both are laid out here
with the bytes that follow each table chosen on purpose: a zero entry after every copy, so the
entries windows.kcbtable checks are exactly the copied ones.
"""

from __future__ import annotations

import struct

from imagebuilder.callback_tables import pe_sections
from imagebuilder.code_targets import code_target_address
from imagebuilder.memory import PAGE, AddressSpace, PhysicalMemory
from imagebuilder.module_image import ModuleImage
from imagebuilder.pe_image import page_up
from imagebuilder.private_memory import PrivateMemory
from imagebuilder.process_layout import ProcessLayout
from imagebuilder.scenario import CodeTarget


def copy_on_write(space: AddressSpace, memory: PhysicalMemory, va: int, size: int) -> None:
    """Gives the process its own copy of the image pages under [va, va + size), as Windows does
    when a process writes to a copy-on-write image page."""
    for page in range(va & ~(PAGE - 1), va + size, PAGE):
        old = space.translate(page)
        assert old is not None, f"{page:#x} is not mapped"
        new = memory.alloc()
        memory.write(new, memory.read(old, PAGE))
        space.map_page(page, new)


def target_address(
    layout: ProcessLayout, private: PrivateMemory, target: str | CodeTarget, bits: int = 64
) -> int:
    """A hijack target: code in a private region, or a module's code far from its exports, or
    a named place in a module's code."""
    if isinstance(target, CodeTarget):
        return code_target_address(layout, target)
    if target in ("private", "private_rwx"):
        return private.alloc(target if bits == 64 else f"{target}32")
    module = layout.module_named(target)
    assert module is not None, target
    return module.base + module.extras.get("payload", 0x1000)


def owner_table(owner: ModuleImage) -> int:
    return owner.base + owner.extras["callback_table"]


def place_table(
    layout: ProcessLayout,
    private: PrivateMemory,
    memory: PhysicalMemory,
    owner: ModuleImage,
    location: str,
    entries: int,
) -> int:
    """The address PEB.KernelCallbackTable gets: the owner's table, or a copy of it (followed by
    a zero entry) in private memory, in the owner's writable .data, or at the end of another
    module."""
    original = owner_table(owner)
    if location == "owner":
        return original
    copy = layout.space.read(original, 8 * entries) + bytes(8)
    if location in ("private", "private_rwx"):
        return private.alloc(location, copy)
    if location == "writable_section":
        data = next(s for s in pe_sections(owner) if s.writable)
        address = data.start
    else:
        module = layout.module_named(location)
        assert module is not None, location
        address = module.base + module.size - page_up(len(copy))
    copy_on_write(layout.space, memory, address, len(copy))
    layout.space.write(address, copy)
    return address


def override_entries(
    layout: ProcessLayout,
    private: PrivateMemory,
    table: int,
    overrides: dict[int, str | CodeTarget],
    bits: int = 64,
) -> None:
    """Rewrites the entries of the table at ``table`` (its pages are the process's own)."""
    fmt = "<Q" if bits == 64 else "<I"
    for api, target in overrides.items():
        value = target_address(layout, private, target, bits)
        layout.space.write(table + struct.calcsize(fmt) * api, struct.pack(fmt, value))
