"""One session's handle on one spool: open, index, check, commit, close.

A session's life (docs/mbox.md): Mailbox.open takes the session marker
([IN-USE] for a second session), then briefly the MDA locks to replay any
interrupted commit and index the spool; RETR/TOP read the indexed bytes
without locks, after checking the spool was not rewritten (Fingerprint,
check_from_lines); remove_messages takes the MDA locks again to delete
(commit.py); close lets the spool and the marker go. Failures are raised
as the mpop3.errors exceptions the session answers with, logged here with
the mailbox's name.
"""

import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass

from .. import mail_group
from ..errors import MailboxInUse, ModuleInitError, StoragePermError, StorageTempError
from ..progress import Progress
from . import _kernels, commit
from .lock import SessionMarker, parse_methods, spool_locks

log = logging.getLogger("mpop3.storage")


@dataclass(frozen=True)
class Settings:
    """storage_mbox's `> name value` lines, parsed; the names are the
    settings' own (their meanings: storage_mbox's MPOP3_SETTINGS)."""

    storage_dir: str = "/var/mail"
    mbox_locks: tuple = ("dotlock", "fcntl")
    mbox_lock_timeout: float = 20.0
    mbox_dotlock_stale: float = 1024.0
    mbox_state_dir: str | None = None
    mailbox_user: str = "mailbox"

    @classmethod
    def parse(cls, conf):
        """From {name: text}; raises ModuleInitError (ValueError for an
        unknown lock method) naming the setting."""
        values = {}
        for name, value in conf.items():
            if name in ("storage_dir", "mbox_state_dir"):
                values[name] = value
            elif name == "mbox_locks":
                values[name] = parse_methods(value)
            elif name == "mailbox_user":
                if value not in ("mailbox", "any"):
                    raise ModuleInitError(f"mailbox_user: {value!r} is neither 'mailbox' nor 'any'")
                values[name] = value
            elif name in ("mbox_lock_timeout", "mbox_dotlock_stale"):
                try:
                    values[name] = float(value)
                except ValueError:
                    raise ModuleInitError(f"{name}: not a number: {value!r}") from None
                if values[name] < 0:
                    raise ModuleInitError(f"{name}: must not be negative")
            else:
                raise ModuleInitError(f"{name}: not a storage_mbox setting")
        return cls(**values)

    @property
    def state_dir(self):
        """Where session markers and commit journals live."""
        return self.mbox_state_dir or self.storage_dir


MARKER = ".mpop3-session"
JOURNAL = ".mpop3-journal"
# the longest name a state file adds to a mailbox's (a journal set aside)
LONGEST_SUFFIX = len(JOURNAL + ".orphaned-99")
NAME_MAX = 255


def check_mailbox_name(name):
    """The core validates names; a file name is built from this one, so
    again, and it must not be the name of a file kept beside a spool: a
    dot-lock (MAILBOX.lock, and the dot files it is made from), a session
    marker or a journal (their suffix is .mpop3-...), whose own names must
    fit in a file name."""
    if (
        not name
        or "/" in name
        or ".." in name
        or name.startswith(".")
        or name.endswith(".lock")
        or ".mpop3-" in name
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        or len(os.fsencode(name)) + LONGEST_SUFFIX > NAME_MAX
    ):
        log.error("%r: refused as a mailbox name (a state file's, or not a file name)", name)
        raise StoragePermError("invalid mailbox name")


class Fingerprint:
    """What the session saw: the spool's identity and length, and the bytes
    around its last message boundary and at its end. Appends keep it;
    anything else that a rewrite changes breaks it (popa3d's check)."""

    def __init__(self, fd, index):
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        self.length = index.length
        self.samples = []
        if len(index):
            last = index.start(len(index) - 1)
            self.samples.append(self._sample(fd, max(0, last - 64), min(index.length, last + 192)))
        self.samples.append(self._sample(fd, max(0, index.length - 64), index.length))

    @staticmethod
    def _sample(fd, start, end):
        return (start, os.pread(fd, end - start, start))

    def matches(self, fd, path):
        try:
            on_disk = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        if (on_disk.st_dev, on_disk.st_ino) != self.identity or (st.st_dev, st.st_ino) != self.identity:
            return False
        if st.st_size < self.length:
            return False
        return all(os.pread(fd, len(data), start) == data for start, data in self.samples)


# Spools open in this process, by (device, inode): one descriptor each, as
# POSIX drops all of a process's fcntl locks on a file when it closes any
# descriptor of it; a second session on the same file (a hard link under
# another name) is refused instead of opening another.
_open_spools = {}
_registry_lock = threading.Lock()


class Mailbox:
    """The handle: one session's view of one spool. `index` is the
    _kernels.MboxIndex of the messages the session sees."""

    def __init__(self, settings, name, marker):
        self.settings = settings
        self.name = name
        self.path = os.path.join(settings.storage_dir, name)
        self.marker = marker
        self.fd = None
        self.writable = False
        self.key = None
        self.index = None
        self.fingerprint = None
        self.journal_path = os.path.join(settings.state_dir, name + JOURNAL)

    @classmethod
    def open(cls, settings, name):
        """Take the session marker, open and index the spool: the handle."""
        return cls._opened(settings, name, "load")

    @classmethod
    def repair(cls, settings, name):
        """Finish an interrupted commit of this mailbox, as a session's
        open would, without indexing it (start-up recovery, recover.py)."""
        cls._opened(settings, name, "replay_pending").close()

    @classmethod
    def _opened(cls, settings, name, then):
        check_mailbox_name(name)
        with mail_group.held_for(settings.storage_dir, settings.state_dir):
            return cls._opened_with_group(settings, name, then)

    @classmethod
    def _opened_with_group(cls, settings, name, then):
        try:
            marker = SessionMarker.acquire(os.path.join(settings.state_dir, name + MARKER))
        except OSError as e:
            raise _os_failure(name, "taking the session marker", e) from None
        box = cls(settings, name, marker)
        try:
            box.open_spool()
            getattr(box, then)()
        except (StoragePermError, StorageTempError, MailboxInUse):
            box.close()
            raise
        except (OSError, EOFError, commit.JournalError) as e:
            box.close()
            if isinstance(e, OSError):
                raise _os_failure(name, "opening", e) from None
            log.error("%s: cannot open: %s", name, e)
            raise StorageTempError("cannot open the mailbox") from None
        except BaseException:
            box.close()
            raise
        return box

    def locks(self, write):
        s = self.settings
        return spool_locks(self.path, self.fd, s.mbox_locks, write, s.mbox_lock_timeout, s.mbox_dotlock_stale)

    def open_spool(self):
        """Open without following a symlink and without blocking on a FIFO;
        refuse anything but a regular file. A missing spool is empty."""
        flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | flags)
                self.writable = True
            except PermissionError:
                fd = os.open(self.path, os.O_RDONLY | flags)  # may read, cannot delete
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise StoragePermError("the spool is not a regular file") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise StoragePermError("the spool is not a regular file")
        if os.geteuid() != 0 and st.st_uid != os.geteuid():
            # the mailbox's user opens it (privilege rule 1, wuMailbox): a
            # spool owned by anyone else is not this mailbox's. (Root is
            # only ever here in tools and tests: a root server switches.)
            os.close(fd)
            log.error(
                "%s: spool owned by uid %d, not by uid %d serving it; refused", self.name, st.st_uid, os.geteuid()
            )
            raise StoragePermError("the spool belongs to another user")
        with _registry_lock:
            key = (st.st_dev, st.st_ino)
            if key in _open_spools:
                os.close(fd)
                raise MailboxInUse("spool in use by another session")
            _open_spools[key] = self
        self.fd, self.key = fd, key

    def load(self):
        if self.fd is None:
            self.index = _kernels.Scanner().finish()
            return
        with self.locks(write=self.writable and self.pending()) as held:
            self.replay(held)
            self.index = _kernels.scan_fd(self.fd, os.fstat(self.fd).st_size)
            self.fingerprint = Fingerprint(self.fd, self.index)

    def pending(self):
        """Whether a journal is there. Only this session (it holds the
        marker) writes one, so a look before locking is enough to know
        whether the scan must write."""
        return os.path.lexists(self.journal_path) or os.path.lexists(self.journal_path + ".tmp")

    def replay_pending(self):
        if self.fd is None:
            if self.pending():
                log.warning("%s: a commit journal waits for a spool that is not there; left alone", self.name)
            return
        if self.pending():
            with self.locks(write=self.writable) as held:
                self.replay(held)

    def replay(self, held):
        """Under the MDA locks: finish a commit a crash interrupted, if any."""
        if not self.writable:
            if os.path.lexists(self.journal_path):
                # half rewritten, and we may not finish it: showing it could lie
                log.error("%s: an interrupted commit needs replaying, but the spool is read-only for us", self.name)
                raise StorageTempError("mailbox being repaired")
            return
        progress = Progress(log, f"mailbox {self.name}: replaying an interrupted commit")
        outcome = commit.replay(self.fd, self.journal_path, held.refresh, progress)
        if outcome is None:
            return
        what, detail = outcome
        if what == commit.SET_ASIDE:
            log.error("%s: the journal of an interrupted commit was %s", self.name, detail)
        else:
            log.warning("%s: an interrupted commit was %s", self.name, detail)

    def check_unchanged(self, doing):
        if self.fd is not None and not self.fingerprint.matches(self.fd, self.path):
            log.error(
                "%s: the spool was modified by another program during the session "
                "(external modification); %s refused, nothing will be deleted",
                self.name,
                doing,
            )
            raise StorageTempError("mailbox changed by another program")

    def check_from_lines(self, indexes, doing):
        """Each message still starts where the index says: a From line there."""
        for i in indexes:
            start = self.index.start(i)
            if self.index.data(i) > start and os.pread(self.fd, 5, start) != b"From ":
                log.error(
                    "%s: message %d no longer starts with a From line (external modification); "
                    "%s refused, nothing will be deleted",
                    self.name,
                    i + 1,
                    doing,
                )
                raise StorageTempError("mailbox changed by another program")

    def reading(self, chunks):
        """The chunks, with a read failure turned into what the client is told."""
        try:
            yield from chunks
        except (OSError, EOFError) as e:
            log.error("%s: reading a message failed: %s", self.name, e)
            raise StorageTempError("cannot read the mailbox") from None

    def remove_messages(self, deleted):
        """Commit the session: remove the messages numbered (from 0) in
        `deleted`, keeping all else, mail delivered meanwhile included."""
        deleted = {i for i in deleted if 0 <= i < len(self.index)}
        if not deleted:
            return
        if not self.writable:
            log.error("%s: the spool is read-only for us; nothing deleted", self.name)
            raise StoragePermError("permission denied")
        try:
            with (
                mail_group.held_for(self.settings.storage_dir, self.settings.state_dir),
                self.locks(write=True) as held,
            ):
                self.check_unchanged("commit")
                self.check_from_lines(deleted, "commit")
                size = os.fstat(self.fd).st_size
                p0, pieces = commit.image_pieces(self.index, deleted, size)
                progress = Progress(log, f"mailbox {self.name}: commit")
                commit.commit(self.fd, self.journal_path, p0, pieces, size, held.refresh, progress=progress)
        except OSError as e:
            raise _os_failure(self.name, "committing deletions", e) from None
        log.info("%s: %d message(s) deleted", self.name, len(deleted))

    def close(self):
        if self.fd is not None:
            with _registry_lock:
                _open_spools.pop(self.key, None)
            os.close(self.fd)
            self.fd = None
        if self.marker is not None:
            with mail_group.held_for(self.settings.state_dir):
                self.marker.release()
            self.marker = None


def _os_failure(name, doing, e):
    log.error("%s: %s failed: %s", name, doing, e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoragePermError("permission denied")
    return StorageTempError("temporary storage failure")
