"""Processes of a server under test: its children and theirs, and a limit
on how many it may have (a pids cgroup: fork then fails with EAGAIN, root
or not)."""

import contextlib
import os

from pop_server import wait_for


def children(pid):
    """The pids of the processes whose parent is `pid` (made by any of its threads)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):  # it ended while we looked
        pass
    return found


def descendants(pid):
    """Its children, theirs, and so on (a split server's mail processes are
    its spawner's children)."""
    found = children(pid)
    return found + [d for child in found for d in descendants(child)]


@contextlib.contextmanager
def process_limit(pid, limit):
    """Move process `pid` into a pids cgroup of its own allowing `limit`
    tasks (root is held to it too); yields a function to change the limit."""
    base = "/sys/fs/cgroup/pids" if os.path.isdir("/sys/fs/cgroup/pids") else "/sys/fs/cgroup"
    if base == "/sys/fs/cgroup":  # cgroup v2: the controller must be on for children
        with open(f"{base}/cgroup.subtree_control", "w") as f:
            f.write("+pids")
    group = f"{base}/mpop3-test-{os.getpid()}"
    os.mkdir(group)

    def set_limit(n):
        with open(f"{group}/pids.max", "w") as f:
            f.write(str(n))

    try:
        set_limit(limit)
        with open(f"{group}/cgroup.procs", "w") as f:
            f.write(str(pid))
        yield set_limit
    finally:

        def removed():
            """every process back out of the test's pids cgroup (its session processes too), and the group gone"""
            for task in open(f"{group}/cgroup.procs").read().split():
                with contextlib.suppress(OSError):  # it may have ended
                    with open(f"{base}/cgroup.procs", "w") as f:
                        f.write(task)
            try:
                os.rmdir(group)
                return True
            except OSError:
                return False

        wait_for(removed, interval=0.05)


def cpu_seconds(pid):
    """User + system CPU of a process, its threads, its live descendants
    and the ended children it has waited for (a benchmark's measure)."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = sum(int(n) for n in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                total += sum(cpu_seconds(int(child)) for child in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return total
