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

Whatever else may create names in these directories (another local user,
where they are world-writable), every file here is opened without
following a symlink and without blocking (a FIFO), and used only if it is
a regular file; nothing is written into a file we did not create.
"""

import errno
import fcntl
import logging
import os
import secrets
import socket
import stat
import time
from contextlib import contextmanager

from ..errors import MailboxInUse, StorageTempError

log = logging.getLogger("mpop3.storage")

LOCK_METHODS = ("dotlock", "fcntl")
POLL = 0.05  # first wait between lock attempts; doubles up to POLL_MAX
POLL_MAX = 1.0
# how to open a file beside a spool: never through a symlink, never waiting on a FIFO
STATE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def parse_methods(text):
    """`mbox_locks` value ("dotlock fcntl", "fcntl", "none") -> tuple."""
    words = tuple(w for w in text.replace(",", " ").split() if w != "none")
    for w in words:
        if w not in LOCK_METHODS:
            raise ValueError(f"mbox_locks: unknown method {w!r} (known: dotlock, fcntl, none)")
    return words


def kind(mode):
    """What a file of this mode is, for the log."""
    for test, text in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return text
    return "a device"


# ---- dot-lock ------------------------------------------------------------------


def _unique_name(directory):
    """A temporary name nobody can guess: a file planted at a predictable
    one would stop us from locking. A dot file, which no mailbox name may be."""
    return os.path.join(directory, ".lk" + secrets.token_hex(16))


def _token():
    return f"{os.getpid()}@{socket.gethostname()}\n".encode()


def write_token(fd, path):
    """Write who holds a lock into a file we just made. On a full disk the
    file stays empty (a lock all the same, judged by its age alone): a
    full disk is when users most need to log in and delete mail."""
    try:
        os.write(fd, _token())
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.warning("%s: %s; the lock stays empty", path, e.strerror)


class DotLock:
    """SPOOL.lock, held: the file we made, open (to keep it fresh)."""

    def __init__(self, lock_path, fd, ino):
        self.lock_path, self.fd, self.ino = lock_path, fd, ino
        self.touched = time.monotonic()
        self.lost = False

    @classmethod
    def attempt(cls, spool_path, stale_after):
        """One attempt at SPOOL.lock: (the DotLock if we hold it now, else
        None; what is odd about the lock in the way, for the log, or None).

        The link() method (liblockfile, procmail): write a uniquely named
        file, link it to the lock name, and trust the link count rather than
        link()'s return value, which NFS may get wrong after a retransmission."""
        lock_path = spool_path + ".lock"
        directory = os.path.dirname(spool_path) or "."
        for _ in range(16):  # a name taken meanwhile: take another
            tmp = _unique_name(directory)
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | STATE_OPEN, 0o644)
                break
            except FileExistsError:
                continue
        else:
            raise OSError(errno.EEXIST, "no free temporary name for a dot-lock", directory)
        held = None
        try:
            write_token(fd, tmp)
            try:
                os.link(tmp, lock_path)
            except OSError:
                pass  # judged by the link count below
            st = os.fstat(fd)
            if st.st_nlink == 2:
                held = cls(lock_path, fd, st.st_ino)
        finally:
            os.unlink(tmp)
            if held is None:
                os.close(fd)
        if held is not None:
            return held, None
        return None, break_if_stale(lock_path, stale_after)

    def refresh(self, interval):
        """Touch the lock if `interval` seconds went by since it was made or
        last touched, so that nobody judging it by its age (procmail's
        LOCKTIMEOUT, mbox_dotlock_stale) breaks it during a long commit."""
        now = time.monotonic()
        if now - self.touched < interval:
            return
        self.touched = now
        os.utime(self.fd)
        if not self.lost and not self._still_ours():
            self.lost = True
            log.error("%s: our dot-lock was broken by another program while we held it", self.lock_path)

    def _still_ours(self):
        try:
            st = os.lstat(self.lock_path)
        except FileNotFoundError:
            return False
        return stat.S_ISREG(st.st_mode) and st.st_ino == self.ino

    def release(self):
        """Remove SPOOL.lock if it is still ours (somebody may have judged
        it stale and taken it since; theirs is not ours to remove)."""
        try:
            if self._still_ours():
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)


def _owner_is_dead(lock_path):
    """True if the lock says it was made by a process of this host that is gone.

    Our lock files hold "PID@HOST"; procmail's hold "0" and are judged by age only."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | STATE_OPEN)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        text = os.read(fd, 200).decode("ascii", "replace").strip()
    except OSError:
        return False
    finally:
        os.close(fd)
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


def break_if_stale(lock_path, stale_after):
    """Remove a dot-lock whose owner is gone or that is older than
    stale_after seconds (procmail's LOCKTIMEOUT rule). Returns what is odd
    about a lock that is not a regular file (no MDA makes one), or None."""
    try:
        st = os.lstat(lock_path)
    except FileNotFoundError:
        return None
    odd = None
    if not stat.S_ISREG(st.st_mode):
        odd = f"{lock_path} is {kind(st.st_mode)}, not a regular file: no MDA makes such a dot-lock"
    if time.time() - st.st_mtime > stale_after or (odd is None and _owner_is_dead(lock_path)):
        try:
            os.unlink(lock_path)
        except OSError:
            pass  # gone, a directory, or not ours to remove (a sticky directory)
    return odd


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


class Held:
    """What spool_locks() holds; refresh() keeps the dot-lock fresh (a
    commit calls it at every step)."""

    def __init__(self, dotlock, stale_after):
        self.dotlock = dotlock
        self.interval = stale_after / 4

    def refresh(self):
        if self.dotlock is not None:
            self.dotlock.refresh(self.interval)


@contextmanager
def spool_locks(spool_path, fd, methods, write, timeout, stale_after):
    """Hold the MDA locks (dot-lock, then fcntl) for a scan or a commit.

    Both are tried without blocking; if the second is busy the first is let
    go before waiting, so we never sit on a dot-lock while an MDA that takes
    them in the other order waits for it. StorageTempError after `timeout`."""
    deadline = time.monotonic() + timeout
    wait = POLL
    dot = "dotlock" in methods
    odd = None
    while True:
        dotlock = None
        if dot:
            dotlock, why = DotLock.attempt(spool_path, stale_after)
            if why and why != odd:
                log.warning("%s; waiting for it to go", why)
            odd = why or odd
        if dotlock is not None or not dot:
            try:
                have_fcntl = fd is None or "fcntl" not in methods or try_fcntl(fd, write)
            except BaseException:
                if dotlock is not None:
                    dotlock.release()
                raise
            if have_fcntl:
                break
            if dotlock is not None:
                dotlock.release()
        left = deadline - time.monotonic()
        if left <= 0:
            log.error(
                "%s: locked by another program for more than %g s%s", spool_path, timeout, odd and f" ({odd})" or ""
            )
            raise StorageTempError(f"{spool_path}: locked by another program for more than {timeout} s")
        time.sleep(min(wait, left))  # one last attempt at the deadline, never a wait past it
        wait = min(wait * 2, POLL_MAX)
    try:
        yield Held(dotlock, stale_after)
    finally:
        if fd is not None and "fcntl" in methods:
            release_fcntl(fd)
        if dotlock is not None:
            dotlock.release()


# ---- the session marker -------------------------------------------------------


class SessionMarker:
    """STATE_DIR/MAILBOX.mpop3-session, flock()ed while a session lasts."""

    def __init__(self, path, fd):
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path):
        """Hold the marker: MailboxInUse if a session has it, StorageTempError
        (logged) if what is at its name is not a marker of ours."""
        while True:
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | STATE_OPEN, 0o600)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(path, os.O_RDWR | STATE_OPEN)
                except FileNotFoundError:
                    continue  # its holder just let it go
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
                        raise
                    try:
                        what = kind(os.lstat(path).st_mode)
                    except OSError:
                        what = "unusable"
                    raise cls.refused(path, f"is {what} ({e.strerror})") from None
            try:
                marker = cls._take(path, fd, created)
            except BaseException:
                os.close(fd)
                raise
            if marker is not None:
                return marker
            os.close(fd)

    @classmethod
    def _take(cls, path, fd, created):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise cls.refused(path, f"is {kind(st.st_mode)}")
        if st.st_uid != os.geteuid():
            raise cls.refused(path, f"belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})")
        if st.st_nlink != 1:
            raise cls.refused(path, f"has {st.st_nlink} names (a hard link)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MailboxInUse("mailbox in use by another session") from None
        # The previous holder unlinks the file before it lets go: if ours
        # is no longer the file at `path`, start again.
        try:
            if os.lstat(path).st_ino != st.st_ino:
                return None
        except FileNotFoundError:
            return None
        if created:  # who holds it, for the administrator; only in a file we made
            try:
                write_token(fd, path)
            except OSError as e:
                os.unlink(path)  # ours and held: as release() does
                log.error("%s: cannot write the session marker: %s", path, e.strerror)
                raise StorageTempError("cannot write the session marker") from None
        return cls(path, fd)

    @staticmethod
    def refused(path, why):
        log.error("%s %s: not a session marker of ours; refused (remove it if nothing should be there)", path, why)
        return StorageTempError("the session marker is not usable")

    def release(self):
        if self.fd is None:
            return
        try:
            if os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
