"""storage_mbox through its function table, as the POP3 session uses it:
opening, [IN-USE], refusing odd files, commits and their fast paths,
external modifications, interrupted commits, locks other programs hold."""

import fcntl
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from mbox_helpers import MODULE_PATH, TREE, commit_with_hook, fcntl_locked, message, reference_view, spool_of, storage

from mpop3.errors import MailboxInUse, StoragePermError, StorageTempError
from mpop3.mbox import commit as mbox_commit


@pytest.fixture
def spool_dir(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    return d


@pytest.fixture
def mod(spool_dir):
    return storage(spool_dir, mbox_lock_timeout="1")


@pytest.fixture
def steps():
    """The commit steps taken, by name (mbox_commit's test hook)."""
    seen = []
    mbox_commit.step_hook = seen.append
    yield seen
    mbox_commit.step_hook = None


def session_view(mod, box):
    """[(size, uid, RETR bytes)] as a client would see them."""
    count = mod.storage_message_count(box)
    sizes, uids = mod.storage_message_sizes(box), mod.storage_unique_ids(box)
    return [(sizes[i], uids[i], b"".join(mod.storage_dump_fragment(box, i, None))) for i in range(count)]


def commit(mod, name, deleted):
    box = mod.storage_lock_mailbox(name)
    try:
        mod.storage_synch(box, set(deleted))
    finally:
        mod.storage_unlock_mailbox(box)


def test_a_session_sees_what_the_reference_sees(mod, spool_dir):
    data = b"From a\nS: 1\n\n.x\r\nFrom y\n\nFrom b\nS: 2\n\nend" + b"\0\r\n"
    (spool_dir / "bob").write_bytes(data)
    box = mod.storage_lock_mailbox("bob")
    try:
        assert session_view(mod, box) == reference_view(data)
        assert b"".join(mod.storage_dump_fragment(box, 0, 0)) == b"S: 1\r\n\r\n.\r\n"
    finally:
        mod.storage_unlock_mailbox(box)


def test_a_missing_spool_is_an_empty_mailbox(mod, spool_dir):
    box = mod.storage_lock_mailbox("nobody-yet")
    assert mod.storage_message_count(box) == 0
    mod.storage_synch(box, set())
    mod.storage_unlock_mailbox(box)
    assert not (spool_dir / "nobody-yet").exists()


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_a_spool_that_is_not_a_regular_file_is_refused_never_followed(mod, spool_dir, tmp_path, kind):
    target = tmp_path / "elsewhere"
    target.write_bytes(spool_of(2))
    path = spool_dir / "bob"
    {"symlink": lambda: path.symlink_to(target), "directory": path.mkdir, "fifo": lambda: os.mkfifo(path)}[kind]()
    with pytest.raises(StoragePermError):
        mod.storage_lock_mailbox("bob")
    assert target.read_bytes() == spool_of(2)
    # and the refusal left no marker behind: a later, fixed spool opens
    os.unlink(path) if kind != "directory" else path.rmdir()
    path.write_bytes(spool_of(1))
    commit(mod, "bob", [0])
    assert path.read_bytes() == b""


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x\0", "a\nb", "../etc"])
def test_a_bad_mailbox_name_is_refused(mod, name):
    with pytest.raises(StoragePermError):
        mod.storage_lock_mailbox(name)


def test_a_second_session_in_this_process_is_in_use(mod, spool_dir):
    (spool_dir / "bob").write_bytes(spool_of(3))
    os.link(spool_dir / "bob", spool_dir / "robert")  # the same spool under another name
    box = mod.storage_lock_mailbox("bob")
    with pytest.raises(MailboxInUse):
        mod.storage_lock_mailbox("bob")
    with pytest.raises(MailboxInUse):
        mod.storage_lock_mailbox("robert")
    mod.storage_unlock_mailbox(box)
    box = mod.storage_lock_mailbox("robert")
    assert mod.storage_message_count(box) == 3
    mod.storage_unlock_mailbox(box)


HOLDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tree!r})
    sys.path.insert(0, {tree!r} + "/tests")
    from mbox_helpers import storage
    mod = storage({spool!r})
    box = mod.storage_lock_mailbox("bob")
    print("locked", flush=True)
    sys.stdin.readline()
""")


def test_a_second_session_in_another_process_is_in_use_until_it_ends(mod, spool_dir):
    (spool_dir / "bob").write_bytes(spool_of(3))
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(tree=TREE, spool=str(spool_dir))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "locked\n"
        with pytest.raises(MailboxInUse):
            mod.storage_lock_mailbox("bob")
        # the session holds no MDA lock meanwhile: a delivery could lock the spool now
        assert not (spool_dir / "bob.lock").exists()
        fd = os.open(spool_dir / "bob", os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        child.kill()  # dies holding the mailbox: the kernel lets go of the marker
        child.wait()
    box = mod.storage_lock_mailbox("bob")
    mod.storage_unlock_mailbox(box)


def test_commit_keeps_inode_owner_mode_and_kept_bytes(mod, spool_dir, steps):
    path = spool_dir / "bob"
    data = spool_of(10)
    path.write_bytes(data)
    os.chown(path, 4321, 4322)
    os.chmod(path, 0o620)
    before = os.stat(path)
    commit(mod, "bob", [0, 4])
    after = os.stat(path)
    assert (after.st_ino, after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (before.st_ino, 4321, 4322, 0o620)
    assert path.read_bytes() == b"".join(message(n) for n in range(10) if n not in (0, 4))
    assert "journal-durable" in steps
    assert sorted(os.listdir(spool_dir)) == ["bob"]  # no journal, marker or lock left


def test_mail_delivered_during_the_session_is_kept(mod, spool_dir):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(5))
    box = mod.storage_lock_mailbox("bob")
    with open(path, "ab") as f:  # an MDA appends after the scan
        f.write(message(100) + message(101))
    assert mod.storage_message_count(box) == 5  # not shown to this session
    mod.storage_synch(box, {0, 1, 2, 3, 4})
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == message(100) + message(101)


def test_deleting_everything_leaves_an_empty_file_with_one_truncate(mod, spool_dir, steps):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(5))
    commit(mod, "bob", range(5))
    assert path.exists() and path.read_bytes() == b""
    assert "truncate" in steps and "journal-open" not in steps


def test_deleting_a_tail_is_one_truncate(mod, spool_dir, steps):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(8))
    commit(mod, "bob", [6, 7])
    assert path.read_bytes() == spool_of(6)
    assert "truncate" in steps and "journal-open" not in steps


def test_deleting_a_tail_with_new_mail_behind_it_journals_only_the_new_mail(mod, spool_dir):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(8))
    box = mod.storage_lock_mailbox("bob")
    with open(path, "ab") as f:
        f.write(message(50))
    sizes = []
    tmp = spool_dir / "bob.mpop3-journal.tmp"
    mbox_commit.step_hook = lambda step: sizes.append(tmp.stat().st_size if tmp.exists() else 0)
    try:
        mod.storage_synch(box, {7})
    finally:
        mbox_commit.step_hook = None
        mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == spool_of(7) + message(50)
    assert max(sizes) <= 3 * mbox_commit.PAGE + len(message(50))  # a header, two records, the mail


def test_commit_ids_survive_for_the_kept_messages(mod, spool_dir):
    (spool_dir / "bob").write_bytes(spool_of(20))
    box = mod.storage_lock_mailbox("bob")
    uids = list(mod.storage_unique_ids(box))
    mod.storage_synch(box, {0, 5, 19})
    mod.storage_unlock_mailbox(box)
    box = mod.storage_lock_mailbox("bob")
    assert list(mod.storage_unique_ids(box)) == [u for i, u in enumerate(uids) if i not in (0, 5, 19)]
    mod.storage_unlock_mailbox(box)


@pytest.mark.parametrize("change", ["rewrite", "truncate", "replace"])
def test_an_external_modification_ends_the_session_and_deletes_nothing(mod, spool_dir, change, caplog):
    path = spool_dir / "bob"
    data = spool_of(6)
    path.write_bytes(data)
    box = mod.storage_lock_mailbox("bob")
    changed = data.replace(b"message 5", b"MESSAGE 5")
    if change == "rewrite":  # same length, different bytes (an MUA marking mail read)
        with open(path, "r+b") as f:
            f.write(changed)
    elif change == "truncate":
        changed = data[: len(data) // 2]
        with open(path, "r+b") as f:
            f.truncate(len(changed))
    else:  # a new file renamed over the spool
        (spool_dir / "tmp").write_bytes(changed)
        os.rename(spool_dir / "tmp", path)
    assert_refused_and_left_alone(mod, box, path, changed, caplog, send=5, delete=0)


def test_appends_are_not_a_modification(mod, spool_dir):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(3))
    box = mod.storage_lock_mailbox("bob")
    with open(path, "ab") as f:
        f.write(message(9))
    assert b"".join(mod.storage_dump_fragment(box, 2, None)).startswith(b"Subject: message 2\r\n")
    mod.storage_unlock_mailbox(box)


class Crash(Exception):
    pass


def crash_at(step_name, nth=1):
    seen = []

    def hook(step):
        seen.append(step)
        if seen.count(step_name) == nth:
            raise Crash(step)

    return hook


@pytest.mark.parametrize(
    "step, nth, outcome",
    [
        ("journal-open", 1, "old"),
        ("journal-write", 1, "old"),
        ("record", 1, "old"),
        ("journal-fsync", 1, "old"),
        ("journal-rename", 1, "old"),
        ("journal-durable", 1, "new"),
        ("copy", 1, "new"),
        ("spool-fsync", 1, "new"),
        ("spool-truncate", 1, "new"),
        ("spool-fsync", 2, "new"),
        ("journal-unlink", 1, "new"),
    ],
)
def test_an_interrupted_commit_leaves_the_old_or_the_new_mailbox(mod, spool_dir, step, nth, outcome):
    path = spool_dir / "bob"
    old = spool_of(30)
    new = b"".join(message(n) for n in range(1, 30))
    path.write_bytes(old)
    commit_with_hook(mod, "bob", {0}, crash_at(step, nth), raises=Crash)
    for stale in spool_dir.glob("bob.lock"):  # a dead commit's dot-lock
        stale.unlink()
    box = mod.storage_lock_mailbox("bob")  # replays the journal, if any
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == (old if outcome == "old" else new)
    assert sorted(os.listdir(spool_dir)) == ["bob"]


@pytest.mark.parametrize(
    "step, nth, outcome",
    [
        ("journal-fsync", 1, "old"),
        ("copy", 1, "new"),  # the first write into the spool
        ("spool-fsync", 1, "new"),
        ("spool-truncate", 1, "new"),
        ("journal-unlink", 1, "new"),
    ],
)
def test_mail_delivered_between_a_crash_and_the_replay_is_kept(mod, spool_dir, step, nth, outcome):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(10))
    commit_with_hook(mod, "bob", {0, 3}, crash_at(step, nth), raises=Crash)
    with open(path, "ab") as f:  # an fcntl-only MDA delivers before anyone opens the mailbox
        f.write(message(77))
    box = mod.storage_lock_mailbox("bob")
    mod.storage_unlock_mailbox(box)
    deleted = (0, 3) if outcome == "new" else ()
    assert path.read_bytes() == b"".join(message(n) for n in range(10) if n not in deleted) + message(77)


def test_a_fresh_dot_lock_of_another_program_makes_the_open_wait_then_fail(mod, spool_dir):
    (spool_dir / "bob").write_bytes(spool_of(2))
    (spool_dir / "bob.lock").write_bytes(b"0")  # procmail's content
    started = time.monotonic()
    with pytest.raises(StorageTempError):
        mod.storage_lock_mailbox("bob")
    assert time.monotonic() - started >= 1
    assert (spool_dir / "bob.lock").read_bytes() == b"0"  # not ours to remove


def test_a_stale_dot_lock_is_broken(spool_dir):
    mod = storage(spool_dir, mbox_lock_timeout="3", mbox_dotlock_stale="60")
    (spool_dir / "bob").write_bytes(spool_of(2))
    (spool_dir / "bob.lock").write_bytes(b"0")
    old = time.time() - 120
    os.utime(spool_dir / "bob.lock", (old, old))
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 2
    mod.storage_unlock_mailbox(box)
    assert not (spool_dir / "bob.lock").exists()


def test_a_dot_lock_left_by_a_dead_process_of_this_host_is_broken(mod, spool_dir):
    import socket

    (spool_dir / "bob").write_bytes(spool_of(2))
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (spool_dir / "bob.lock").write_text(f"{child.stdout.strip()}@{socket.gethostname()}\n")
    box = mod.storage_lock_mailbox("bob")
    mod.storage_unlock_mailbox(box)


def test_an_fcntl_lock_of_another_process_makes_the_open_wait_then_fail(mod, spool_dir):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(2))
    with fcntl_locked(path), pytest.raises(StorageTempError):
        mod.storage_lock_mailbox("bob")
    assert not (spool_dir / "bob.lock").exists()  # the dot-lock was let go while waiting


def test_permission_denied_is_an_error_and_the_spool_is_unchanged():
    # as a user who may read the spool but not write it (root may do anything)
    spool_dir = pathlib.Path(tempfile.mkdtemp(prefix="mbox-perm-"))  # pytest's are closed to nobody
    os.chmod(spool_dir, 0o777)
    path = spool_dir / "bob"
    path.write_bytes(spool_of(4))
    os.chown(path, 65534, 65534)  # nobody's own spool, but read-only
    os.chmod(path, 0o444)
    someone_elses = spool_dir / "carol"
    someone_elses.write_bytes(spool_of(1))
    os.chmod(someone_elses, 0o666)  # readable and writable, but root's
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {TREE!r}); sys.path.insert(0, {TREE!r} + "/tests")
        from mbox_helpers import storage
        from mpop3.errors import StoragePermError
        mod = storage({str(spool_dir)!r})
        os.setgid(65534); os.setuid(65534)  # after the imports: /root is closed to nobody
        box = mod.storage_lock_mailbox("bob")
        print(mod.storage_message_count(box))
        try:
            mod.storage_synch(box, {{0}})
        except StoragePermError:
            print("refused")
        mod.storage_unlock_mailbox(box)
        try:
            mod.storage_lock_mailbox("carol")
        except StoragePermError:
            print("not-mine")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["4", "refused", "not-mine"], result.stderr
    assert path.read_bytes() == spool_of(4)
    shutil.rmtree(spool_dir)


def test_the_module_declares_its_settings():
    from mpop3.loader import import_module_file

    module = import_module_file(MODULE_PATH, "tests")
    assert set(module.MPOP3_SETTINGS) == {
        "storage_dir",
        "mbox_locks",
        "mbox_lock_timeout",
        "mbox_dotlock_stale",
        "mbox_state_dir",
        "mailbox_user",
    }
    with pytest.raises(ValueError):
        module.module_init({"mbox_locks": "flock"})


def test_a_message_that_no_longer_starts_where_it_did_is_not_sent_or_deleted(mod, spool_dir, caplog):
    # a same-length rewrite far from the end, which the end samples cannot see
    path = spool_dir / "bob"
    data = spool_of(6)
    path.write_bytes(data)
    box = mod.storage_lock_mailbox("bob")
    start = len(spool_of(2))
    changed = data[:start] + b"X" + data[start + 1 :]
    with open(path, "r+b") as f:
        f.write(changed)
    assert b"".join(mod.storage_dump_fragment(box, 0, None)).startswith(b"Subject: message 0")
    assert_refused_and_left_alone(mod, box, path, changed, caplog, send=2, delete=2)


def assert_refused_and_left_alone(mod, box, path, changed, caplog, send, delete):
    """After another program changed the spool: no RETR, no commit, the
    spool as that program left it, and the change logged."""
    with pytest.raises(StorageTempError):
        mod.storage_dump_fragment(box, send, None)
    with pytest.raises(StorageTempError):
        mod.storage_synch(box, {delete})
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == changed
    assert "external modification" in caplog.text


def failing_at(step_name, error):
    def hook(step):
        if step == step_name:
            raise OSError(error, os.strerror(error))

    return hook


@pytest.mark.parametrize("step", ["journal-open", "journal-write", "record", "journal-fsync", "journal-rename"])
def test_an_io_error_before_the_commit_point_leaves_the_spool_as_it_was(mod, spool_dir, step, caplog):
    import errno

    path = spool_dir / "bob"
    path.write_bytes(spool_of(10))
    commit_with_hook(mod, "bob", {0}, failing_at(step, errno.EIO), raises=StorageTempError)
    assert path.read_bytes() == spool_of(10)
    assert sorted(os.listdir(spool_dir)) == ["bob"]  # the partial journal is gone
    assert "committing deletions failed" in caplog.text


def test_an_io_error_after_the_commit_point_is_repaired_by_the_next_open(mod, spool_dir):
    import errno

    path = spool_dir / "bob"
    path.write_bytes(spool_of(10))
    commit_with_hook(mod, "bob", {0}, failing_at("spool-fsync", errno.EIO), raises=StorageTempError)
    assert (spool_dir / "bob.mpop3-journal").exists()
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 9
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == spool_of(9, start=1)
    assert sorted(os.listdir(spool_dir)) == ["bob"]


def test_a_journal_planted_by_someone_else_is_not_applied(mod, spool_dir):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(10))
    commit_with_hook(mod, "bob", {0}, crash_at("spool-truncate"), raises=Crash)
    os.chown(spool_dir / "bob.mpop3-journal", 4321, 4321)
    with pytest.raises(StorageTempError):
        mod.storage_lock_mailbox("bob")
    assert (spool_dir / "bob.mpop3-journal").exists()  # left for the administrator


def test_with_fcntl_only_a_dot_lock_does_not_stop_us(spool_dir):
    mod = storage(spool_dir, mbox_locks="fcntl", mbox_lock_timeout="1")
    (spool_dir / "bob").write_bytes(spool_of(3))
    (spool_dir / "bob.lock").write_bytes(b"0")
    commit(mod, "bob", [0])
    assert (spool_dir / "bob").read_bytes() == spool_of(2, start=1)
    assert (spool_dir / "bob.lock").read_bytes() == b"0"


def test_we_remove_only_our_own_dot_lock(spool_dir):
    # if our lock was judged stale and another program's lock replaced it,
    # releasing ours must not remove theirs
    from mpop3.mbox.lock import spool_locks

    spool = spool_dir / "bob"
    spool.write_bytes(spool_of(1))
    with spool_locks(str(spool), None, ("dotlock",), True, 1, 1024):
        assert (spool_dir / "bob.lock").read_text().startswith(f"{os.getpid()}@")
        (spool_dir / "bob.lock").unlink()
        (spool_dir / "bob.lock").write_bytes(b"0")
    assert (spool_dir / "bob.lock").read_bytes() == b"0"


def recreate_on_the_same_inode(path, data):
    """Delete `path` and make a new file of `data` there on the inode it had
    (ext4 and most others soon give a new file the inode just freed)."""
    inode = path.stat().st_ino
    path.unlink()
    for n in range(100):
        candidate = path.with_name(f"new-{n}")
        candidate.write_bytes(data)
        if candidate.stat().st_ino == inode:
            candidate.rename(path)
            break
    for leftover in path.parent.glob("new-*"):
        leftover.unlink()
    assert path.stat().st_ino == inode


@pytest.mark.parametrize("step", ["journal-durable", "journal-unlink"])  # before the spool is written; after
@pytest.mark.parametrize("how", ["rewritten in place", "deleted and recreated"])
def test_a_journal_is_never_applied_to_another_spool_on_the_same_inode(mod, spool_dir, caplog, step, how):
    path = spool_dir / "bob"
    path.write_bytes(spool_of(30))
    inode = path.stat().st_ino
    commit_with_hook(mod, "bob", {0}, crash_at(step), raises=Crash)
    other = spool_of(40, start=100)  # another mailbox's mail, longer than the old one
    if how == "rewritten in place":
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(other)
    else:
        recreate_on_the_same_inode(path, other)
    assert path.stat().st_ino == inode
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 40
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == other
    kept = [name for name in os.listdir(spool_dir) if name.startswith("bob.mpop3-journal.orphaned")]
    assert len(kept) == 1  # set aside for the administrator, not applied
    assert "not applied" in caplog.text


def test_the_commit_id_tells_a_spool_recreated_on_the_same_inode_from_the_journals(mod, spool_dir, caplog):
    # the same first and last bytes, the same length, the same inode: only
    # the commit id the spool carried (an extended attribute) tells them apart
    path = spool_dir / "bob"
    old = spool_of(30)
    path.write_bytes(old)
    try:
        os.setxattr(path, mbox_commit.TAG, b"x")
    except OSError:
        pytest.skip("no user extended attributes here: the samples alone tie a journal to its spool")
    commit_with_hook(mod, "bob", {0}, crash_at("journal-durable"), raises=Crash)
    other = old.replace(b"line 1 of message 15\n", b"LINE 1 OF MESSAGE 15\n")  # new mail, in the middle
    recreate_on_the_same_inode(path, other)
    box = mod.storage_lock_mailbox("bob")
    assert mod.storage_message_count(box) == 30
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == other
    assert "does not carry the journal's commit id" in caplog.text


def test_a_commit_journals_a_window_at_a_time_not_the_whole_move(mod, spool_dir, monkeypatch):
    path = spool_dir / "bob"
    data = spool_of(2000, body_lines=100)  # 5 MB to move one message to the left
    path.write_bytes(data)
    monkeypatch.setattr(mbox_commit, "WINDOW_MAX", 256 << 10)
    sizes = []

    def journal_size(step):
        for name in ("bob.mpop3-journal", "bob.mpop3-journal.tmp"):
            if (spool_dir / name).exists():
                sizes.append((spool_dir / name).stat().st_blocks * 512)

    commit_with_hook(mod, "bob", {0}, journal_size)
    assert path.read_bytes() == data[len(message(0, body_lines=100)) :]
    assert sizes and max(sizes) <= 2 * (256 << 10) + (64 << 10), max(sizes)


SMALL_WINDOWS = {"WINDOW_MIN": 8 << 10, "WINDOW_MAX": 8 << 10, "READ_CHUNK": 4 << 10, "COPY_CHUNK": 4 << 10}


def spool_with_a_big_message(at, count=60):
    """`count` messages, message `at` 200 KB: deleting it moves the rest
    further than a window, straight from the spool."""
    return b"".join(message(n, body_lines=9000 if n == at else 20) for n in range(count))


WINDOWED = {
    "the first message": (spool_of(100, body_lines=20), {0}),
    "scattered messages": (spool_of(100, body_lines=20), {3, 4, 5, 40, 97}),
    "a big message": (spool_with_a_big_message(2), {2}),
    "a small then a big message": (spool_with_a_big_message(30), {1, 30}),
}


def without(data, deleted):
    from mpop3.mbox import kernels_reference as ref

    return b"".join(
        data[m.start : m.end + (1 if data[m.end : m.end + 1] == b"\n" else 0)]
        for i, m in enumerate(ref.parse(data))
        if i not in deleted
    )


def steps_of_a_commit(mod, path, data, deleted):
    """The names of the steps an uninterrupted commit takes, in order."""
    path.write_bytes(data)
    seen = []
    mbox_commit.step_hook = seen.append
    try:
        commit(mod, "bob", deleted)
    finally:
        mbox_commit.step_hook = None
    assert path.read_bytes() == without(data, deleted)
    return seen


def windowed(mod, spool_dir, monkeypatch, case):
    """Small windows, and case WINDOWED[case] committed once without a
    crash: (bob's path, old spool, deleted, new spool, steps of the commit)."""
    for knob, value in SMALL_WINDOWS.items():
        monkeypatch.setattr(mbox_commit, knob, value)
    path = spool_dir / "bob"
    old, deleted = WINDOWED[case]
    return path, old, deleted, without(old, deleted), steps_of_a_commit(mod, path, old, deleted)


def crash_at_index(index):
    seen = []

    def hook(step):
        seen.append(step)
        if len(seen) == index:
            raise Crash(step)

    return hook


@pytest.mark.parametrize("case", sorted(WINDOWED))
def test_a_commit_interrupted_at_any_step_of_any_window_leaves_the_old_or_the_new_mailbox(
    mod, spool_dir, monkeypatch, case
):
    path, old, deleted, new, steps = windowed(mod, spool_dir, monkeypatch, case)
    assert steps.count("window") >= 3  # several windows, and a crash between each two
    outcomes = set()
    for index in range(1, len(steps) + 1):
        for mail_meanwhile in (False, True):
            path.write_bytes(old)
            commit_with_hook(mod, "bob", deleted, crash_at_index(index), raises=Crash)
            if mail_meanwhile:  # an fcntl-only MDA delivers before anyone opens the mailbox
                with open(path, "ab") as f:
                    f.write(message(77))
            box = mod.storage_lock_mailbox("bob")  # replays the journal, if any
            mod.storage_unlock_mailbox(box)
            after = path.read_bytes()
            extra = message(77) if mail_meanwhile else b""
            assert after in (old + extra, new + extra), f"crashed at step {index} ({steps[index - 1]})"
            outcomes.add(after == new + extra)
            assert sorted(os.listdir(spool_dir)) == ["bob"]
    assert outcomes == {False, True}


@pytest.mark.parametrize("case", sorted(WINDOWED))
def test_a_replay_interrupted_in_turn_is_replayed_again(mod, spool_dir, monkeypatch, case):
    path, old, deleted, new, steps = windowed(mod, spool_dir, monkeypatch, case)
    durable = steps.index("journal-durable") + 1
    for index in range(durable, len(steps) + 1, 3):
        path.write_bytes(old)
        commit_with_hook(mod, "bob", deleted, crash_at_index(index), raises=Crash)
        for again in range(1, 30, 4):  # the replay crashes too, at its again-th step
            mbox_commit.step_hook = crash_at_index(again)
            try:
                box = mod.storage_lock_mailbox("bob")
                mod.storage_unlock_mailbox(box)
                break  # it had fewer steps: done
            except Crash:
                pass
            finally:
                mbox_commit.step_hook = None
        box = mod.storage_lock_mailbox("bob")
        mod.storage_unlock_mailbox(box)
        assert path.read_bytes() == new, f"crashed at step {index} ({steps[index - 1]}), then in the replay"
        assert sorted(os.listdir(spool_dir)) == ["bob"]


@pytest.mark.parametrize("lost", ["the window's bytes", "the window's record"])
def test_a_window_a_power_cut_tore_is_redone_from_the_one_before(mod, spool_dir, monkeypatch, lost):
    # kill -9 loses nothing written; a power cut may lose what was written
    # since the last fsync, in any order: here the journal of the third
    # window half-written when its fsync never happened
    for knob, value in SMALL_WINDOWS.items():
        monkeypatch.setattr(mbox_commit, knob, value)
    path = spool_dir / "bob"
    old, deleted = WINDOWED["the first message"]
    path.write_bytes(old)
    # crashed at the third journal fsync: the commit point's, then windows 2 and 3
    commit_with_hook(mod, "bob", deleted, crash_at("journal-fsync", 3), raises=Crash)
    journal = spool_dir / "bob.mpop3-journal"
    with open(journal, "r+b") as f:
        plan = mbox_commit.Plan.unpack(f.fileno())
        torn = mbox_commit.Journal(None, str(journal), f.fileno(), plan, None, plan.header_size)
        if lost == "the window's bytes":
            f.seek(torn.area_offset(0) + 100)  # window 3 went to area 0
        else:
            f.seek(torn.record_offset(0) + 20)
        f.write(b"\0" * 50)
    box = mod.storage_lock_mailbox("bob")
    mod.storage_unlock_mailbox(box)
    assert path.read_bytes() == without(old, deleted)
    assert sorted(os.listdir(spool_dir)) == ["bob"]
