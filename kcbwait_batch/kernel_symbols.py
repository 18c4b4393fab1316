"""Which kernel symbol table an image needs, and how to supply it: for when vol cannot say.

When no symbol table matches an image's kernel, Volatility never constructs windows.kcbwait, so
the plugin cannot explain anything; ``vol`` itself only prints the download URL it could not
reach (offline) and generic hints.  This helper finds the kernel's CodeView record the way
Volatility's PDB scanner does (an ``RSDS`` record naming a kernel PDB, followed back to its MZ
header), and prints the PDB name, GUID and age, whether a matching table is present, and how to
supply one online and offline.

    kcbwait-kernel-symbols IMAGE [-s DIR ...]          (installed console script)
    python -m kcbwait_batch.kernel_symbols IMAGE [-s DIR ...]   (from a checkout)

Exit status: 0 a matching table is present, 2 none is (the message says how to get one), 1 no
Windows kernel CodeView record was found (not a Windows image, or truncated before the kernel).

It reads the image file as physical memory, which raw images and uncompressed crash dumps are.
It imports only the framework (not the plugin package), so it also runs as a plain script.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from volatility3 import framework
from volatility3.framework import constants, contexts, exceptions
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import physical
from volatility3.framework.symbols.windows import pdbutil

SYMBOL_SERVER = "https://msdl.microsoft.com/download/symbols"
ISF_SUFFIXES = (".json.xz", ".json")
EXIT_PRESENT, EXIT_NO_KERNEL, EXIT_MISSING = 0, 1, 2
# Kernel images are page aligned; the scan walks back page by page from the record to "MZ".
PAGE_SIZE = 0x1000


@dataclass(frozen=True)
class KernelPdb:
    """A kernel's PDB identity from its CodeView (RSDS) record."""

    name: str  # e.g. ntkrnlmp.pdb
    guid: str  # 32 upper-case hex digits, as Volatility names symbol tables
    age: int

    @property
    def table_stem(self) -> str:
        return f"{self.guid}-{self.age}"

    def table_paths(self, directory: Path) -> list[Path]:
        """Where Volatility looks for the table under a symbols directory."""
        return [directory / "windows" / self.name / f"{self.table_stem}{s}" for s in ISF_SUFFIXES]

    @property
    def download_url(self) -> str:
        return f"{SYMBOL_SERVER}/{self.name}/{self.guid}{self.age:X}/{self.name}"


def find_kernel_pdb(image: Path) -> KernelPdb | None:
    """The first kernel CodeView record (with an MZ header before it) in the image file."""
    framework.require_interface_version(2, 0, 0)
    context = contexts.Context()
    config_path = "kcbwait_kernel_symbols.physical"
    context.config[f"{config_path}.location"] = requirements.URIRequirement.location_from_file(
        str(image)
    )
    layer = physical.FileLayer(context, config_path, "physical")
    context.add_layer(layer)
    names = [f"{name}.pdb".encode() for name in constants.windows.KERNEL_MODULE_NAMES]
    try:
        for hit in pdbutil.PDBUtility.pdbname_scan(context, layer.name, PAGE_SIZE, names):
            if hit.get("mz_offset") is not None:
                return KernelPdb(str(hit["pdb_name"]), str(hit["GUID"]).upper(), int(hit["age"]))
    except exceptions.InvalidAddressException:
        return None
    return None


def default_symbol_dirs() -> list[Path]:
    """Directories vol searches without -s (its own symbols packages and cache)."""
    return [Path(p) for p in constants.SYMBOL_BASEPATHS]


def message(pdb: KernelPdb, symbol_dirs: list[Path]) -> tuple[int, str]:
    """(exit status, text) for an image whose kernel is ``pdb``."""
    found = [p for d in symbol_dirs for p in pdb.table_paths(d) if p.is_file()]
    head = f"kernel {pdb.name} GUID {pdb.guid} age {pdb.age}"
    if found:
        return EXIT_PRESENT, f"{head}: symbol table present at {found[0]}"
    searched = ", ".join(str(d) for d in symbol_dirs) or "(none)"
    return EXIT_MISSING, "\n".join(
        [
            f"{head}: no symbol table {pdb.table_stem}.json.xz found (searched: {searched}).",
            "Online: run vol without --offline; Volatility downloads the PDB from",
            f"  {pdb.download_url}",
            "  and caches the converted table.",
            "Offline: fetch that URL on a connected machine, convert it with",
            f"  python -m volatility3.framework.symbols.windows.pdbconv -f {pdb.name}"
            f" -o {pdb.table_stem}.json",
            f"  and place it as DIR/windows/{pdb.name}/{pdb.table_stem}.json (or .json.xz);",
            "  then run: vol --offline -s DIR -f IMAGE windows.kcbwait",
            "  (or copy Volatility's Windows symbol pack into a directory passed with -s).",
        ]
    )


def describe_image(image: Path, symbol_dirs: list[Path]) -> tuple[int, str]:
    """(exit status, message) for ``image`` (see the module docstring)."""
    pdb = find_kernel_pdb(image)
    if pdb is None:
        return EXIT_NO_KERNEL, (
            f"{image}: no Windows kernel CodeView record (RSDS ntkrnlmp.pdb/ntoskrnl.pdb...) "
            "found: not a Windows memory image, or truncated before the kernel"
        )
    return message(pdb, symbol_dirs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kcbwait-kernel-symbols",
        description="Name the kernel symbol table (PDB GUID/age) an image needs and say how "
        "to supply it.",
    )
    parser.add_argument("image", type=Path)
    parser.add_argument(
        "-s",
        "--symbol-dirs",
        type=Path,
        action="append",
        default=[],
        help="a symbols directory as passed to vol -s (repeatable); vol's defaults are added",
    )
    args = parser.parse_args(argv)
    if not args.image.is_file():
        print(f"{args.image}: no such file", file=sys.stderr)
        return EXIT_NO_KERNEL
    status, text = describe_image(args.image, [*args.symbol_dirs, *default_symbol_dirs()])
    print(text, file=sys.stdout if status == EXIT_PRESENT else sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
