"""The user stacks the builder lays out, read back from the image independently of the builder.

For every frame the truth file's ``stack`` lists (windows.kcbstack rows):
- the module bytes are read from the image (tests/support/readback.py page walk) and parsed
  with pefile; a frame reached by unwinding or scanning returns right after a call
  instruction, a frame entered from the kernel (trap frame, machine frame, resynchronisation)
  right after `syscall`;
- the qword below an unwound or scanned frame's Rsp is its Rip (where a return address lies);
- every function a frame runs in has unwind codes that describe its actual prologue bytes,
  decoded here with a small table of the instructions the builder emits (not its code);
- each healthy thread has as many frames as the call chain its scenario declares;
- a WoW64 thread's 32-bit rows start at the x86 context TlsSlots[1] names and follow its
  EBP chain.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pefile
import pytest

from imagebuilder.isf import SymbolTable
from tests.conftest import SCENARIOS
from tests.support.readback import RawImage, Reader

CALL_PATTERNS = (
    (5, lambda b: b[0] == 0xE8),  # call rel32
    (6, lambda b: b[:2] == b"\xff\x15"),  # call [rip+disp32]
    (7, lambda b: b[:3] == b"\x48\xff\x15"),
    (2, lambda b: b[0] == 0xFF and 0xD0 <= b[1] <= 0xD7),  # call reg
    (3, lambda b: b[:2] == b"\x41\xff" and 0xD0 <= b[2] <= 0xD7),
    (3, lambda b: b[0] == 0xFF and 0x50 <= b[1] <= 0x57),  # call [reg+disp8]
    (6, lambda b: b[0] == 0xFF and 0x90 <= b[1] <= 0x97),  # call [reg+disp32]
)
KERNEL_ENTERED = ("trap frame", "machine frame", "callback frame (kernel)")
UWOP_PUSH_NONVOL, UWOP_ALLOC_LARGE, UWOP_ALLOC_SMALL, UWOP_SET_FPREG = 0, 1, 2, 3
UWOP_SAVE_NONVOL, UWOP_EPILOG, UWOP_SAVE_XMM128, UWOP_PUSH_MACHFRAME = 4, 6, 8, 10
UNW_FLAG_CHAININFO = 4
SCENARIOS_CHECKED = ("stacks", "real-machine")


# -- the image, read back ----------------------------------------------------------------------
class Module:
    """A module as one process maps it: bytes from the image (absent pages zero), pefile."""

    def __init__(self, image: RawImage, dtb: int, entry: dict[str, Any]) -> None:
        self.name, self.base, self.size = entry["name"], entry["base"], entry["size"]
        data = bytearray(self.size)
        self.present = set()
        for offset in range(0, self.size, 0x1000):
            page = image.read(dtb, self.base + offset, 0x1000)
            if page is not None:
                data[offset : offset + 0x1000] = page
                self.present.add(offset)
        self.data = bytes(data)
        self.pe = pefile.PE(data=self.data, fast_load=True)
        directory = self.pe.OPTIONAL_HEADER.DATA_DIRECTORY[3]
        self.functions = []
        for at in range(directory.VirtualAddress, directory.VirtualAddress + directory.Size, 12):
            self.functions.append(struct.unpack_from("<III", self.data, at))

    def function(self, rva: int) -> tuple[int, int, int] | None:
        return next((f for f in self.functions if f[0] <= rva < f[1]), None)

    def unwind(self, info: int) -> dict[str, Any]:
        """UNWIND_INFO at ``info``, read with struct; codes with their extra slots."""
        head, prologue, count, frame = struct.unpack_from("<BBBB", self.data, info)
        slots = struct.unpack_from(f"<{count}H", self.data, info + 4)
        codes, i = [], 0
        while i < count:
            offset, op, op_info = slots[i] & 0xFF, (slots[i] >> 8) & 0xF, slots[i] >> 12
            extra = {
                UWOP_ALLOC_LARGE: 1 if op_info == 0 else 2,
                UWOP_SAVE_NONVOL: 1,
                UWOP_SAVE_XMM128: 1,
                UWOP_EPILOG: 1,
            }.get(op, 0)
            codes.append((offset, op, op_info, *slots[i + 1 : i + 1 + extra]))
            i += 1 + extra
        parent = None
        if (head >> 3) & UNW_FLAG_CHAININFO:
            parent = struct.unpack_from("<III", self.data, info + 4 + 2 * (count + count % 2))
        return {
            "version": head & 7,
            "prologue": prologue,
            "codes": codes,
            "frame_register": frame & 0xF,
            "frame_offset": frame >> 4,
            "parent": parent,
        }


# Register numbers of the push/mov/movaps forms decoded below.
def decode_prologue(code: bytes) -> tuple[list[tuple], int | None]:
    """The unwind codes the prologue at the start of ``code`` needs, in applying order, and
    the lea rbp displacement (a frame pointer).  Decodes only: push r64, sub rsp imm8/imm32,
    lea rbp,[rsp+d8], mov [rsp+d8],r64, movaps [rsp+d8],xmm.  Stops at the first other
    instruction."""
    codes, at, fp = [], 0, None
    while at < len(code):
        b = code[at:]
        if 0x50 <= b[0] <= 0x57:
            at += 1
            codes.append((at, UWOP_PUSH_NONVOL, b[0] - 0x50))
        elif b[0] == 0x41 and 0x50 <= b[1] <= 0x57:
            at += 2
            codes.append((at, UWOP_PUSH_NONVOL, 8 + b[1] - 0x50))
        elif b[:3] == b"\x48\x83\xec":
            at += 4
            codes.append((at, UWOP_ALLOC_SMALL, b[3] // 8 - 1))
        elif b[:3] == b"\x48\x81\xec":
            size = struct.unpack_from("<I", b, 3)[0]
            at += 7
            if size < 0x80000:
                codes.append((at, UWOP_ALLOC_LARGE, 0, size // 8))
            else:
                codes.append((at, UWOP_ALLOC_LARGE, 1, size & 0xFFFF, size >> 16))
        elif b[:4] == b"\x48\x8d\x6c\x24":
            fp = b[4]
            at += 5
            codes.append((at, UWOP_SET_FPREG, 0))
        elif b[:2] == b"\x48\x89" and b[2] & 0xC7 == 0x44 and b[3] == 0x24:
            at += 5
            codes.append((at, UWOP_SAVE_NONVOL, (b[2] >> 3) & 7, b[4] // 8))
        elif b[:2] == b"\x0f\x29" and b[2] & 0xC7 == 0x44 and b[3] == 0x24:
            at += 5
            codes.append((at, UWOP_SAVE_XMM128, (b[2] >> 3) & 7, b[4] // 16))
        else:
            break
    return list(reversed(codes)), fp


def _after_call(module: Module, rva: int) -> bool:
    return any(
        rva >= size and match(module.data[rva - size : rva]) for size, match in CALL_PATTERNS
    )


def _check_unwind_matches_prologue(
    module: Module, begin: int, info_rva: int, kinds: set | None = None
) -> None:
    """Asserts the codes are the decoded prologue's; adds what it saw to ``kinds``."""
    kinds = set() if kinds is None else kinds
    info = module.unwind(info_rva)
    if any(c[1] == UWOP_PUSH_MACHFRAME for c in info["codes"]):
        return  # KiUserCallbackDispatcher: its codes describe the UCALLOUT_FRAME it stands on
    kinds.update((c[1], c[2] if c[1] == UWOP_ALLOC_LARGE else None) for c in info["codes"])
    kinds.add(("version", info["version"]))
    codes = [c for c in info["codes"] if c[1] != UWOP_EPILOG]
    if info["version"] == 2:
        epilog = [c for c in info["codes"] if c[1] == UWOP_EPILOG]
        assert epilog and info["codes"][: len(epilog)] == epilog  # first, two slots each
    if info["parent"] is not None:
        parent_begin, _end, parent_info = info["parent"]
        kinds.add("chained")
        _check_unwind_matches_prologue(module, parent_begin, parent_info, kinds)
    expected, fp = decode_prologue(module.data[begin : begin + max(info["prologue"], 1) + 16])
    expected = [c for c in expected if c[0] <= info["prologue"]]
    assert codes == expected, (module.name, hex(begin))
    if fp is not None:
        assert (info["frame_register"], info["frame_offset"] * 16) == (5, fp)
    else:
        assert info["frame_register"] == 0


@pytest.fixture(scope="module", params=SCENARIOS_CHECKED)
def built(request, images):
    scenario = request.param
    paths = images.get(scenario, "lab")
    truth = images.truth(scenario, "lab")
    symbols = SymbolTable.load(images.profile("lab").isf_path)
    reader = Reader(RawImage(paths["raw"]), symbols, truth["dtb"], truth["kernel_base"])
    return scenario, reader, truth


def _modules(reader: Reader, truth, where) -> dict[int, list[Module]]:
    """pid -> its modules, read from its own address space."""
    found = {}
    for proc in truth["processes"]:
        dtb = next(w["dtb"] for (pid, _t), w in where.items() if pid == proc["pid"])
        found[proc["pid"]] = [Module(reader.image, dtb, m) for m in proc["modules"]]
    return found


def test_frames_return_after_calls_and_slots_hold_them(built):
    _scenario, reader, truth = built
    where = reader.threads()
    modules = _modules(reader, truth, where)
    checked = 0
    for thread in truth["threads"]:
        if thread["pid"] == 4:
            continue
        dtb = where[(thread["pid"], thread["tid"])]["dtb"]
        for row in thread["stack"]:
            if (
                row["rip"] is None
                or row["callback_level"] is None
                or "not in a module" in row["notes"]
            ):
                continue
            module = next(
                (m for m in modules[thread["pid"]] if m.base <= row["rip"] < m.base + m.size), None
            )
            assert module is not None, row
            rva = row["rip"] - module.base
            if row["how"] in KERNEL_ENTERED:
                assert module.data[rva - 2 : rva] == b"\x0f\x05", row  # after `syscall`
                continue
            assert _after_call(module, rva), (thread["tid"], row)
            assert reader.image.qword(dtb, row["rsp"] - 8) == row["rip"], (thread["tid"], row)
            checked += 1
    assert checked > 50


def test_unwind_codes_describe_the_prologues(built):
    """Every function a frame runs in (in a process that can read its unwind data)."""
    _scenario, reader, truth = built
    where = reader.threads()
    modules = _modules(reader, truth, where)
    seen, kinds = set(), set()
    for thread in truth["threads"]:
        for row in thread.get("stack", []):
            if row["rip"] is None or row["callback_level"] is None:
                continue
            for module in modules[thread["pid"]]:
                if not module.base <= row["rip"] < module.base + module.size:
                    continue
                found = module.function(row["rip"] - module.base)
                if found is None or (module.name, found[0]) in seen:
                    continue
                begin, _end, info = found
                if info & ~0xFFF not in module.present:
                    continue
                seen.add((module.name, found[0]))
                if module.unwind(info)["version"] not in (1, 2):
                    continue  # the damaged record of "unwind_info_corrupt"
                _check_unwind_matches_prologue(module, begin, info, kinds)
    names = {name for name, _b in seen}
    if _scenario == "stacks":
        assert {
            (UWOP_PUSH_NONVOL, None),
            (UWOP_ALLOC_SMALL, None),
            (UWOP_ALLOC_LARGE, 0),
            (UWOP_ALLOC_LARGE, 1),
            (UWOP_SET_FPREG, None),
            (UWOP_SAVE_NONVOL, None),
            (UWOP_SAVE_XMM128, None),
            (UWOP_EPILOG, None),
            ("version", 2),
            "chained",
        } <= kinds, kinds
    assert {"ntdll.dll", "user32.dll", "kernel32.dll", "win32u.dll"} <= names


def _declared_frames(thread: dict[str, Any], modules: list[str]) -> int:
    """Frames of a healthy thread from its scenario: level 0 RtlUserThreadStart, (kernel32)
    BaseThreadInitThunk, WinMain, the routine that calls the stub, the stub; each callback
    level its handler, a dispatch routine, WndProc, user32's system-call routine, the stub and
    KiUserCallbackDispatcher; the innermost handler resting in NtCallbackReturn only itself,
    the stub and the dispatcher; a thread resting there without levels: the dispatcher and the
    stub more."""
    levels = len(thread.get("callbacks", []))
    resting = thread["wait"] in ("NtCallbackReturn", "ZwCallbackReturn")
    zero = 3 + ("kernel32.dll" in modules) + ("user32.dll" in modules)
    total = zero + 6 * levels
    if resting and levels:
        total -= 3
    if resting and not levels:
        total += 2
    return total


def test_healthy_threads_have_their_declared_frames(built):
    scenario, _reader, truth = built
    if scenario != "stacks":
        pytest.skip("stacks.json declares the healthy chains")
    spec = json.loads((SCENARIOS / "stacks.json").read_text())
    records = {t["tid"]: t for t in truth["threads"]}
    checked = 0
    for proc in spec["processes"]:
        if proc.get("damage") or proc.get("wow64"):
            continue
        for thread in proc["threads"]:
            if thread.get("damage"):
                continue
            rows = records[thread["tid"]]["stack"]
            assert len(rows) == _declared_frames(thread, proc["modules"]), thread["tid"]
            assert [r["frame"] for r in rows] == list(range(len(rows)))
            assert all(r["notes"] == "" for r in rows)
            assert rows[-1]["symbol"].startswith("ntdll.dll!RtlUserThreadStart+")
            checked += 1
    assert checked >= 8


def test_wow64_rows_follow_the_context_and_the_ebp_chain(built):
    scenario, reader, truth = built
    if scenario != "stacks":
        pytest.skip("stacks.json has the WoW64 threads")
    where = reader.threads()
    sym = reader.symbols
    tls = sym.offset("_TEB", "TlsSlots") + 8
    for thread in truth["threads"]:
        if not thread["wow64"]:
            continue
        w = where[(thread["pid"], thread["tid"])]
        teb = reader.kthread(w["ethread"], "Teb")
        context = reader.image.qword(w["dtb"], teb + tls)
        machine, eip, esp = (
            struct.unpack("<H", reader.image.read(w["dtb"], context + 2, 2))[0],
            struct.unpack("<I", reader.image.read(w["dtb"], context + 4 + 0xB8, 4))[0],
            struct.unpack("<I", reader.image.read(w["dtb"], context + 4 + 0xC4, 4))[0],
        )
        assert machine == 0x14C
        rows = [r for r in thread["stack"] if r["how"] == "frame pointer"]
        # Three links: the chain ends at a saved Ebp of 0 (4 rows) or a return address of 0.
        assert len(rows) in (3, 4) and (rows[0]["rip"], rows[0]["rsp"]) == (eip, esp)
        for row in rows[1:]:
            value = struct.unpack("<I", reader.image.read(w["dtb"], row["rsp"] - 4, 4))[0]
            assert value == row["rip"] and row["callback_level"] is None
            assert row["symbol"].split("+")[0] in ("ntdll.dll", "user32.dll")


def test_no_stray_return_addresses_on_healthy_stacks(built):
    """Every qword on a healthy thread's stack (from its Rsp up to StackBase) that a scan would
    take for a return address (a call site's return in one of the process's modules) is a
    return slot of the walk: the Rsp of the frame it returns to is just above it."""
    scenario, reader, truth = built
    if scenario != "stacks":
        pytest.skip("stacks.json has no stale frames")
    where = reader.threads()
    modules = _modules(reader, truth, where)
    damaged = {d.get("tid") for d in truth["damage"] if d["scope"] == "thread"}
    for thread in truth["threads"]:
        rows = thread["stack"]
        if thread["pid"] != 5100 or thread["tid"] in damaged:
            continue
        w = where[(thread["pid"], thread["tid"])]
        teb = reader.kthread(w["ethread"], "Teb")
        base = reader.field(teb, "_TEB", "NtTib.StackBase", w["dtb"])
        slots = {r["rsp"] - 8 for r in rows if r["how"] in ("unwind", "scan")}
        for page in range(rows[0]["rsp"] & ~0xFFF, base, 0x1000):
            data = reader.image.read(w["dtb"], page, 0x1000)
            if data is None:
                continue  # a deep handler stack's untouched pages
            for index, value in enumerate(struct.unpack("<512Q", data)):
                slot = page + 8 * index
                if slot < rows[0]["rsp"]:
                    continue
                module = next(
                    (m for m in modules[thread["pid"]] if m.base <= value < m.base + m.size),
                    None,
                )
                if module is not None and _after_call(module, value - module.base):
                    assert slot in slots, (thread["tid"], hex(slot), hex(value))


def test_damage_shows_in_the_image(built):
    """The unwind damage kinds are in the image: the .pdata pages of process 5200's own EXE
    absent (no other process maps that image, so no copy can stand in), a version-4
    UNWIND_INFO in process 5300's copy of user32 only."""
    scenario, reader, truth = built
    if scenario != "stacks":
        pytest.skip("stacks.json declares the unwind damage")
    modules = _modules(reader, truth, reader.threads())
    user32 = {p: m for p, mods in modules.items() for m in mods if m.name == "user32.dll"}
    healthy, corrupt = user32[5100], user32[5300]
    gone = next(m for m in modules[5200] if m.name == "pdatagone.exe")
    pdata = gone.pe.OPTIONAL_HEADER.DATA_DIRECTORY[3]
    pages = range(pdata.VirtualAddress & ~0xFFF, pdata.VirtualAddress + pdata.Size, 0x1000)
    assert pdata.Size and not any(p in gone.present for p in pages)
    assert not any(m.name == "pdatagone.exe" for pid, mods in modules.items() if pid != 5200
                   for m in mods)
    changed = [f for f in healthy.functions if corrupt.data[f[2]] & 7 != healthy.data[f[2]] & 7]
    assert changed and all(corrupt.data[f[2]] & 7 == 4 for f in changed)
    records = {t["tid"]: t["stack"] for t in truth["threads"]}
    wndproc = next(r for r in records[5204] if "pdatagone.exe!WndProc" in (r["symbol"] or ""))
    assert wndproc["notes"] == "unreadable: unwind data"
    assert records[5204][wndproc["frame"] + 1]["how"] == "scan"
    assert records[5304][1]["notes"] == "invalid: unwind data"
    assert records[5304][2]["how"] == "scan"
    overwritten = next(r for r in records[5140] if r["rip"] == 0x4141414141414141)
    after = records[5140][overwritten["frame"] + 1]
    assert overwritten["symbol"] is None and overwritten["notes"] == "not in a module"
    assert (after["how"], after["callback_level"]) == ("callback frame (kernel)", 0)
