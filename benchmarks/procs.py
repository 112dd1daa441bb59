"""Memory, open files and CPU time of a process and its descendants, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessSample:
    pid: int
    role: str  # "daemon", "worker" or "helper" (multiprocessing's resource tracker)
    rss_kb: int
    fds: int


def family(pid: int) -> list[int]:
    """`pid` and all its living descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat:
            # The command name may hold spaces and parentheses: the fields start after the last ')'.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [pid], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def sample(pid: int) -> list[ProcessSample]:
    """RSS and open file descriptors of `pid` and each descendant (those that vanish meanwhile are left out)."""
    out = []
    for member in family(pid):
        rss = _rss_kb(member)
        try:
            fds = len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            continue
        if rss is not None:
            out.append(ProcessSample(member, _role(member, pid), rss, fds))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` itself so far."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def family_cpu(pid: int, *, itself: bool = True) -> float:
    """User + system CPU time so far of `pid`'s living descendants, and of `pid` itself unless `itself` is False."""
    members = family(pid)
    return sum(cpu_seconds(member) for member in (members if itself else members[1:]))


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything in /proc/stat but idle and iowait)."""
    fields = (_read("/proc/stat") or "cpu 0").splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]
    return (sum(values) - sum(values[3:5])) / CLOCK_TICKS


def _role(member: int, root: int) -> str:
    if member == root:
        return "daemon"
    cmdline = _read(f"/proc/{member}/cmdline") or ""
    return "helper" if "resource_tracker" in cmdline else "worker"


def _rss_kb(pid: int) -> int | None:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None
