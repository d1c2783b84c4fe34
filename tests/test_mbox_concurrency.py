"""storage_mbox against the world: real MDAs delivering during a session and
its commit, kill -9 at many instants of a 100 MB commit, a full disk."""

import os
import poplib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from mbox_helpers import commit_with_hook, committer, fill, mbox, message, spool_of, storage, tmpfs
from pop_server import Wire

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


def killed_then_reopened(mod, spool, old, script, kill_at):
    """Write `old` to the spool, run the committer `script` killed at its
    kill_at-th step, then open the mailbox (the next open replays, and
    breaks the dead commit's dot-lock): (the spool's bytes, its count)."""
    spool.write_bytes(old)
    child = subprocess.run([sys.executable, "-c", script, str(kill_at)], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL
    box = mod.storage_lock_mailbox("bob")
    count = mod.storage_message_count(box)
    mod.storage_unlock_mailbox(box)
    return spool.read_bytes(), count


def test_kill_9_at_twenty_instants_of_a_100_mb_commit_leaves_old_or_new(tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = spool_dir / "bob"
    old = spool_of(10000, body_lines=440)
    assert len(old) >= 100 << 20
    new = old[len(message(0, body_lines=440)) :]
    script = committer(spool_dir)
    spool.write_bytes(old)
    finished = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, timeout=120)
    steps = int(finished.stdout.split()[-1])  # an uninterrupted commit: how many steps it takes
    assert spool.read_bytes() == new and steps >= 20
    mod = storage(spool_dir)
    outcomes = []
    for kill_at in sorted({1 + k * (steps - 1) // 19 for k in range(20)}):
        after, count = killed_then_reopened(mod, spool, old, script, kill_at)
        assert after in (old, new), f"killed at step {kill_at}: neither old nor new"
        assert count == (10000 if after == old else 9999)
        outcomes.append(after == new)
        assert sorted(os.listdir(spool_dir)) == ["bob"]
    assert len(outcomes) == 20 and any(outcomes) and not all(outcomes)
    # and ten kills by the clock, wherever the commit happens to be (inside
    # a copy_file_range, an fsync, ...), spread over how long one takes
    spool.write_bytes(old)
    child = subprocess.Popen([sys.executable, "-c", script, "0"], stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"go\n"
    started = time.monotonic()
    assert child.wait(120) == 0
    took = time.monotonic() - started
    rng = random.Random(7)
    outcomes = []
    for delay in sorted(rng.uniform(0, took) for _ in range(10)):
        spool.write_bytes(old)
        child = subprocess.Popen([sys.executable, "-c", script, "0"], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"go\n"
        time.sleep(delay)
        child.kill()
        child.wait()
        box = mod.storage_lock_mailbox("bob")
        mod.storage_unlock_mailbox(box)
        after = spool.read_bytes()
        assert after in (old, new), f"killed {delay:.3f} s into the commit"
        outcomes.append(after == new)
    assert any(outcomes)  # some kills landed after the commit point


def test_kill_9_at_every_step_of_a_commit_in_windows_leaves_old_or_new(tmp_path):
    # windows of 64 KiB: kills between windows, and at every step inside each
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    spool = spool_dir / "bob"
    old = spool_of(500, body_lines=20)  # 350 KB: six windows
    deleted = {0, 7, 300}
    new = b"".join(message(n, body_lines=20) for n in range(500) if n not in deleted)
    knobs = {"WINDOW_MIN": 64 << 10, "WINDOW_MAX": 64 << 10, "READ_CHUNK": 32 << 10, "COPY_CHUNK": 32 << 10}
    script = committer(spool_dir, deleted, **knobs)
    spool.write_bytes(old)
    finished = subprocess.run([sys.executable, "-c", script, "0"], capture_output=True, text=True, timeout=120)
    steps = int(finished.stdout.split()[-1])
    assert spool.read_bytes() == new
    mod = storage(spool_dir)
    outcomes = []
    for kill_at in range(1, steps + 1):
        after, count = killed_then_reopened(mod, spool, old, script, kill_at)
        assert after in (old, new), f"killed at step {kill_at} of {steps}: neither old nor new"
        assert count == (500 if after == old else 497)
        outcomes.append(after == new)
        assert sorted(os.listdir(spool_dir)) == ["bob"]
    assert steps >= 40 and any(outcomes) and not all(outcomes)


# ---- disk full -----------------------------------------------------------------------


@pytest.mark.root
def test_a_disk_too_full_for_any_journal_refuses_the_commit_and_keeps_the_spool(spawn):
    data = spool_of(1200, body_lines=100)  # ~3 MB of 4
    with tmpfs("4m") as where:
        spool_dir = os.path.join(where, "spool")
        with spawn({"bob": "secret"}, {"bob": data}, spool=spool_dir) as server:
            filler = os.path.join(where, "filler")
            fill(filler)
            os.truncate(filler, os.path.getsize(filler) - (32 << 10))  # room to log in, not to journal
            assert quit_after_deleting(server, 1).startswith(b"-ERR [SYS/TEMP]")
            assert read(os.path.join(spool_dir, "bob")) == data
            assert sorted(os.listdir(spool_dir)) == ["bob"]
            # the tail needs no journal: even now, deleting it works
            assert quit_after_deleting(server, 1200).startswith(b"+OK")
            assert read(os.path.join(spool_dir, "bob")) == spool_of(1199, body_lines=100)
            os.unlink(filler)


@pytest.mark.root
def test_deleting_on_a_nearly_full_disk_works_once_a_little_space_is_free(spawn, tmp_path):
    # a 16 MB spool on a full filesystem: deleting its first message moves
    # 16 MB, which a commit must do in place, a window at a time
    data = spool_of(6000, body_lines=100)
    new = data[len(message(0, body_lines=100)) :]
    with tmpfs("24m") as where:
        spool_dir = os.path.join(where, "spool")
        server = spawn({"bob": "secret"}, {"bob": data}, spool=spool_dir)
        filler = os.path.join(where, "filler")
        fill(filler)
        os.truncate(filler, os.path.getsize(filler) - (32 << 10))  # less than a commit needs at least
        assert quit_after_deleting(server, 1).startswith(b"-ERR [SYS/TEMP]")
        assert read(os.path.join(spool_dir, "bob")) == data
        assert sorted(os.listdir(spool_dir)) == ["bob"]
        os.truncate(filler, os.path.getsize(filler) - (1 << 20))  # a MB free: a sixteenth of the spool
        assert quit_after_deleting(server, 1).startswith(b"+OK")
        assert read(os.path.join(spool_dir, "bob")) == new
        assert sorted(os.listdir(spool_dir)) == ["bob"]
        server.stop()


@pytest.mark.root
def test_on_a_disk_full_to_the_last_byte_a_user_can_still_log_in_and_delete(spawn):
    # deleting the last message needs no journal: one truncate, which frees space
    data = spool_of(1200, body_lines=100)
    with tmpfs("4m") as where:
        spool_dir = os.path.join(where, "spool")
        with spawn({"bob": "secret"}, {"bob": data}, spool=spool_dir) as server:
            filler = os.path.join(where, "filler")
            fill(filler)
            assert quit_after_deleting(server, 1200).startswith(b"+OK")
            assert read(os.path.join(spool_dir, "bob")) == spool_of(1199, body_lines=100)
            assert sorted(os.listdir(spool_dir)) == ["bob"]
            os.unlink(filler)


@pytest.mark.root
def test_a_disk_filling_up_during_the_move_does_not_stop_it(monkeypatch):
    # the commit point reserves all the room the move takes: a disk that
    # fills up afterwards (an MDA delivering elsewhere) cannot leave the
    # spool half moved until space is freed
    from mpop3.mbox import commit as mbox_commit

    for knob in ("WINDOW_MIN", "WINDOW_MAX"):
        monkeypatch.setattr(mbox_commit, knob, 64 << 10)
    data = spool_of(800, body_lines=100)  # 2 MB: thirty windows
    with tmpfs("8m") as where:
        spool_dir = os.path.join(where, "spool")
        os.mkdir(spool_dir)
        spool = os.path.join(spool_dir, "bob")
        with open(spool, "wb") as f:
            f.write(data)
        windows = []

        def hook(step):
            if step == "journal-durable":
                fill(os.path.join(where, "filler"))
            windows.append(step == "window")

        commit_with_hook(storage(spool_dir), "bob", {0}, hook)
        assert sum(windows) >= 20
        assert read(spool) == spool_of(799, start=1, body_lines=100)
        assert sorted(os.listdir(spool_dir)) == ["bob"]


def quit_after_deleting(server, number):
    wire = Wire(server.port, timeout=60)
    wire.login("bob", "secret")
    assert wire.cmd(f"DELE {number}").startswith(b"+OK")
    reply = wire.cmd("QUIT")
    wire.close()
    return reply


def read(path):
    with open(path, "rb") as f:
        return f.read()


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
