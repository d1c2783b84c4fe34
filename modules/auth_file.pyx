"""auth_file: users and passwords from a file.

Each line is `user:password[:mailbox]`; `#` starts a comment line. The
password is plaintext (optionally written `{PLAIN}secret`) or a crypt(3)
hash (`$y$...`, `$6$...`, `$2b$...`, optionally `{CRYPT}$6$...`). APOP and
CRAM-MD5 work for plaintext entries only. The mailbox defaults to the user
name. The file is re-read when it changes; a malformed line is logged with
its line number and skipped.
"""

include "mpop3_module.pxi"

import hmac
import logging
import os
import re

from mpop3.passwords import crypt_matches

MPOP3_MODULE_CLASS = "auth"
MPOP3_SETTINGS = {
    "passwd_file": "the password file (default /etc/mpop3/passwd)",
}

log = logging.getLogger("mpop3.auth")

HASH = re.compile(r"^\$(y|gy|7|2[abxy]|6|5|1|sha1|md5)\$")
# What an unknown user's password is checked against, so that a miss costs
# about what a hit costs (no user enumeration by timing).
DUMMY_PLAIN = "\0no such user\0"


class Entry:
    __slots__ = ("secret", "hashed", "mailbox")

    def __init__(self, secret, hashed, mailbox):
        self.secret = secret
        self.hashed = hashed
        self.mailbox = mailbox


class PasswordFile:
    def __init__(self, path):
        self.path = path
        self.stamp = None  # (inode, mtime, size) of the version we read
        self.entries = {}
        self.dummy_hash = None  # a hash from the file (bytes), for unknown users

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
        dummy = None
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
            user, value = entry
            if user in entries:
                log.warning("%s:%d: user %r listed again; line ignored", self.path, number, user)
                continue
            entries[user] = value
            if value.hashed and dummy is None:
                dummy = value.secret.encode("utf-8", "surrogateescape")
        self.entries = entries
        self.dummy_hash = dummy


def parse_line(line):
    """(user, Entry), or a string saying what is wrong with the line."""
    parts = line.split(":")
    if len(parts) not in (2, 3):
        return "expected user:password[:mailbox]"
    user, secret = parts[0], parts[1]
    mailbox = parts[2] if len(parts) == 3 else user
    if not user or user != user.strip():
        return "empty user name or spaces around it"
    if not secret:
        return "empty password"
    if not mailbox:
        return "empty mailbox name"
    if secret.startswith("{PLAIN}"):
        return user, Entry(secret[7:], False, mailbox)
    if secret.startswith("{CRYPT}"):
        secret = secret[7:]
        if not HASH.match(secret):
            return "{CRYPT} must be followed by a crypt(3) hash"
    return user, Entry(secret, bool(HASH.match(secret)), mailbox)


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
    if entry is None or entry.hashed:
        return None
    return entry.secret


def auth_login(user):
    entry = lookup(user)
    return None if entry is None else entry.mailbox


def auth_attempt_login(user, password):
    """USER/PASS. Runs in a worker thread (crypt() may take tens of ms).

    Every failure costs one crypt() call whether the user is unknown, has a
    plaintext password or a hash, so the time a wrong password takes does
    not tell who exists (no user enumeration)."""
    entry = lookup(user)
    given = password.encode("utf-8", "surrogateescape")
    if entry is not None and entry.hashed:
        stored = entry.secret.encode("utf-8", "surrogateescape")
        return entry.mailbox if crypt_matches(given, stored) else None
    if entry is not None and hmac.compare_digest(entry.secret.encode("utf-8", "surrogateescape"), given):
        return entry.mailbox
    # an unknown user, or a wrong plaintext password: spend a hash's worth too
    crypt_matches(given, None, passwords.dummy_hash)
    hmac.compare_digest(DUMMY_PLAIN.encode(), given)
    return None
