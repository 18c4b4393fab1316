"""Names the builder's PDBs give routines that no export names.

user32's callback-table routines are not exported (../shared/docs/real-binaries.md: none of
the 143 pointers of 19041's ``apfnDispatch`` is at an export, 120 distinct routines); its PDB
names them ``__fnDWORD``, ``__fnNCDESTROY``, ``__ClientLoadLibrary``, ...  The list below is
the Windows 10 x64 table in ApiNumber order as public research on KernelCallbackTable
injection lists it (structure definitions of ``apfnDispatch``; repeated names are entries that
share a routine).  The builder's own table shares routines at 19041's ratio, at random, so
each routine takes the name of the first ApiNumber that uses it; a routine whose ApiNumber's
name is taken takes the next unused one, and tables longer than the list get generated
``__fnCALLBACK<N>`` names.

Internal (non-exported, non-table) routines get generated names in user32's own style
(``xxx``/``zzz`` prefixes for routines that may call back into the kernel, ``_`` for
internal helpers), drawn from a fixed vocabulary that no export uses.
"""

from __future__ import annotations

import random

# fmt: off
USER32_CALLBACKS = (
    "__fnCOPYDATA", "__fnCOPYGLOBALDATA", "__fnDWORD", "__fnNCDESTROY",
    "__fnDWORDOPTINLPMSG", "__fnINOUTDRAG", "__fnGETTEXTLENGTHS", "__fnINCNTOUTSTRING",
    "__fnINCNTOUTSTRINGNULL", "__fnINLPCOMPAREITEMSTRUCT", "__fnINLPCREATESTRUCT",
    "__fnINLPDELETEITEMSTRUCT", "__fnINLPDRAWITEMSTRUCT", "__fnPOPTINLPUINT", "__fnPOPTINLPUINT",
    "__fnINLPMDICREATESTRUCT", "__fnINOUTLPMEASUREITEMSTRUCT", "__fnINLPWINDOWPOS",
    "__fnINOUTLPPOINT5", "__fnINOUTLPSCROLLINFO", "__fnINOUTLPRECT", "__fnINOUTNCCALCSIZE",
    "__fnINOUTLPPOINT5", "__fnINPAINTCLIPBRD", "__fnINSIZECLIPBRD", "__fnINDESTROYCLIPBRD",
    "__fnINSTRINGNULL", "__fnINSTRINGNULL", "__fnINDEVICECHANGE", "__fnPOWERBROADCAST",
    "__fnINLPUAHDRAWMENU", "__fnOPTOUTLPDWORDOPTOUTLPDWORD", "__fnOPTOUTLPDWORDOPTOUTLPDWORD",
    "__fnOUTDWORDINDWORD", "__fnOUTLPRECT", "__fnOUTSTRING", "__fnPOPTINLPUINT",
    "__fnPOUTLPINT", "__fnSENTDDEMSG", "__fnINOUTSTYLECHANGE", "__fnHkINDWORD",
    "__fnHkINLPCBTACTIVATESTRUCT", "__fnHkINLPCBTCREATESTRUCT", "__fnHkINLPDEBUGHOOKSTRUCT",
    "__fnHkINLPMOUSEHOOKSTRUCTEX", "__fnHkINLPKBDLLHOOKSTRUCT", "__fnHkINLPMSLLHOOKSTRUCT",
    "__fnHkINLPMSG", "__fnHkINLPRECT", "__fnHkOPTINLPEVENTMSG", "__xxxClientCallDelegateThread",
    "__ClientCallDummyCallback", "__ClientCallDummyCallback", "__fnSHELLWINDOWMANAGEMENTCALLOUT",
    "__fnSHELLWINDOWMANAGEMENTNOTIFY", "__ClientCallDummyCallback", "__xxxClientCallDitThread",
    "__xxxClientEnableMMCSS", "__xxxClientUpdateDpi", "__xxxClientExpandStringW",
    "__ClientCopyDDEIn1", "__ClientCopyDDEIn2", "__ClientCopyDDEOut1", "__ClientCopyDDEOut2",
    "__ClientCopyImage", "__ClientEventCallback", "__ClientFindMnemChar", "__ClientFreeDDEHandle",
    "__ClientFreeLibrary", "__ClientGetCharsetInfo", "__ClientGetDDEFlags",
    "__ClientGetDDEHookData", "__ClientGetListboxString", "__ClientGetMessageMPH",
    "__ClientLoadImage", "__ClientLoadLibrary", "__ClientLoadMenu", "__ClientLoadLocalT1Fonts",
    "__ClientPSMTextOut", "__ClientLpkDrawTextEx", "__ClientExtTextOutW",
    "__ClientGetTextExtentPointW", "__ClientCharToWchar", "__ClientAddFontResourceW",
    "__ClientThreadSetup", "__ClientDeliverUserApc", "__ClientNoMemoryPopup",
    "__ClientMonitorEnumProc", "__ClientCallWinEventProc", "__ClientWaitMessageExMPH",
    "__ClientCallDummyCallback", "__ClientCallDummyCallback", "__ClientImmLoadLayout",
    "__ClientImmProcessKey", "__fnIMECONTROL", "__fnINWPARAMDBCSCHAR", "__fnGETTEXTLENGTHS",
    "__ClientCallDummyCallback", "__ClientLoadStringW", "__ClientLoadOLE",
    "__ClientRegisterDragDrop", "__ClientRevokeDragDrop", "__fnINOUTMENUGETOBJECT",
    "__ClientPrinterThunk", "__fnOUTLPCOMBOBOXINFO", "__fnOUTLPSCROLLBARINFO",
    "__fnINLPUAHDRAWMENU", "__fnINLPUAHDRAWMENUITEM", "__fnINLPUAHDRAWMENU",
    "__fnINOUTLPUAHMEASUREMENUITEM", "__fnINLPUAHDRAWMENU", "__fnOUTLPTITLEBARINFOEX",
    "__fnTOUCH", "__fnGESTURE", "__fnPOPTINLPUINT", "__fnPOPTINLPUINT",
    "__xxxClientCallDefaultInputHandler", "__fnEMPTY", "__ClientRimDevCallback",
    "__xxxClientCallMinTouchHitTestingCallback", "__ClientCallLocalMouseHooks",
    "__xxxClientBroadcastThemeChange", "__xxxClientCallDevCallbackSimple",
    "__xxxClientAllocWindowClassExtraBytes", "__xxxClientFreeWindowClassExtraBytes",
    "__fnGETWINDOWDATA", "__fnINOUTSTYLECHANGE", "__fnHkINLPMOUSEHOOKSTRUCTEX",
    "__xxxClientCallDefWindowProc", "__fnSHELLSYNCDISPLAYCHANGED", "__fnHkINLPCHARHOOKSTRUCT",
    "__fnINTERCEPTEDWINDOWACTION", "__xxxTooltipCallback", "__xxxClientInitPSBInfo",
    "__xxxClientDoScrollMenu", "__xxxClientEndScroll", "__xxxClientDrawSize",
    "__xxxClientDrawScrollBar", "__xxxClientHitTestScrollBar", "__xxxClientTrackInit",
)
_INTERNAL_PREFIXES = ("xxx", "zzz", "_", "Real", "Internal", "Client")
_INTERNAL_VERBS = (
    "Send", "Post", "Dispatch", "Translate", "Paint", "Draw", "Fill", "Track", "Measure",
    "Calc", "Hit", "Scroll", "Activate", "Show", "Hide", "Move", "Size", "Map", "Route",
)
_INTERNAL_NOUNS = (
    "Message", "MessageWorker", "Window", "WindowFrame", "Caption", "Border", "Menu", "MenuBar",
    "MenuItem", "ScrollBar", "Thumb", "Button", "ListBox", "ComboBox", "Edit", "Static",
    "Dialog", "Icon", "Cursor", "Caret", "Rect", "Region", "Clip", "Key", "Char", "Hook",
    "HookChain", "Desktop", "Monitor", "Dpi", "Theme", "Class", "Atom", "Prop", "Timer",
)
# fmt: on
# Routines with chained unwind information (../shared/docs/real-binaries.md: ordinary unwind
# data everywhere else): a user32 callback handler with a secondary prologue, and an ntdll
# export with a separated cold fragment.
CHAINED_HANDLER = "__fnINLPCREATESTRUCT"
SPLIT_NTDLL_ROUTINE = "LdrLoadDll"


def callback_names(routine_of: list[int]) -> list[str]:
    """The name of each routine (by index) of a callback table whose entry ``api`` uses
    routine ``routine_of[api]``."""
    distinct = list(dict.fromkeys(USER32_CALLBACKS))
    used: set[str] = set()
    names: dict[int, str] = {}
    spare = iter(distinct)
    generated = 0
    for api, routine in enumerate(routine_of):
        if routine in names:
            continue
        name = USER32_CALLBACKS[api] if api < len(USER32_CALLBACKS) else None
        while name is None or name in used:
            name = next(spare, None)
            if name is None:
                name = f"__fnCALLBACK{generated}"
                generated += 1
        used.add(name)
        names[routine] = name
    return [names[r] for r in range(len(names))]


def user32_internal_names(count: int) -> list[str]:
    rng = random.Random(0x5533)
    pool = [
        prefix + verb + noun
        for prefix in _INTERNAL_PREFIXES
        for verb in _INTERNAL_VERBS
        for noun in _INTERNAL_NOUNS
    ]
    rng.shuffle(pool)
    assert count <= len(pool)
    return pool[:count]
