"""storage_mbox against the world: real MDAs delivering during a session and
its commit, kill -9 at many instants of a 100 MB commit, a full disk."""

import os
import poplib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from mbox_helpers import TREE, mbox, message, spool_of, storage

from mpop3.mbox import kernels_reference as ref

pytestmark = pytest.mark.slow  # 100 MB spools, kills, concurrent deliveries

PROCMAIL = shutil.which("procmail")


def contents(data):
    """Each message of a spool: From line and content, as bytes."""
    return [data[m.start : m.end] for m in ref.parse(data)]


def delivered(kind, n):
    """Message n of an MDA of this kind, as it is handed to it and as it must stand in the spool."""
    return mbox(
        b"Subject: %s %d\n\nbody of %s %d\n" % (kind.encode(), n, kind.encode(), n),
        sender=f"{kind}@example.org",
        date="Fri Nov 20 09:00:00 2026",
        finish_last=False,
    )


def deliver_with_procmail(rcfile, count):
    """procmail takes SPOOL.lock with link() and an fcntl lock (strace shows
    both) for a `:0:` recipe; run it as a user's .procmailrc would."""
    for n in range(count):
        subprocess.run([PROCMAIL, "-m", rcfile], input=delivered("procmail", n), check=True, timeout=60)


FCNTL_APPENDER = textwrap.dedent("""
    import fcntl, os, sys
    path, count = sys.argv[1], int(sys.argv[2])
    for n in range(count):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.lockf(fd, fcntl.LOCK_EX)  # blocks while a commit holds it
        os.write(fd, b"From fcntl@example.org Fri Nov 20 09:00:00 2026\\nSubject: fcntl %d\\n\\n"
                     b"body of fcntl %d\\n\\n" % (n, n))
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
""")


@pytest.mark.clients
def test_mail_delivered_by_procmail_and_an_fcntl_appender_during_a_session_is_kept(tmp_path, spawn):
    assert PROCMAIL, "procmail is installed by .ci/run"
    original = spool_of(3000, body_lines=120)  # ~20 MB, so the commit takes a while
    spool = tmp_path / "spool" / "bob"
    rcfile = tmp_path / "procmailrc"
    rcfile.write_text(f"SHELL=/bin/sh\nLOCKSLEEP=1\n:0:\n{spool}\n")
    with spawn({"bob": "secret"}, {"bob": original}) as server:
        client = poplib.POP3("127.0.0.1", server.port, timeout=60)
        client.user("bob")
        client.pass_("secret")
        assert client.stat()[0] == 3000
        # deliveries start after the index and go on during DELE and the commit
        appender = subprocess.Popen([sys.executable, "-c", FCNTL_APPENDER, str(spool), "40"])
        procmail = threading.Thread(target=deliver_with_procmail, args=(str(rcfile), 40))
        procmail.start()
        assert client.retr(2)[1][0] == b"Subject: message 1"
        for number in (1, 3, 3000):
            client.dele(number)
        assert client.quit().startswith(b"+OK")
        procmail.join(120)
        assert appender.wait(120) == 0
    final = contents(spool.read_bytes())
    kept = [m for i, m in enumerate(contents(original)) if i not in (0, 2, 2999)]
    assert final[: len(kept)] == kept
    arrivals = final[len(kept) :]
    expected = [delivered("procmail", n) for n in range(40)]
    expected += [delivered("fcntl", n) for n in range(40)]
    assert sorted(arrivals) == sorted(expected)  # each once, byte for byte


def test_a_second_session_in_another_server_gets_in_use(spawn):
    one = spawn({"bob": "secret"}, {"bob": spool_of(2)})
    two = spawn(conf=one.conf_path)
    first = poplib.POP3("127.0.0.1", one.port, timeout=10)
    first.user("bob")
    first.pass_("secret")
    second = poplib.POP3("127.0.0.1", two.port, timeout=10)
    second.user("bob")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("secret")
    first.quit()


# ---- kill -9 during a commit -------------------------------------------------

COMMITTER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tree!r}); sys.path.insert(0, {tree!r} + "/tests")
    from mbox_helpers import storage
    from mpop3.mbox import commit as mbox_commit
    kill_at = int(sys.argv[1])
    taken = []
    def hook(step):
        taken.append(step)
        if len(taken) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    mod = storage({spool_dir!r})
    box = mod.storage_lock_mailbox("bob")
    mbox_commit.step_hook = hook
    print("go", flush=True)
    mod.storage_synch(box, {{0}})
    mod.storage_unlock_mailbox(box)
    print(len(taken))
""")


def test_kill_9_at_twenty_instants_of_a_100_mb_commit_leaves_old_or_new(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = spool_dir / "bob"
    old = spool_of(10000, body_lines=440)
    assert len(old) >= 100 << 20
    new = old[len(message(0, body_lines=440)) :]
    script = COMMITTER.format(tree=TREE, spool_dir=str(spool_dir))
    spool.write_bytes(old)
    finished = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, timeout=120)
    steps = int(finished.stdout.split()[-1])  # an uninterrupted commit: how many steps it takes
    assert spool.read_bytes() == new and steps >= 20
    mod = storage(spool_dir)
    outcomes = []
    for kill_at in sorted({1 + k * (steps - 1) // 19 for k in range(20)}):
        spool.write_bytes(old)
        child = subprocess.run([sys.executable, "-c", script, str(kill_at)], capture_output=True, timeout=120)
        assert child.returncode == -signal.SIGKILL
        box = mod.storage_lock_mailbox("bob")  # the next open: replays, breaks the dead dot-lock
        count = mod.storage_message_count(box)
        mod.storage_unlock_mailbox(box)
        after = spool.read_bytes()
        assert after in (old, new), f"killed at step {kill_at}: neither old nor new"
        assert count == (10000 if after == old else 9999)
        outcomes.append(after == new)
        assert sorted(os.listdir(spool_dir)) == ["bob"]
    assert len(outcomes) == 20 and any(outcomes) and not all(outcomes)
    # and five kills by the clock, wherever the commit happens to be (inside
    # a copy_file_range, an fsync, ...)
    rng = random.Random(7)
    for delay in [rng.uniform(0, 0.3) for _ in range(5)]:
        spool.write_bytes(old)
        child = subprocess.Popen([sys.executable, "-c", script, "0"], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"go\n"
        time.sleep(delay)
        child.kill()
        child.wait()
        box = mod.storage_lock_mailbox("bob")
        mod.storage_unlock_mailbox(box)
        assert spool.read_bytes() in (old, new), f"killed {delay:.3f} s into the commit"


# ---- disk full -----------------------------------------------------------------------


@pytest.fixture
def small_tmpfs():
    where = tempfile.mkdtemp(prefix="mbox-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", where], check=True)
    yield where
    subprocess.run(["umount", where], check=True)
    os.rmdir(where)


@pytest.mark.root
def test_disk_full_during_a_commit_answers_err_and_keeps_the_spool(small_tmpfs, spawn):
    spool_dir = os.path.join(small_tmpfs, "spool")
    data = spool_of(1200, body_lines=100)  # ~3 MB of 4: no room for a journal of it
    with spawn({"bob": "secret"}, {"bob": data}, spool=spool_dir) as server:
        client = poplib.POP3("127.0.0.1", server.port, timeout=30)
        client.user("bob")
        client.pass_("secret")
        client.dele(1)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            client.quit()
    with open(os.path.join(spool_dir, "bob"), "rb") as f:
        assert f.read() == data
    assert sorted(os.listdir(spool_dir)) == ["bob"]
    # and with room again (the tail needs no journal), the same deletion works
    mod = storage(spool_dir)
    box = mod.storage_lock_mailbox("bob")
    mod.storage_synch(box, {1199})
    mod.storage_unlock_mailbox(box)
    with open(os.path.join(spool_dir, "bob"), "rb") as f:
        assert f.read() == spool_of(1199, body_lines=100)


@pytest.mark.clients
def test_procmail_waits_for_the_dot_lock_and_the_fcntl_lock_we_take(tmp_path):
    # the locks a scan or a commit holds are the ones procmail respects
    spool = tmp_path / "bob"
    spool.write_bytes(spool_of(1))
    rcfile = tmp_path / "procmailrc"
    rcfile.write_text(f"SHELL=/bin/sh\nLOCKSLEEP=1\n:0:\n{spool}\n")
    from mpop3.mbox.lock import spool_locks

    fd = os.open(spool, os.O_RDWR)
    try:
        for methods in (("dotlock",), ("fcntl",)):
            before = spool.read_bytes()
            with spool_locks(str(spool), fd, methods, True, 5, 1024):
                mda = subprocess.Popen([PROCMAIL, "-m", str(rcfile)], stdin=subprocess.PIPE)
                mda.stdin.write(delivered(methods[0], 0))
                mda.stdin.close()
                with pytest.raises(subprocess.TimeoutExpired):
                    mda.wait(1.5)
                assert spool.read_bytes() == before  # nothing written under our lock
            assert mda.wait(30) == 0
    finally:
        os.close(fd)
    assert contents(spool.read_bytes())[1:] == [delivered("dotlock", 0), delivered("fcntl", 0)]
