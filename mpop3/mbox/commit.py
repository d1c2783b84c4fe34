"""Remove deleted messages from an mbox spool in place, crash-safe, in
bounded free space.

The spool keeps its inode (an MDA holding it open, or locking it with fcntl
only, goes on appending to the live file), its owner, group and mode. The
argument (docs/mbox.md has it in full):

- Let p0 be the first deleted byte. Everything before p0 stays put. The new
  bytes from p0 on ("the image") are the kept records after p0 followed by
  any mail appended since the scan: ranges of the spool ("pieces"), each
  moving towards the start of the file, never away from it.
- If the image is empty (deleting a tail, or everything), one ftruncate()
  does it: the file has the old length or the new one, nothing between.
- Otherwise the journal gets the plan (p0, the pieces, samples of the spool
  that tie the journal to it) and the first window of the image: when that
  is durable and renamed into place, the commit has happened (the commit
  point). Then, a window at a time: the window is written into the spool
  and made durable, and the next one is journaled (its bytes in one of two
  areas of the journal, with a checksum, and a record saying where the
  move stands) and made durable. Every byte a window overwrites has been
  moved already or is in the journal, and no window overwrites the source
  of a later one (bytes only move left), so from any record the move can
  be redone: the next open finishes it (replay). The journal never holds
  more than two windows, whatever the spool's size.
- A window whose bytes move further than its length (past a large deleted
  message) cannot overwrite its own source: it is copied straight from the
  spool, and only its record is journaled.
"""

import bisect
import errno
import os
import stat
import struct
import zlib

from ._kernels import start_writeback

MAGIC = b"MPOP3JN2"
MAGIC_V1 = b"MPOP3JN1"  # the journal of mpop3 before windows: the whole image at DATA_OFFSET_V1
RECORD_MAGIC = b"MPOP3WN2"
TAG = "user.mpop3.commit"  # the spool's extended attribute holding the id of its commit in progress

PAGE = 4096
SAMPLE = 4096  # bytes of each sample of the spool the journal records
WINDOW_MAX = 32 << 20  # the most a window moves: the journal holds at most two
WINDOW_MIN = 64 << 10  # the least, on a nearly full disk
READ_CHUNK = 1 << 20  # bytes read into memory at a time to journal a window
COPY_CHUNK = 8 << 20  # bytes per copy into the spool
FROM_SPOOL = 0xFFFFFFFF  # a record's area when its window is copied straight from the spool

# magic, flags, commit id, dev, ino, old size, p0, image length, window,
# pieces, lengths of the samples: before p0, old bytes past the new end
# (first and last), the image's last bytes
HEADER = struct.Struct("<8sI16sQQQQQQIIIII")
TAGGED = 1  # flag: the spool carries the commit id in its TAG attribute
# magic, commit id, sequence number, done (image bytes already in place),
# window length, area (0, 1 or FROM_SPOOL), checksum of the area's bytes
RECORD = struct.Struct("<8s16sQQQII")
HEADER_V1 = struct.Struct("<8sQQQQQII")  # magic dev ino old_size p0 length head_n tail_n
DATA_OFFSET_V1 = 16384

# Tests set this to a callable(step_name) to stop a commit at an exact step.
step_hook = None


class JournalError(Exception):
    """A journal that cannot be replayed safely; the mailbox stays closed."""


def _step(name):
    if step_hook is not None:
        step_hook(name)


def image_pieces(index, deleted, file_size):
    """(p0, [(offset, length), ...]): where rewriting starts and the spool
    ranges, in order, that make up the new bytes from there on."""
    first = min(deleted)
    p0 = index.start(first)
    pieces = []
    for i in range(first + 1, len(index)):
        if i in deleted:
            continue
        _append(pieces, index.start(i), index.record_end(i))
    if file_size > index.length:  # mail delivered since the scan
        _append(pieces, index.length, file_size)
    return p0, pieces


def _append(pieces, start, end):
    if pieces and pieces[-1][0] + pieces[-1][1] == start:
        pieces[-1] = (pieces[-1][0], end - pieces[-1][0])
    else:
        pieces.append((start, end - start))


# ---- the plan: what a commit does, as its journal's header records it -------------


class Plan:
    """Make the spool's bytes from p0 on the concatenation of `pieces`
    (ranges of the spool as it is, `old_size` long), with samples of the
    spool that tie the journal to this one file."""

    def __init__(self, fd, p0, pieces, old_size, window, commit_id=None, tagged=False, samples=None):
        self.p0, self.pieces, self.old_size, self.window = p0, pieces, old_size, window
        self.length = sum(n for _, n in pieces)
        self.starts = []  # where each piece goes in the image
        at = 0
        for _, n in pieces:
            self.starts.append(at)
            at += n
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self.commit_id = commit_id or os.urandom(16)
        self.tagged = tagged
        self.samples = samples or self._take_samples(fd)

    def _take_samples(self, fd):
        end = self.p0 + self.length  # the old bytes from here to old_size go: the witness
        gap = self.old_size - end
        before = os.pread(fd, min(SAMPLE, self.p0), self.p0 - min(SAMPLE, self.p0))
        head = os.pread(fd, min(SAMPLE, gap), end)
        tail = os.pread(fd, min(SAMPLE, gap), self.old_size - min(SAMPLE, gap))
        last = b"".join(os.pread(fd, n, off) for off, n in self.sources(self.length - min(SAMPLE, self.length)))
        return before, head, tail, last

    def sources(self, start, end=None):
        """The spool ranges [(offset, length)] holding image bytes [start, end)."""
        end = self.length if end is None else end
        out = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < end:
            offset, n = self.pieces[i]
            skip = start - self.starts[i]
            take = min(n - skip, end - start)
            out.append((offset + skip, take))
            start += take
            i += 1
        return out

    def gap(self, at):
        """How far image byte `at` moves: its source's offset minus its place."""
        return self.sources(at, at + 1)[0][0] - (self.p0 + at)

    def pack(self):
        before, head, tail, last = self.samples
        fixed = HEADER.pack(
            MAGIC,
            TAGGED if self.tagged else 0,
            self.commit_id,
            *self.identity,
            self.old_size,
            self.p0,
            self.length,
            self.window,
            len(self.pieces),
            len(before),
            len(head),
            len(tail),
            len(last),
        )
        flat = [x for piece in self.pieces for x in piece]
        body = fixed + before + head + tail + last + struct.pack(f"<{len(flat)}Q", *flat)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, jfd):
        raw = os.pread(jfd, PAGE, 0)
        if len(raw) < HEADER.size:
            raise JournalError("damaged journal header")
        magic, flags, cid, dev, ino, old_size, p0, length, window, count, *lengths = HEADER.unpack_from(raw)
        if max(lengths) > SAMPLE or window > 1 << 30 or count > 1 << 28:
            raise JournalError("damaged journal header")
        size = HEADER.size + sum(lengths) + 16 * count
        raw = os.pread(jfd, size + 4, 0)
        if len(raw) < size + 4 or struct.unpack_from("<I", raw, size)[0] != zlib.crc32(raw[:size]):
            raise JournalError("damaged journal header")
        samples, at = [], HEADER.size
        for n in lengths:
            samples.append(raw[at : at + n])
            at += n
        flat = struct.unpack_from(f"<{2 * count}Q", raw, at)
        plan = cls.__new__(cls)
        plan.p0, plan.old_size, plan.window, plan.length = p0, old_size, window, length
        plan.pieces = list(zip(flat[::2], flat[1::2], strict=True))
        plan.starts = []
        at = 0
        for _, n in plan.pieces:
            plan.starts.append(at)
            at += n
        if at != length:
            raise JournalError("damaged journal header")
        plan.identity, plan.commit_id, plan.tagged, plan.samples = (dev, ino), cid, bool(flags & TAGGED), samples
        plan.header_size = _align(size + 4)
        return plan

    def untruncated(self, fd, size):
        """Whether the spool still has its old end (the old bytes past the
        new end, which no window writes): the final truncate did not happen."""
        _, head, tail, _ = self.samples
        end = self.p0 + self.length
        return (
            size >= self.old_size
            and os.pread(fd, len(head), end) == head
            and os.pread(fd, len(tail), self.old_size - len(tail)) == tail
        )

    def finished(self, fd, size):
        """Whether the spool ends with the image (then truncated: done)."""
        last = self.samples[3]
        end = self.p0 + self.length
        return size >= end and os.pread(fd, len(last), end - len(last)) == last


class Record:
    """Where a move stands: image bytes [0, done) are in place, and the
    window [done, done + length) is journaled (in `area`, or to be copied
    from the spool), perhaps partly written."""

    def __init__(self, seq, done, length, area, crc=0):
        self.seq, self.done, self.length, self.area, self.crc = seq, done, length, area, crc

    def pack(self, commit_id):
        body = RECORD.pack(RECORD_MAGIC, commit_id, self.seq, self.done, self.length, self.area, self.crc)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def unpack(cls, raw, commit_id):
        if len(raw) < RECORD.size + 4 or struct.unpack_from("<I", raw, RECORD.size)[0] != zlib.crc32(
            raw[: RECORD.size]
        ):
            return None
        magic, cid, seq, done, length, area, crc = RECORD.unpack_from(raw)
        if magic != RECORD_MAGIC or cid != commit_id:
            return None
        return cls(seq, done, length, area, crc)


def _align(n):
    return -(-n // PAGE) * PAGE


# ---- the journal: writing a commit through, and replaying one ---------------------


class Journal:
    """An open journal of `plan` for the spool `fd`; `tick` is called at
    every step (the caller keeps its dot-lock fresh there)."""

    def __init__(self, fd, path, jfd, plan, tick, header_size):
        self.fd, self.path, self.jfd, self.plan, self.header_size = fd, path, jfd, plan, header_size
        self.step = stepper(tick)
        self.buffer = None

    def record_offset(self, slot):
        return self.header_size + slot * PAGE

    def area_offset(self, area):
        return self.header_size + 2 * PAGE + area * self.plan.window

    def journal_window(self, seq, done):
        """Journal the window after `done`: its bytes into area seq % 2
        (unless it may be copied straight from the spool), then its record.
        Durable only after the caller's sync."""
        plan = self.plan
        left = plan.length - done
        gap = plan.gap(done)
        if gap >= min(left, plan.window):  # it cannot overwrite its own source
            record = Record(seq, done, min(left, gap, WINDOW_MAX), FROM_SPOOL)
        else:
            record = Record(seq, done, min(left, plan.window), seq % 2)
            record.crc = self._fill(record)
        self.step("record")
        os.pwrite(self.jfd, record.pack(plan.commit_id), self.record_offset(seq % 2))
        return record

    def _fill(self, record):
        """Copy the window's bytes from the spool into its area; their checksum."""
        if self.buffer is None:
            self.buffer = memoryview(bytearray(READ_CHUNK))
        crc, at = 0, self.area_offset(record.area)
        for offset, n in self.plan.sources(record.done, record.done + record.length):
            while n > 0:
                self.step("journal-write")
                piece = self.buffer[: min(n, READ_CHUNK)]
                got = os.preadv(self.fd, [piece], offset)
                if got != len(piece):
                    raise OSError(errno.EIO, "short read: the spool ended early")
                os.pwrite(self.jfd, piece, at)
                start_writeback(self.jfd, at, got)
                crc = zlib.crc32(piece, crc)
                offset, at, n = offset + got, at + got, n - got
        return crc

    def apply(self, record):
        """Write the window into the spool and make it durable."""
        dest = self.plan.p0 + record.done
        if record.area == FROM_SPOOL:
            for offset, n in self.plan.sources(record.done, record.done + record.length):
                copy_range(self.fd, offset, self.fd, dest, n, self.step)
                dest += n
        else:
            copy_range(self.jfd, self.area_offset(record.area), self.fd, dest, record.length, self.step)
        self.step("spool-fsync")
        os.fdatasync(self.fd)

    def run(self, record, progress=None):
        """Carry the move through from `record` (a window journaled, maybe
        partly written) to the end, then truncate and remove the journal.
        `progress(done, total)` (mpop3.progress) hears of each window once
        it is durable in the spool, and of the end."""
        while True:
            self.apply(record)
            done = record.done + record.length
            if done >= self.plan.length:
                break
            if progress is not None:
                progress(done, self.plan.length)
            self.step("window")
            record = self.journal_window(record.seq + 1, done)
            self.step("journal-fsync")
            os.fdatasync(self.jfd)
        self.finish(self.plan.p0 + self.plan.length)
        if progress is not None:
            progress(self.plan.length, self.plan.length)

    def finish(self, final_size):
        self.step("spool-truncate")
        os.ftruncate(self.fd, final_size)
        self.step("spool-fsync")
        os.fsync(self.fd)
        self.step("journal-unlink")
        os.unlink(self.path)
        fsync_dir(self.path)
        untag(self.fd)

    def where(self):
        """The record to go on from: the newest whose window's bytes are
        intact (an older one if the newest was torn by a crash)."""
        plan = self.plan
        records = []
        for slot in (0, 1):
            record = Record.unpack(os.pread(self.jfd, RECORD.size + 4, self.record_offset(slot)), plan.commit_id)
            if record is not None and record.done + record.length <= plan.length:
                records.append(record)
        for record in sorted(records, key=lambda r: r.seq, reverse=True):
            if record.area == FROM_SPOOL or self._intact(record):
                return record
        raise JournalError("no intact record in the journal")

    def _intact(self, record):
        if record.area not in (0, 1) or record.length > self.plan.window:
            return False
        crc, at, left = 0, self.area_offset(record.area), record.length
        while left > 0:
            data = os.pread(self.jfd, min(left, READ_CHUNK), at)
            if not data:
                return False
            crc = zlib.crc32(data, crc)
            at, left = at + len(data), left - len(data)
        return crc == record.crc


def stepper(tick):
    """The step function of a commit: the test hook, then `tick` (the
    caller keeps its dot-lock fresh there)."""

    def step(name):
        _step(name)
        if tick is not None:
            tick()

    return step


def commit(fd, journal_path, p0, pieces, old_size, tick=None, commit_id=None, progress=None):
    """Make the spool's bytes from p0 on the concatenation of `pieces`;
    `progress(done, total)` hears how many image bytes are in place."""
    length = sum(n for _, n in pieces)
    if length == 0:
        _step("truncate")
        os.ftruncate(fd, p0)
        os.fsync(fd)
        return
    window = window_for(os.path.dirname(journal_path), length)
    plan = Plan(fd, p0, pieces, old_size, window, commit_id=commit_id)
    journal, record = begin(fd, journal_path, plan, tick)
    try:
        journal.run(record, progress)
    finally:
        os.close(journal.jfd)


def window_for(directory, length):
    """A window a quarter of the free space, within WINDOW_MIN and WINDOW_MAX:
    a commit on a nearly full disk moves less at a time, and still moves."""
    try:
        st = os.statvfs(directory or ".")
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 4 * WINDOW_MAX
    window = max(WINDOW_MIN, min(WINDOW_MAX, free // 4 // PAGE * PAGE))
    return min(window, _align(length))


def begin(fd, journal_path, plan, tick):
    """Journal `plan` and its first window, and make that durable: the
    commit point. Returns the Journal and the first window's record. A
    full disk before the commit point tries smaller windows, then fails
    with the spool untouched."""
    plan.tagged = tag(fd, plan.commit_id)
    tmp = journal_path + ".tmp"
    while True:
        try:
            return _begin(fd, journal_path, tmp, plan, tick)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT) or plan.window <= WINDOW_MIN:
                raise
            plan.window = max(WINDOW_MIN, plan.window // 4 // PAGE * PAGE)


def _begin(fd, journal_path, tmp, plan, tick):
    # A new file of ours, never one somebody left there (in a sticky, world
    # writable spool directory it could be theirs, and they would read the mail).
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    jfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        header = plan.pack()
        journal = Journal(fd, journal_path, jfd, plan, tick, _align(len(header)))
        journal.step("journal-open")
        os.pwrite(jfd, header, 0)
        record = journal.journal_window(0, 0)
        if record.length < plan.length:
            # All the room the move will take, now: the other record's page
            # and, for windows journaled, the second area. A disk filling up
            # meanwhile then cannot stop the move once it has begun.
            end = journal.area_offset(1) + plan.window if record.area != FROM_SPOOL else journal.area_offset(0)
            os.posix_fallocate(jfd, journal.record_offset(0), end - journal.record_offset(0))
        journal.step("journal-fsync")
        os.fsync(jfd)
        journal.step("journal-rename")
        os.rename(tmp, journal_path)  # the commit point
        fsync_dir(journal_path)
        journal.step("journal-durable")
    except BaseException:
        os.close(jfd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return journal, record


def tag(fd, commit_id):
    """Mark the spool with the commit's id (an extended attribute), durably;
    False where the filesystem keeps none: the samples tie the journal then."""
    try:
        os.setxattr(fd, TAG, commit_id)
    except OSError:
        return False
    os.fsync(fd)
    return True


def untag(fd):
    try:
        os.removexattr(fd, TAG)
    except OSError:
        pass


def copy_range(src, src_off, dst, dst_off, n, step=_step):
    """Copy n bytes between files (or within one, the ranges apart), in the
    kernel where it can."""
    while n > 0:
        step("copy")
        want = min(COPY_CHUNK, n)
        try:
            done = os.copy_file_range(src, dst, want, src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, want, src_off)
            done = os.pwrite(dst, data, dst_off) if data else 0
        if done <= 0:
            raise OSError(errno.EIO, "short copy: the source ended early")
        start_writeback(dst, dst_off, done)  # overlap the disk writes with the copy
        src_off += done
        dst_off += done
        n -= done


def fsync_dir(path):
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---- replay ------------------------------------------------------------------------

REPLAYED = "replayed"
SET_ASIDE = "set aside"


def replay(fd, journal_path, tick=None, progress=None):
    """Finish a commit a crash interrupted. Returns None if there was
    nothing to do, else (REPLAYED or SET_ASIDE, what happened); raises
    JournalError for a journal that must not be used. Call with the spool
    locked for writing. `progress` as for commit()."""
    try:
        os.unlink(journal_path + ".tmp")  # never reached its commit point
    except FileNotFoundError:
        pass
    try:
        jfd = os.open(journal_path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except PermissionError:
        owner = os.lstat(journal_path).st_uid
        raise JournalError(f"journal owned by uid {owner}, not by us (uid {os.geteuid()}): not applied") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise JournalError("the journal is not a regular file: not applied") from None
        raise
    try:
        st = os.fstat(jfd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise JournalError("the journal is not a regular file of one name: not applied")
        if st.st_uid != os.geteuid():
            raise JournalError(f"journal owned by uid {st.st_uid}, not by us: not applied")
        if os.pread(jfd, 8, 0) == MAGIC_V1:
            return _replay_v1(fd, journal_path, jfd, tick)
        if os.pread(jfd, 8, 0) != MAGIC:
            raise JournalError("not an mpop3 journal")
        plan = Plan.unpack(jfd)
        journal = Journal(fd, journal_path, jfd, plan, tick, plan.header_size)
        size = os.fstat(fd).st_size
        why = _mismatch(plan, fd)
        if why is None and plan.untruncated(fd, size):
            record = journal.where()
            if size > plan.old_size:
                # Mail appended after the crash sits past the old end: the
                # window in flight is finished, and the rest of the move
                # with that mail after it is a new commit.
                journal.apply(record)
                done = record.done + record.length
                _go_on(fd, journal_path, plan, done, size, tick, progress)
                return REPLAYED, "replayed, keeping mail delivered after the crash"
            journal.run(record, progress)
            return REPLAYED, "replayed"
        if why is None and plan.finished(fd, size):
            journal.finish(size)  # truncated: mail appended since stays
            return REPLAYED, "replayed" + (
                "" if size == plan.p0 + plan.length else ", keeping mail delivered after the crash"
            )
        return SET_ASIDE, set_aside(journal_path, why or "the spool's bytes are not those it was written for")
    finally:
        os.close(jfd)


def _mismatch(plan, fd):
    """Why the journal was not written for this spool, or None."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != plan.identity:
        return "the spool was replaced since the journal was written"
    if plan.tagged:
        try:
            mark = os.getxattr(fd, TAG)
        except OSError:
            mark = None
        if mark != plan.commit_id:
            return "the spool does not carry the journal's commit id"
    before = plan.samples[0]
    if os.pread(fd, len(before), plan.p0 - len(before)) != before:
        return "the spool's bytes before the commit are not those it was written for"
    return None


def _go_on(fd, journal_path, plan, done, size, tick, progress):
    """The rest of an interrupted move, with mail appended since at its
    end, as a commit of its own; its journal replaces the old one."""
    pieces = plan.sources(done) + [(plan.old_size, size - plan.old_size)]
    # the same commit id: the spool's mark must match whichever journal a
    # crash leaves, the old one or this
    commit(fd, journal_path, plan.p0 + done, pieces, size, tick, commit_id=plan.commit_id, progress=progress)


def _replay_v1(fd, journal_path, jfd, tick):
    """A journal of mpop3 before windows: the whole image, after a header."""
    raw = os.pread(jfd, DATA_OFFSET_V1, 0)
    _, dev, ino, old_size, p0, length, head_n, tail_n = HEADER_V1.unpack_from(raw)
    end = HEADER_V1.size + head_n + tail_n
    if head_n > SAMPLE or tail_n > SAMPLE or struct.unpack_from("<I", raw, end)[0] != zlib.crc32(raw[:end]):
        raise JournalError("damaged journal header")
    if os.fstat(jfd).st_size != DATA_OFFSET_V1 + length:
        raise JournalError("journal of the wrong length")
    head, tail = raw[HEADER_V1.size : HEADER_V1.size + head_n], raw[HEADER_V1.size + head_n : end]
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        return SET_ASIDE, set_aside(journal_path, "the spool was replaced since the journal was written")
    size = st.st_size
    new_end = p0 + length
    untruncated = (
        size >= old_size and os.pread(fd, head_n, new_end) == head and os.pread(fd, tail_n, old_size - tail_n) == tail
    )
    last = os.pread(jfd, min(SAMPLE, length), DATA_OFFSET_V1 + length - min(SAMPLE, length))
    if not untruncated and not (size >= new_end and os.pread(fd, len(last), new_end - len(last)) == last):
        return SET_ASIDE, set_aside(journal_path, "the spool's bytes are not those it was written for")
    copy_range(jfd, DATA_OFFSET_V1, fd, p0, length, stepper(tick))
    os.fdatasync(fd)
    if untruncated and size > old_size:
        commit(fd, journal_path, new_end, [(old_size, size - old_size)], size, tick)
        return REPLAYED, "replayed, keeping mail delivered after the crash"
    final = new_end if untruncated else size
    os.ftruncate(fd, final)
    os.fsync(fd)
    os.unlink(journal_path)
    fsync_dir(journal_path)
    return REPLAYED, "replayed" + ("" if final == new_end else ", keeping mail delivered after the crash")


def set_aside(journal_path, why):
    """Rename a journal that must not be applied to a name of its own
    (NAME.mpop3-journal.orphaned, -2, -3, ...), for the administrator."""
    for n in range(1, 100):
        name = journal_path + ".orphaned" + ("" if n == 1 else f"-{n}")
        try:
            os.link(journal_path, name)
        except FileExistsError:
            continue
        os.unlink(journal_path)
        fsync_dir(journal_path)
        return f"not applied: {why}; set aside as {os.path.basename(name)}"
    raise JournalError(f"not applied: {why}; and no name left to set it aside")
