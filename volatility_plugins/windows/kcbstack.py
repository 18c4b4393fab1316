"""windows.kcbstack: each thread's user-mode call stack through every callback level (x64).

One row per frame, from the trap frame's Rip to the thread's first frame
(``RtlUserThreadStart``), crossing each kernel-to-user callback through the machine frame that
KeUserModeCallback left on the user stack, and resynchronising on the UCALLOUT_FRAME the
kernel names wherever an unwind goes astray.  Frames are found with the modules' own unwind
data (``.pdata``/UNWIND_INFO, read from the process's memory); where that is unreadable or
corrupt, by a bounded scan for call-site return addresses (How ``scan``).  WoW64 threads add
their 32-bit frames from the WoW64 CPU context by the EBP chain.  The threads listed, and their
order, are windows.kcbwait's (same options).  docs/output-contract.md, "windows.kcbstack".
"""

from __future__ import annotations

from volatility3.framework import interfaces
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.windows import kcbwait
from volatility3.plugins.windows.kcbwait_analysis import (
    cells,
    plugin_requirements,
    results,
    stack_walk,
    text,
    wording,
)

COLUMNS = [
    ("PID", int),
    ("TID", int),
    ("Process", str),
    ("Frame", int),
    ("CallbackLevel", int),
    ("Rip", format_hints.Hex),
    ("Symbol", str),
    ("Rsp", format_hints.Hex),
    ("How", str),
    ("Notes", str),
]


class KcbStack(interfaces.plugins.PluginInterface):
    """Lists the user-mode call stacks of the threads windows.kcbwait lists (x64)."""

    _required_framework_version = (2, 26, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            *plugin_requirements.common_requirements(),
            requirements.VersionRequirement(
                name="kcbwait", component=kcbwait.KcbWait, version=(3, 1, 0)
            ),
            *plugin_requirements.thread_selection_requirements(),
        ]

    @staticmethod
    def _frame_row(result: results.ThreadResult, frame: stack_walk.StackFrame) -> tuple:
        return (
            *kcbwait.identity_cells(result)[:3],
            cells.cell(frame.index),
            cells.cell(frame.level),
            cells.cell(frame.rip, hex_value=True),
            cells.cell(text.display(frame.symbol)),
            cells.cell(frame.rsp, hex_value=True),
            cells.cell(wording.how(frame.how)),
            text.display(wording.frame_notes(frame.notes)),
        )

    def _generator(self):
        mode = plugin_requirements.listing_mode(self.config)
        for result in kcbwait.KcbWait.analyse_threads(
            self.context,
            self.config["kernel"],
            pids=self.config.get("pid", None),
            tids=self.config.get("tid", None),
            progress_callback=self._progress_callback,
            stack_mode=mode,
        ):
            for frame in result.stack or ():
                yield 0, self._frame_row(result, frame)

    def run(self):
        return plugin_requirements.x64_tree_grid(
            self.context, self.config["kernel"], "windows.kcbstack", COLUMNS, self._generator
        )
