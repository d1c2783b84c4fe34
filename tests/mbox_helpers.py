"""Shared by the tests/test_mbox_*.py files: the storage_mbox module with
test settings, spool generators, and the reference's view of a spool."""

import glob
import os
import random

from mpop3 import mbox_reference
from mpop3.loader import import_module_file

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_PATH = glob.glob(os.path.join(TREE, "modules", "storage_mbox.*.so"))[0]


def storage(spool_dir, **extra):
    """storage_mbox, initialised as the config would: storage_dir plus extra."""
    module = import_module_file(MODULE_PATH, "tests")
    module.module_init({"storage_dir": str(spool_dir), "mbox_lock_timeout": "5", **extra})
    return module


def message(n, body_lines=3, sender="sender@example.org"):
    """One mbox record: From line, a few headers, a body, the separator."""
    body = b"".join(b"line %d of message %d\n" % (k, n) for k in range(body_lines))
    return (b"From %s Thu Nov 19 10:00:%02d 2026\nSubject: message %d\nMessage-ID: <%d@example.org>\n\n"
            % (sender.encode(), n % 60, n, n) + body + b"\n")


def spool_of(count, start=0, body_lines=3):
    return b"".join(message(n, body_lines) for n in range(start, start + count))


PIECES = [b"From a@b Mon Nov 16 10:00:00 2026\n", b"From x\r\n", b"\n", b"\r\n", b".\n", b"..x\n",
          b".\r\n", b"From in body\n", b">From quoted\n", b"a\rb\n", b"\r", b"\0\0\n", b"Subject: hi\n",
          b"X: y\r\n", b"body text\n", b"F", b"Fro", b"From", b"From ", b" ", b"\n\n"]


def random_spool(rng, pieces=40):
    """A spool made of the awkward pieces above in random order."""
    return b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, pieces)))


def reference_view(data):
    """What a POP3 client must see for this spool: [(size, uid, RETR bytes)]."""
    out = []
    for m in mbox_reference.parse(data):
        out.append((m.size, m.uid, mbox_reference.render(data[m.data:m.end])))
    return out


def seeded(seed):
    return random.Random(seed)
