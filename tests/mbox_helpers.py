"""Spools for the tests: mbox(), the one builder of mbox files, and the
generators built on it; for the tests/test_mbox_*.py files also the
storage_mbox module with test settings, the reference's view of a spool,
a session run in a process of its own (in_child: what hangs there cannot
hang the suite) and a small filesystem (tmpfs, root only) and a way to fill it."""

import contextlib
import glob
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from mpop3.loader import import_module_file
from mpop3.mbox import kernels_reference as mbox_reference

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCMAIL = shutil.which("procmail")
MODULE_PATH = glob.glob(os.path.join(TREE, "modules", "storage_mbox.*.so"))[0]


def storage(spool_dir, **extra):
    """storage_mbox, initialised as the config would: storage_dir plus extra."""
    module = import_module_file(MODULE_PATH, "tests")
    module.module_init({"storage_dir": str(spool_dir), "mbox_lock_timeout": "5", **extra})
    return module


CHILD = textwrap.dedent("""
    import logging, os, sys
    sys.path.insert(0, {tree!r}); sys.path.insert(0, {tree!r} + "/tests")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from mbox_helpers import storage
    from mpop3.errors import MailboxInUse, StoragePermError, StorageTempError
    mod = storage({spool_dir!r}, **{settings!r})
    for action, arg in {actions!r}:
        if action == "remove":
            os.rmdir(arg) if os.path.isdir(arg) and not os.path.islink(arg) else os.unlink(arg)
            continue
        try:
            box = mod.storage_lock_mailbox(arg)
        except MailboxInUse:
            print("in-use", flush=True)
        except StorageTempError:
            print("temp", flush=True)
        except StoragePermError:
            print("perm", flush=True)
        else:
            print("ok", mod.storage_message_count(box), flush=True)
            if action == "delete-first":
                mod.storage_synch(box, {{0}})
            mod.storage_unlock_mailbox(box)
""")


def in_child(spool_dir, actions, timeout=20, **settings):
    """Run `actions` in a new process on storage_mbox over spool_dir:
    ("open", mailbox) opens and closes a session, ("delete-first", mailbox)
    also deletes its first message, ("remove", path) removes a file or an
    empty directory. Returns (one outcome per open: "ok COUNT", "in-use",
    "temp" or "perm"; the process's log). A process still busy after
    `timeout` seconds is killed and the call fails: something hung."""
    settings = {"mbox_lock_timeout": "1", **settings}
    script = CHILD.format(tree=TREE, spool_dir=str(spool_dir), settings=settings, actions=list(actions))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung: still busy after {timeout} s; log so far: {e.stderr!r}") from None
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(), done.stderr


COMMITTER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tree!r}); sys.path.insert(0, {tree!r} + "/tests")
    from mbox_helpers import storage
    from mpop3.mbox import commit as mbox_commit
    for name, value in {knobs!r}.items():
        setattr(mbox_commit, name, value)
    kill_at = int(sys.argv[1])
    taken = []
    counting = [{after!r} is None]
    def hook(step):
        if counting[0] and ({step!r} is None or step == {step!r}):
            taken.append(step)
            if len(taken) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        counting[0] = counting[0] or step == {after!r}
    mod = storage({spool_dir!r})
    if {owner!r} is not None:  # as a session process: the spool's owner
        os.setgroups([]); os.setgid({owner!r}[1]); os.setuid({owner!r}[0])
    box = mod.storage_lock_mailbox("bob")
    mbox_commit.step_hook = hook
    print("go", flush=True)
    mod.storage_synch(box, {deleted!r})
    mod.storage_unlock_mailbox(box)
    print(len(taken))
""")


def committer(spool_dir, deleted=frozenset({0}), step=None, after=None, owner=None, **knobs):
    """A script that deletes messages `deleted` (from 0) of the spool bob,
    killing itself (SIGKILL) at the Nth step of the commit, N its first
    argument (0: never; it then prints how many steps it counted). `step`
    counts only the steps of that name, `after` only those after the first
    step of that name; `owner` (uid, gid) is who commits; `knobs` set
    mpop3.mbox.commit's constants (WINDOW_MAX=...)."""
    return COMMITTER.format(
        tree=TREE, spool_dir=str(spool_dir), deleted=set(deleted), step=step, after=after, owner=owner, knobs=knobs
    )


def commit_with_hook(mod, name, deleted, hook, raises=None):
    """Delete messages `deleted` (from 0) of mailbox `name` in a session of
    `mod`, with `hook` as mpop3.mbox.commit's step hook. `raises`: the
    exception the hook stops the commit with (a crash at that step, the
    process living on), which is then expected."""
    from mpop3.mbox import commit as mbox_commit

    box = mod.storage_lock_mailbox(name)
    mbox_commit.step_hook = hook
    try:
        if raises is None:
            mod.storage_synch(box, set(deleted))
        else:
            with pytest.raises(raises):
                mod.storage_synch(box, set(deleted))
    finally:
        mbox_commit.step_hook = None
        mod.storage_unlock_mailbox(box)


HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
""")


@contextlib.contextmanager
def fcntl_locked(path):
    """Another process (an MDA delivering) holds an fcntl write lock on
    `path` while the block runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def tmpfs(size):
    """A tmpfs of `size` ("4m") mounted on a new directory, for filling
    disks (root only); unmounted and removed afterwards."""
    where = tempfile.mkdtemp(prefix="mbox-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", where], check=True)
        os.rmdir(where)


def fill(path):
    """Write `path` until its filesystem is full, to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while os.write(fd, b"x" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


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
