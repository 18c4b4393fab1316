"""Export names for the builder's ntdll, win32u and user32: real ones where a scenario or a
reader needs them, plausible generated ones to bring each image to a real export count.

Counts and system-call numbers follow ../shared/docs/real-binaries.md (build 19041.572:
ntdll 2429 named exports, win32u 1317, user32 between 951 and 1010).  Generated names are
drawn from fixed vocabularies with a fixed seed: every build of the builder makes the same
images.  No generated name contains "Callback", so none can pass for the dispatcher, the
callback-return stub or a callback handler.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

NTDLL_NAMED_EXPORTS = 2429
WIN32U_NAMED_EXPORTS = 1317
USER32_NAMED_EXPORTS = 985

# The first system calls of x64 Windows 10 (the frequently used ones, numbered 0, 1, 2, ...);
# the rest follow in alphabetical order.  NtCallbackReturn is 5 in every build measured.
NTDLL_HOT_SYSCALLS = (
    "NtAccessCheck",
    "NtWorkerFactoryWorkerReady",
    "NtAcceptConnectPort",
    "NtMapUserPhysicalPagesScatter",
    "NtWaitForSingleObject",
    "NtCallbackReturn",
    "NtReadFile",
    "NtDeviceIoControlFile",
    "NtWriteFile",
    "NtRemoveIoCompletion",
    "NtReleaseSemaphore",
    "NtReplyWaitReceivePort",
    "NtReplyPort",
    "NtSetInformationThread",
    "NtSetEvent",
    "NtClose",
    "NtQueryObject",
    "NtQueryInformationFile",
    "NtOpenKey",
    "NtEnumerateValueKey",
    "NtFindAtom",
    "NtQueryDefaultLocale",
    "NtQueryKey",
    "NtQueryValueKey",
    "NtAllocateVirtualMemory",
    "NtQueryInformationProcess",
    "NtWaitForMultipleObjects32",
    "NtWriteFileGather",
    "NtSetInformationProcess",
    "NtCreateKey",
    "NtFreeVirtualMemory",
    "NtImpersonateClientOfPort",
    "NtReleaseMutant",
    "NtQueryInformationToken",
    "NtRequestWaitReplyPort",
    "NtQueryVirtualMemory",
    "NtOpenThreadToken",
    "NtQueryInformationThread",
    "NtOpenProcess",
    "NtSetInformationFile",
    "NtMapViewOfSection",
    "NtAccessCheckAndAuditAlarm",
    "NtUnmapViewOfSection",
    "NtReplyWaitReceivePortEx",
    "NtTerminateProcess",
    "NtSetEventBoostPriority",
    "NtReadFileScatter",
    "NtOpenThreadTokenEx",
    "NtOpenProcessTokenEx",
    "NtQueryPerformanceCounter",
    "NtEnumerateKey",
    "NtOpenFile",
    "NtDelayExecution",
    "NtQueryDirectoryFile",
    "NtQuerySystemInformation",
    "NtOpenSection",
    "NtQueryTimer",
    "NtFsControlFile",
    "NtWriteVirtualMemory",
    "NtCloseObjectAuditAlarm",
    "NtDuplicateObject",
    "NtQueryAttributesFile",
    "NtClearEvent",
    "NtReadVirtualMemory",
    "NtOpenEvent",
    "NtAdjustPrivilegesToken",
    "NtDuplicateToken",
    "NtContinue",
    "NtQueryDefaultUILanguage",
    "NtQueueApcThread",
    "NtYieldExecution",
    "NtAddAtom",
    "NtCreateEvent",
    "NtQueryVolumeInformationFile",
    "NtCreateSection",
    "NtFlushBuffersFile",
    "NtApphelpCacheControl",
    "NtCreateProcessEx",
    "NtCreateThread",
    "NtIsProcessInJob",
    "NtProtectVirtualMemory",
    "NtQuerySection",
    "NtResumeThread",
    "NtTerminateThread",
    "NtReadRequestData",
    "NtCreateFile",
    "NtQueryEvent",
    "NtWriteRequestData",
    "NtOpenDirectoryObject",
    "NtAccessCheckByTypeAndAuditAlarm",
    "NtQuerySystemTime",
    "NtWaitForMultipleObjects",
    "NtSetInformationObject",
    "NtCancelIoFile",
    "NtTraceEvent",
    "NtPowerInformation",
    "NtSetValueKey",
    "NtCancelTimer",
    "NtSetTimer",
)
# Real system calls numbered alphabetically after the hot ones.
NTDLL_MORE_SYSCALLS = (
    "NtAlertThreadByThreadId",
    "NtWaitForAlertByThreadId",
    "NtCreateWorkerFactory",
    "NtCreateUserProcess",
    "NtCreateThreadEx",
    "NtGetContextThread",
    "NtSetContextThread",
    "NtSuspendThread",
    "NtAlertResumeThread",
    "NtTestAlert",
    "NtRaiseException",
    "NtGetNextThread",
    "NtGetNextProcess",
    "NtOpenThread",
    "NtQuerySystemEnvironmentValue",
    "NtCreateMutant",
    "NtCreateSemaphore",
    "NtCreateTimer",
    "NtCreateIoCompletion",
    "NtSetIoCompletion",
    "NtCreateNamedPipeFile",
    "NtCreateMailslotFile",
    "NtDeleteFile",
    "NtDeleteKey",
    "NtDeleteValueKey",
    "NtFlushKey",
    "NtLoadDriver",
    "NtUnloadDriver",
    "NtShutdownSystem",
    "NtQueryDebugFilterState",
    "NtSignalAndWaitForSingleObject",
    "NtAlpcSendWaitReceivePort",
    "NtAlpcConnectPort",
    "NtAlpcCreatePort",
    "NtManagePartition",
    "NtCreatePartition",
)
# Non-system-call exports the builder's own code or a reader needs, and real CRT exports.
NTDLL_ROUTINES = (
    "KiUserCallbackDispatcher",
    "KiUserApcDispatcher",
    "KiUserExceptionDispatcher",
    "KiRaiseUserExceptionDispatcher",
    "LdrInitializeThunk",
    "RtlUserThreadStart",
    "RtlAllocateHeap",
    "RtlFreeHeap",
    "RtlRaiseStatus",
    "RtlRaiseException",
    "RtlExitUserThread",
    "RtlExitUserProcess",
    "RtlDispatchException",
    "RtlLookupFunctionEntry",
    "RtlVirtualUnwind",
    "RtlCaptureContext",
    "RtlEnterCriticalSection",
    "RtlLeaveCriticalSection",
    "RtlInitUnicodeString",
    "LdrLoadDll",
    "LdrGetProcedureAddress",
    "LdrGetDllHandle",
    "DbgBreakPoint",
    "DbgUiRemoteBreakin",
    "TpAllocWork",
    "TpPostWork",
    "EtwEventWrite",
    "memcpy",
    "memmove",
    "memset",
    "memcmp",
    "strlen",
    "wcslen",
    "strcmp",
    "wcscmp",
    "_stricmp",
    "_wcsicmp",
    "strncpy_s",
    "wcscpy_s",
    "sprintf_s",
    "swprintf_s",
    "qsort",
    "bsearch",
)

WIN32U_HOT_SYSCALLS = (
    "NtUserGetThreadState",
    "NtUserPeekMessage",
    "NtUserCallOneParam",
    "NtUserGetKeyState",
    "NtUserInvalidateRect",
    "NtUserCallNoParam",
    "NtUserGetMessage",  # 0x1006, as in 19041 (real-binaries.md)
    "NtUserMessageCall",
    "NtGdiBitBlt",
    "NtGdiGetCharSet",
    "NtUserGetDC",
    "NtGdiSelectBitmap",
    "NtUserWaitMessage",
    "NtUserTranslateMessage",
    "NtUserGetProp",
    "NtUserPostMessage",
    "NtUserQueryWindow",
    "NtUserTranslateAccelerator",
    "NtGdiFlush",
    "NtUserRedrawWindow",
    "NtUserWindowFromPoint",
    "NtUserCallMsgFilter",
    "NtUserValidateTimerCallback",
    "NtUserBeginPaint",
    "NtUserSetTimer",
    "NtUserEndPaint",
    "NtUserSetCursor",
    "NtUserKillTimer",
    "NtUserBuildHwndList",
    "NtUserSelectPalette",
    "NtUserCallNextHookEx",
    "NtUserHideCaret",
    "NtGdiIntersectClipRect",
    "NtUserCallHwndLock",
    "NtUserGetProcessWindowStation",
    "NtGdiDeleteObjectApp",
    "NtUserSetWindowPos",
    "NtUserShowCaret",
    "NtUserEndDeferWindowPosEx",
    "NtUserCallHwndParamLock",
    "NtUserVkKeyScanEx",
    "NtGdiSetDIBitsToDeviceInternal",
    "NtUserCallTwoParam",
    "NtGdiGetRandomRgn",
    "NtUserCopyAcceleratorTable",
    "NtUserNotifyWinEvent",
    "NtGdiExtSelectClipRgn",
    "NtUserIsClipboardFormatAvailable",
    "NtUserSetScrollInfo",
    "NtGdiStretchBlt",
    "NtUserCreateCaret",
    "NtGdiRectVisible",
    "NtGdiCombineRgn",
    "NtGdiGetDCObject",
    "NtUserDispatchMessage",
    "NtUserRegisterWindowMessage",
    "NtGdiExtTextOutW",
    "NtGdiSelectFont",
    "NtGdiRestoreDC",
    "NtGdiSaveDC",
    "NtUserGetForegroundWindow",
    "NtUserShowScrollBar",
    "NtUserFindExistingCursorIcon",
    "NtGdiGetDCDword",
    "NtGdiGetRegionData",
    "NtGdiLineTo",
    "NtUserSystemParametersInfo",
    "NtGdiGetAppClipBox",
    "NtUserGetAsyncKeyState",
    "NtUserGetCPD",
    "NtUserRemoveProp",
    "NtGdiDoPalette",
    "NtGdiPolyPolyDraw",
    "NtUserSetCapture",
    "NtUserEnumDisplayMonitors",
    "NtGdiCreateCompatibleBitmap",
    "NtUserSetProp",
    "NtGdiGetTextCharsetInfo",
    "NtUserSBGetParms",
    "NtUserGetIconInfo",
    "NtUserExcludeUpdateRgn",
    "NtUserSetFocus",
    "NtGdiExtGetObjectW",
    "NtUserGetUpdateRect",
    "NtGdiCreateCompatibleDC",
    "NtUserGetClipboardSequenceNumber",
    "NtGdiCreatePen",
    "NtUserShowWindow",
    "NtUserGetKeyboardLayoutList",
    "NtGdiPatBlt",
    "NtUserMapVirtualKeyEx",
    "NtUserSetWindowLong",
    "NtGdiHfontCreate",
    "NtUserMoveWindow",
    "NtUserPostThreadMessage",
    "NtUserDrawIconEx",
    "NtUserGetSystemMenu",
    "NtGdiDrawStream",
    "NtUserInternalGetWindowText",
    "NtUserGetWindowDC",
    "NtGdiInvertRgn",
    "NtGdiGetRgnBox",
    "NtGdiGetAndSetDCDword",
    "NtGdiMaskBlt",
    "NtGdiGetWidthTable",
    "NtUserScrollDC",
    "NtUserGetObjectInformation",
    "NtGdiCreateBitmap",
    "NtUserFindWindowEx",
    "NtGdiPolyPatBlt",
    "NtUserUnhookWindowsHookEx",
    "NtGdiGetNearestColor",
    "NtGdiTransformPoints",
    "NtGdiGetDCPoint",
    "NtGdiCreateDIBBrush",
    "NtGdiGetTextMetricsW",
    "NtUserCreateWindowEx",
)

USER32_ROUTINES = (
    "GetMessageW",
    "GetMessageA",
    "DispatchMessageW",
    "DispatchMessageA",
    "PeekMessageW",
    "PeekMessageA",
    "SendMessageW",
    "SendMessageA",
    "PostMessageW",
    "CreateWindowExW",
    "CreateWindowExA",
    "DefWindowProcW",
    "DefWindowProcA",
    "CallWindowProcW",
    "CallWindowProcA",
    "ShowWindow",
    "SetWindowPos",
    "TranslateMessage",
    "RegisterClassExW",
    "MessageBoxW",
    "GetWindowLongPtrW",
    "SetWindowLongPtrW",
    "SetWindowsHookExW",
    "CallNextHookEx",
    "UnhookWindowsHookEx",
)

# fmt: off
_VERBS = (
    "Acquire", "Add", "Adjust", "Allocate", "Append", "Apply", "Assign", "Begin", "Cancel",
    "Capture", "Change", "Check", "Clear", "Close", "Commit", "Compare", "Compute", "Convert",
    "Copy", "Create", "Decode", "Delete", "Destroy", "Disable", "Enable", "Encode", "End",
    "Enumerate", "Find", "Flush", "Free", "Get", "Initialize", "Insert", "Invalidate", "Load",
    "Lock", "Lookup", "Map", "Notify", "Open", "Query", "Read", "Register", "Release", "Remove",
    "Reset", "Resolve", "Set", "Start", "Stop", "Test", "Unlock", "Unregister", "Update",
    "Validate", "Verify", "Wait", "Write",
)
_NT_NOUNS = (
    "Key", "Value", "File", "Section", "Port", "Event", "Mutant", "Semaphore", "Timer", "Token",
    "Thread", "Process", "Job", "Object", "Atom", "Profile", "Transaction", "Enlistment",
    "ResourceManager", "TransactionManager", "Partition", "Registry", "Driver", "Directory",
    "SymbolicLink", "IoCompletion", "WaitCompletionPacket", "LowBoxToken", "Privilege",
    "SecurityObject", "Locale", "BootEntry", "DriverEntry", "SystemEnvironmentValue", "Keyed",
    "WnfStateData", "VirtualMemory", "InformationAtom", "InformationEnlistment",
    "InformationJobObject", "InformationKey", "InformationPort", "InformationResourceManager",
    "InformationTransaction", "InformationWorkerFactory", "ChannelHandle", "DebugObject",
    "EventPair", "Mailslot", "NamedPipe", "PagingFile", "PlugPlayEvent", "PrivateNamespace",
    "RegistryTransaction", "SessionObject", "TimerResolution", "UserPhysicalPages",
)
_RTL_NOUNS = (
    "Acl", "Ace", "ActivationContext", "Atom", "AtomTable", "Bitmap", "BitmapRange", "Boundary",
    "CompressedBuffer", "Context", "CriticalSection", "CurrentDirectory", "DebugInformation",
    "DeltaRange", "Environment", "EnvironmentVariable", "EventLog", "FunctionTable",
    "GenericTable", "GenericTableAvl", "Handle", "HandleTable", "Heap", "HeapInformation",
    "Image", "ImageNtHeader", "IntegerToString", "LargeInteger", "Locale", "LockRange",
    "MemoryStream", "Message", "ModuleList", "Path", "PathName", "ProcessHeap", "Registry",
    "RegistryKey", "Resource", "RunOnce", "SecurityDescriptor", "SecurityObject", "Sid",
    "SidAndAttributes", "SplayLink", "SRWLock", "String", "StringToInteger", "Thread",
    "ThreadPool", "TimeZone", "Timer", "TimerQueue", "UnicodeString", "UserStack", "Wnf",
    "WorkItem", "AnsiString", "OemString", "Sddl", "Token", "ExtendedFeatures", "Utf8String",
    "ElevationFlags", "ProtectedPolicy", "FeatureConfiguration", "SystemTime", "NtPath",
)
_OTHER_PREFIXES = (("Ldr", 0.05), ("Etw", 0.03), ("Tp", 0.03), ("Csr", 0.01), ("Alpc", 0.02))
_WIN32U_NOUNS = (
    "Window", "Menu", "MenuItem", "Cursor", "Icon", "Caret", "Clipboard", "ClipboardData",
    "Dialog", "Rect", "Region", "Keyboard", "KeyboardLayout", "Mouse", "Display", "Monitor",
    "Desktop", "WindowStation", "Hook", "WindowsHook", "Prop", "Class", "ClassInfo", "Scroll",
    "ScrollBar", "Focus", "Accelerator", "Input", "InputContext", "Touch", "Pointer",
    "PointerDevice", "Dpi", "Layered", "Composition", "DisplayConfig", "Gesture", "Hotkey",
    "Imm", "Thread", "Queue", "Palette", "Font", "Brush", "Pen", "Bitmap", "DIBSection", "DC",
    "Path", "Transform", "ColorSpace", "Icm", "Glyph", "TextExtent", "Metafile", "Printer",
    "Spooler", "Sprite", "Redirection", "Shell", "Power", "Session", "Timer", "Raw",
    "RawInput", "Winevent", "Clip", "Animation", "Shadow", "Theme", "Visual", "Frame",
)
_USER32_NOUNS = (
    "Window", "WindowText", "WindowRect", "WindowPlacement", "WindowLong", "WindowWord", "Menu",
    "MenuItem", "MenuInfo", "Cursor", "CursorPos", "Icon", "IconInfo", "Caret", "CaretPos",
    "Clipboard", "ClipboardData", "Dialog", "DialogItem", "DlgItem", "DlgItemText", "Rect",
    "Keyboard", "KeyboardLayout", "KeyboardState", "Display", "DisplaySettings", "Monitor",
    "MonitorInfo", "Desktop", "WindowStation", "Hook", "Prop", "Class", "ClassInfo",
    "ClassLong", "ScrollInfo", "ScrollPos", "ScrollRange", "Focus", "Capture", "Accelerator",
    "AcceleratorTable", "Input", "TouchInput", "PointerInfo", "PointerDevice", "DpiAwareness",
    "LayeredWindow", "Timer", "RawInput", "RawInputDevice", "Shadow", "Theme", "Frame",
    "Message", "MessageExtraInfo", "ParentWindow", "SysColor", "SystemMetrics", "Palette",
)
_WIN_SUFFIXES = ("", "", "W", "A", "Ex", "ExW", "ExA", "Internal", "ForDpi")
# fmt: on


def _combinations(prefix: str, verbs: Iterable[str], nouns: Iterable[str]) -> list[str]:
    return [prefix + verb + noun for verb in verbs for noun in nouns]


def _draw(rng: random.Random, pool: list[str], count: int, taken: set[str]) -> list[str]:
    """``count`` names of ``pool`` (in its order after a shuffle) that ``taken`` lacks."""
    rng.shuffle(pool)
    chosen = []
    for name in pool:
        if len(chosen) == count:
            break
        if name not in taken:
            taken.add(name)
            chosen.append(name)
    assert len(chosen) == count, (count, len(chosen))
    return chosen


def ntdll_syscalls(count: int) -> list[str]:
    """``count`` Nt system calls in system-call-number order: the hot ones, then the others
    alphabetically."""
    rng = random.Random(0x4E7D)
    taken = set(NTDLL_HOT_SYSCALLS) | set(NTDLL_MORE_SYSCALLS)
    rest = list(NTDLL_MORE_SYSCALLS)
    pool = _combinations("Nt", _VERBS, _NT_NOUNS)
    rest += _draw(rng, pool, count - len(NTDLL_HOT_SYSCALLS) - len(rest), taken)
    return [*NTDLL_HOT_SYSCALLS, *sorted(rest)]


def ntdll_routines(count: int, taken: set[str]) -> list[str]:
    """``count`` non-system-call export names: the needed ones, then generated Rtl*, Ldr*, ...
    (``taken``: names already used; extended)."""
    rng = random.Random(0x4E7E)
    names = [n for n in NTDLL_ROUTINES if n not in taken]
    taken.update(names)
    remaining = count - len(names)
    for prefix, share in _OTHER_PREFIXES:
        pool = _combinations(prefix, _VERBS, _RTL_NOUNS)
        names += _draw(rng, pool, int(count * share), taken)
    pool = _combinations("Rtl", _VERBS, _RTL_NOUNS) + _combinations("Rtlp", _VERBS, _RTL_NOUNS)
    names += _draw(rng, pool, count - len(names), taken)
    assert remaining >= 0 and len(names) == count
    return names


def win32u_syscalls(count: int) -> list[str]:
    rng = random.Random(0x3232)
    taken = set(WIN32U_HOT_SYSCALLS)
    pool = [
        name + suffix
        for name in _combinations("NtUser", _VERBS, _WIN32U_NOUNS)
        + _combinations("NtGdi", _VERBS, _WIN32U_NOUNS)
        for suffix in ("", "Ex")
    ]
    rest = _draw(rng, pool, count - len(WIN32U_HOT_SYSCALLS), taken)
    return [*WIN32U_HOT_SYSCALLS, *sorted(rest)]


def user32_routines(count: int) -> list[str]:
    rng = random.Random(0x5532)
    taken = set(USER32_ROUTINES)
    pool = [
        name + suffix
        for name in _combinations("", _VERBS, _USER32_NOUNS)
        for suffix in _WIN_SUFFIXES
    ]
    return [*USER32_ROUTINES, *_draw(rng, pool, count - len(USER32_ROUTINES), taken)]
