"""Units of the builder's stack layouts: unwind-code encodings, frame shapes, damage specs."""

from __future__ import annotations

import struct

import pytest

from imagebuilder import stack_functions as sf
from imagebuilder.damage_spec import DamageError, parse_process_damage, parse_thread_damage
from imagebuilder.spec_fields import FieldError
from imagebuilder.thread_layout import frame_shape
from imagebuilder.unwind_info import (
    UWOP_ALLOC_LARGE,
    UWOP_EPILOG,
    alloc_large,
    code_slots,
    epilog,
    ops_of,
    unwind_info,
)


def test_alloc_large_has_both_encodings():
    assert alloc_large(7, 0x50008) == (7, UWOP_ALLOC_LARGE, 0, 0xA001)
    assert alloc_large(7, 0xC0008) == (7, UWOP_ALLOC_LARGE, 1, 0x0008, 0xC)
    assert ops_of([alloc_large(7, 0x50008)]) == (("alloc", 0x50008),)
    assert ops_of([alloc_large(7, 0xC0008)]) == (("alloc", 0xC0008),)


def test_version_2_epilog_takes_two_slots_and_is_skipped():
    codes = [epilog(7, 7), (6, 2, 3), (2, 0, 14)]
    slots = code_slots(codes)
    assert len(slots) == 4 and (slots[0] >> 8) & 0xF == UWOP_EPILOG
    (record,) = unwind_info(6, codes, version=2)
    version, prologue, count, frame = struct.unpack_from("<BBBB", record)
    assert (version & 7, prologue, count, frame) == (2, 6, 4, 0)
    assert ops_of(codes) == (("alloc", 0x20), ("push", 14))


def test_frame_pointer_function_shape():
    (winmain, winproc) = sf.exe_functions()
    (_code, info) = (
        None,
        unwind_info(
            winmain.prologue,
            list(winmain.codes),
            frame_register=5,
            frame_offset=winmain.frame_offset // 16,
        ),
    )
    assert info[0][3] == 5 | 2 << 4  # rbp, FrameOffset 2 (0x20)
    shape = frame_shape(ops_of(list(winmain.codes), 5, 2))
    assert (shape.size, shape.pushes, shape.fp) == (0x68, {5: 0x60}, 0x20)
    assert shape.size % 16 == 8 and winproc.fp == 0x30


def test_every_stack_function_keeps_rsp_aligned():
    for function in [
        *sf.user32_functions("slot"),
        *sf.exe_functions(),
        *sf.kernel32_functions(),
        *sf.ntdll_functions("slot"),
    ]:
        codes = list(function.codes) + list(function.secondary_codes)
        shape = frame_shape(ops_of(codes, function.frame_register, function.frame_offset // 16))
        assert shape.size == function.frame and shape.size % 16 == 8, function.name


def test_damage_specs():
    assert (
        parse_process_damage({"unwind_data_paged_out": "user32.dll"}, "p", []).unwind_data_paged_out
        == "user32.dll"
    )
    damage = parse_process_damage(
        {"unwind_info_corrupt": {"module": "user32.dll", "function": "UserSystemCall"}}, "p", []
    )
    assert damage.unwind_info_corrupt == ("user32.dll", "UserSystemCall")
    with pytest.raises(DamageError):
        parse_process_damage({"unwind_info_corrupt": {"module": "user32.dll"}}, "p", [])
    (item,) = parse_thread_damage(
        [{"kind": "return_address_overwritten", "level": 2}], "t", 2, "user"
    )
    assert (item.kind, item.level) == ("return_address_overwritten", 2)
    with pytest.raises(FieldError):
        parse_thread_damage([{"kind": "return_address_overwritten", "level": 3}], "t", 2, "user")
