"""The scoreboard: what each server process counts and who it serves now,
in shared memory the process that answers `/metrics` and `mpop3 who` reads.

Each process that serves sessions writes one Segment of its own (a memfd
its parent made before the fork, or passed across an exec): the metric
cells (metrics.py) and a slot per session it may hold. The parent keeps a
Board of its children's segments, forgets a segment once its process is
reaped, and folds its counters into the totals then. A child keeps no
mapping of any other segment, so a process taken over by a client can at
worst misreport itself.

A slot is written by its process alone, under a sequence number that is
odd while a write is under way (a seqlock: the reader retries). The one
field the reader writes is `kick`: the serial of the session to end (a
slot's serial changes at each new session, so a kick that comes late ends
nothing).
"""

import os
import signal
import struct
import time

from . import metrics, shared_memory

HEADER = struct.Struct("<8sqq")  # magic, pid, slots
MAGIC = b"mpop3sb1"
# seq, serial, kick, state (0: free, else metrics.STATES index + 1), tls,
# since (time.time()), address, user
SLOT = struct.Struct("<IIIBBxxd64p256p")
U32 = struct.Struct("<I")  # seq, serial, kick
FIELDS = struct.Struct("<BBxxd64p256p")  # state onwards, at 12: the writer's alone (`kick` is the reader's)
FIELDS_AT = 12
STATE = struct.Struct("<BB")  # state and tls, at 12
CELLS_AT = HEADER.size
SLOTS_AT = CELLS_AT + 8 * metrics.CELLS
KICK_AT = 8  # offset of `kick` in a slot
FREE = 0
KICK_SIGNAL = signal.SIGUSR1  # "look at your slots' kick fields"


class Segment(shared_memory.Mapped):
    """One process's part of the scoreboard."""

    def __init__(self, memory, slots, fd=None):
        self.memory = memory
        self.slots = slots
        self.fd = fd  # kept only to pass across an exec
        self.cells = memoryview(memory)[CELLS_AT:SLOTS_AT].cast("q")
        # ours to hand out, in this process: slots released, then those
        # from `unused` on (a mail process uses few of its thousands)
        self.free = []
        self.unused = 0
        self.serials = {}
        # what we wrote last, kept here so that a write reads nothing back
        self.seqs = {}
        self.shown = {}  # (since, address, user)

    @classmethod
    def create(cls, slots, keep_fd=False):
        size = SLOTS_AT + SLOT.size * max(1, slots)
        memory, fd = shared_memory.create("mpop3-scoreboard", size, keep_fd)
        segment = cls(memory, slots, fd)
        HEADER.pack_into(memory, 0, MAGIC, os.getpid(), slots)
        return segment

    @classmethod
    def attach(cls, fd):
        """The segment a parent passed across an exec (a login process)."""
        memory = shared_memory.attach(fd)
        magic, _, slots = HEADER.unpack_from(memory, 0)
        if magic != MAGIC or SLOTS_AT + SLOT.size * max(1, slots) > len(memory):
            raise ValueError("not a scoreboard segment")
        return cls(memory, slots)

    # --- the writer: this process's sessions ------------------------------------

    def claim(self, address, state, secure, user=b""):
        """A slot for a new session, or None when all are taken (it is then
        counted but not listed)."""
        if self.free:
            index = self.free.pop()
        elif self.unused < self.slots:
            index = self.unused
            self.unused += 1
        else:
            return None
        self.serials[index] = serial = (self.serials.get(index, 0) + 1) & 0xFFFFFFFF or 1
        self.write(index, serial, state + 1, secure, address, user)
        return index

    def update(self, index, state, secure, user=b""):
        if user == self.shown[index][2]:  # the state alone: two bytes
            at = SLOTS_AT + index * SLOT.size
            writing = self.seqs.get(index, 0) | 1
            U32.pack_into(self.memory, at, writing)
            STATE.pack_into(self.memory, at + FIELDS_AT, state + 1, secure)
            self.seqs[index] = written = (writing + 1) & 0xFFFFFFFF
            U32.pack_into(self.memory, at, written)
            return
        self.write(index, self.serials[index], state + 1, secure, None, user)

    def release(self, index):
        self.write(index, self.serials[index], FREE, False, b"", b"")
        self.free.append(index)

    def write(self, index, serial, state, secure, address, user):
        at = SLOTS_AT + index * SLOT.size
        memory = self.memory
        if address is None:
            since, address, _ = self.shown[index]
        else:
            since = time.time()
        self.shown[index] = (since, address, user)
        writing = self.seqs.get(index, 0) | 1  # odd: being written
        U32.pack_into(memory, at, writing)
        U32.pack_into(memory, at + 4, serial)
        FIELDS.pack_into(memory, at + FIELDS_AT, state, secure, since, address[:63], user[:255])
        self.seqs[index] = written = (writing + 1) & 0xFFFFFFFF
        U32.pack_into(memory, at, written)

    def kicked(self, index):
        """Whether the reader asked to end the session in this slot."""
        kick = U32.unpack_from(self.memory, SLOTS_AT + index * SLOT.size + KICK_AT)[0]
        return kick != 0 and kick == self.serials[index]

    # --- the reader ------------------------------------------------------------------

    def sessions(self):
        """(slot index, serial, state, secure, since, address, user) of each
        session listed now."""
        found = []
        memory = self.memory
        for index in range(self.slots):
            at = SLOTS_AT + index * SLOT.size
            for _ in range(100):
                first = SLOT.unpack_from(memory, at)
                if first[0] & 1:
                    continue
                if U32.unpack_from(memory, at)[0] == first[0]:
                    break
            else:
                continue  # a writer kept at it: leave it out this time
            _, serial, _, state, secure, since, address, user = first
            if state != FREE and state <= len(metrics.STATES):
                found.append((index, serial, state - 1, bool(secure), since, address, user))
        return found

    def kick(self, index, serial):
        U32.pack_into(self.memory, SLOTS_AT + index * SLOT.size + KICK_AT, serial)


# This process's own segment, when its parent made it (fork, or exec).
own = None


class Board:
    """The reader's side: the segments of every process that serves
    sessions, and what ended processes counted."""

    def __init__(self):
        self.segments = {}  # pid -> (role, Segment)
        self.retired = [0] * metrics.CELLS

    def add(self, pid, role, segment):
        self.segments[pid] = (role, segment)

    def retire(self, pid):
        """`pid` has ended: keep its counters, forget its gauges and slots."""
        entry = self.segments.pop(pid, None)
        if entry is None:
            return
        segment = entry[1]
        retired, gauges = self.retired, metrics.GAUGE_CELLS
        for i, value in enumerate(segment.cells):
            if i not in gauges:
                retired[i] += value
        segment.close()

    def drop_all(self, keep=None):
        """In a new child: unmap every segment but its own."""
        for _, segment in self.segments.values():
            if segment is not keep:
                segment.close()
        self.segments = {}

    def totals(self):
        totals = list(self.retired)
        for _, segment in self.segments.values():
            for i, value in enumerate(segment.cells):
                totals[i] += value
        return totals

    def roles(self):
        counts = {}
        for role, _ in self.segments.values():
            counts[role] = counts.get(role, 0) + 1
        return counts

    def sessions(self):
        """(pid, role, slot...) of every session listed."""
        return [(pid, role, *s) for pid, (role, segment) in self.segments.items() for s in segment.sessions()]

    def kick(self, wanted):
        """End the sessions `wanted(address, user)` picks: mark each, then
        tell its process; the number marked."""
        marked, told = 0, set()
        for pid, (_, segment) in list(self.segments.items()):
            for index, serial, _, _, _, address, user in segment.sessions():
                if wanted(address, user):
                    segment.kick(index, serial)
                    marked += 1
                    told.add(pid)
        for pid in told:
            try:
                os.kill(pid, KICK_SIGNAL)
            except ProcessLookupError:
                pass
        return marked
