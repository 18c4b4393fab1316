"""Declarations of the lab profile's kernel types, enumerations and globals.

The vocabulary (``S``, ``U``, ``Pad``, ``PadTo``, ``Overlay``, ``bits``) and every structure
the lab table holds, in Windows field order with C types; ``imagebuilder.lab_profile`` lays
them out and writes the table.  Type-string syntax: see ``imagebuilder.lab_profile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POINTER_SIZE = 8


# -- declaration vocabulary -------------------------------------------------------------------
@dataclass(frozen=True)
class Pad:
    """``size`` bytes of explicit padding."""

    size: int
    why: str = ""


@dataclass(frozen=True)
class PadTo:
    """Explicit padding up to ``offset`` (relative to the enclosing structure)."""

    offset: int
    why: str = ""


FieldDecl = tuple[str, str]
Alternative = FieldDecl | list[FieldDecl]


@dataclass(frozen=True)
class Overlay:
    """An anonymous union inside a structure: every alternative starts at the same offset."""

    alternatives: tuple[Any, ...]

    def __init__(self, *alternatives: Alternative) -> None:
        object.__setattr__(self, "alternatives", tuple(alternatives))


Entry = FieldDecl | Overlay | Pad | PadTo


@dataclass(frozen=True)
class TypeDecl:
    kind: str  # "struct" or "union"
    entries: tuple[Any, ...]
    align: int = 1  # a declared minimum alignment (DECLSPEC_ALIGN), 1 when none


def S(*entries: Entry, align: int = 1) -> TypeDecl:  # noqa: N802 - reads like a C keyword
    return TypeDecl("struct", tuple(entries), align)


def U(*alternatives: Alternative, align: int = 1) -> TypeDecl:  # noqa: N802
    return TypeDecl("union", tuple(alternatives), align)


def bits(width: int, base: str) -> str:
    return f"bits:{width}:{base}"


def _flags(base: str, *names_widths: tuple[str, int]) -> list[FieldDecl]:
    return [(name, bits(width, base)) for name, width in names_widths]


# -- base types (x64, little endian) ----------------------------------------------------------
BASE_TYPES: dict[str, dict[str, Any]] = {
    "char": {"kind": "char", "signed": True, "size": 1},
    "unsigned char": {"kind": "char", "signed": False, "size": 1},
    "short": {"kind": "int", "signed": True, "size": 2},
    "unsigned short": {"kind": "int", "signed": False, "size": 2},
    "int": {"kind": "int", "signed": True, "size": 4},
    "unsigned int": {"kind": "int", "signed": False, "size": 4},
    "long": {"kind": "int", "signed": True, "size": 4},
    "unsigned long": {"kind": "int", "signed": False, "size": 4},
    "long long": {"kind": "int", "signed": True, "size": 8},
    "unsigned long long": {"kind": "int", "signed": False, "size": 8},
    "wchar": {"kind": "int", "signed": True, "size": 2},
    "f32": {"kind": "float", "signed": True, "size": 4},
    "double": {"kind": "float", "signed": True, "size": 8},
    "pointer": {"kind": "int", "signed": False, "size": POINTER_SIZE},
    "void": {"kind": "void", "signed": True, "size": 0},
}

UCHAR = "unsigned char"
USHORT = "unsigned short"
ULONG = "unsigned long"
ULL = "unsigned long long"
LL = "long long"
PVOID = "pointer:void"


# -- enumerations (names and values are Windows facts) ----------------------------------------
def _enum(names: list[str], start: int = 0) -> dict[str, Any]:
    return {"base": "int", "size": 4,
            "constants": {name: start + i for i, name in enumerate(names)}}


ENUMS: dict[str, dict[str, Any]] = {
    "_KTHREAD_STATE": _enum([
        "Initialized", "Ready", "Running", "Standby", "Terminated", "Waiting", "Transition",
        "DeferredReady", "GateWaitObsolete", "WaitingForProcessInSwap",
    ]),
    "_KWAIT_REASON": _enum([
        "Executive", "FreePage", "PageIn", "PoolAllocation", "DelayExecution", "Suspended",
        "UserRequest", "WrExecutive", "WrFreePage", "WrPageIn", "WrPoolAllocation",
        "WrDelayExecution", "WrSuspended", "WrUserRequest", "WrSpare0", "WrQueue",
        "WrLpcReceive", "WrLpcReply", "WrVirtualMemory", "WrPageOut", "WrRendezvous",
        "WrKeyedEvent", "WrTerminated", "WrProcessInSwap", "WrCpuRateControl",
        "WrCalloutStack", "WrKernel", "WrResource", "WrPushLock", "WrMutex", "WrQuantumEnd",
        "WrDispatchInt", "WrPreempted", "WrYieldExecution", "WrFastMutex", "WrGuardedMutex",
        "WrRundown", "WrAlertByThreadId", "WrDeferredPreempt", "WrPhysicalFault",
        "MaximumWaitReason",
    ]),
    "_MODE": _enum(["KernelMode", "UserMode", "MaximumMode"]),
    "_NT_PRODUCT_TYPE": _enum(["NtProductWinNt", "NtProductLanManNt", "NtProductServer"], 1),
    "_SYSTEM_DLL_TYPE": _enum([
        "PsNativeSystemDll", "PsWowX86SystemDll", "PsWowArm32SystemDll",
        "PsWowAmd64SystemDll", "PsWowChpeX86SystemDll", "PsVsmEnclaveRuntimeDll",
        "PsSystemDllTotalTypes",
    ]),
}


# -- structures -------------------------------------------------------------------------------
TYPES: dict[str, TypeDecl] = {
    # Lists, strings, integers ----------------------------------------------------------------
    "_LIST_ENTRY": S(("Flink", "pointer:_LIST_ENTRY"), ("Blink", "pointer:_LIST_ENTRY")),
    "_SINGLE_LIST_ENTRY": S(("Next", "pointer:_SINGLE_LIST_ENTRY")),
    "_UNICODE_STRING": S(
        ("Length", USHORT), ("MaximumLength", USHORT), ("Buffer", "pointer:wchar")),
    "_LARGE_INTEGER": U(
        [("LowPart", ULONG), ("HighPart", "long")],
        ("QuadPart", LL),
    ),
    "_ULARGE_INTEGER": U(
        [("LowPart", ULONG), ("HighPart", ULONG)],
        ("QuadPart", ULL),
    ),
    "_LUID": S(("LowPart", ULONG), ("HighPart", "long")),
    "_QUAD": S(Overlay(("UseThisFieldToCopy", LL), ("DoNotUseThisField", "double"))),
    "_M128A": S(("Low", ULL), ("High", LL), align=16),
    "_CLIENT_ID": S(("UniqueProcess", PVOID), ("UniqueThread", PVOID)),
    "_KSYSTEM_TIME": S(("LowPart", ULONG), ("High1Time", "long"), ("High2Time", "long")),
    "_EX_FAST_REF": S(Overlay(
        ("Object", PVOID),
        ("RefCnt", bits(4, ULL)),
        ("Value", ULL),
    )),
    "_EX_PUSH_LOCK": S(Overlay(
        _flags(ULL, ("Locked", 1), ("Waiting", 1), ("Waking", 1), ("MultipleShared", 1),
               ("Shared", 60)),
        ("Value", ULL),
        ("Ptr", PVOID),
    )),
    "_EX_RUNDOWN_REF": S(Overlay(("Count", ULL), ("Ptr", PVOID))),
    "_RTL_BALANCED_NODE": S(
        Overlay(
            ("Children", "array:2:pointer:_RTL_BALANCED_NODE"),
            [("Left", "pointer:_RTL_BALANCED_NODE"), ("Right", "pointer:_RTL_BALANCED_NODE")],
        ),
        Overlay(
            ("Red", bits(1, UCHAR)),
            ("Balance", bits(2, UCHAR)),
            ("ParentValue", ULL),
        ),
    ),
    "_RTL_AVL_TREE": S(("Root", "pointer:_RTL_BALANCED_NODE")),

    # Dispatcher objects ----------------------------------------------------------------------
    "_DISPATCHER_HEADER": S(
        Overlay(
            ("Lock", "long"),
            ("LockNV", "long"),
            [("Type", UCHAR), ("Signalling", UCHAR), ("Size", UCHAR), ("Reserved1", UCHAR)],
        ),
        ("SignalState", "long"),
        ("WaitListHead", "_LIST_ENTRY"),
    ),
    "_KEVENT": S(("Header", "_DISPATCHER_HEADER")),
    "_KTIMER": S(
        ("Header", "_DISPATCHER_HEADER"),
        ("DueTime", "_ULARGE_INTEGER"),
        ("TimerListEntry", "_LIST_ENTRY"),
        ("Dpc", PVOID),
        ("Processor", USHORT),
        ("TimerType", USHORT),
        ("Period", ULONG),
    ),
    "_KMUTANT": S(
        ("Header", "_DISPATCHER_HEADER"),
        ("MutantListEntry", "_LIST_ENTRY"),
        ("OwnerThread", "pointer:_KTHREAD"),
        ("MutantFlags", UCHAR),
        ("ApcDisable", UCHAR),
    ),
    "_KAPC_STATE": S(
        ("ApcListHead", "array:2:_LIST_ENTRY"),
        ("Process", "pointer:_KPROCESS"),
        ("InProgressFlags", UCHAR),
        ("KernelApcPending", UCHAR),
        ("UserApcPendingAll", UCHAR),
    ),

    # Processes -------------------------------------------------------------------------------
    "_KPROCESS": S(
        ("Header", "_DISPATCHER_HEADER"),
        ("ProfileListHead", "_LIST_ENTRY"),
        ("DirectoryTableBase", ULL),
        ("ThreadListHead", "_LIST_ENTRY"),
        ("ProcessLock", ULONG),
        ("ProcessTimerDelay", ULONG),
        ("DeepFreezeStartTime", ULL),
        ("ReadyListHead", "_LIST_ENTRY"),
        ("SwapListEntry", "_SINGLE_LIST_ENTRY"),
        Overlay(
            _flags(ULONG, ("AutoAlignment", 1), ("DisableBoost", 1), ("DisableQuantum", 1)),
            ("ProcessFlags", "long"),
        ),
        ("BasePriority", "char"),
        ("QuantumReset", "char"),
        ("Visited", "char"),
        ("ProcessListEntry", "_LIST_ENTRY"),
        ("CycleTime", ULL),
        ("ContextSwitches", ULL),
        ("FreezeCount", ULONG),
        ("KernelTime", ULONG),
        ("UserTime", ULONG),
        ("ReadyTime", ULONG),
        ("UserDirectoryTableBase", ULL),
        ("AddressPolicy", UCHAR),
        ("InstrumentationCallback", PVOID),
        ("KernelWaitTime", ULL),
        ("UserWaitTime", ULL),
    ),
    "_EPROCESS": S(
        ("Pcb", "_KPROCESS"),
        ("ProcessLock", "_EX_PUSH_LOCK"),
        ("UniqueProcessId", PVOID),
        ("ActiveProcessLinks", "_LIST_ENTRY"),
        ("RundownProtect", "_EX_RUNDOWN_REF"),
        ("Flags2", ULONG),
        ("Flags", ULONG),
        ("CreateTime", "_LARGE_INTEGER"),
        ("Token", "_EX_FAST_REF"),
        ("SectionObject", PVOID),
        ("SectionBaseAddress", PVOID),
        ("InheritedFromUniqueProcessId", PVOID),
        ("OwnerProcessId", ULL),
        ("Peb", "pointer:_PEB"),
        ("Session", "pointer:_MM_SESSION_SPACE"),
        ("ObjectTable", "pointer:_HANDLE_TABLE"),
        ("WoW64Process", "pointer:_EWOW64PROCESS"),
        ("ImageFilePointer", "pointer:_FILE_OBJECT"),
        ("ImageFileName", "array:15:unsigned char"),
        ("PriorityClass", UCHAR),
        ("ThreadListHead", "_LIST_ENTRY"),
        ("ActiveThreads", ULONG),
        ("ExitStatus", "long"),
        ("VadRoot", "_RTL_AVL_TREE"),
        ("VadHint", PVOID),
        ("VadCount", ULL),
        ("ExitTime", "_LARGE_INTEGER"),
        ("Flags3", ULONG),
    ),
    "_EWOW64PROCESS": S(
        ("Peb", PVOID), ("Machine", USHORT), ("NtdllType", "enum:_SYSTEM_DLL_TYPE")),
    "_HANDLE_TABLE": S(
        ("NextHandleNeedingPool", ULONG),
        ("ExtraInfoPages", "long"),
        ("TableCode", ULL),
        ("QuotaProcess", "pointer:_EPROCESS"),
        ("HandleTableList", "_LIST_ENTRY"),
        ("UniqueProcessId", ULONG),
        ("Flags", ULONG),
    ),
    "_MM_SESSION_SPACE": S(
        ("ReferenceCount", "long"),
        ("u", "__anonymous__MM_SESSION_SPACE_u"),
        ("SessionId", ULONG),
        ("ProcessReferenceToSession", "long"),
        ("ProcessList", "_LIST_ENTRY"),
        ("LocaleId", ULONG),
        ("AttachCount", ULONG),
        ("CreateTime", ULL),
    ),
    "__anonymous__MM_SESSION_SPACE_u": U(("LongFlags", ULONG)),

    # Threads ---------------------------------------------------------------------------------
    "_KTHREAD": S(
        ("Header", "_DISPATCHER_HEADER"),
        ("SListFaultAddress", PVOID),
        ("QuantumTarget", ULL),
        ("InitialStack", PVOID),
        ("StackLimit", PVOID),
        ("StackBase", PVOID),
        ("ThreadLock", ULL),
        ("CycleTime", ULL),
        ("KernelStack", PVOID),
        ("Running", UCHAR),
        ("Alerted", "array:2:unsigned char"),
        Overlay(
            _flags(ULONG, ("AutoBoostActive", 1), ("ReadyTransition", 1), ("WaitNext", 1),
                   ("SystemAffinityActive", 1), ("Alertable", 1), ("UserStackWalkActive", 1),
                   ("ApcInterruptRequest", 1), ("QuantumEndMigrate", 1),
                   ("UmsDirectedSwitchEnable", 1), ("TimerActive", 1), ("SystemThread", 1),
                   ("ProcessDetachActive", 1), ("CalloutActive", 1)),
            ("MiscFlags", "long"),
        ),
        Overlay(
            # 19041's ThreadFlags bits up to KernelStackResident (bit 17; bit 16 in 14393):
            # 0 when the memory manager has swapped the thread's kernel stack out.
            _flags(ULONG, ("ThreadFlagsSpare", 2), ("AutoAlignment", 1), ("DisableBoost", 1),
                   ("AlertedByThreadId", 1), ("QuantumDonation", 1), ("EnableStackSwap", 1),
                   ("GuiThread", 1), ("DisableQuantum", 1), ("ChargeOnlySchedulingGroup", 1),
                   ("DeferPreemption", 1), ("QueueDeferPreemption", 1),
                   ("ForceDeferSchedule", 1), ("SharedReadyQueueAffinity", 1),
                   ("FreezeCount", 1), ("TerminationApcRequest", 1),
                   ("AutoBoostEntriesExhausted", 1), ("KernelStackResident", 1)),
            ("ThreadFlags", "long"),
        ),
        ("SystemCallNumber", ULONG),
        ("FirstArgument", PVOID),
        ("TrapFrame", "pointer:_KTRAP_FRAME"),
        ("ApcState", "_KAPC_STATE"),
        ("Priority", "char"),
        ("WaitStatus", LL),
        ("WaitBlockList", PVOID),
        ("WaitListEntry", "_LIST_ENTRY"),
        ("Queue", "pointer:_DISPATCHER_HEADER"),
        ("Teb", PVOID),
        ("State", UCHAR),
        ("WaitIrql", UCHAR),
        ("WaitMode", "char"),
        ("WaitTime", ULONG),
        ("Win32Thread", PVOID),
        ("Process", "pointer:_KPROCESS"),
        ("PreviousMode", "char"),
        ("BasePriority", "char"),
        ("ApcStateIndex", UCHAR),
        ("IdealProcessor", ULONG),
        ("SavedApcState", "_KAPC_STATE"),
        ("WaitReason", UCHAR),
        ("SuspendCount", "char"),
        ("KernelTime", ULONG),
        ("CallbackNestingLevel", UCHAR),
        ("UserTime", ULONG),
        ("SuspendEvent", "_KEVENT"),
        ("ThreadListEntry", "_LIST_ENTRY"),
        ("MutantListHead", "_LIST_ENTRY"),
    ),
    "_ETHREAD": S(
        ("Tcb", "_KTHREAD"),
        ("CreateTime", "_LARGE_INTEGER"),
        Overlay(("ExitTime", "_LARGE_INTEGER"), ("KeyedWaitChain", "_LIST_ENTRY")),
        Overlay(
            ("PostBlockList", "_LIST_ENTRY"),
            [("ForwardLinkShadow", PVOID), ("StartAddress", PVOID)],
        ),
        Overlay(
            ("TerminationPort", PVOID),
            ("ReaperLink", "pointer:_ETHREAD"),
            ("KeyedWaitValue", PVOID),
        ),
        ("ActiveTimerListLock", ULL),
        ("ActiveTimerListHead", "_LIST_ENTRY"),
        ("Cid", "_CLIENT_ID"),
        ("DeviceToVerify", "pointer:_DEVICE_OBJECT"),
        ("Win32StartAddress", PVOID),
        ("ThreadListEntry", "_LIST_ENTRY"),
        ("RundownProtect", "_EX_RUNDOWN_REF"),
        ("ThreadLock", "_EX_PUSH_LOCK"),
        ("ReadClusterSize", ULONG),
        ("MmLockOrdering", "long"),
        ("CrossThreadFlags", ULONG),
        ("SameThreadPassiveFlags", ULONG),
        ("SameThreadApcFlags", ULONG),
    ),
    # The base trap frame sits at InitialStack - sizeof(_KTRAP_FRAME) and Windows code
    # computes that with 0x190, so the size is pinned (FIXED_SIZES).  The debug-register and
    # last-branch fields Windows keeps between Rbp and ErrorCode are not declared; the padding
    # keeps the CPU-pushed part (ErrorCode, Rip, SegCs, EFlags, Rsp, SegSs) at the top.
    "_KTRAP_FRAME": S(
        ("P1Home", ULL), ("P2Home", ULL), ("P3Home", ULL), ("P4Home", ULL), ("P5", ULL),
        ("PreviousMode", "char"),
        ("PreviousIrql", UCHAR),
        ("FaultIndicator", UCHAR),
        ("ExceptionActive", UCHAR),
        ("MxCsr", ULONG),
        ("Rax", ULL), ("Rcx", ULL), ("Rdx", ULL), ("R8", ULL), ("R9", ULL), ("R10", ULL),
        ("R11", ULL),
        ("GsBase", ULL),
        ("Xmm0", "_M128A"), ("Xmm1", "_M128A"), ("Xmm2", "_M128A"), ("Xmm3", "_M128A"),
        ("Xmm4", "_M128A"), ("Xmm5", "_M128A"),
        ("FaultAddress", ULL),
        ("Dr0", ULL), ("Dr1", ULL), ("Dr2", ULL), ("Dr3", ULL), ("Dr6", ULL), ("Dr7", ULL),
        ("SegDs", USHORT), ("SegEs", USHORT), ("SegFs", USHORT), ("SegGs", USHORT),
        ("TrapFrame", ULL),
        ("Rbx", ULL), ("Rdi", ULL), ("Rsi", ULL), ("Rbp", ULL),
        PadTo(0x160, "debug-control and last-branch records, not declared"),
        ("ErrorCode", ULL),
        ("Rip", ULL),
        ("SegCs", USHORT),
        ("Fill0", UCHAR),
        ("Logging", UCHAR),
        ("Fill1", "array:2:unsigned short"),
        ("EFlags", ULONG),
        ("Fill2", ULONG),
        ("Rsp", ULL),
        ("SegSs", USHORT),
        ("Fill3", USHORT),
        ("Fill4", ULONG),
    ),
    # KiCallUserMode's KCALLOUT_FRAME is a _KEXCEPTION_FRAME; TrapFrame, OutputBuffer and
    # OutputLength are plain ULONG64 in Windows' own tables.
    "_KEXCEPTION_FRAME": S(
        ("P1Home", ULL), ("P2Home", ULL), ("P3Home", ULL), ("P4Home", ULL), ("P5", ULL),
        ("Xmm6", "_M128A"), ("Xmm7", "_M128A"), ("Xmm8", "_M128A"), ("Xmm9", "_M128A"),
        ("Xmm10", "_M128A"), ("Xmm11", "_M128A"), ("Xmm12", "_M128A"), ("Xmm13", "_M128A"),
        ("Xmm14", "_M128A"), ("Xmm15", "_M128A"),
        ("TrapFrame", ULL),
        ("OutputBuffer", ULL),
        ("OutputLength", ULL),
        ("MxCsr", ULL),
        ("Rbp", ULL), ("Rbx", ULL), ("Rdi", ULL), ("Rsi", ULL),
        ("R12", ULL), ("R13", ULL), ("R14", ULL), ("R15", ULL),
        ("Return", ULL),
    ),
    "_KERNEL_STACK_SEGMENT": S(
        ("StackBase", ULL), ("StackLimit", ULL), ("KernelStack", ULL), ("InitialStack", ULL)),
    "_KSTACK_CONTROL": S(
        ("StackBase", ULL),
        Overlay(("ActualLimit", ULL), ("StackExpansion", bits(1, ULL))),
        ("Previous", "_KERNEL_STACK_SEGMENT"),
    ),

    # User-mode process structures ------------------------------------------------------------
    "_NT_TIB": S(
        ("ExceptionList", PVOID),
        ("StackBase", PVOID),
        ("StackLimit", PVOID),
        ("SubSystemTib", PVOID),
        Overlay(("FiberData", PVOID), ("Version", ULONG)),
        ("ArbitraryUserPointer", PVOID),
        ("Self", "pointer:_NT_TIB"),
    ),
    "_TEB": S(
        ("NtTib", "_NT_TIB"),
        ("EnvironmentPointer", PVOID),
        ("ClientId", "_CLIENT_ID"),
        ("ActiveRpcHandle", PVOID),
        ("ThreadLocalStoragePointer", PVOID),
        ("ProcessEnvironmentBlock", "pointer:_PEB"),
        ("LastErrorValue", ULONG),
        ("CountOfOwnedCriticalSections", ULONG),
        ("CsrClientThread", PVOID),
        ("Win32ThreadInfo", PVOID),
        ("User32Reserved", "array:26:unsigned long"),
        ("UserReserved", "array:5:unsigned long"),
        ("WOW32Reserved", PVOID),
        ("CurrentLocale", ULONG),
        ("FpSoftwareStatusRegister", ULONG),
        ("ExceptionCode", "long"),
        ("InstrumentationCallbackSp", ULL),
        ("InstrumentationCallbackPreviousPc", ULL),
        ("InstrumentationCallbackPreviousSp", ULL),
        ("TxFsContext", ULONG),
        ("InstrumentationCallbackDisabled", UCHAR),
        ("LastStatusValue", ULONG),
        ("StaticUnicodeString", "_UNICODE_STRING"),
        ("StaticUnicodeBuffer", "array:261:wchar"),
        ("DeallocationStack", PVOID),
        ("TlsSlots", "array:64:pointer:void"),
        ("TlsLinks", "_LIST_ENTRY"),
    ),
    "_PEB": S(
        ("InheritedAddressSpace", UCHAR),
        ("ReadImageFileExecOptions", UCHAR),
        ("BeingDebugged", UCHAR),
        ("BitField", UCHAR),
        ("Mutant", PVOID),
        ("ImageBaseAddress", PVOID),
        ("Ldr", "pointer:_PEB_LDR_DATA"),
        ("ProcessParameters", "pointer:_RTL_USER_PROCESS_PARAMETERS"),
        ("SubSystemData", PVOID),
        ("ProcessHeap", PVOID),
        ("CrossProcessFlags", ULONG),
        Overlay(("KernelCallbackTable", PVOID), ("UserSharedInfoPtr", PVOID)),
        ("SystemReserved", ULONG),
        ("AtlThunkSListPtr32", ULONG),
        ("ApiSetMap", PVOID),
        ("TlsExpansionCounter", ULONG),
        ("TlsBitmap", PVOID),
        ("TlsBitmapBits", "array:2:unsigned long"),
        ("NumberOfProcessors", ULONG),
        ("NtGlobalFlag", ULONG),
        ("CriticalSectionTimeout", "_LARGE_INTEGER"),
        ("OSMajorVersion", ULONG),
        ("OSMinorVersion", ULONG),
        ("OSBuildNumber", USHORT),
        ("OSCSDVersion", USHORT),
        ("OSPlatformId", ULONG),
        ("ImageSubsystem", ULONG),
        ("ImageSubsystemMajorVersion", ULONG),
        ("ImageSubsystemMinorVersion", ULONG),
    ),
    # The 32-bit PEB of a WoW64 process (EPROCESS.WoW64Process->Peb): every pointer is a ULONG,
    # as the kernel's own tables declare it; KernelCallbackTable at +0x2C.
    "_PEB32": S(
        ("InheritedAddressSpace", UCHAR),
        ("ReadImageFileExecOptions", UCHAR),
        ("BeingDebugged", UCHAR),
        ("BitField", UCHAR),
        ("Mutant", ULONG),
        ("ImageBaseAddress", ULONG),
        ("Ldr", ULONG),
        ("ProcessParameters", ULONG),
        ("SubSystemData", ULONG),
        ("ProcessHeap", ULONG),
        ("FastPebLock", ULONG),
        ("AtlThunkSListPtr", ULONG),
        ("IFEOKey", ULONG),
        ("CrossProcessFlags", ULONG),
        Overlay(("KernelCallbackTable", ULONG), ("UserSharedInfoPtr", ULONG)),
        ("SystemReserved", ULONG),
        ("AtlThunkSListPtr32", ULONG),
        ("ApiSetMap", ULONG),
        ("TlsExpansionCounter", ULONG),
        ("TlsBitmap", ULONG),
        ("TlsBitmapBits", "array:2:unsigned long"),
    ),
    "_PEB_LDR_DATA": S(
        ("Length", ULONG),
        ("Initialized", UCHAR),
        ("SsHandle", PVOID),
        ("InLoadOrderModuleList", "_LIST_ENTRY"),
        ("InMemoryOrderModuleList", "_LIST_ENTRY"),
        ("InInitializationOrderModuleList", "_LIST_ENTRY"),
        ("EntryInProgress", PVOID),
        ("ShutdownInProgress", UCHAR),
        ("ShutdownThreadId", PVOID),
    ),
    "_LDR_DATA_TABLE_ENTRY": S(
        ("InLoadOrderLinks", "_LIST_ENTRY"),
        ("InMemoryOrderLinks", "_LIST_ENTRY"),
        ("InInitializationOrderLinks", "_LIST_ENTRY"),
        ("DllBase", PVOID),
        ("EntryPoint", PVOID),
        ("SizeOfImage", ULONG),
        ("FullDllName", "_UNICODE_STRING"),
        ("BaseDllName", "_UNICODE_STRING"),
        ("Flags", ULONG),
        ("ObsoleteLoadCount", USHORT),
        ("TlsIndex", USHORT),
        ("HashLinks", "_LIST_ENTRY"),
        ("TimeDateStamp", ULONG),
        ("ParentDllBase", PVOID),
        ("OriginalBase", ULL),
        ("LoadTime", "_LARGE_INTEGER"),
        ("BaseNameHashValue", ULONG),
        ("ReferenceCount", ULONG),
    ),
    "_CURDIR": S(("DosPath", "_UNICODE_STRING"), ("Handle", PVOID)),
    "_RTL_USER_PROCESS_PARAMETERS": S(
        ("MaximumLength", ULONG),
        ("Length", ULONG),
        ("Flags", ULONG),
        ("DebugFlags", ULONG),
        ("ConsoleHandle", PVOID),
        ("ConsoleFlags", ULONG),
        ("StandardInput", PVOID),
        ("StandardOutput", PVOID),
        ("StandardError", PVOID),
        ("CurrentDirectory", "_CURDIR"),
        ("DllPath", "_UNICODE_STRING"),
        ("ImagePathName", "_UNICODE_STRING"),
        ("CommandLine", "_UNICODE_STRING"),
        ("Environment", PVOID),
        ("WindowTitle", "_UNICODE_STRING"),
        ("DesktopInfo", "_UNICODE_STRING"),
        ("ShellInfo", "_UNICODE_STRING"),
        ("RuntimeData", "_UNICODE_STRING"),
        ("EnvironmentSize", ULL),
        ("EnvironmentVersion", ULL),
    ),

    # Kernel modules --------------------------------------------------------------------------
    "_KLDR_DATA_TABLE_ENTRY": S(
        ("InLoadOrderLinks", "_LIST_ENTRY"),
        ("ExceptionTable", PVOID),
        ("ExceptionTableSize", ULONG),
        ("GpValue", PVOID),
        ("DllBase", PVOID),
        ("EntryPoint", PVOID),
        ("SizeOfImage", ULONG),
        ("FullDllName", "_UNICODE_STRING"),
        ("BaseDllName", "_UNICODE_STRING"),
        ("Flags", ULONG),
        ("LoadCount", USHORT),
        ("SectionPointer", PVOID),
        ("CheckSum", ULONG),
        ("SizeOfImageNotRounded", ULONG),
        ("TimeDateStamp", ULONG),
    ),
    "_IMAGE_DOS_HEADER": S(
        ("e_magic", USHORT), ("e_cblp", USHORT), ("e_cp", USHORT), ("e_crlc", USHORT),
        ("e_cparhdr", USHORT), ("e_minalloc", USHORT), ("e_maxalloc", USHORT),
        ("e_ss", USHORT), ("e_sp", USHORT), ("e_csum", USHORT), ("e_ip", USHORT),
        ("e_cs", USHORT), ("e_lfarlc", USHORT), ("e_ovno", USHORT),
        ("e_res", "array:4:unsigned short"), ("e_oemid", USHORT), ("e_oeminfo", USHORT),
        ("e_res2", "array:10:unsigned short"), ("e_lfanew", "long"),
    ),

    # Virtual address descriptors and mapped files --------------------------------------------
    "_MMVAD_FLAGS": S(*_flags(
        ULONG, ("Lock", 1), ("LockContended", 1), ("DeleteInProgress", 1), ("NoChange", 1),
        ("VadType", 3), ("Protection", 5), ("PreferredNode", 6), ("PageSize", 2),
        ("PrivateMemory", 1))),
    "_MMVAD_FLAGS1": S(*_flags(ULONG, ("CommitCharge", 31), ("MemCommit", 1))),
    "__anonymous__MMVAD_SHORT_u": U(("LongFlags", ULONG), ("VadFlags", "_MMVAD_FLAGS")),
    "__anonymous__MMVAD_SHORT_u1": U(("LongFlags1", ULONG), ("VadFlags1", "_MMVAD_FLAGS1")),
    "_MMVAD_SHORT": S(
        Overlay(
            ("VadNode", "_RTL_BALANCED_NODE"),
            [("NextVad", "pointer:_MMVAD_SHORT"), ("ExtraCreateInfo", PVOID)],
        ),
        ("StartingVpn", ULONG),
        ("EndingVpn", ULONG),
        ("StartingVpnHigh", UCHAR),
        ("EndingVpnHigh", UCHAR),
        ("CommitChargeHigh", UCHAR),
        ("ReferenceCount", "long"),
        ("PushLock", "_EX_PUSH_LOCK"),
        ("u", "__anonymous__MMVAD_SHORT_u"),
        ("u1", "__anonymous__MMVAD_SHORT_u1"),
        ("EventList", PVOID),
    ),
    "_MMVAD": S(
        ("Core", "_MMVAD_SHORT"),
        ("Subsection", "pointer:_SUBSECTION"),
        ("FirstPrototypePte", PVOID),
        ("LastContiguousPte", PVOID),
        ("ViewLinks", "_LIST_ENTRY"),
        ("VadsProcess", "pointer:_EPROCESS"),
        ("FileObject", "pointer:_FILE_OBJECT"),
    ),
    "_SUBSECTION": S(
        ("ControlArea", "pointer:_CONTROL_AREA"),
        ("SubsectionBase", PVOID),
        ("NextSubsection", "pointer:_SUBSECTION"),
        ("StartingSector", ULONG),
        ("NumberOfFullSectors", ULONG),
        ("PtesInSubsection", ULONG),
    ),
    "_SEGMENT": S(
        ("ControlArea", "pointer:_CONTROL_AREA"),
        ("TotalNumberOfPtes", ULONG),
        ("NumberOfCommittedPages", ULL),
        ("SizeOfSegment", ULL),
        ("BasedAddress", PVOID),
    ),
    "_CONTROL_AREA": S(
        ("Segment", "pointer:_SEGMENT"),
        ("ListHead", "_LIST_ENTRY"),
        ("NumberOfSectionReferences", ULL),
        ("NumberOfPfnReferences", ULL),
        ("NumberOfMappedViews", ULL),
        ("NumberOfUserReferences", ULL),
        ("FilePointer", "_EX_FAST_REF"),
        ("ControlAreaLock", "long"),
        ("ModifiedWriteCount", ULONG),
        ("LockedPages", ULL),
    ),
    "_FILE_OBJECT": S(
        ("Type", "short"),
        ("Size", "short"),
        ("DeviceObject", "pointer:_DEVICE_OBJECT"),
        ("FsContext", PVOID),
        ("SectionObjectPointer", PVOID),
        ("PrivateCacheMap", PVOID),
        ("FinalStatus", "long"),
        ("RelatedFileObject", "pointer:_FILE_OBJECT"),
        ("LockOperation", UCHAR),
        ("DeletePending", UCHAR),
        ("ReadAccess", UCHAR),
        ("WriteAccess", UCHAR),
        ("DeleteAccess", UCHAR),
        ("SharedRead", UCHAR),
        ("SharedWrite", UCHAR),
        ("SharedDelete", UCHAR),
        ("Flags", ULONG),
        ("FileName", "_UNICODE_STRING"),
        ("CurrentByteOffset", "_LARGE_INTEGER"),
        ("Waiters", ULONG),
        ("Busy", ULONG),
        ("LastLock", PVOID),
        ("Lock", "_KEVENT"),
        ("Event", "_KEVENT"),
    ),

    # Object manager and pool -----------------------------------------------------------------
    "_OBJECT_HEADER": S(
        ("PointerCount", LL),
        Overlay(("HandleCount", LL), ("NextToFree", PVOID)),
        ("Lock", "_EX_PUSH_LOCK"),
        ("TypeIndex", UCHAR),
        ("TraceFlags", UCHAR),
        ("InfoMask", UCHAR),
        ("Flags", UCHAR),
        ("Reserved", ULONG),
        Overlay(("ObjectCreateInfo", PVOID), ("QuotaBlockCharged", PVOID)),
        ("SecurityDescriptor", PVOID),
        ("Body", "_QUAD"),
    ),
    "_OBJECT_HEADER_NAME_INFO": S(
        ("Directory", PVOID),
        ("Name", "_UNICODE_STRING"),
        ("ReferenceCount", "long"),
        ("Reserved", ULONG),
    ),
    "_POOL_HEADER": S(
        Overlay(
            _flags(USHORT, ("PreviousSize", 8), ("PoolIndex", 8), ("BlockSize", 8),
                   ("PoolType", 8)),
            ("Ulong1", ULONG),
        ),
        ("PoolTag", ULONG),
        Overlay(
            ("ProcessBilled", "pointer:_EPROCESS"),
            [("AllocatorBackTraceIndex", USHORT), ("PoolTagHash", USHORT)],
        ),
    ),
    "_POOL_TRACKER_BIG_PAGES": S(
        ("Va", ULL),
        ("Key", ULONG),
        *_flags(ULONG, ("Pattern", 8), ("PoolType", 12), ("SlushSize", 12)),
        ("NumberOfBytes", ULL),
    ),
    "_OBJECT_SYMBOLIC_LINK": S(
        ("CreationTime", "_LARGE_INTEGER"),
        ("LinkTarget", "_UNICODE_STRING"),
        ("DosDeviceDriveIndex", ULONG),
        ("Flags", ULONG),
        ("AccessMask", ULONG),
    ),
    "_ERESOURCE": S(
        ("SystemResourcesList", "_LIST_ENTRY"),
        ("OwnerTable", PVOID),
        ("ActiveCount", "short"),
        ("Flag", USHORT),
        ("SharedWaiters", PVOID),
        ("ExclusiveWaiters", PVOID),
        ("ActiveEntries", ULONG),
        ("ContentionCount", ULONG),
        ("NumberOfSharedWaiters", ULONG),
        ("NumberOfExclusiveWaiters", ULONG),
    ),
    "_SEP_TOKEN_PRIVILEGES": S(("Present", ULL), ("Enabled", ULL), ("EnabledByDefault", ULL)),
    "_TOKEN": S(
        ("TokenId", "_LUID"),
        ("AuthenticationId", "_LUID"),
        ("ParentTokenId", "_LUID"),
        ("ExpirationTime", "_LARGE_INTEGER"),
        ("TokenLock", "pointer:_ERESOURCE"),
        ("ModifiedId", "_LUID"),
        ("Privileges", "_SEP_TOKEN_PRIVILEGES"),
        ("SessionId", ULONG),
        ("UserAndGroupCount", ULONG),
        ("RestrictedSidCount", ULONG),
    ),
    "_DEVICE_OBJECT": S(
        ("Type", "short"),
        ("Size", USHORT),
        ("ReferenceCount", "long"),
        ("DriverObject", "pointer:_DRIVER_OBJECT"),
        ("NextDevice", "pointer:_DEVICE_OBJECT"),
        ("AttachedDevice", "pointer:_DEVICE_OBJECT"),
        ("CurrentIrp", PVOID),
        ("Timer", PVOID),
        ("Flags", ULONG),
        ("Characteristics", ULONG),
        ("Vpb", PVOID),
        ("DeviceExtension", PVOID),
    ),
    "_DRIVER_OBJECT": S(
        ("Type", "short"),
        ("Size", "short"),
        ("DeviceObject", "pointer:_DEVICE_OBJECT"),
        ("Flags", ULONG),
        ("DriverStart", PVOID),
        ("DriverSize", ULONG),
        ("DriverSection", PVOID),
        ("DriverExtension", PVOID),
        ("DriverName", "_UNICODE_STRING"),
    ),
    "_VACB": S(
        ("BaseAddress", PVOID),
        ("SharedCacheMap", "pointer:_SHARED_CACHE_MAP"),
        ("Overlay", "__anonymous__VACB_Overlay"),
        ("ArrayHead", PVOID),
    ),
    "__anonymous__VACB_Overlay": U(
        ("FileOffset", "_LARGE_INTEGER"), ("ActiveCount", USHORT), ("Links", "_LIST_ENTRY")),
    "_SHARED_CACHE_MAP": S(
        ("NodeTypeCode", "short"),
        ("NodeByteSize", "short"),
        ("OpenCount", ULONG),
        ("FileSize", "_LARGE_INTEGER"),
        ("BcbList", "_LIST_ENTRY"),
        ("SectionSize", "_LARGE_INTEGER"),
        ("ValidDataLength", "_LARGE_INTEGER"),
        ("ValidDataGoal", "_LARGE_INTEGER"),
        ("InitialVacbs", "array:4:pointer:_VACB"),
        ("Vacbs", "pointer:pointer:_VACB"),
        ("FileObjectFastRef", "_EX_FAST_REF"),
    ),

    # Registry (only so that Volatility's class overrides find their types) -------------------
    "_HHIVE": S(("Signature", ULONG)),
    "_CMHIVE": S(
        ("Hive", "_HHIVE"),
        ("FileHandles", "array:6:pointer:void"),
        ("NotifyList", "_LIST_ENTRY"),
        ("HiveList", "_LIST_ENTRY"),
        ("PreloadedHiveList", "_LIST_ENTRY"),
    ),
    "_CM_KEY_BODY": S(
        ("Type", ULONG),
        ("KeyControlBlock", PVOID),
        ("NotifyBlock", PVOID),
        ("ProcessID", PVOID),
        ("KeyBodyList", "_LIST_ENTRY"),
    ),
    "_CM_KEY_NODE": S(
        ("Signature", USHORT),
        ("Flags", USHORT),
        ("LastWriteTime", "_LARGE_INTEGER"),
        ("AccessBits", UCHAR),
        ("Parent", ULONG),
        ("SubKeyCounts", "array:2:unsigned long"),
        ("SubKeyLists", "array:2:unsigned long"),
    ),
    "_CM_KEY_VALUE": S(
        ("Signature", USHORT),
        ("NameLength", USHORT),
        ("DataLength", ULONG),
        ("Data", ULONG),
        ("Type", ULONG),
        ("Flags", USHORT),
        ("Spare", USHORT),
        ("Name", "array:1:wchar"),
    ),
    "_HMAP_ENTRY": S(("BlockOffset", ULL), ("PermanentBinAddress", ULL), ("MemAlloc", ULONG)),

    # System information ----------------------------------------------------------------------
    # Volatility reads NtMajorVersion at the fixed offset 0x26C while looking for the page
    # tables, and the image builder writes NtBuildNumber at 0x260: the padding keeps the
    # undeclared fields between NtSystemRoot and NtBuildNumber out of the table.
    "_KUSER_SHARED_DATA": S(
        ("TickCountLowDeprecated", ULONG),
        ("TickCountMultiplier", ULONG),
        ("InterruptTime", "_KSYSTEM_TIME"),
        ("SystemTime", "_KSYSTEM_TIME"),
        ("TimeZoneBias", "_KSYSTEM_TIME"),
        ("ImageNumberLow", USHORT),
        ("ImageNumberHigh", USHORT),
        ("NtSystemRoot", "array:260:wchar"),
        PadTo(0x260, "MaxStackTraceDepth .. TimeZoneBiasStamp, not declared"),
        ("NtBuildNumber", ULONG),
        ("NtProductType", "enum:_NT_PRODUCT_TYPE"),
        ("ProductTypeIsValid", UCHAR),
        ("NativeProcessorArchitecture", USHORT),
        ("NtMajorVersion", ULONG),
        ("NtMinorVersion", ULONG),
        ("ProcessorFeatures", "array:64:unsigned char"),
    ),
    "_DBGKD_GET_VERSION64": S(
        ("MajorVersion", USHORT),
        ("MinorVersion", USHORT),
        ("ProtocolVersion", UCHAR),
        ("KdSecondaryVersion", UCHAR),
        ("Flags", USHORT),
        ("MachineType", USHORT),
        ("MaxPacketType", UCHAR),
        ("MaxStateChange", UCHAR),
        ("MaxManipulate", UCHAR),
        ("Simulation", UCHAR),
        ("Unused", "array:1:unsigned short"),
        ("KernBase", ULL),
        ("PsLoadedModuleList", ULL),
        ("DebuggerDataList", ULL),
    ),
}

# Offsets and sizes that code outside this table hard-codes; layout() checks them.
FIXED_OFFSETS: dict[tuple[str, str], int] = {
    ("_KUSER_SHARED_DATA", "NtBuildNumber"): 0x260,
    ("_KUSER_SHARED_DATA", "NtMajorVersion"): 0x26C,  # Volatility's DTB validation
    ("_KUSER_SHARED_DATA", "NtMinorVersion"): 0x270,
    ("_OBJECT_HEADER", "Body"): 0x30,  # 16-byte pool header + 0x30 keeps bodies 16-aligned
}
FIXED_SIZES: dict[str, int] = {
    "_KTRAP_FRAME": 0x190,  # InitialStack - 0x190 is the base trap frame
    "_KSTACK_CONTROL": 0x30,  # up to build 19041
    "_POOL_HEADER": 0x10,
    "_DISPATCHER_HEADER": 0x18,
    "_LIST_ENTRY": 0x10,
    "_UNICODE_STRING": 0x10,
}


# -- kernel globals ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelSymbol:
    rva: int
    ctype: str  # what the builder stores there (not written to the table, as in Windows')
    size: int


KERNEL_DATA_START = 0x10000
KERNEL_DATA_END = 0x20000

SYMBOLS: dict[str, KernelSymbol] = {
    "PsActiveProcessHead": KernelSymbol(0x10000, "_LIST_ENTRY", 0x10),
    "PsLoadedModuleList": KernelSymbol(0x10010, "_LIST_ENTRY", 0x10),
    "PsInitialSystemProcess": KernelSymbol(0x10020, "pointer:_EPROCESS", 8),
    "KeUserCallbackDispatcher": KernelSymbol(0x10030, "pointer:void", 8),
    "MmSystemRangeStart": KernelSymbol(0x10040, "pointer:void", 8),
    "KeNumberProcessors": KernelSymbol(0x10050, "unsigned long", 4),
    "NtBuildNumber": KernelSymbol(0x10060, "unsigned long", 4),
    "CmNtCSDVersion": KernelSymbol(0x10070, "unsigned long", 4),
    "KdVersionBlock": KernelSymbol(0x10080, "_DBGKD_GET_VERSION64", 0x28),
    "NtBuildLab": KernelSymbol(0x100C0, "array:64:char", 0x40),
    "MmProtectToValue": KernelSymbol(0x10100, "array:32:long", 0x80),
    # Volatility reads the KDBG through its own kdbg table (0x340 bytes).
    "KdDebuggerDataBlock": KernelSymbol(0x10200, "_KDDEBUGGER_DATA64", 0x340),
}
