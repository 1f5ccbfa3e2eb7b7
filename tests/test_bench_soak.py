"""The soak benchmark's accounting (scripts/bench_soak.py): hypervisor steal per window."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_soak import Sample, cpu_jiffies, steal_share  # noqa: E402


def test_steal_share_is_the_windows_stolen_part_of_cpu_time() -> None:
    # (minute, rss MB, stolen jiffies, total jiffies): minutes 0-2 lose 10%, minutes 2-4 half
    rows = [(0.0, 100, 0, 0), (1.0, 100, 10, 100), (2.0, 100, 20, 200), (3.0, 100, 70, 300), (3.9, 100, 120, 400)]
    samples = [Sample(*row) for row in rows]
    assert steal_share(samples, 0, 2) == 0.1
    assert steal_share(samples, 2, 4) == 0.5
    assert steal_share(samples, 10, 20) == 0.0  # no samples: unknown, counted as none
    assert steal_share([Sample(0.5, 100, 0, 0), Sample(1.5, 100, 0, 0)], 0, 2) == 0.0  # no CPU time: no division


def test_cpu_jiffies_reads_this_machine() -> None:
    stolen, total = cpu_jiffies()
    assert 0 <= stolen <= total
    if Path("/proc/stat").exists():
        assert total > 0
