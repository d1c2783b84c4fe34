"""The failed-login throttle where no process outlives a session (stdin
mode, started by inetd or socat once per connection): LoginThrottle's
records kept in files in `state_dir`, so a guesser who reconnects waits as
long as one who stays.

- One file per (address group, user) and one per address group (for
  spraying), named by the hex of a keyed hash: no names or addresses on
  disk. The key (also the key of user_key() and mark()) is in a file of its
  own in the directory, made by the first failure and never rewritten.
- Each read-modify-write holds fcntl.lockf on the record's file, opened
  with O_NOFOLLOW | O_NONBLOCK, and only a regular file of our own is
  believed: a symlink, FIFO or someone else's file is left alone, logged.
- Times are wall-clock (time.time()): records outlive processes.
- The arithmetic is LoginThrottle's (limits.py); records quiet for
  FAILURE_MEMORY are forgotten, and about one call in SWEEP_ODDS looks at a
  bounded sample of the files and removes the forgotten ones.
- Whatever cannot be read or written is logged and the call falls back to
  the process's own in-memory LoginThrottle: a login is never refused
  because the directory is not what it should be.
"""

import errno
import fcntl
import hashlib
import logging
import os
import random
import stat
import struct
import time

from ..log import RateLimited
from .limits import (
    FINGERPRINTS,
    SPRAY_MEMORY,
    LoginThrottle,
    count_failure,
    forgotten,
    new_record,
    new_spray,
    spray_last,
    take_turn,
)

log = logging.getLogger("mpop3.server")
noisy = RateLimited(log)  # what a planted file can make us say

KEY_NAME = "throttle.key"
KEY_SIZE = 32
USER_PREFIX = "failed."  # + hex: a user's record, per address group
GROUP_PREFIX = "spray."  # + hex: an address group's spraying record
KEY_TEMP_PREFIX = ".throttle.key."  # a key being made (linked into place when whole)
SWEEP_ODDS = 100  # about one call in this many sweeps forgotten records away
SWEEP_SAMPLE = 256  # files looked at by one sweep, at most
CLOCK_SLACK = 5.0  # a failure later than now by more: the clock went back, forget it
LOCK_PATIENCE = 2.0  # seconds to wait for a record's lock before doing without it
MAX_RECORD = 4096

OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
USER_HEAD = struct.Struct("<2sIdd")  # b"F1", failures, last failure, next check; then the marks
GROUP_HEAD = struct.Struct("<2sd")  # b"S1", next check; then (user key, last failure) pairs
GROUP_ENTRY = struct.Struct("<16sd")
MARK_SIZE = 16


class Unusable(Exception):
    """A record's file that is not ours to use (already logged)."""


class FileLoginThrottle(LoginThrottle):
    """LoginThrottle's interface (reserve, failed, succeeded, user_key, mark,
    base, maximum), its records in files in `directory`. `key`: the hash
    key to use instead of the directory's (tests compute names with it).

    The directory's key is made by the first failure ever recorded there,
    not before: a session that only logs in writes nothing. Until the key
    exists there is no record to read, and a user key made meanwhile (with
    the process's own key) is remembered with its user, to be made anew
    with the directory's once it exists."""

    def __init__(self, directory, base, maximum, key=None):
        super().__init__(base, maximum)  # its tables: what we fall back on
        self.directory = directory
        self.wall = time.time  # records outlive processes (the fallback's clock stays monotonic)
        self.files = None  # True: self.key is the directory's; False: it cannot be had; None: none yet
        self.provisional = {}  # user key made with our own key -> the user
        if key is not None:
            self.key, self.files = key, True

    def use_files(self, make=False):
        """Whether the records are in files: the directory's key is ours,
        read now (or, if `make`, made) if need be."""
        if self.files is None:
            key = load_key(self.directory, make)
            if key is not None:
                self.key, self.files = key, bool(key)
        return self.files

    def user_key(self, user):
        files = self.use_files()
        key = super().user_key(user)
        if files is None:
            self.provisional[key] = user
        return key

    def mark(self, user, password):
        self.use_files(make=True)  # a failure: its record needs the key
        return super().mark(user, password)

    def directory_key(self, user_key):
        """`user_key` as made with the directory's key."""
        user = self.provisional.get(user_key)
        return user_key if user is None else super().user_key(user)

    def path(self, group, user_key=None):
        """The file of (group, user_key)'s record, or of the group's
        spraying record if user_key is None."""
        name = group.encode("utf-8", "surrogateescape")
        if user_key is None:
            h = hashlib.blake2b(name, key=self.key, digest_size=20, person=b"spray")
            return os.path.join(self.directory, GROUP_PREFIX + h.hexdigest())
        h = hashlib.blake2b(name + b"\0" + user_key, key=self.key, digest_size=20, person=b"failed")
        return os.path.join(self.directory, USER_PREFIX + h.hexdigest())

    def reserve(self, group, user_key):
        if not self.use_files():
            return super().reserve(group, user_key)
        self.maybe_sweep()
        now = self.wall()
        try:
            with (
                Record(self.path(group, self.directory_key(user_key)), USER) as user,
                Record(self.path(group), GROUP) as spray,
            ):
                record = user.load(now)
                spraying = spray.load(now)
                wait = take_turn(record, spraying, now, self.delay)
                user.store(record)
                spray.store(spraying)
                return wait
        except Unusable:
            return super().reserve(group, user_key)

    def failed(self, group, user_key, mark):
        if not self.use_files(make=True):
            return super().failed(group, user_key, mark)
        self.maybe_sweep()
        now = self.wall()
        user_key = self.directory_key(user_key)
        try:
            with (
                Record(self.path(group, user_key), USER, create=True) as user,
                Record(self.path(group), GROUP, create=True) as spray,
            ):
                record = user.load(now) or new_record(now)
                spraying = spray.load(now) or new_spray(now)
                answer = count_failure(record, spraying, user_key, mark, now, self.delay)
                user.store(record)
                spray.store(spraying)
                return answer
        except Unusable:
            return super().failed(group, user_key, mark)

    def succeeded(self, group, user_key):
        super().succeeded(group, user_key)
        if not self.use_files():
            return
        try:
            with Record(self.path(group, self.directory_key(user_key)), USER) as user:
                user.remove()
        except Unusable:
            pass

    def maybe_sweep(self):
        if random.randrange(SWEEP_ODDS) == 0:
            sweep(self.directory, self.wall())


class Kind:
    def __init__(self, encode, decode, last):
        self.encode, self.decode, self.last = encode, decode, last


def encode_user(record):
    failures, last, marks, next_check = record
    return USER_HEAD.pack(b"F1", failures, last, next_check) + b"".join(marks)


def decode_user(data):
    head, failures, last, next_check = USER_HEAD.unpack_from(data)
    marks = data[USER_HEAD.size :]
    if head != b"F1" or len(marks) % MARK_SIZE or len(marks) > FINGERPRINTS * MARK_SIZE:
        raise ValueError("not a user's record")
    return [failures, last, [marks[i : i + MARK_SIZE] for i in range(0, len(marks), MARK_SIZE)], next_check]


def encode_group(spray):
    users, next_check = spray
    return GROUP_HEAD.pack(b"S1", next_check) + b"".join(GROUP_ENTRY.pack(k, t) for k, t in users.items())


def decode_group(data):
    head, next_check = GROUP_HEAD.unpack_from(data)
    entries = data[GROUP_HEAD.size :]
    if head != b"S1" or len(entries) % GROUP_ENTRY.size or len(entries) > SPRAY_MEMORY * GROUP_ENTRY.size:
        raise ValueError("not an address's record")
    return [dict(GROUP_ENTRY.iter_unpack(entries)), next_check]


USER = Kind(encode_user, decode_user, lambda record: record[1])
GROUP = Kind(encode_group, decode_group, spray_last)


class Record:
    """A record's file, opened and locked for one read-modify-write; a
    record that does not exist (and need not be created) is None. Raises
    Unusable for what we may not use."""

    def __init__(self, path, kind, create=False):
        self.path = path
        self.kind = kind
        self.create = create
        self.fd = None

    def __enter__(self):
        flags = OPEN_FLAGS | (os.O_CREAT if self.create else 0)
        for _ in range(3):  # again if the file was removed while we waited for its lock
            try:
                fd = os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                return self
            except OSError as e:
                noisy.warning("throttle-open", "failed-login record %s: cannot open: %s", self.path, e.strerror)
                raise Unusable() from None
            try:
                ours(fd, self.path)
                lock(fd, self.path)
                if os.fstat(fd).st_nlink > 0:
                    self.fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        noisy.warning("throttle-lock", "failed-login record %s: keeps being replaced", self.path)
        raise Unusable()

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # which releases the lock
            self.fd = None

    def load(self, now):
        """The record, None if there is none or it is forgotten."""
        if self.fd is None:
            return None
        try:
            data = os.pread(self.fd, MAX_RECORD + 1, 0)
        except OSError as e:
            noisy.warning("throttle-read", "failed-login record %s: cannot read: %s", self.path, e.strerror)
            raise Unusable() from None
        if not data:
            return None  # just made
        try:
            if len(data) > MAX_RECORD:
                raise ValueError("too long")
            record = self.kind.decode(data)
        except (ValueError, struct.error):
            noisy.warning("throttle-garbled", "failed-login record %s: garbled, started afresh", self.path)
            return None
        last = self.kind.last(record)
        if forgotten(last, now) or last > now + CLOCK_SLACK:
            return None
        return record

    def store(self, record):
        """Write `record` back; a record that is None (nothing to remember)
        is removed."""
        if self.fd is None:
            return
        if record is None:
            self.remove()
            return
        data = self.kind.encode(record)
        try:
            os.pwrite(self.fd, data, 0)
            os.ftruncate(self.fd, len(data))
        except OSError as e:
            noisy.warning("throttle-write", "failed-login record %s: cannot write: %s", self.path, e.strerror)
            raise Unusable() from None

    def remove(self):
        """Remove the record (its lock held: whoever waits for it sees it gone)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            noisy.warning("throttle-remove", "failed-login record %s: cannot remove: %s", self.path, e.strerror)


def ours(fd, path):
    """Raise Unusable unless `fd` is a regular file of this process's user."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        noisy.warning("throttle-type", "failed-login record %s: not a regular file, left alone", path)
        raise Unusable()
    if st.st_uid != os.geteuid():
        noisy.warning("throttle-owner", "failed-login record %s: owned by uid %d, not us, left alone", path, st.st_uid)
        raise Unusable()


def lock(fd, path):
    """lockf, waiting at most LOCK_PATIENCE: records are held for a few
    microseconds, so a lock held longer is a stuck process, not a turn."""
    deadline = time.monotonic() + LOCK_PATIENCE
    pause = 0.001
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                noisy.warning("throttle-lock", "failed-login record %s: cannot lock: %s", path, e.strerror)
                raise Unusable() from None
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def load_key(directory, make=False):
    """The directory's hash key; None if there is none (and not `make`);
    b"" (logged) if it cannot be read or made. It is made whole under a name
    of its own (O_EXCL, mode 0600) and linked into place, so nobody reads
    half a key, and the first to link wins."""
    path = os.path.join(directory, KEY_NAME)
    try:
        try:
            return read_key(path)
        except FileNotFoundError:
            if not make:
                return None
            make_key(directory, path)
            return read_key(path)
    except (OSError, ValueError) as e:
        log.warning(
            "%s: cannot keep failed-login records in %s (%s): failures are remembered for this session only",
            path,
            directory,
            getattr(e, "strerror", None) or e,
        )
        return b""


def read_key(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise ValueError(f"not a regular file of uid {os.geteuid()} with mode 0600")
        key = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_SIZE:
        raise ValueError(f"{len(key)} bytes, not {KEY_SIZE}")
    return key


def make_key(directory, path):
    temp = os.path.join(directory, f"{KEY_TEMP_PREFIX}{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, os.urandom(KEY_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            pass  # another session made it first: theirs it is
    finally:
        os.unlink(temp)


def sweep(directory, now):
    """Remove forgotten records: a sample of at most SWEEP_SAMPLE of our
    files, so the work is bounded however many there are. A file last
    written more than FAILURE_MEMORY ago holds no failure younger than that."""
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.name.startswith((USER_PREFIX, GROUP_PREFIX, KEY_TEMP_PREFIX))]
    except OSError as e:
        noisy.warning("throttle-sweep", "%s: cannot list failed-login records: %s", directory, e.strerror)
        return
    for name in random.sample(names, min(len(names), SWEEP_SAMPLE)):
        path = os.path.join(directory, name)
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or not forgotten(st.st_mtime, now):
            continue
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: not forgotten
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and forgotten(st.st_mtime, now):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)
