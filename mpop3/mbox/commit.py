"""Remove deleted messages from an mbox spool in place, crash-safe.

The spool keeps its inode (an MDA holding it open, or locking it with fcntl
only, goes on appending to the live file), its owner, group and mode. The
argument (docs/mbox.md has it in full):

- Let p0 be the first deleted byte. Everything before p0 stays put. The new
  bytes from p0 on ("the image") are the kept records after p0 followed by
  any mail appended since the scan.
- If the image is empty (deleting a tail, or everything), one ftruncate()
  does it: the file has the old length or the new one, nothing between.
- Otherwise the image goes to a journal file first, fsynced, then renamed
  into place (the commit point; the directory is fsynced too). Only then is
  the spool overwritten from p0, truncated and fsynced, and the journal
  removed. Before the rename the spool is untouched (old mailbox); after it
  the journal holds the whole image and the next open replays it (new
  mailbox). Replaying is idempotent, and mail an MDA appended after a crash
  and before the replay is found (by length and by comparing samples of the
  old bytes the journal recorded) and kept.
"""

import errno
import os
import struct
import zlib

from ._kernels import start_writeback

MAGIC = b"MPOP3JN1"
FIXED = struct.Struct("<8sQQQQQII")  # magic dev ino old_size start length head_n tail_n
SAMPLE = 4096  # bytes of the old end recorded at each side: the replay's witness
DATA_OFFSET = 16384  # the image starts here in the journal (page aligned)
CHUNK = 8 << 20  # bytes per copy step

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


def commit(fd, journal_path, p0, pieces, old_size):
    """Make the spool's bytes from p0 on the concatenation of `pieces`."""
    length = sum(n for _, n in pieces)
    if length == 0:
        _step("truncate")
        os.ftruncate(fd, p0)
        os.fsync(fd)
        return
    jfd = write_journal(journal_path, fd, p0, [(fd, off, n) for off, n in pieces], old_size)
    try:
        apply_journal(fd, jfd, journal_path, p0, length, p0 + length)
    finally:
        os.close(jfd)


def write_journal(journal_path, fd, p0, sources, old_size):
    """Write the image to the journal and make it durable; returns its fd."""
    length = sum(n for _, _, n in sources)
    st = os.fstat(fd)
    gap = old_size - p0 - length  # the old bytes past the new end: the witness
    head = os.pread(fd, min(SAMPLE, gap), p0 + length) if gap > 0 else b""
    tail = os.pread(fd, min(SAMPLE, gap), old_size - min(SAMPLE, gap)) if gap > 0 else b""
    header = FIXED.pack(MAGIC, st.st_dev, st.st_ino, old_size, p0, length, len(head), len(tail)) + head + tail
    header += struct.pack("<I", zlib.crc32(header))
    tmp = journal_path + ".tmp"
    # A new file of ours, never one somebody left there (in a sticky, world
    # writable spool directory it could be theirs, and they would read the mail).
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    jfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _step("journal-open")
        # (no posix_fallocate: writing into ext4's unwritten extents ran 10x slower)
        os.pwrite(jfd, header, 0)
        pos = DATA_OFFSET
        for src, off, n in sources:
            copy_range(src, off, jfd, pos, n)
            pos += n
        _step("journal-fsync")
        os.fsync(jfd)
        _step("journal-rename")
        os.rename(tmp, journal_path)  # the commit point
        fsync_dir(journal_path)
        _step("journal-durable")
    except BaseException:
        os.close(jfd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return jfd


def apply_journal(fd, jfd, journal_path, p0, length, final_size):
    copy_range(jfd, DATA_OFFSET, fd, p0, length)
    _step("spool-truncate")
    os.ftruncate(fd, final_size)
    _step("spool-fsync")
    os.fsync(fd)
    _step("journal-unlink")
    os.unlink(journal_path)
    fsync_dir(journal_path)


def copy_range(src, src_off, dst, dst_off, n):
    """Copy n bytes between files, in the kernel where it can."""
    while n > 0:
        _step("copy")
        want = min(CHUNK, n)
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


def read_header(jfd):
    raw = os.pread(jfd, DATA_OFFSET, 0)
    if len(raw) < FIXED.size or raw[:8] != MAGIC:
        raise JournalError("not an mpop3 journal")
    magic, dev, ino, old_size, p0, length, head_n, tail_n = FIXED.unpack_from(raw)
    end = FIXED.size + head_n + tail_n
    if head_n > SAMPLE or tail_n > SAMPLE or len(raw) < end + 4:
        raise JournalError("damaged journal header")
    (crc,) = struct.unpack_from("<I", raw, end)
    if crc != zlib.crc32(raw[:end]):
        raise JournalError("damaged journal header")
    if os.fstat(jfd).st_size != DATA_OFFSET + length:
        raise JournalError("journal of the wrong length")
    head = raw[FIXED.size : FIXED.size + head_n]
    tail = raw[FIXED.size + head_n : end]
    return dev, ino, old_size, p0, length, head, tail


def replay(fd, journal_path):
    """Finish a commit a crash interrupted. Returns what happened, or None
    if there was nothing to do. Call with the spool locked for writing."""
    try:
        os.unlink(journal_path + ".tmp")  # never reached its commit point
    except FileNotFoundError:
        pass
    try:
        jfd = os.open(journal_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        owner = os.fstat(jfd).st_uid
        if owner != os.geteuid():
            raise JournalError(f"journal owned by uid {owner}, not by us: not applied")
        dev, ino, old_size, p0, length, head, tail = read_header(jfd)
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (dev, ino):
            os.rename(journal_path, journal_path + ".orphaned")
            return "orphaned: the spool was replaced since the journal was written; set aside"
        size = st.st_size
        untruncated = size >= old_size and _witness_matches(fd, p0 + length, old_size, head, tail)
        if untruncated and size > old_size:
            # Mail appended after the crash sits past the old end: it has to
            # move too, so it joins a new journal that replaces this one.
            sources = [(jfd, DATA_OFFSET, length), (fd, old_size, size - old_size)]
            new_jfd = write_journal(journal_path, fd, p0, sources, size)
            try:
                new_length = length + size - old_size
                apply_journal(fd, new_jfd, journal_path, p0, new_length, p0 + new_length)
            finally:
                os.close(new_jfd)
            return "replayed, keeping mail delivered after the crash"
        if not untruncated and size < p0 + length:
            raise JournalError(f"the spool is shorter ({size}) than the journal's result ({p0 + length})")
        final = p0 + length if untruncated else size
        apply_journal(fd, jfd, journal_path, p0, length, final)
        return "replayed" + ("" if final == p0 + length else ", keeping mail delivered after the crash")
    finally:
        os.close(jfd)


def _witness_matches(fd, start, old_end, head, tail):
    if not head:
        return True
    return os.pread(fd, len(head), start) == head and os.pread(fd, len(tail), old_end - len(tail)) == tail
