"""The requirements windows.kcbwait and windows.kcbtable share: the same analysis underneath."""

from __future__ import annotations

from volatility3.framework import interfaces
from volatility3.framework.configuration import requirements
from volatility3.plugins.windows import pslist, vadinfo
from volatility3.plugins.windows.kcbwait_analysis import pdb_names


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
