"""Session counts that hold across processes: `max_sessions` and
`max_sessions_per_ip` for every process that admits clients.

Several processes accept clients of one server: the workers of `processes
N` (prefork.py), the login processes of processes by role (split.py), whose
master also holds the logged-in sessions. Each of them writes its counts in
a column of its own of one table in shared memory (a memfd its parent made:
passed across the exec to a login process): its sessions, and its sessions
per address group, in a bucket chosen by a keyed hash of the group (so no
client can aim at another's bucket). To admit a client, a process sums the
columns. No lock: each column has one writer, and processes admitting at
the very same instant may let in one session each beyond a limit. Two
address groups whose buckets collide share a limit (with 65,536 buckets, a
few pairs among thousands of addresses). The parent zeroes an ended
process's column: its sessions ended with it.
"""

import hashlib

from . import shared_memory

BUCKETS = 65536
CELL = "I"  # unsigned 32-bit counts


class SharedCounts(shared_memory.Mapped):
    def __init__(self, memory, columns, key, column=0, fd=None):
        self.memory = memory
        self.columns = columns
        self.key = key
        self.column = column  # ours to write
        self.fd = fd  # kept only to pass across an exec
        self.cells = memoryview(memory).cast(CELL)
        self.stride = BUCKETS + 1  # a column: its total, then its buckets

    @classmethod
    def create(cls, columns, key, keep_fd=False):
        memory, fd = shared_memory.create("mpop3-counts", columns * (BUCKETS + 1) * 4, keep_fd)
        return cls(memory, columns, key, fd=fd)

    @classmethod
    def attach(cls, fd, columns, key, column):
        memory = shared_memory.attach(fd)
        if len(memory) != columns * (BUCKETS + 1) * 4:
            raise ValueError("not a session counts table")
        return cls(memory, columns, key, column)

    def bucket(self, group):
        digest = hashlib.blake2b(group.encode("utf-8", "surrogateescape"), key=self.key, digest_size=4)
        return 1 + int.from_bytes(digest.digest(), "little") % BUCKETS

    def add(self, group, change):
        """Count a session of ours in (+1) or out (-1)."""
        at, cells = self.column * self.stride, self.cells
        cells[at] = max(0, cells[at] + change)
        at += self.bucket(group)
        cells[at] = max(0, cells[at] + change)

    def total(self):
        cells, stride = self.cells, self.stride
        return sum(cells[c * stride] for c in range(self.columns))

    def at(self, group):
        """Sessions from `group` in every process."""
        cells, stride, bucket = self.cells, self.stride, self.bucket(group)
        return sum(cells[c * stride + bucket] for c in range(self.columns))

    def clear(self, column):
        """The parent, once the process writing `column` has ended."""
        start = column * self.stride * 4
        self.memory[start : start + self.stride * 4] = bytes(self.stride * 4)
