"""The files storage_mbox keeps beside a spool (the dot-lock and its
temporary files, the session marker, the journal) when somebody else put
something at their names first: FIFOs, symlinks, directories, hard links,
files of other users, mailbox names that are state files' names. Nothing
hangs, nothing of theirs is truncated or written, and every refusal is an
-ERR and a log line. Each attempt that could hang runs in a process of its
own (mbox_helpers.in_child)."""

import os
import re
import socket
import stat
import subprocess
import threading
import time

import pytest
from mbox_helpers import PROCMAIL, commit_with_hook, fcntl_locked, fill, in_child, message, spool_of, storage, tmpfs

from mpop3.errors import StoragePermError, StorageTempError
from mpop3.mbox import commit as mbox_commit
from mpop3.mbox import lock as mbox_lock

FOREIGN = 4321  # a uid and gid nobody on the machine has


@pytest.fixture
def spool_dir(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    return d


def plant(path, kind, target):
    """Put something that is not a state file of ours at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink to a fifo":
        os.mkfifo(target)
        os.symlink(target, path)
    elif kind == "dangling symlink":
        os.symlink(target, path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "hard link to the spool":
        os.link(target, path)
    elif kind == "another user's file":
        path.write_bytes(b"theirs\n")
        os.chmod(path, 0o666)
        os.chown(path, FOREIGN, FOREIGN)
    else:
        raise AssertionError(kind)


def remove(path):
    os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)


# ---- item 2: the dot-lock ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "symlink to a fifo", "dangling symlink", "directory"])
def test_a_dot_lock_that_is_not_a_regular_file_never_hangs_a_login(spool_dir, tmp_path, kind):
    (spool_dir / "bob").write_bytes(spool_of(2))
    lock = spool_dir / "bob.lock"
    plant(lock, kind, tmp_path / "elsewhere")
    started = time.monotonic()
    # twice in one process: the first refusal leaves nothing held behind
    actions = [("open", "bob"), ("open", "bob"), ("remove", str(lock)), ("open", "bob")]
    outcomes, log = in_child(spool_dir, actions, mbox_lock_timeout="0.3")
    assert outcomes == ["temp", "temp", "ok 2"], log
    assert time.monotonic() - started < 5  # two lock timeouts of 0.3 s, and a Python start
    assert "bob.lock" in log and "not a regular file" in log


def test_releasing_never_reads_a_fifo_put_in_place_of_our_dot_lock(spool_dir):
    from mpop3.mbox.lock import spool_locks

    spool = spool_dir / "bob"
    spool.write_bytes(spool_of(1))
    done = threading.Event()

    def hold_and_release():
        with spool_locks(str(spool), None, ("dotlock",), True, 1, 1024):
            os.unlink(spool_dir / "bob.lock")
            os.mkfifo(spool_dir / "bob.lock")  # theirs now, and a trap
        done.set()

    threading.Thread(target=hold_and_release, daemon=True).start()
    try:
        assert done.wait(5), "releasing the dot-lock hung on a FIFO"
        assert stat.S_ISFIFO(os.lstat(spool_dir / "bob.lock").st_mode)  # not ours to remove
    finally:
        if not done.is_set():  # let the stuck thread go
            fd = os.open(spool_dir / "bob.lock", os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)


# ---- items 2 and 3: the session marker ---------------------------------------------


@pytest.mark.parametrize(
    "kind",
    [
        "fifo",
        "symlink to a fifo",
        "dangling symlink",
        "directory",
        "hard link to the spool",
        pytest.param("another user's file", marks=pytest.mark.root),
    ],
)
def test_a_session_marker_that_is_not_ours_is_refused_logged_and_left_alone(spool_dir, tmp_path, kind):
    data = spool_of(3)
    (spool_dir / "bob").write_bytes(data)
    marker = spool_dir / "bob.mpop3-session"
    plant(marker, kind, spool_dir / "bob" if kind.startswith("hard") else tmp_path / "elsewhere")
    before = os.lstat(marker)
    outcomes, log = in_child(spool_dir, [("open", "bob"), ("open", "bob")])
    assert (spool_dir / "bob").read_bytes() == data  # a hard link is not truncated
    assert outcomes == ["temp", "temp"], log  # refused, and the refusal held nothing
    assert "bob.mpop3-session" in log
    after = os.lstat(marker)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    if kind == "another user's file":
        assert marker.read_bytes() == b"theirs\n"
    remove(marker)
    assert in_child(spool_dir, [("open", "bob")])[0] == ["ok 3"]


@pytest.mark.root
def test_a_full_disk_leaves_the_marker_and_the_dot_lock_empty_and_the_login_works():
    # what they hold (PID@HOST) is for the administrator; the locks are
    # their names and flock(): on a full disk, a login still works
    with tmpfs("1m") as where:
        spool_dir = os.path.join(where, "spool")
        os.mkdir(spool_dir)
        with open(os.path.join(spool_dir, "bob"), "wb") as f:
            f.write(spool_of(2))
        filler = os.path.join(where, "filler")
        fill(filler)
        outcomes, log = in_child(spool_dir, [("open", "bob"), ("open", "bob"), ("remove", filler), ("open", "bob")])
        assert outcomes == ["ok 2", "ok 2", "ok 2"], log
        assert "bob.mpop3-session: No space left on device" in log and "bob.lock" not in log
        assert sorted(os.listdir(spool_dir)) == ["bob"]


def test_a_marker_that_cannot_be_written_does_not_keep_the_mailbox_in_use(spool_dir, monkeypatch, caplog):
    import errno

    mod = storage(spool_dir, mbox_lock_timeout="1")
    (spool_dir / "bob").write_bytes(spool_of(2))
    failures = [OSError(errno.EIO, "Input/output error")]
    real_token = mbox_lock._token

    def token():  # the marker's write is the first, then the dot-lock's
        if failures:
            raise failures.pop()
        return real_token()

    monkeypatch.setattr(mbox_lock, "_token", token)
    with pytest.raises(StorageTempError):
        mod.storage_lock_mailbox("bob")
    assert "bob.mpop3-session: cannot write the session marker" in caplog.text
    assert sorted(os.listdir(spool_dir)) == ["bob"]
    box = mod.storage_lock_mailbox("bob")  # not [IN-USE]: the failed attempt holds nothing
    assert mod.storage_message_count(box) == 2
    mod.storage_unlock_mailbox(box)


@pytest.mark.parametrize("methods", ["dotlock", "fcntl"])
def test_waiting_for_a_busy_lock_never_goes_past_the_timeout(spool_dir, methods):
    mod = storage(spool_dir, mbox_locks=methods, mbox_lock_timeout="1.6")
    spool = spool_dir / "bob"
    spool.write_bytes(spool_of(2))
    (spool_dir / "bob.lock").write_bytes(b"0")  # procmail's, fresh
    with fcntl_locked(spool):  # and an MDA holds the fcntl lock
        started = time.monotonic()
        with pytest.raises(StorageTempError):
            mod.storage_lock_mailbox("bob")
        took = time.monotonic() - started
    # waits double up to a second: a last one cut at the deadline, not slept in full
    assert 1.6 <= took < 1.6 + 0.3, took


# ---- item 8: names that are state files' names ---------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "bob.lock",
        "bob.mpop3-session",
        "bob.mpop3-journal",
        "bob.mpop3-journal.tmp",
        "bob.mpop3-journal.orphaned",
        ".bob",
        ".lk12345.1.host",
        "b" * 240,  # its journal's name would be longer than a file name may be
    ],
)
def test_a_mailbox_name_that_is_a_state_file_name_is_refused(spool_dir, name):
    mod = storage(spool_dir)
    with pytest.raises(StoragePermError):
        mod.storage_lock_mailbox(name)


def test_a_mailbox_cannot_open_another_ones_state_files(spool_dir):
    # bob's session holds its marker; "bob.mpop3-session" must not open it as a spool
    mod = storage(spool_dir)
    (spool_dir / "bob").write_bytes(spool_of(2))
    box = mod.storage_lock_mailbox("bob")
    try:
        for name in ("bob.mpop3-session", "bob.lock"):
            with pytest.raises(StoragePermError):
                mod.storage_lock_mailbox(name)
    finally:
        mod.storage_unlock_mailbox(box)


@pytest.mark.parametrize("name", ["bob.locked", "lock", "bob-mpop3", "b" * 200, "Bob.Smith"])
def test_names_near_those_are_still_mailboxes(spool_dir, name):
    mod = storage(spool_dir)
    (spool_dir / name).write_bytes(spool_of(2))
    box = mod.storage_lock_mailbox(name)
    assert mod.storage_message_count(box) == 2
    mod.storage_synch(box, {0})
    mod.storage_unlock_mailbox(box)
    assert (spool_dir / name).read_bytes() == message(1)


# ---- item 9: dot-lock temporary names, and keeping the lock fresh --------------------


def test_files_planted_at_the_old_predictable_temporary_names_do_not_stop_a_login(spool_dir):
    mod = storage(spool_dir)
    (spool_dir / "bob").write_bytes(spool_of(2))
    # the old names: .lk<pid>.<counter>.<host>, the host name being in the APOP greeting
    counter = getattr(mbox_lock, "_counter", 0)
    for n in range(counter + 1, counter + 20):
        (spool_dir / f".lk{os.getpid()}.{n}.{socket.gethostname()}").write_bytes(b"")
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 2
    mod.storage_unlock_mailbox(box)


def test_dot_lock_temporary_names_cannot_be_guessed(spool_dir, monkeypatch):
    from mpop3.mbox.lock import spool_locks

    spool = spool_dir / "bob"
    spool.write_bytes(spool_of(1))
    names = []
    real_link = os.link

    def link(src, dst, **kw):
        names.append(os.path.basename(src))
        return real_link(src, dst, **kw)

    monkeypatch.setattr(os, "link", link)
    for _ in range(20):
        with spool_locks(str(spool), None, ("dotlock",), True, 1, 1024):
            pass
    assert len(set(names)) == 20
    for name in names:
        # a dot file (which no mailbox name may be) and 128 random bits in
        # hex, nothing else: no pid or host name to guess it from
        assert re.fullmatch(r"\.lk[0-9a-f]{32,}", name), name
    assert os.listdir(spool_dir) == ["bob"]


def test_a_temporary_name_taken_meanwhile_is_not_a_failure(spool_dir, monkeypatch):
    from mpop3.mbox.lock import spool_locks

    spool = spool_dir / "bob"
    spool.write_bytes(spool_of(1))
    taken = spool_dir / ".lk-taken"
    os.mkfifo(taken)
    fresh = iter([str(taken), str(spool_dir / ".lk-fresh")])
    monkeypatch.setattr(mbox_lock, "_unique_name", lambda directory: next(fresh))
    with spool_locks(str(spool), None, ("dotlock",), True, 1, 1024):
        assert (spool_dir / "bob.lock").exists()
    assert sorted(os.listdir(spool_dir)) == [".lk-taken", "bob"]


def slow_commit(mod, spool_dir, seconds, monkeypatch, step_seconds=0.1):
    """Delete message 1 of bob's spool (a MB) in a commit made to last
    `seconds`, as on a slow disk: the step hook sleeps, and the commit
    copies 16 KiB a step. Returns the ages of bob.lock seen at each step."""
    for knob in ("COPY_CHUNK", "READ_CHUNK", "CHUNK"):  # CHUNK: the commit before windows
        monkeypatch.setattr(mbox_commit, knob, 16 << 10, raising=False)
    lock = spool_dir / "bob.lock"
    ages = []
    deadline = time.monotonic() + seconds

    def hook(step):
        ages.append(time.time() - os.lstat(lock).st_mtime)
        if time.monotonic() < deadline:
            time.sleep(step_seconds)

    commit_with_hook(mod, "bob", {0}, hook)
    assert time.monotonic() >= deadline  # it did last that long
    return ages


@pytest.mark.slow
def test_a_long_commit_keeps_its_dot_lock_fresh(spool_dir, monkeypatch):
    mod = storage(spool_dir, mbox_dotlock_stale="1")
    (spool_dir / "bob").write_bytes(spool_of(400, body_lines=100))
    ages = slow_commit(mod, spool_dir, 3, monkeypatch)
    assert max(ages) < 0.75, ages  # an MDA judging it by age (1 s here) never breaks it
    assert (spool_dir / "bob").read_bytes() == spool_of(399, start=1, body_lines=100)


@pytest.mark.clients
@pytest.mark.slow
def test_procmail_does_not_force_the_dot_lock_of_a_long_commit(spool_dir, tmp_path, monkeypatch):
    assert PROCMAIL, "procmail is installed by .ci/run"
    mod = storage(spool_dir, mbox_dotlock_stale="4")
    spool = spool_dir / "bob"
    spool.write_bytes(spool_of(400, body_lines=100))
    rcfile = tmp_path / "procmailrc"
    rcfile.write_text(f"SHELL=/bin/sh\nLOCKSLEEP=1\nLOCKTIMEOUT=4\nLOGFILE={tmp_path}/procmail.log\n:0:\n{spool}\n")
    procmail = []

    def deliver_when_locked():
        while not (spool_dir / "bob.lock").exists():
            time.sleep(0.01)
        procmail.append(subprocess.run([PROCMAIL, "-m", str(rcfile)], input=message(500), timeout=60))

    mda = threading.Thread(target=deliver_when_locked)
    mda.start()
    slow_commit(mod, spool_dir, 8, monkeypatch)
    mda.join(60)
    assert procmail[0].returncode == 0
    assert "Forcing lock" not in (tmp_path / "procmail.log").read_text()
    assert spool.read_bytes() == spool_of(399, start=1, body_lines=100) + message(500)
