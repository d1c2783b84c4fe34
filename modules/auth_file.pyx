"""auth_file: users and passwords from a file.

Each line is `user:password[:mailbox]`; `#` starts a comment line. The
mailbox defaults to the user name. The file is re-read when it changes.

The password field is read as:
- `{PLAIN}secret`: the plaintext password `secret`;
- `{CRYPT}hash`: a crypt(3) hash;
- unmarked, a crypt(3) hash if it looks like one: it starts with `$` (the
  modular format: `$y$`, `$6$`, `$2b$`, `$argon2id$`, `$md5,rounds=`, ...),
  or is 13 characters of `./0-9A-Za-z` (DES) or `_` and 19 (BSDI);
  otherwise a plaintext password;
- `!` or `*` alone, or in front of a hash: a locked account, as in shadow(5).
Hashes are checked by libcrypt, which knows more methods than a list of
prefixes would. An entry nobody can log in with (an empty password, a hash
libcrypt cannot check, a lock) is locked: it never logs in, and it is
logged with its line number at every (re)load, hence shown by
`mpop3 --check-config`. So is an unmarked DES hash, since a plaintext
password could look the same. A malformed line is logged with its line
number and skipped.

APOP and CRAM-MD5 work for plaintext entries only. An empty password never
logs in. Every login attempt costs the same whoever the user is (see
mpop3.passwords.HashCosts), so timing does not tell which users exist.
"""

include "mpop3_module.pxi"

import hmac
import logging
import os
import re

from mpop3.passwords import HashCosts, hash_problem

MPOP3_MODULE_CLASS = "auth"
MPOP3_SETTINGS = {
    "passwd_file": "the password file (default /etc/mpop3/passwd)",
}

log = logging.getLogger("mpop3.auth")

# Unmarked fields taken as hashes: a plaintext password shaped like these
# must be written {PLAIN}...; taking a hash for a password would let the
# hash itself log in.
DES_OR_BSDI = re.compile(r"[./0-9A-Za-z]{13}|_[./0-9A-Za-z]{19}")
# What an unknown user's password is compared with, as a plaintext one's is
DUMMY_PLAIN = "\0no such user\0".encode()

PLAIN, HASH, LOCKED = "plain", "hash", "locked"


class Entry:
    __slots__ = ("kind", "secret", "mailbox")

    def __init__(self, kind, secret, mailbox):
        self.kind = kind  # PLAIN, HASH or LOCKED
        self.secret = secret  # bytes: the password (PLAIN) or the hash (HASH); None if LOCKED
        self.mailbox = mailbox


class PasswordFile:
    def __init__(self, path):
        self.path = path
        self.stamp = None  # (inode, mtime, size) of the version we read
        self.entries = {}
        self.costs = HashCosts()  # the hashes' cost classes: what every attempt costs

    def refresh(self):
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self.stamp != "missing":
                log.warning("passwd_file %s: %s; nobody can log in", self.path, e.strerror)
            self.stamp, self.entries = "missing", {}
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self.stamp:
            self.load()
            self.stamp = stamp

    def load(self):
        entries = {}
        try:
            with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
                lines = f.read().splitlines()
        except OSError as e:
            log.warning("passwd_file %s: %s; nobody can log in", self.path, e.strerror)
            self.entries = {}
            return
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            entry = parse_line(line)
            if isinstance(entry, str):
                log.warning("%s:%d: %s; line ignored", self.path, number, entry)
                continue
            user, value, note = entry
            if user in entries:
                log.warning("%s:%d: user %r listed again; line ignored", self.path, number, user)
                continue
            if note is not None:
                log.warning("%s:%d: user %r: %s", self.path, number, user, note)
            entries[user] = value
        hashes = [entry.secret for entry in entries.values() if entry.kind is HASH]
        self.costs = HashCosts(hashes, reuse=self.costs)
        if self.costs.cost_note():
            log.info("%s: %s", self.path, self.costs.cost_note())
        self.entries = entries


def parse_line(line):
    """(user, Entry, note), where a note says why the entry is locked or
    how it was read; or a string saying what is wrong with the line."""
    parts = line.split(":")
    if len(parts) not in (2, 3):
        return "expected user:password[:mailbox]"
    user, field = parts[0], parts[1]
    mailbox = parts[2] if len(parts) == 3 else user
    if not user or user != user.strip():
        return "empty user name or spaces around it"
    if not mailbox:
        return "empty mailbox name"
    kind, secret, note = read_password(field)
    return user, Entry(kind, secret, mailbox), note


def read_password(field):
    """(kind, secret as bytes or None, note or None) for a password field."""
    if field.startswith("{PLAIN}"):
        field = field[7:]
        if not field:
            return locked("empty password")
        return PLAIN, field.encode("utf-8", "surrogateescape"), None
    if field.startswith("{CRYPT}"):
        return read_hash(field[7:], marked=True)
    if not field:
        return locked("empty password")
    unlocked = field.lstrip("!*")
    if unlocked != field and (not unlocked or looks_hashed(unlocked)):
        return locked("locked (a ! or * in front, as in shadow(5))")
    if looks_hashed(field):
        return read_hash(field, marked=False)
    return PLAIN, field.encode("utf-8", "surrogateescape"), None


def looks_hashed(field):
    return field.startswith("$") or DES_OR_BSDI.fullmatch(field) is not None


def read_hash(text, marked):
    stored = text.encode("utf-8", "surrogateescape")
    problem = hash_problem(stored) if stored else "{CRYPT} must be followed by a crypt(3) hash"
    if problem is not None:
        return locked(problem, "" if marked else " (if it is a plaintext password, write {PLAIN} in front of it)")
    if not marked and not text.startswith("$"):
        return HASH, stored, (
            "taken as a DES crypt(3) hash (weak: 8 characters count); write {PLAIN} in front of it "
            "if it is a plaintext password, {CRYPT} to say it is a hash"
        )
    return HASH, stored, None


def locked(why, hint=""):
    return LOCKED, None, f"{why}: nobody can log in as this user{hint}"


cdef object passwords = PasswordFile("/etc/mpop3/passwd")


def module_init(settings):
    global passwords
    passwords = PasswordFile(settings.get("passwd_file", "/etc/mpop3/passwd"))
    passwords.refresh()


def lookup(user):
    passwords.refresh()
    return passwords.entries.get(user)


def auth_password(user):
    entry = lookup(user)
    if entry is None or entry.kind is not PLAIN:
        return None
    return entry.secret.decode("utf-8", "surrogateescape")


def auth_login(user):
    entry = lookup(user)
    return None if entry is None or entry.kind is LOCKED else entry.mailbox


def auth_attempt_login(user, password):
    """USER/PASS (and AUTH PLAIN, LOGIN). Runs in a worker thread (crypt()
    may take tens of ms).

    Every attempt costs the same whether the user is unknown, locked, has a
    plaintext password or a hash of any method: one hash per cost class in
    the file (HashCosts), so the time it takes does not tell who exists."""
    entry = lookup(user)
    costs = passwords.costs
    given = password.encode("utf-8", "surrogateescape")
    if entry is None or entry.kind is LOCKED or not given:  # an empty password never logs in
        costs.check(given)
        hmac.compare_digest(DUMMY_PLAIN, given)
        return None
    if entry.kind is HASH:
        return entry.mailbox if costs.check(given, entry.secret) else None
    matched = hmac.compare_digest(entry.secret, given)
    costs.check(given)
    return entry.mailbox if matched else None
