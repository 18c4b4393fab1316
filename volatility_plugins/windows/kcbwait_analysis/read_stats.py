"""Debug counters of the work one analysis did: explicit bytes read, export directories parsed.

They answer the performance questions an investigator (or a benchmark) asks of a run: does the
plugin read small windows rather than whole stacks, and does it parse ntdll's export directory
a constant number of times per image rather than once per process?  One ReadStats object
belongs to one analysis run (``KcbWait.analyse_threads`` makes it, or takes the caller's); the
plugin logs it at debug level when the run ends.  Reads made without one are simply not
counted.
Reads made through Volatility's typed objects (single fields) are not counted: they are a few
bytes each; what is counted is every read the analysis asks for by length (stack pages, frames,
PE headers, export directories).
"""

from __future__ import annotations

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

    def count_read(self, length: int) -> None:
        self.explicit_reads += 1
        self.bytes_read += length

    def count_export_parse(self, base: int) -> None:
        self.export_parses[base] += 1
