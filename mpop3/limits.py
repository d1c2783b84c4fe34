"""Protection against abuse: connection counts, failed-login delays, and
the checks that keep a module's mailbox name away from path tricks."""

import hashlib
import os
import time
from collections import OrderedDict

# A client address is forgotten this long after its last failed login.
FAILURE_MEMORY = 900.0
# At most this many addresses are remembered (the oldest go first), so a
# botnet cannot make the table grow without bound.
MAX_ADDRESSES = 20000
# Distinct wrong passwords remembered per address (to spot a repeat).
FINGERPRINTS_PER_ADDRESS = 8


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
        self.addresses.pop(address, None)


class LoginDelayClock:
    """The core's LOGIN-DELAY (RFC 2449): the last login time per mailbox."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.last = {}

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
        self.last[mailbox] = now
        if len(self.last) > MAX_ADDRESSES:  # forget logins older than the delay
            self.last = {m: t for m, t in self.last.items() if now - t < delay}


def valid_mailbox_name(name):
    """Whether a mailbox name from a module is safe to become a file name:
    not empty, no "/", no "..", no leading ".", no NUL or control characters."""
    if not isinstance(name, str) or not name or len(name) > 255:
        return False
    if "/" in name or ".." in name or name.startswith("."):
        return False
    return all(ord(c) >= 32 and ord(c) != 127 for c in name)
