"""The builder's ntdll, user32 and win32u have the shapes ../shared/docs/real-binaries.md
measured on Microsoft's own binaries, read back with pefile (not with the builder's code)."""

from __future__ import annotations

import struct

import pefile
import pytest

from imagebuilder.ntdll_image import build_ntdll
from imagebuilder.user32_image import build_user32
from imagebuilder.win32u_image import build_win32u

# real-binaries.md: the dispatcher, the same code in all five builds (call displacements aside).
DISPATCHER = [
    (0x00, "48 8b 4c 24 20"),  # mov rcx,[rsp+20h]
    (0x05, "8b 54 24 28"),  # mov edx,[rsp+28h]
    (0x09, "44 8b 44 24 2c"),  # mov r8d,[rsp+2Ch]
    (0x0E, "65 48 8b 04 25 60 00 00 00"),  # mov rax,gs:[60h]
    (0x17, "4c 8b 48 58"),  # mov r9,[rax+58h]
    (0x1B, "4b 8b 04 c1"),  # mov rax,[r9+r8*8]
    (0x1F, "e8"),  # call <CFG thunk>
    (0x24, "33 c9"),  # xor ecx,ecx
    (0x26, "33 d2"),  # xor edx,edx
    (0x28, "44 8b c0"),  # mov r8d,eax
    (0x2B, "e8"),  # call NtCallbackReturn
    (0x30, "8b f0"),  # mov esi,eax
    (0x34, "e8"),  # call RtlRaiseStatus
    (0x39, "eb"),  # jmp
]
STUB = bytes.fromhex("4c8bd1 b805000000 f604250803fe7f01 7503 0f05 c3 cd2e c3".replace(" ", ""))
UWOP_PUSH_NONVOL, UWOP_ALLOC_SMALL, UWOP_PUSH_MACHFRAME = 0, 2, 10
UNW_FLAG_CHAININFO = 4


class Image:
    """A built module parsed by pefile (a mapped image: raw offsets equal RVAs)."""

    def __init__(self, module):
        self.module = module
        self.pe = pefile.PE(data=module.data)
        self.data = module.data
        self.exports = {
            e.name.decode(): e.address for e in self.pe.DIRECTORY_ENTRY_EXPORT.symbols if e.name
        }
        self.functions = {
            f.struct.BeginAddress: f for f in getattr(self.pe, "DIRECTORY_ENTRY_EXCEPTION", [])
        }

    def section_of(self, rva: int):
        return next(s for s in self.pe.sections if s.contains_rva(rva))

    def dword(self, rva: int) -> int:
        return struct.unpack_from("<I", self.data, rva)[0]

    def call_target(self, rva: int) -> int:
        assert self.data[rva] == 0xE8
        return rva + 5 + struct.unpack_from("<i", self.data, rva + 1)[0]

    def unwind(self, begin: int) -> tuple[int, int, int, list[tuple[int, int, int]], int | None]:
        """(version, flags, prologue size, codes (offset, op, info), handler RVA) from the raw
        UNWIND_INFO bytes of the RUNTIME_FUNCTION beginning at ``begin``."""
        rva = self.functions[begin].struct.UnwindData
        head, prologue, count, _frame = self.data[rva : rva + 4]
        codes = [
            (self.data[slot], self.data[slot + 1] & 0xF, self.data[slot + 1] >> 4)
            for slot in range(rva + 4, rva + 4 + 2 * count, 2)
        ]
        handler = None
        if head >> 3 & 3:
            handler = self.dword(rva + 4 + 2 * (count + count % 2))
        return head & 7, head >> 3, prologue, codes, handler

    def chain_parent(self, begin: int) -> tuple[int, int, int] | None:
        """The parent RUNTIME_FUNCTION (begin, end, unwind) an entry's UNWIND_INFO chains to
        (UNW_FLAG_CHAININFO: it follows the codes), or None."""
        rva = self.functions[begin].struct.UnwindData
        head, _prologue, count, _frame = self.data[rva : rva + 4]
        if not head >> 3 & UNW_FLAG_CHAININFO:
            return None
        return struct.unpack_from("<III", self.data, rva + 4 + 2 * (count + count % 2))

    def function_end(self, begin: int) -> int:
        """End of the function starting at ``begin``: its entry, then every entry right after
        it that chains back to it (a secondary prologue)."""
        end = self.functions[begin].struct.EndAddress
        while end in self.functions and (self.chain_parent(end) or (None,))[0] == begin:
            end = self.functions[end].struct.EndAddress
        return end


@pytest.fixture(scope="module")
def ntdll():
    return Image(build_ntdll(zw_alias=True))


@pytest.fixture(scope="module")
def win32u():
    return Image(build_win32u())


@pytest.fixture(scope="module", params=[128, 143])
def user32(request, ntdll, win32u):
    return Image(build_user32(request.param, ntdll.module, win32u.module))


def test_dispatcher_code_and_offsets(ntdll):
    d = ntdll.exports["KiUserCallbackDispatcher"]
    for offset, hex_bytes in DISPATCHER:
        expected = bytes.fromhex(hex_bytes)
        assert ntdll.data[d + offset : d + offset + len(expected)] == expected, hex(offset)
    assert ntdll.call_target(d + 0x2B) == ntdll.exports["NtCallbackReturn"]
    assert ntdll.call_target(d + 0x34) == ntdll.exports["RtlRaiseStatus"]
    assert d + 0x3B + ntdll.data[d + 0x3A] - 0x100 == d + 0x32  # jmp back to `mov ecx,esi`
    extras = ntdll.module.extras
    assert extras["dispatcher_return"] == d + 0x24
    assert extras["dispatcher_callback_return"] == d + 0x30


def test_dispatcher_runtime_function_and_unwind_info(ntdll):
    d = ntdll.exports["KiUserCallbackDispatcher"]
    function = ntdll.functions[d]
    assert function.struct.EndAddress - function.struct.BeginAddress == 0x3B
    version, flags, prologue, codes, handler = ntdll.unwind(d)
    assert (version, flags, prologue) == (1, 3, 0)  # UNW_FLAG_EHANDLER | UNW_FLAG_UHANDLER
    # Applied in this order: Rsp += 0x30, then the MACHINE_FRAME (no error code).
    assert codes == [(0, UWOP_ALLOC_SMALL, 0x30 // 8 - 1), (0, UWOP_PUSH_MACHFRAME, 0)]
    assert handler is not None and ntdll.section_of(handler).Name.rstrip(b"\0") == b".text"
    # pefile's own reading of the codes agrees.
    ops = [c.struct.UnwindOp for c in function.unwindinfo.UnwindCodes]
    assert ops == [UWOP_ALLOC_SMALL, UWOP_PUSH_MACHFRAME]


def test_cfg_thunk_sits_0x160_below_and_tail_jumps(ntdll):
    d = ntdll.exports["KiUserCallbackDispatcher"]
    thunk = ntdll.call_target(d + 0x1F)
    assert thunk == d - 0x160
    assert thunk not in ntdll.exports.values()
    function = ntdll.functions[thunk]
    code = ntdll.data[thunk : function.struct.EndAddress]
    assert code.startswith(bytes.fromhex("4883ec48"))  # sub rsp,48h
    assert code.endswith(bytes.fromhex("4883c448 48ffe0"))  # add rsp,48h; jmp rax
    assert bytes.fromhex("ff15") in code  # call [the CFG check]
    _v, _f, prologue, codes, _h = ntdll.unwind(thunk)
    assert prologue == 4 and codes == [(4, UWOP_ALLOC_SMALL, 0x48 // 8 - 1)]


def test_callback_return_stub(ntdll):
    stub = ntdll.exports["NtCallbackReturn"]
    assert ntdll.exports["ZwCallbackReturn"] == stub
    assert ntdll.data[stub : stub + len(STUB)] == STUB  # system-call number 5
    assert "KiUserCallbackDispatcherContinue" not in ntdll.exports


def test_every_ntdll_system_call_is_a_real_stub(ntdll):
    numbers = {}
    for name, rva in ntdll.exports.items():
        if name.startswith("Nt"):
            stub = ntdll.data[rva : rva + 0x18]
            assert stub[:4] == STUB[:4] and stub[8:] == STUB[8:], name
            numbers[name] = struct.unpack_from("<I", stub, 4)[0]
            assert ntdll.exports["Zw" + name[2:]] == rva
            assert rva in ntdll.functions
    assert sorted(numbers.values()) == list(range(len(numbers)))
    assert numbers["NtCallbackReturn"] == 5 and numbers["NtWaitForSingleObject"] == 4


def test_export_counts_are_in_the_real_range(ntdll, win32u, user32):
    assert 2277 <= len(ntdll.exports) <= 2467
    assert 1259 <= len(win32u.exports) <= 1317
    assert 951 <= len(user32.exports) <= 1010


def test_ntdll_exports_are_routines_with_unwind_data(ntdll):
    with_pdata = [rva in ntdll.functions for rva in ntdll.exports.values()]
    assert sum(with_pdata) / len(with_pdata) > 0.85  # leaf routines need no RUNTIME_FUNCTION
    text = ntdll.section_of(ntdll.exports["KiUserCallbackDispatcher"])
    assert all(text.contains_rva(rva) for rva in ntdll.exports.values())


def test_win32u_stubs(win32u):
    numbers = {}
    for name, rva in win32u.exports.items():
        assert name.startswith(("NtUser", "NtGdi")), name
        stub = win32u.data[rva : rva + 0x18]
        assert stub[:4] == STUB[:4] and stub[8:] == STUB[8:], name
        numbers[name] = struct.unpack_from("<I", stub, 4)[0]
        assert win32u.functions[rva].struct.EndAddress == rva + 0x18
    assert sorted(numbers.values()) == list(range(0x1000, 0x1000 + len(numbers)))
    assert numbers["NtUserGetMessage"] == 0x1006


def test_user32_sections(user32):
    names = [s.Name.rstrip(b"\0").decode() for s in user32.pe.sections]
    assert names == [".text", ".rdata", ".data", ".pdata", ".didat", ".rsrc", ".reloc"]


def _table(user32) -> list[int]:
    rva = user32.module.extras["callback_table"]
    count = user32.module.data_section[1] // 8
    base = user32.module.base
    assert user32.pe.OPTIONAL_HEADER.ImageBase == base
    return [struct.unpack_from("<Q", user32.data, rva + 8 * i)[0] - base for i in range(count)]


def test_callback_table_in_read_only_rdata(user32):
    rva = user32.module.extras["callback_table"]
    section = user32.section_of(rva)
    assert section.Name.rstrip(b"\0") == b".rdata"
    assert not section.Characteristics & pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_MEM_WRITE"]
    entries = _table(user32)
    text = user32.section_of(entries[0])
    assert all(text.contains_rva(e) for e in entries)
    assert text.Characteristics & pefile.SECTION_CHARACTERISTICS["IMAGE_SCN_MEM_EXECUTE"]
    # Several ApiNumbers share one routine: 143 pointers, 120 distinct in 19041.
    assert len(set(entries)) == round(len(entries) * 120 / 143)
    # The pointers are relocated: each has an IMAGE_REL_BASED_DIR64 entry.
    user32.pe.parse_data_directories(
        directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_BASERELOC"]]
    )
    blocks = user32.pe.DIRECTORY_ENTRY_BASERELOC
    relocated = {e.rva for block in blocks for e in block.entries if e.type == 10}
    assert all(rva + 8 * i in relocated for i in range(len(entries)))


def test_no_handler_is_exported(user32):
    exported = set(user32.exports.values())
    assert not exported & set(_table(user32))
    assert not [n for n in user32.exports if n.startswith("__fn")]


def test_handlers_begin_at_runtime_functions_and_call_nt_callback_return(user32):
    user32.pe.parse_data_directories(
        directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_IMPORT"]]
    )
    slots = {
        imp.name.decode(): imp.address - user32.module.base
        for entry in user32.pe.DIRECTORY_ENTRY_IMPORT
        if entry.dll.decode().lower() == "ntdll.dll"
        for imp in entry.imports
    }
    slot = slots["NtCallbackReturn"]  # imported from ntdll by name
    entries = sorted(set(_table(user32)))
    at_function = [e for e in entries if e in user32.functions]
    assert len(at_function) / len(entries) > 0.85  # 135 of 143 in 19041
    for entry in entries:
        if entry in user32.functions:
            end = user32.function_end(entry)
            _v, flags, prologue, codes, _h = user32.unwind(entry)
            assert (flags, prologue) == (0, 4) and [c[1] for c in codes] == [UWOP_ALLOC_SMALL]
        else:  # a leaf routine that tail-jumps to NtCallbackReturn
            end = entry + 0x10
        code = user32.data[entry:end]
        # call [rip+disp] (FF 15) or the tail call's jmp [rip+disp] (FF 25)
        calls = [i for i in range(len(code) - 5) if code[i : i + 2] in (b"\xff\x15", b"\xff\x25")]
        targets = {entry + i + 6 + struct.unpack_from("<i", code, i + 2)[0] for i in calls}
        assert slot in targets, hex(entry)


def test_iat_is_bound_to_ntdll(user32, ntdll):
    user32.pe.parse_data_directories(
        directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_IMPORT"]]
    )
    entry = next(e for e in user32.pe.DIRECTORY_ENTRY_IMPORT if e.dll == b"ntdll.dll")
    imp = next(i for i in entry.imports if i.name == b"NtCallbackReturn")
    bound = struct.unpack_from("<Q", user32.data, imp.address - user32.module.base)[0]
    assert bound == ntdll.module.address("NtCallbackReturn")


def test_a_user32_handler_has_a_chained_secondary_entry(user32):
    """A handler whose secondary prologue (`push rbx`) has a RUNTIME_FUNCTION of its own, right
    after the primary one, whose UNWIND_INFO chains to the handler's entry."""
    entries = set(_table(user32))
    # (The stack layouts' dispatch routine UserCallWinProcChained is chained too; it is no
    # table entry.)
    chained = [
        b
        for b in user32.functions
        if user32.chain_parent(b) and user32.chain_parent(b)[0] in entries
    ]
    assert len(chained) == 1
    secondary = user32.functions[chained[0]].struct
    parent = user32.chain_parent(chained[0])
    primary = user32.functions[parent[0]].struct
    assert parent == (primary.BeginAddress, primary.EndAddress, primary.UnwindData)
    assert primary.BeginAddress in entries and primary.EndAddress == secondary.BeginAddress
    _v, flags, prologue, codes, _h = user32.unwind(secondary.BeginAddress)
    assert (flags, prologue, codes) == (UNW_FLAG_CHAININFO, 1, [(1, UWOP_PUSH_NONVOL, 3)])
    assert user32.data[secondary.BeginAddress] == 0x53  # push rbx


def test_an_ntdll_export_has_a_separated_chained_fragment(ntdll):
    """LdrLoadDll's cold fragment lies far from it, in an entry that chains to LdrLoadDll's."""
    chained = [b for b in ntdll.functions if ntdll.chain_parent(b)]
    assert len(chained) == 1
    parent = ntdll.chain_parent(chained[0])
    assert parent[0] == ntdll.exports["LdrLoadDll"]
    assert chained[0] - parent[1] > 0x1000
    assert ntdll.functions[parent[0]].struct.EndAddress == parent[1]
    _v, flags, prologue, codes, _h = ntdll.unwind(chained[0])
    assert (flags, prologue, codes) == (UNW_FLAG_CHAININFO, 0, [])
    # The hot part's `jne rel32` leads into the fragment.
    hot = ntdll.data[parent[0] : parent[1]]
    jne = hot.index(b"\x0f\x85")
    target = parent[0] + jne + 6 + struct.unpack_from("<i", hot, jne + 2)[0]
    assert target == chained[0]
