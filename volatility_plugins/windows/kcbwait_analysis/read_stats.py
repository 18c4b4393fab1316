"""Debug counters of the work one analysis did: explicit bytes read, export directories parsed.

They answer the performance questions an investigator (or a benchmark) asks of a run: does the
plugin read small windows rather than whole stacks, and does it parse ntdll's export directory
a constant number of times per image rather than once per process?  Counters live for the
analysis in progress in this Python process (Volatility runs one plugin at a time per process);
the plugin resets them when an analysis starts and logs them at debug level when it ends.
Reads made through Volatility's typed objects (single fields) are not counted: they are a few
bytes each; what is counted is every read the analysis asks for by length (stack pages, frames,
PE headers, export directories).
"""

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ReadStats:
    explicit_reads: int = 0
    bytes_read: int = 0
    export_parses: Counter = field(default_factory=Counter)
    """Export directories read and parsed, by image base."""
    threads: int = 0

    def summary(self) -> str:
        per_thread = self.bytes_read / self.threads if self.threads else 0.0
        busiest = max(self.export_parses.values(), default=0)
        return (
            f"{self.threads} threads analysed; {self.explicit_reads} explicit reads, "
            f"{self.bytes_read} bytes ({per_thread:.0f} per thread); "
            f"{sum(self.export_parses.values())} export directories parsed for "
            f"{len(self.export_parses)} image bases (at most {busiest} per base)"
        )


STATS = ReadStats()


def reset() -> ReadStats:
    """Starts counting afresh for a new analysis; returns the live counters."""
    global STATS
    STATS = ReadStats()
    return STATS


def count_read(length: int) -> None:
    STATS.explicit_reads += 1
    STATS.bytes_read += length


def count_export_parse(base: int) -> None:
    STATS.export_parses[base] += 1
