"""Protection against abuse: session counts, failed-login delays,
LOGIN-DELAY, and the check that keeps a module's mailbox name away from
path tricks. Every process model uses these same classes; where a model
has several processes, the ones that must see every session live in the
parent (mpop3/server/supervisor.py)."""

import functools
import hashlib
import ipaddress
import logging
import os
import threading
import time
from collections import OrderedDict

from ..protocol import replies

log = logging.getLogger("mpop3.server")

# A client's failures are forgotten this long after the last one.
FAILURE_MEMORY = 900.0
# At most this many (address, user) records and addresses are remembered
# (the oldest go first), so a botnet cannot make the tables grow without bound.
MAX_RECORDS = 20000
# Distinct wrong passwords remembered per (address, user), to spot a repeat.
FINGERPRINTS = 8
# Users with failures from one address before the address itself is slowed
# down (password spraying: a few passwords tried on many users).
SPRAY_USERS = 3
SPRAY_MEMORY = 64  # failing users remembered per address


@functools.lru_cache(maxsize=8192)
def address_group(address, ipv6_prefix=64):
    """The key per-address limits count under: an IPv4 address as it is,
    an IPv6 address as its /ipv6_prefix network (a site gets a /64 or more,
    so one client could otherwise use as many addresses as it likes), an
    IPv4-mapped IPv6 address as the IPv4 address; anything else (a pipe's
    "stdin", a UNIX socket) as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)


class Admission:
    """max_sessions and max_sessions_per_ip: whether a session may start.

    `counts`, if given, are the sessions of every process that admits
    clients (shared_counts.SharedCounts): ours are written in our column,
    and the limits are judged on all columns, unless `judge_shared` is
    false (the split model's master, whose sessions were admitted once
    already, by a login process)."""

    def __init__(self, max_sessions, max_per_address, counts=None, ipv6_prefix=64, judge_shared=True):
        self.max_sessions = max_sessions
        self.max_per_address = max_per_address
        self.counts = counts
        self.judge_shared = judge_shared and counts is not None
        self.ipv6_prefix = ipv6_prefix
        self.sessions = 0
        self.per_address = {}  # address group -> sessions

    def admit(self, address):
        """None, having counted the session in; or the reply that refuses it."""
        shared = self.counts if self.judge_shared else None
        open_now = self.sessions if shared is None else shared.total()
        if open_now >= self.max_sessions:
            log.warning("%s: refused, %d sessions already", address, open_now)
            return replies.ERR_TOO_MANY_SESSIONS
        group = address_group(address, self.ipv6_prefix)
        count = self.per_address.get(group, 0)
        from_group = count if shared is None else shared.at(group)
        if from_group >= self.max_per_address:
            log.warning("%s: refused, %d sessions from %s already", address, from_group, group)
            return replies.ERR_TOO_MANY_FROM_YOU
        self.per_address[group] = count + 1
        self.sessions += 1
        if self.counts is not None:
            self.counts.add(group, +1)
        return None

    def release(self, address):
        self.sessions -= 1
        group = address_group(address, self.ipv6_prefix)
        count = self.per_address.get(group, 1) - 1
        if count > 0:
            self.per_address[group] = count
        else:
            self.per_address.pop(group, None)
        if self.counts is not None:
            self.counts.add(group, -1)


class LoginThrottle:
    """Failed-login delays, per (client address group, user).

    A failure makes that user's later attempts from that address wait: each
    distinct wrong password doubles the delay, from `base` up to `maximum`
    (a repeat of a recent wrong password is a misconfigured client retrying,
    not someone guessing: no growth). The wait comes before the password is
    checked, right password or wrong (reserve), so closing the connection
    early gains a guesser nothing; the failure's own answer waits as long.
    One user's failures do not slow another user down, but failures for more
    than SPRAY_USERS users from one address slow the whole address down, one
    attempt at a time. A success clears that user's record only.

    Users and passwords are known by keyed hashes (user_key, mark), so the
    tables hold no names or secrets, and a parent process can keep them for
    its children (mpop3/server/supervisor.py).
    """

    def __init__(self, base, maximum, clock=time.monotonic):
        self.base = base
        self.maximum = maximum
        self.clock = clock
        self.key = os.urandom(16)
        self.users = OrderedDict()  # (group, user key) -> [failures, last, fingerprints, next check]
        self.groups = OrderedDict()  # group -> [{user key: last failure}, next check]
        self.lock = threading.Lock()  # logins are checked in worker threads

    def user_key(self, user):
        """The user's key: case does not make another user (name services
        that fold case would let `Bob` and `bob` guess twice as fast)."""
        folded = user.decode("utf-8", "surrogateescape").casefold().encode("utf-8", "surrogateescape")
        return hashlib.blake2b(folded, key=self.key, digest_size=16, person=b"user").digest()

    def mark(self, user, password):
        """The fingerprint of a (user, password) pair, to spot a repeat."""
        h = hashlib.blake2b(key=self.key, digest_size=16, person=b"password")
        h.update(user)
        h.update(b"\0")
        h.update(password)
        return h.digest()

    def delay(self, failures):
        return failure_delay(failures, self.base, self.maximum)

    def reserve(self, group, user_key):
        """Seconds this attempt must wait before its password is checked.
        The time is taken, so attempts for one user (or, when spraying, one
        address) are checked one delay apart however many arrive at once."""
        now = self.clock()
        with self.lock:
            record = self.live(self.users, (group, user_key), now)
            spray = self.live(self.groups, group, now)
            return take_turn(record, spray, now, self.delay)

    def failed(self, group, user_key, mark):
        """Record a failed login; the seconds to wait before answering it."""
        now = self.clock()
        with self.lock:
            record = self.live(self.users, (group, user_key), now, pop=True) or new_record(now)
            spray = self.live(self.groups, group, now, pop=True) or new_spray(now)
            answer = count_failure(record, spray, user_key, mark, now, self.delay)
            self.remember(self.users, (group, user_key), record)
            self.remember(self.groups, group, spray)
            return answer

    def succeeded(self, group, user_key):
        with self.lock:
            self.users.pop((group, user_key), None)

    def spray_delay(self, spray):
        return spray_delay(spray, self.delay)

    def live(self, table, key, now, pop=False):
        """table[key] unless forgotten: quiet for FAILURE_MEMORY."""
        entry = table.pop(key, None) if pop else table.get(key)
        if entry is None:
            return None
        last = entry[1] if table is self.users else spray_last(entry)
        if forgotten(last, now):
            table.pop(key, None)
            return None
        return entry

    def remember(self, table, key, entry):
        table[key] = entry  # the newest last: the oldest are forgotten first
        while len(table) > MAX_RECORDS:
            table.popitem(last=False)


# The throttle's arithmetic, on its two kinds of record, wherever they are
# kept (LoginThrottle's tables, or files: mpop3/server/file_throttle.py):
# - a user's record, per (address group, user key): [failures, last failure,
#   fingerprints of the distinct wrong passwords, next check];
# - an address group's spraying record: [{user key: last failure}, next check].
# `delay` is failures -> seconds (LoginThrottle.delay).


def failure_delay(failures, base, maximum):
    """The delay after `failures` distinct wrong passwords: base, doubling, up to maximum."""
    if failures <= 0:
        return 0.0
    return min(maximum, base * 2 ** min(failures - 1, 32))


def new_record(now):
    return [0, now, [], now]


def new_spray(now):
    return [{}, now]


def spray_last(spray):
    """When the group's last remembered failure was."""
    return max(spray[0].values(), default=0)


def forgotten(last, now):
    """Whether failures last seen at `last` are forgotten by `now`."""
    return now - last > FAILURE_MEMORY


def spray_delay(spray, delay):
    return 0.0 if spray is None else delay(len(spray[0]) - SPRAY_USERS)


def take_turn(record, spray, now, delay):
    """reserve(): the seconds to wait before this attempt's check, taking
    that time from the user's record and the group's spraying record
    (either may be None: nothing remembered)."""
    start = now
    if record is not None and record[0]:
        start = max(start, record[3])
        record[3] = start + delay(record[0])
    spraying = spray_delay(spray, delay)
    if spraying:
        start = max(start, spray[1])
        spray[1] = start + spraying
    return start - now


def count_failure(record, spray, user_key, mark, now, delay):
    """failed(): count a failure into both records; the seconds to wait
    before answering it."""
    if mark not in record[2]:
        record[0] += 1
        record[2].append(mark)
        del record[2][:-FINGERPRINTS]
    record[1] = now
    record[3] = max(record[3], now + delay(record[0]))
    spray[0].pop(user_key, None)
    spray[0][user_key] = now
    while len(spray[0]) > SPRAY_MEMORY:
        del spray[0][next(iter(spray[0]))]
    spraying = spray_delay(spray, delay)
    spray[1] = max(spray[1], now + spraying)
    return max(delay(record[0]), spraying)


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
            if len(self.last) > MAX_RECORDS:  # forget logins older than the delay
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
