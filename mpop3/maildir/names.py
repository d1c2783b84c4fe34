"""What a Maildir file name says, and a file's size as RETR sends it.

A delivered name is `TIME.UNIQUE.HOST[,S=n][,W=n][:2,FLAGS]`: TIME the
delivery's seconds, UNIQUE made of parts such as `M<usec>`, `P<pid>`,
`Q<count>` (Dovecot, qmail, postfix) or `<pid>_<count>` (procmail); the
base, up to `:`, never changes once delivered (flags change after it).
"""

import hashlib
import re

# seconds, then in the unique part microseconds (M) and a delivery counter (Q or _)
_TIME = re.compile(r"(\d{1,18})\.([^.]*)")
_USEC = re.compile(r"M(\d{1,6})")
_SEQ = re.compile(r"(?:Q|_)(\d{1,12})")
_W = re.compile(r",W=(\d{1,15})(?:,|$)")
_PLAIN = re.compile(r"[\x21-\x7e]{1,70}").fullmatch
LAST = 1 << 62  # names that carry no time sort after the others


def delivery_key(name):
    """Sort key: (seconds, microseconds, counter, name). Names without a
    time come last, by name."""
    m = _TIME.match(name)
    if m is None:
        return (LAST, 0, 0, name)
    unique = m.group(2)
    usec = _USEC.search(unique)
    seq = _SEQ.search(unique)
    return (int(m.group(1)), int(usec.group(1)) if usec else 0, int(seq.group(1)) if seq else 0, name)


def base_of(name):
    """The name without its `:2,FLAGS` info: what stays when flags change."""
    i = name.find(":")
    return name if i < 0 else name[:i]


def size_in_name(base):
    """The `,W=` (RFC 822, CRLF) size an MDA put in the name, or None."""
    m = _W.search(base)
    return int(m.group(1)) if m else None


def filename_uidl(base):
    """The base name (qmail-pop3d's UIDL), or where that is longer than 70
    characters or has any outside 0x21-0x7E, its 40-character digest."""
    if _PLAIN(base):
        return base
    return hashlib.blake2b(base.encode("utf-8", "surrogateescape"), digest_size=20).hexdigest()


def odd_name(name):
    """Names skipped with a log line: control characters, bytes that are not
    UTF-8, and names no MDA makes (a dot file is never a message)."""
    return name.startswith(".") or any(c < " " or c == "\x7f" or "\udc80" <= c <= "\udcff" for c in name)


class SizeCounter:
    """The size RETR sends for bytes fed in pieces: every line end CRLF, and
    a final line without one gets one (as the kernel's DotWriter does)."""

    __slots__ = ("total", "bare_lf", "last")

    def __init__(self):
        self.total = 0
        self.bare_lf = 0
        self.last = 0x0A  # as if after a line end: an empty file is empty

    def feed(self, data):
        if not data:
            return
        lf = data.count(b"\n")
        crlf = data.count(b"\r\n")
        if data[0] == 0x0A and self.last == 0x0D:
            crlf += 1  # a CRLF split between two pieces
        self.bare_lf += lf - crlf
        self.total += len(data)
        self.last = data[-1]

    def result(self):
        return self.total + self.bare_lf + (0 if self.last == 0x0A else 2)
