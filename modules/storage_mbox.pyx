"""storage_mbox: mbox spools, the default storage (DESIGN section 6, docs/mbox.md).

One session's life: lock_mailbox takes the session marker ([IN-USE] for a
second session), then briefly the MDA locks to replay any interrupted commit
and index the spool; RETR/TOP read the indexed bytes without locks, after
checking the spool was not rewritten; synch takes the MDA locks again to
remove the deleted messages (mpop3.mbox_commit); unlock lets the marker go.
"""

include "mpop3_module.pxi"

import errno
import logging
import os
import stat
import threading

from mpop3 import _mbox, mbox_commit
from mpop3.errors import MailboxInUse, ModuleInitError, StoragePermError, StorageTempError
from mpop3.mbox_lock import SessionMarker, parse_methods, spool_locks
from mpop3.storage_functions import WU_ANY, WU_MAILBOX

MPOP3_MODULE_CLASS = "storage"
MPOP3_SETTINGS = {
    "storage_dir": "the spool directory, the C program's MBOX_ROOT (default /var/mail)",
    "mbox_locks": "how MDAs lock spools here: dotlock, fcntl, both (default 'dotlock fcntl') or none",
    "mbox_lock_timeout": "seconds to wait for an MDA's lock before -ERR [SYS/TEMP] (default 20)",
    "mbox_dotlock_stale": "age in seconds after which a dot-lock is broken, procmail's LOCKTIMEOUT (default 1024)",
    "mbox_state_dir": "where session markers and commit journals live (default: storage_dir)",
    "mailbox_user": "who opens a spool: 'mailbox' (its user, default) or 'any' (the server's user)",
}

log = logging.getLogger("mpop3.storage")

DEFAULTS = {
    "storage_dir": "/var/mail",
    "mbox_locks": ("dotlock", "fcntl"),
    "mbox_lock_timeout": 20.0,
    "mbox_dotlock_stale": 1024.0,
    "mbox_state_dir": None,
    "mailbox_user": "mailbox",
}
settings = dict(DEFAULTS)

# Spools open in this process, by (device, inode): one descriptor each, as
# POSIX drops all of a process's fcntl locks on a file when it closes any
# descriptor of it; a second session on the same file (a hard link under
# another name) is refused instead of opening another.
_open_spools = {}
_registry_lock = threading.Lock()


def module_init(conf):
    settings.clear()
    settings.update(DEFAULTS)
    for name, value in conf.items():
        if name in ("storage_dir", "mbox_state_dir"):
            settings[name] = value
        elif name == "mbox_locks":
            settings[name] = parse_methods(value)
        elif name == "mailbox_user":
            if value not in ("mailbox", "any"):
                raise ModuleInitError(f"mailbox_user: {value!r} is neither 'mailbox' nor 'any'")
            settings[name] = value
        else:
            try:
                settings[name] = float(value)
            except ValueError:
                raise ModuleInitError(f"{name}: not a number: {value!r}") from None
            if settings[name] < 0:
                raise ModuleInitError(f"{name}: must not be negative")


def check_mailbox_name(name):
    """The core validates names; a file name is built from this one, so again."""
    if (not name or name in (".", "..") or "/" in name or ".." in name
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)):
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


class Mailbox:
    """The handle: one session's view of one spool."""

    def __init__(self, name, path, marker):
        self.name = name
        self.path = path
        self.marker = marker
        self.fd = None
        self.writable = False
        self.key = None
        self.index = None
        self.fingerprint = None
        state_dir = settings["mbox_state_dir"] or settings["storage_dir"]
        self.journal_path = os.path.join(state_dir, name + ".mpop3-journal")

    def locks(self, write):
        return spool_locks(self.path, self.fd, settings["mbox_locks"], write,
                           settings["mbox_lock_timeout"], settings["mbox_dotlock_stale"])

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
            log.error("%s: spool owned by uid %d, not by uid %d serving it; refused",
                      self.name, st.st_uid, os.geteuid())
            raise StoragePermError("the spool belongs to another user")
        with _registry_lock:
            key = (st.st_dev, st.st_ino)
            if key in _open_spools:
                os.close(fd)
                raise MailboxInUse("spool in use by another session")
            _open_spools[key] = self
        self.fd, self.key = fd, key

    def load(self):
        self.open_spool()
        if self.fd is None:
            self.index = _mbox.Scanner().finish()
            return
        # Only this session (it holds the marker) writes a journal, so a
        # look before locking is enough to know whether the scan must write.
        repair = os.path.exists(self.journal_path) or os.path.exists(self.journal_path + ".tmp")
        with self.locks(write=self.writable and repair):
            if self.writable:
                done = mbox_commit.replay(self.fd, self.journal_path)
                if done:
                    log.warning("%s: an interrupted commit was %s", self.name, done)
            elif repair and os.path.exists(self.journal_path):
                # half rewritten, and we may not finish it: showing it could lie
                log.error("%s: an interrupted commit needs replaying, but the spool is "
                          "read-only for us", self.name)
                raise StorageTempError("mailbox being repaired")
            self.index = _mbox.scan_fd(self.fd, os.fstat(self.fd).st_size)
            self.fingerprint = Fingerprint(self.fd, self.index)

    def check_unchanged(self, doing):
        if self.fd is not None and not self.fingerprint.matches(self.fd, self.path):
            log.error("%s: the spool was modified by another program during the session "
                      "(external modification); %s refused, nothing will be deleted", self.name, doing)
            raise StorageTempError("mailbox changed by another program")

    def check_from_lines(self, indexes, doing):
        """Each message still starts where the index says: a From line there."""
        for i in indexes:
            start = self.index.start(i)
            if self.index.data(i) > start and os.pread(self.fd, 5, start) != b"From ":
                log.error("%s: message %d no longer starts with a From line (external modification); "
                          "%s refused, nothing will be deleted", self.name, i + 1, doing)
                raise StorageTempError("mailbox changed by another program")

    def close(self):
        if self.fd is not None:
            with _registry_lock:
                _open_spools.pop(self.key, None)
            os.close(self.fd)
            self.fd = None
        if self.marker is not None:
            self.marker.release()
            self.marker = None


def _os_failure(name, doing, e):
    log.error("%s: %s failed: %s", name, doing, e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoragePermError("permission denied")
    return StorageTempError("temporary storage failure")


# ---- the storage table -------------------------------------------------------

def storage_need_user():
    # a spool is its user's file: open it as that user (the C module's
    # wuMailbox), unless every spool belongs to the server's own user
    return WU_MAILBOX if settings["mailbox_user"] == "mailbox" else WU_ANY


def storage_lock_mailbox(mailbox):
    check_mailbox_name(mailbox)
    path = os.path.join(settings["storage_dir"], mailbox)
    state_dir = settings["mbox_state_dir"] or settings["storage_dir"]
    try:
        marker = SessionMarker.acquire(os.path.join(state_dir, mailbox + ".mpop3-session"))
    except OSError as e:
        raise _os_failure(mailbox, "taking the session marker", e) from None
    box = Mailbox(mailbox, path, marker)
    try:
        box.load()
    except (StoragePermError, StorageTempError, MailboxInUse):
        box.close()
        raise
    except (OSError, EOFError, mbox_commit.JournalError) as e:
        box.close()
        if isinstance(e, OSError):
            raise _os_failure(mailbox, "opening", e) from None
        log.error("%s: cannot open: %s", mailbox, e)
        raise StorageTempError("cannot open the mailbox") from None
    except BaseException:
        box.close()
        raise
    return box


def storage_message_count(box):
    return len(box.index)


def storage_message_sizes(box):
    return box.index.sizes


def storage_uidl_supported(box):
    return True


def storage_unique_ids(box):
    return box.index.uids


def storage_dump_fragment(box, index, body_lines):
    box.check_unchanged("RETR/TOP")
    box.check_from_lines((index,), "RETR/TOP")
    return _reading(box, _mbox.dump(box.fd, box.index.data(index), box.index.end(index), body_lines))


def _reading(box, chunks):
    """The chunks, with a read failure turned into what the client is told."""
    try:
        yield from chunks
    except (OSError, EOFError) as e:
        log.error("%s: reading a message failed: %s", box.name, e)
        raise StorageTempError("cannot read the mailbox") from None


def storage_synch(box, deleted):
    deleted = {i for i in deleted if 0 <= i < len(box.index)}
    if not deleted:
        return
    if not box.writable:
        log.error("%s: the spool is read-only for us; nothing deleted", box.name)
        raise StoragePermError("permission denied")
    try:
        with box.locks(write=True):
            box.check_unchanged("commit")
            box.check_from_lines(deleted, "commit")
            size = os.fstat(box.fd).st_size
            p0, pieces = mbox_commit.image_pieces(box.index, deleted, size)
            mbox_commit.commit(box.fd, box.journal_path, p0, pieces, size)
    except OSError as e:
        raise _os_failure(box.name, "committing deletions", e) from None
    log.info("%s: %d message(s) deleted", box.name, len(deleted))


def storage_unlock_mailbox(box):
    box.close()
