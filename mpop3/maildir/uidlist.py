"""Dovecot's dovecot-uidlist, read only, for `uidl_format dovecot`.

Dovecot keeps in each Maildir a file mapping IMAP UIDs to file names
(https://doc.dovecot.org/2.3/admin_manual/mailbox_formats/maildir/):

    version 3:  3 V<uidvalidity> N<next uid> G<guid> ...    (the header)
                <uid> [<key><value> ...] :<file name>       (a message)
    version 1:  1 <uidvalidity> <next uid>
                <uid> <file name>

A message's fields may include P<pop3 uidl> (a UIDL saved by a migration,
which Dovecot then answers instead of its format). Dovecot 2.3's default
pop3_uidl_format is %08Xu%08Xv: the UID and the UIDVALIDITY, each as eight
hex digits, which Dovecot 2.3 writes in lower case despite the X (checked
against a running Dovecot 2.3.19, tests/test_storage_maildir.py). File names are matched by their base (up to `:`),
since flags change after it.
"""

import logging
import os
import stat

from .names import base_of

log = logging.getLogger("mpop3.storage")

NAME = "dovecot-uidlist"
MAX_BYTES = 256 * 1024 * 1024


class Uidlist:
    def __init__(self, uidvalidity, records):
        self.uidvalidity = uidvalidity
        self.records = records  # base name -> (uid, saved pop3 uidl or None)

    def lookup(self, base):
        """(uid, UIDL) of a file's base name, or None if Dovecot never saw it."""
        rec = self.records.get(base)
        if rec is None:
            return None
        uid, saved = rec
        return uid, saved or f"{uid:08x}{self.uidvalidity:08x}"


def parse(text, where=NAME):
    """A Uidlist from the file's text; ValueError if it is not one."""
    lines = text.split("\n")
    head = lines[0].split()
    if not head:
        raise ValueError(f"{where}: empty")
    records = {}
    if head[0] == "1":
        if len(head) < 3:
            raise ValueError(f"{where}: short version 1 header")
        uidvalidity = int(head[1])
        for line in lines[1:]:
            if not line:
                continue
            uid, _, name = line.partition(" ")
            records[base_of(name)] = (int(uid), None)
    elif head[0] == "3":
        fields = {f[0]: f[1:] for f in head[1:] if f}
        if "V" not in fields:
            raise ValueError(f"{where}: no UIDVALIDITY in the header")
        uidvalidity = int(fields["V"])
        for line in lines[1:]:
            if not line:
                continue
            before, sep, name = line.partition(" :")
            if not sep:
                raise ValueError(f"{where}: a line without ' :': {line[:80]!r}")
            words = before.split(" ")
            saved = None
            for w in words[1:]:
                if w[:1] == "P" and len(w) > 1:
                    saved = w[1:]
            records[base_of(name)] = (int(words[0]), saved)
    else:
        raise ValueError(f"{where}: version {head[0]!r} is not 1 or 3")
    return Uidlist(uidvalidity, records)


def read(root_fd, maildir):
    """The Maildir's uidlist, or None (logged) if missing or unusable."""
    try:
        fd = os.open(NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        log.warning("%s: no %s: UIDLs from file names (uidl_format dovecot)", maildir, NAME)
        return None
    except OSError as e:
        log.error("%s/%s: %s; UIDLs from file names", maildir, NAME, e.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            log.error("%s/%s: not a regular file of sane size; UIDLs from file names", maildir, NAME)
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return parse(b"".join(chunks).decode("utf-8", "surrogateescape"), f"{maildir}/{NAME}")
    except (OSError, ValueError) as e:
        log.error("%s: %s; UIDLs from file names", maildir, e)
        return None
    finally:
        os.close(fd)
