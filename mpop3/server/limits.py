"""Protection against abuse: session counts, failed-login delays,
LOGIN-DELAY, and the check that keeps a module's mailbox name away from
path tricks. Every process model uses these same classes; where a model
has several processes, the ones that must see every session live in the
parent (mpop3/server/supervisor.py)."""

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict

from ..protocol import replies

log = logging.getLogger("mpop3.server")

# A client address is forgotten this long after its last failed login.
FAILURE_MEMORY = 900.0
# At most this many addresses are remembered (the oldest go first), so a
# botnet cannot make the table grow without bound.
MAX_ADDRESSES = 20000
# Distinct wrong passwords remembered per address (to spot a repeat).
FINGERPRINTS_PER_ADDRESS = 8


class Admission:
    """max_sessions and max_sessions_per_ip: whether a session may start.

    `tally`, if given, counts the sessions of every server process
    (prefork.SessionTally) for max_sessions; per address, the sessions
    counted are this object's."""

    def __init__(self, max_sessions, max_per_address, tally=None):
        self.max_sessions = max_sessions
        self.max_per_address = max_per_address
        self.tally = tally
        self.sessions = 0
        self.per_address = {}

    def admit(self, address):
        """None, having counted the session in; or the reply that refuses it."""
        open_now = self.sessions if self.tally is None else self.tally.total()
        if open_now >= self.max_sessions:
            log.warning("%s: refused, %d sessions already", address, open_now)
            return replies.ERR_TOO_MANY_SESSIONS
        count = self.per_address.get(address, 0)
        if count >= self.max_per_address:
            log.warning("%s: refused, %d sessions from there already", address, count)
            return replies.ERR_TOO_MANY_FROM_YOU
        self.per_address[address] = count + 1
        self.count(+1)
        return None

    def release(self, address):
        self.count(-1)
        count = self.per_address.get(address, 1) - 1
        if count > 0:
            self.per_address[address] = count
        else:
            self.per_address.pop(address, None)

    def count(self, change):
        self.sessions += change
        if self.tally is not None:
            self.tally.set(self.sessions)


class LoginThrottle:
    """Delays for failed logins, per client address.

    Each distinct failure from an address doubles the delay, from `base` up
    to `maximum`. A failure repeating one of the address's recent wrong
    (user, password) pairs is a misconfigured client retrying, not someone
    guessing: it is delayed at the current level, which does not grow.
    """

    def __init__(self, base, maximum, clock=time.monotonic):
        self.base = base
        self.maximum = maximum
        self.clock = clock
        self.key = os.urandom(16)  # fingerprints are keyed: no password is kept
        self.addresses = OrderedDict()  # address -> [failures, last time, fingerprints]
        self.lock = threading.Lock()  # logins are checked in worker threads

    def fingerprint(self, user, password):
        h = hashlib.blake2b(key=self.key, digest_size=16)
        h.update(user)
        h.update(b"\0")
        h.update(password)
        return h.digest()

    def failed(self, address, user, password):
        """Record a failed login; returns the seconds to wait before answering."""
        return self.failed_mark(address, self.fingerprint(user, password))

    def failed_mark(self, address, mark):
        """failed(), given the fingerprint of the (user, password) pair."""
        now = self.clock()
        with self.lock:
            entry = self.addresses.pop(address, None)
            if entry is None or now - entry[1] > FAILURE_MEMORY:
                entry = [0, now, []]
            if mark not in entry[2]:
                entry[0] += 1
                entry[2].append(mark)
                del entry[2][:-FINGERPRINTS_PER_ADDRESS]
            entry[1] = now
            self.addresses[address] = entry
            while len(self.addresses) > MAX_ADDRESSES:
                self.addresses.popitem(last=False)
        return self.delay(entry[0])

    def delay(self, failures):
        if failures <= 0:
            return 0.0
        return min(self.maximum, self.base * 2 ** min(failures - 1, 32))

    def succeeded(self, address):
        with self.lock:
            self.addresses.pop(address, None)


class LoginDelayClock:
    """The core's LOGIN-DELAY (RFC 2449): the last login time per mailbox."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.last = {}
        self.lock = threading.Lock()

    def wait_needed(self, mailbox, delay):
        """Seconds still to wait before `mailbox` may log in again."""
        before = self.last.get(mailbox)
        if delay <= 0 or before is None:
            return 0
        return max(0, delay - (self.clock() - before))

    def logged_in(self, mailbox, delay):
        """Record a login that succeeded (only those count)."""
        if delay <= 0:
            return
        now = self.clock()
        with self.lock:
            self.last[mailbox] = now
            if len(self.last) > MAX_ADDRESSES:  # forget logins older than the delay
                self.last = {m: t for m, t in self.last.items() if now - t < delay}


class FileLoginClock:
    """LOGIN-DELAY where no process outlives a session (stdin mode, started
    by inetd): the last login to a mailbox is the modification time of a
    file in `directory` named by a hash of the mailbox (no names on disk,
    none too long). A clock that cannot be read or written is logged and
    lets logins through."""

    def __init__(self, directory):
        self.directory = directory

    def path(self, mailbox):
        digest = hashlib.sha256(mailbox.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.directory, "login." + digest)

    def wait_needed(self, mailbox, delay):
        if delay <= 0:
            return 0
        try:
            before = os.stat(self.path(mailbox), follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("LOGIN-DELAY: cannot read %s: %s", self.path(mailbox), e.strerror)
            return 0
        return max(0, delay - (time.time() - before))

    def logged_in(self, mailbox, delay):
        if delay <= 0:
            return
        path = self.path(mailbox)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
            try:
                os.utime(fd)
            finally:
                os.close(fd)
        except OSError as e:
            log.warning("LOGIN-DELAY: cannot record a login in %s: %s", path, e.strerror)


def valid_mailbox_name(name):
    """Whether a mailbox name from a module is safe to become a file name:
    not empty, no "/", no "..", no leading ".", no NUL or control characters."""
    if not isinstance(name, str) or not name or len(name) > 255:
        return False
    if "/" in name or ".." in name or name.startswith("."):
        return False
    return all(ord(c) >= 32 and ord(c) != 127 for c in name)
