"""Spools for the tests: mbox(), the one builder of mbox files, and the
generators built on it; for the tests/test_mbox_*.py files also the
storage_mbox module with test settings and the reference's view of a spool."""

import glob
import os
import random

from mpop3.loader import import_module_file
from mpop3.mbox import kernels_reference as mbox_reference

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_PATH = glob.glob(os.path.join(TREE, "modules", "storage_mbox.*.so"))[0]


def storage(spool_dir, **extra):
    """storage_mbox, initialised as the config would: storage_dir plus extra."""
    module = import_module_file(MODULE_PATH, "tests")
    module.module_init({"storage_dir": str(spool_dir), "mbox_lock_timeout": "5", **extra})
    return module


def mbox(*messages, sender="MAILER-DAEMON", date="Thu Nov 19 10:00:00 2026", finish_last=True):
    """An mbox file: each message (bytes: header, blank line, body; LF or
    CRLF lines) after a From_ line, given the newline it may lack and a
    blank line after it. finish_last=False leaves the last message as it
    is, with nothing after it: a spool whose last line has no newline, or
    one record as an MDA is handed it. Body lines starting with "From "
    must already be quoted by the caller."""
    out = []
    for i, m in enumerate(messages):
        out.append(b"From %s %s\n" % (sender.encode(), date.encode()))
        out.append(m)
        if finish_last or i < len(messages) - 1:
            out.append(b"\n" if m.endswith(b"\n") else b"\n\n")
    return b"".join(out)


def message(n, body_lines=3, sender="sender@example.org"):
    """Message number n as an mbox record: From_ line, a few headers, a body, the separator."""
    body = b"".join(b"line %d of message %d\n" % (k, n) for k in range(body_lines))
    head = b"Subject: message %d\nMessage-ID: <%d@example.org>\n\n" % (n, n)
    return mbox(head + body, sender=sender, date=f"Thu Nov 19 10:00:{n % 60:02d} 2026")


def spool_of(count, start=0, body_lines=3):
    """Messages start, start + 1, ... as a spool of `count` records."""
    return b"".join(message(n, body_lines) for n in range(start, start + count))


PIECES = [
    b"From a@b Mon Nov 16 10:00:00 2026\n",
    b"From x\r\n",
    b"\n",
    b"\r\n",
    b".\n",
    b"..x\n",
    b".\r\n",
    b"From in body\n",
    b">From quoted\n",
    b"a\rb\n",
    b"\r",
    b"\0\0\n",
    b"Subject: hi\n",
    b"X: y\r\n",
    b"body text\n",
    b"F",
    b"Fro",
    b"From",
    b"From ",
    b" ",
    b"\n\n",
]


def random_spool(rng, pieces=40):
    """A spool made of the awkward pieces above in random order."""
    return b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, pieces)))


def reference_view(data):
    """What a POP3 client must see for this spool: [(size, uid, RETR bytes)]."""
    out = []
    for m in mbox_reference.parse(data):
        out.append((m.size, m.uid, mbox_reference.render(data[m.data : m.end])))
    return out


def seeded(seed):
    return random.Random(seed)


BODY_LINES = [
    b"plain text\n",
    b".\n",
    b"..\n",
    b".starts with a dot\r\n",
    b"From inside a body\n",
    b">From quoted\n",
    b"nul\0byte\n",
    b"lone\rcr\n",
    b"crlf line\r\n",
    b"\n",
    b"\r\n",
    b"\r\r\n",
]


def random_mailbox(rng, messages=12):
    """A spool shaped like real mail, with every awkward case now and then:
    CRLF and mixed line ends, NULs, lone CRs, "From " and ">From " in bodies,
    lines that are just ".", 100 KB lines, empty bodies, byte-identical
    duplicates, a last line without a newline."""
    records = []
    for _ in range(rng.randint(0, messages)):
        if records and rng.random() < 0.15:
            records.append(rng.choice(records))  # an identical duplicate
            continue
        eol = rng.choice([b"\n", b"\r\n"])
        head = b"From sender%d@example.org Thu Nov 19 10:00:00 2026" % rng.randint(0, 3) + eol
        head += b"Subject: %d" % rng.randint(0, 5) + eol
        body = b"".join(rng.choice(BODY_LINES) for _ in range(rng.choice([0, 0, 1, 3, 10])))
        if rng.random() < 0.05:
            body += b"x" * 100_000 + eol
        records.append(head + eol + body + eol)
    data = b"".join(records)
    if data and rng.random() < 0.2:
        data = data.rstrip(b"\r\n")  # no trailing newline at all
    return data
