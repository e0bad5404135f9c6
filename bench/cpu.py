"""CPU time of a process tree, read from /proc (Linux only, no dependencies).

``tree_cpu_seconds(pid)`` sums utime+stime+cutime+cstime over ``pid`` and all its live
descendants. Counting cutime/cstime keeps the total right when a worker exits and is
reaped during a measurement (its time moves into its parent's cutime); only deltas of this
number are meaningful.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the ``(comm)`` field, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_ticks(pid: int) -> int:
    """utime+stime+cutime+cstime of one process in clock ticks (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    # After "(comm) ": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (found by scanning the ppid of every process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user+system) consumed so far by ``pid`` and its descendants."""
    ticks = process_cpu_ticks(pid) + sum(process_cpu_ticks(c) for c in descendants(pid))
    return ticks / CLK_TCK


def host_cpu_times() -> tuple[int, int, int]:
    """(total, idle+iowait, steal) jiffies of all CPUs together, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest* already in user)
    total = sum(fields[:8])
    return total, fields[3] + fields[4], fields[7] if len(fields) > 7 else 0


def host_busy_between(
    before: tuple[int, int, int], after: tuple[int, int, int]
) -> tuple[float, float]:
    """(busy %, steal %) of the whole machine between two ``host_cpu_times`` readings."""
    total = after[0] - before[0]
    if total <= 0:
        return 0.0, 0.0
    idle = after[1] - before[1]
    steal = after[2] - before[2]
    return round(100 * (total - idle) / total, 1), round(100 * steal / total, 1)
