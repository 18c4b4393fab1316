"""Which Windows kernel an image holds: build number and the symbol table's PDB GUID/age.

Both come from what Volatility already loaded for the analysis, so they name exactly the
kernel and symbol table the plugin's rows were computed with: the GUID/age from the ISF
metadata (``metadata.windows.pdb``; the same values the kernel's CodeView record carries,
since that is how Volatility picked the table), the build from the image itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from volatility3.framework import exceptions, interfaces
from volatility3.framework.symbols import metadata

vollog = logging.getLogger(__name__)

# x64 address of KUSER_SHARED_DATA, fixed by the Windows ABI.
KUSER_SHARED_DATA_X64 = 0xFFFFF78000000000
KUSER_SHARED_DATA_X86 = 0xFFDF0000


@dataclass(frozen=True)
class KernelIdentity:
    """Kernel build (e.g. 19041) and PDB GUID (32 hex digits) and age; None when unknown."""

    build: int | None
    pdb_guid: str | None
    pdb_age: int | None


def identify(
    context: interfaces.context.ContextInterface, kernel_module_name: str
) -> KernelIdentity:
    """The identity of the kernel module ``kernel_module_name`` in ``context``."""
    kernel = context.modules[kernel_module_name]
    table = context.symbol_space[kernel.symbol_table_name]
    guid = age = None
    meta = getattr(table, "metadata", None)
    if isinstance(meta, metadata.WindowsMetadata):
        guid = meta.pdb_guid.upper() if meta.pdb_guid else None
        age = meta.pdb_age
    return KernelIdentity(_build(context, kernel), guid, age)


def _build(context: interfaces.context.ContextInterface, kernel) -> int | None:
    """KUSER_SHARED_DATA.NtBuildNumber (Windows 10+: the plain build number), else the
    debugger version block's MinorVersion (the build on every NT kernel), else None."""
    layer = context.layers[kernel.layer_name]
    x64 = layer.bits_per_register == 64
    kuser_address = KUSER_SHARED_DATA_X64 if x64 else KUSER_SHARED_DATA_X86

    def kuser_build() -> int:
        kuser = kernel.object("_KUSER_SHARED_DATA", offset=kuser_address, absolute=True)
        return kuser.NtBuildNumber

    def version_block_build() -> int:
        address = kernel.get_symbol("KdVersionBlock").address
        return kernel.object("_DBGKD_GET_VERSION64", offset=address).MinorVersion

    readers = []
    if _has_member(kernel, "_KUSER_SHARED_DATA", "NtBuildNumber"):
        readers.append(kuser_build)
    if kernel.has_symbol("KdVersionBlock") and kernel.has_type("_DBGKD_GET_VERSION64"):
        readers.append(version_block_build)
    for read in readers:
        try:
            # The kernel's own NtBuildNumber variable carries 0xF0000000 for free builds;
            # the low 16 bits are the build in every source.
            build = int(read()) & 0xFFFF
        except (exceptions.InvalidAddressException, AttributeError) as error:
            vollog.debug("kernel build not readable here: %s", error)
            continue
        if build:
            return build
    return None


def _has_member(kernel, type_name: str, member: str) -> bool:
    return kernel.has_type(type_name) and kernel.get_type(type_name).has_member(member)
