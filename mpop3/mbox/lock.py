"""Who may touch an mbox spool, and when (docs/mbox.md, "Locking").

Three mechanisms, each for a different reader:

- the dot-lock (SPOOL.lock, made with link() so it is atomic on NFS too)
  and fcntl record locks are what MDAs (procmail, postfix local,
  dovecot-lda) respect; we hold them only while scanning and committing;
- the session marker (STATE_DIR/MAILBOX.mpop3-session, flock()ed for the
  whole session) is what other mpop3 sessions respect: a second one, in
  this process or another, gets [IN-USE]. flock() is released by the kernel
  when a process dies, so a crash leaves no stale marker behind, and it is
  a different file from the spool, so it never interferes with the spool's
  fcntl locks.
"""

import errno
import fcntl
import os
import socket
import threading
import time
from contextlib import contextmanager

from ..errors import MailboxInUse, StorageTempError

LOCK_METHODS = ("dotlock", "fcntl")
POLL = 0.05  # first wait between lock attempts; doubles up to POLL_MAX
POLL_MAX = 1.0


def parse_methods(text):
    """`mbox_locks` value ("dotlock fcntl", "fcntl", "none") -> tuple."""
    words = tuple(w for w in text.replace(",", " ").split() if w != "none")
    for w in words:
        if w not in LOCK_METHODS:
            raise ValueError(f"mbox_locks: unknown method {w!r} (known: dotlock, fcntl, none)")
    return words


# ---- dot-lock ------------------------------------------------------------------

_counter = 0
_counter_lock = threading.Lock()


def _unique_name(directory):
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    return os.path.join(directory, f".lk{os.getpid()}.{n}.{socket.gethostname()}")


def _owner_is_dead(lock_path):
    """True if the lock says it was made by a process of this host that is gone.

    Our lock files hold "PID@HOST"; procmail's hold "0" and are judged by age only."""
    try:
        with open(lock_path, "rb") as f:
            text = f.read(200).decode("ascii", "replace").strip()
    except OSError:
        return False
    pid, _, host = text.partition("@")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def try_dotlock(spool_path, stale_after):
    """One attempt at SPOOL.lock; True if we hold it now.

    The link() method (liblockfile, procmail): write a uniquely named file,
    link it to the lock name, and trust the link count rather than link()'s
    return value, which NFS may get wrong after a retransmission."""
    lock_path = spool_path + ".lock"
    tmp = _unique_name(os.path.dirname(spool_path) or ".")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, _token())
    finally:
        os.close(fd)
    try:
        try:
            os.link(tmp, lock_path)
        except FileExistsError:
            pass
        except OSError:
            pass  # judged by the link count below
        if os.stat(tmp).st_nlink == 2:
            return True
    finally:
        os.unlink(tmp)
    break_if_stale(lock_path, stale_after)
    return False


def break_if_stale(lock_path, stale_after):
    """Remove a dot-lock whose owner is gone or that is older than
    stale_after seconds (procmail's LOCKTIMEOUT rule)."""
    try:
        st = os.lstat(lock_path)
    except FileNotFoundError:
        return
    if time.time() - st.st_mtime > stale_after or _owner_is_dead(lock_path):
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass


def _token():
    return f"{os.getpid()}@{socket.gethostname()}\n".encode()


def release_dotlock(spool_path):
    """Remove SPOOL.lock if it is still ours (somebody may have judged it
    stale and taken it since; theirs is not ours to remove)."""
    lock_path = spool_path + ".lock"
    try:
        with open(lock_path, "rb") as f:
            if f.read(200) != _token():
                return
        os.unlink(lock_path)
    except FileNotFoundError:
        pass


# ---- fcntl -----------------------------------------------------------------------


def try_fcntl(fd, write):
    try:
        fcntl.lockf(fd, (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def release_fcntl(fd):
    fcntl.lockf(fd, fcntl.LOCK_UN)


@contextmanager
def spool_locks(spool_path, fd, methods, write, timeout, stale_after):
    """Hold the MDA locks (dot-lock, then fcntl) for a scan or a commit.

    Both are tried without blocking; if the second is busy the first is let
    go before waiting, so we never sit on a dot-lock while an MDA that takes
    them in the other order waits for it. StorageTempError after `timeout`."""
    deadline = time.monotonic() + timeout
    wait = POLL
    dot = "dotlock" in methods
    while True:
        have_dot = not dot or try_dotlock(spool_path, stale_after)
        have_fcntl = False
        if have_dot:
            try:
                have_fcntl = fd is None or "fcntl" not in methods or try_fcntl(fd, write)
            except BaseException:
                if dot:
                    release_dotlock(spool_path)
                raise
            if have_fcntl:
                break
            if dot:
                release_dotlock(spool_path)
        if time.monotonic() > deadline:
            raise StorageTempError(f"{spool_path}: locked by another program for more than {timeout} s")
        time.sleep(wait)
        wait = min(wait * 2, POLL_MAX)
    try:
        yield
    finally:
        if fd is not None and "fcntl" in methods:
            release_fcntl(fd)
        if dot:
            release_dotlock(spool_path)


# ---- the session marker -------------------------------------------------------


class SessionMarker:
    """STATE_DIR/MAILBOX.mpop3-session, flock()ed while a session lasts."""

    def __init__(self, path, fd):
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path):
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MailboxInUse("mailbox in use by another session") from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder unlinks the file before it lets go: if
            # ours is no longer the file at `path`, start again.
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
                return cls(path, fd)
            os.close(fd)

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
