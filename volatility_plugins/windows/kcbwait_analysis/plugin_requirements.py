"""The requirements windows.kcbwait and windows.kcbtable share: the same analysis underneath."""

from __future__ import annotations

import logging

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.plugins.windows import pslist, vadinfo
from volatility3.plugins.windows.kcbwait_analysis import findings, kernel_facts, pdb_names

vollog = logging.getLogger(__name__)


def common_requirements() -> list[interfaces.configuration.RequirementInterface]:
    """Kernel (Intel32 accepted only so that a 32-bit image gets the plugin's own clear error
    instead of an unsatisfied-requirement listing), the components the analysis calls, and the
    --pid filter."""
    return [
        requirements.ModuleRequirement(
            name="kernel", description="Windows kernel", architectures=["Intel32", "Intel64"]
        ),
        requirements.VersionRequirement(name="pslist", component=pslist.PsList, version=(3, 0, 0)),
        requirements.VersionRequirement(
            name="vadinfo", component=vadinfo.VadInfo, version=(2, 0, 0)
        ),
        pdb_names.version_requirement(),
        requirements.ListRequirement(
            name="pid",
            element_type=int,
            description="Process IDs to include (all other processes are excluded)",
            optional=True,
        ),
    ]


def thread_selection_requirements() -> list[interfaces.configuration.RequirementInterface]:
    """--tid, --at-return-only and --all-threads: which threads windows.kcbwait and
    windows.kcbstack list (findings.ListingMode)."""
    return [
        requirements.ListRequirement(
            name="tid",
            element_type=int,
            description="Thread IDs to include (all other threads are excluded)",
            optional=True,
        ),
        requirements.BooleanRequirement(
            name="at-return-only",
            description="List only threads whose trap frame is in NtCallbackReturn/"
            "ZwCallbackReturn",
            default=False,
            optional=True,
        ),
        requirements.BooleanRequirement(
            name="all-threads",
            description="List every thread, including those with reason 'none'",
            default=False,
            optional=True,
        ),
    ]


def listing_mode(config: interfaces.configuration.HierarchicalDict) -> findings.ListingMode:
    """Which threads the options of ``thread_selection_requirements`` list."""
    return findings.ListingMode.from_options(
        bool(config.get("all-threads", False)), bool(config.get("at-return-only", False))
    )


def x64_tree_grid(
    context: interfaces.context.ContextInterface,
    kernel_module_name: str,
    plugin_name: str,
    columns: list,
    generator,
) -> renderers.TreeGrid:
    """The plugin's TreeGrid, or an empty one and one ERROR line for a 32-bit kernel (raising
    would make vol print "file a bug" for an image that is merely unsupported)."""
    kernel = context.modules[kernel_module_name]
    if not kernel_facts.is_64bit_kernel(context, kernel):
        vollog.error(
            f"{plugin_name} supports only 64-bit (x64) Windows kernels; "
            "this image's kernel is 32-bit, so nothing is analysed"
        )
        return renderers.TreeGrid(columns, iter(()))
    return renderers.TreeGrid(columns, generator())
