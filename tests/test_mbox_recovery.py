"""Repair at start-up (storage_recover): the real mpop3 finishes a commit
that kill -9 interrupted before it listens, so nobody (POP3 client, MUA,
MDA) finds a spool with a stretch of it twice; and it does so as each
spool's owner, never writing as root what a user could have planted."""

import os
import pwd
import signal
import subprocess
import sys
import textwrap

import pytest
from mbox_helpers import TREE, commit_with_hook, committer, message, spool_of, storage
from pop_server import SAFE_USER, Wire, write_site

NOBODY = pwd.getpwnam(SAFE_USER)
FOREIGN = 4321  # a uid and gid nobody on the machine has


def owner_of(path):
    """(uid, gid) a session serving this spool would run as."""
    st = os.stat(path)
    return (st.st_uid, st.st_gid) if os.geteuid() == 0 else None


def crash_a_commit(spool_dir, kill_at):
    """Delete bob's first message in a process of the spool's owner, killed
    (SIGKILL) at the `kill_at`-th copy into the spool after the commit point."""
    script = committer(spool_dir, step="copy", after="journal-durable", owner=owner_of(spool_dir / "bob"))
    child = subprocess.run([sys.executable, "-c", script, str(kill_at)], capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr


@pytest.mark.slow
def test_a_commit_killed_mid_move_is_repaired_before_the_server_listens(tmp_path, spawn):
    old = spool_of(8000, body_lines=100)  # 20 MB
    new = old[len(message(0, body_lines=100)) :]
    conf = write_site(tmp_path, {"bob": "secret"}, {"bob": old})
    spool_dir = tmp_path / "spool"
    crash_a_commit(spool_dir, 2)
    damaged = (spool_dir / "bob").read_bytes()
    assert damaged not in (old, new)  # what an MUA would find now: part moved, part not
    server = spawn(conf=conf)  # returns once it listens
    assert (spool_dir / "bob").read_bytes() == new  # repaired before anyone could log in
    assert sorted(os.listdir(spool_dir)) == ["bob"]
    wire = Wire(server.port)
    wire.login("bob", "secret")
    assert wire.cmd("STAT").startswith(b"+OK 7999 ")
    wire.cmd("QUIT")
    server.stop()
    assert "bob: an interrupted commit was replayed" in server.log()


RECOVER = textwrap.dedent("""
    import logging, sys
    sys.path.insert(0, {tree!r}); sys.path.insert(0, {tree!r} + "/tests")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from mbox_helpers import storage
    storage({spool_dir!r}, **{settings!r}).storage_recover()
""")


def recover(spool_dir, **settings):
    """storage_recover() in a process of its own, as the server calls it
    (as root, here); its log."""
    script = RECOVER.format(tree=TREE, spool_dir=str(spool_dir), settings=settings)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


class Crash(Exception):
    pass


def interrupted(spool_dir, name="bob", messages=30, owner=NOBODY):
    """A spool `name` of `messages` whose commit deleting message 1 stopped
    right after the commit point; spool, journal and directory are the
    owner's, as if the owner's session had crashed there."""
    spool = spool_dir / name
    spool.write_bytes(spool_of(messages))

    def hook(step):
        if step == "journal-durable":
            raise Crash

    commit_with_hook(storage(spool_dir), name, {0}, hook, raises=Crash)
    for leftover in spool_dir.glob(name + ".lock"):
        leftover.unlink()
    for path in [spool_dir, spool, spool_dir / (name + ".mpop3-journal")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return spool


@pytest.fixture
def spool_dir(tmp_path):
    d = tmp_path / "spool"
    d.mkdir()
    path = d
    while str(path) not in ("/", "/tmp"):  # a way down for the spools' owners
        os.chmod(path, os.stat(path).st_mode | 0o011)
        path = path.parent
    return d


@pytest.mark.root
def test_recovery_replays_each_journal_as_the_spools_owner_and_logs_it(spool_dir):
    bob = interrupted(spool_dir, "bob")
    alice = interrupted(spool_dir, "alice", messages=5)
    carol = spool_dir / "carol"
    carol.write_bytes(spool_of(3))
    (spool_dir / "carol.mpop3-journal.tmp").write_bytes(b"never reached its commit point")
    for path in (carol, spool_dir / "carol.mpop3-journal.tmp"):
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    log = recover(spool_dir)
    assert bob.read_bytes() == spool_of(29, start=1)
    assert alice.read_bytes() == spool_of(4, start=1)
    assert carol.read_bytes() == spool_of(3)
    assert sorted(os.listdir(spool_dir)) == ["alice", "bob", "carol"]
    for spool in (bob, alice, carol):
        assert (spool.stat().st_uid, spool.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert "bob: an interrupted commit was replayed" in log
    assert "alice: an interrupted commit was replayed" in log


@pytest.mark.root
def test_recovery_writes_nothing_its_owner_could_not(spool_dir):
    # root may write anything: recovery acting as root would finish this
    # commit; its owner may not write the spool, so neither may recovery
    bob = interrupted(spool_dir)
    os.chmod(bob, 0o444)
    before = bob.read_bytes()
    log = recover(spool_dir)
    assert bob.read_bytes() == before
    assert (spool_dir / "bob.mpop3-journal").exists()
    assert "bob" in log and "read-only" in log


@pytest.mark.root
def test_recovery_never_applies_a_journal_of_another_owner(spool_dir):
    bob = interrupted(spool_dir)
    before = bob.read_bytes()
    os.chown(spool_dir / "bob.mpop3-journal", FOREIGN, FOREIGN)
    log = recover(spool_dir)
    assert bob.read_bytes() == before
    assert (spool_dir / "bob.mpop3-journal").exists()  # left for the administrator
    assert "bob" in log and "not applied" in log


@pytest.mark.root
def test_recovery_follows_no_symlink_and_leaves_roots_files_alone(spool_dir, tmp_path):
    interrupted(spool_dir)
    target = tmp_path / "roots-file"
    target.write_bytes(b"root's own\n")
    os.unlink(spool_dir / "bob")
    os.symlink(target, spool_dir / "bob")  # planted by the spool directory's owner
    interrupted(spool_dir, "root-owned", owner=pwd.getpwuid(0))
    log = recover(spool_dir)
    assert target.read_bytes() == b"root's own\n"
    assert (spool_dir / "bob.mpop3-journal").exists()
    assert (spool_dir / "root-owned").read_bytes() == spool_of(30)  # not even root's own, as root
    assert "bob" in log and "root-owned" in log


@pytest.mark.root
def test_recovery_leaves_a_mailbox_a_session_holds(spool_dir):
    bob = interrupted(spool_dir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import fcntl, os, sys
                fd = os.open({str(spool_dir / "bob.mpop3-session")!r}, os.O_RDWR | os.O_CREAT, 0o600)
                os.fchown(fd, {NOBODY.pw_uid}, {NOBODY.pw_gid})
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                sys.stdin.readline()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = bob.read_bytes()
        log = recover(spool_dir)
        assert bob.read_bytes() == before
        assert "bob" in log and "in use" in log
    finally:
        holder.kill()
        holder.wait()
