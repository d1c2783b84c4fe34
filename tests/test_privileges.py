"""The privilege rules end to end: the real mpop3 started as root (as CI
runs it), the identity of the process serving each session read from
/proc/PID/status, with system accounts made for the test."""

import grp
import os
import pwd
import signal
import socket
import subprocess
import sys
import time

import pytest
from mbox_helpers import mbox
from pop_server import ANY_USER, SAFE_USER, Wire, wait_for, write_site
from process_limits import children, process_limit
from system_users import system_user

pytestmark = pytest.mark.root  # switching users needs root

MAIL_GID = grp.getgrnam("mail").gr_gid
NOBODY = pwd.getpwnam(SAFE_USER)
SPOOL = mbox(b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n")


@pytest.fixture(autouse=True)
def as_root():
    assert os.geteuid() == 0, "these tests check what mpop3 does when started as root"


def identity(pid):
    """(uids, gids, groups) of a process, as the kernel has them."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return (fields["Uid"].split(), fields["Gid"].split(), fields["Groups"].split())


def session_pid(server):
    """The one session process the listener has forked (once the one for
    Spawned's check that the server listens has gone)."""
    return wait_for(lambda: len(pids := children(server.proc.pid)) == 1 and pids, seconds=5)[0]


def expect(pid, user):
    """The process is `user`, with no supplementary group: the mail group
    is only its saved gid, taken as effective gid just while it makes or
    removes state files (so, not now: a spool of root:mail 0660 stays
    unreadable to it)."""
    uid, gid = str(user.pw_uid), str(user.pw_gid)
    assert identity(pid) == ([uid] * 4, [gid, gid, str(MAIL_GID), gid], [])


def own(path, user):
    os.chown(path, user.pw_uid, user.pw_gid)


def test_rule1_system_mailbox_is_served_as_its_user(tmp_path, spawn):
    with system_user("mpop3t-carol") as carol:
        with spawn({"mpop3t-carol": "pw"}, {"mpop3t-carol": SPOOL}) as server:
            spool = tmp_path / "spool" / "mpop3t-carol"
            own(spool, carol)
            # as Debian's /var/mail: root:mail 2775, dot-locks made through mail_group
            os.chown(tmp_path / "spool", 0, MAIL_GID)
            os.chmod(tmp_path / "spool", 0o2775)
            w = Wire(server.port)
            pid = session_pid(server)
            assert identity(pid)[0] == ["0"] * 4  # root until the user has authenticated
            w.login("mpop3t-carol", "pw")
            expect(pid, carol)
            assert identity(server.proc.pid)[0] == ["0"] * 4  # the listener keeps root
            assert w.cmd("DELE 1").startswith(b"+OK")
            assert w.cmd("QUIT").startswith(b"+OK")
        assert spool.read_bytes() == mbox(b"Subject: two\n\nsecond\n")
        assert (spool.stat().st_uid, spool.stat().st_gid) == (carol.pw_uid, carol.pw_gid)


def test_rule1_virtual_user_is_served_as_safe_user_or_mail_owner(tmp_path, spawn):
    with spawn({"vera": "pw"}, {"vera": SPOOL}) as server:  # vera has no system account
        spool = tmp_path / "spool" / "vera"
        inode = spool.stat().st_ino
        w = Wire(server.port)
        pid = session_pid(server)
        w.login("vera", "pw")
        expect(pid, NOBODY)
        assert w.cmd("DELE 2").startswith(b"+OK")
        assert w.cmd("QUIT").startswith(b"+OK")
    assert spool.read_bytes() == mbox(b"Subject: one\n\nfirst\n")
    assert (spool.stat().st_ino, spool.stat().st_uid) == (inode, NOBODY.pw_uid)
    # with a mail owner of their own
    with system_user("mpop3t-vmail") as vmail:
        with spawn({"vera": "pw"}, {"vera": SPOOL}, {"mail_owner": "mpop3t-vmail"}, root=tmp_path / "owned") as server:
            for path in (tmp_path / "owned" / "spool", tmp_path / "owned" / "spool" / "vera"):
                own(path, vmail)
            w = Wire(server.port)
            pid = session_pid(server)
            w.login("vera", "pw")
            expect(pid, vmail)
            assert w.cmd("STAT").startswith(b"+OK 2 ")


def test_a_session_process_does_its_blocking_work_on_its_one_thread(tmp_path, spawn):
    """No worker thread: there is no other session to keep waiting, and
    starting one would cost each session process more than the login."""
    with spawn({"vera": "pw"}, {"vera": SPOOL}) as server:
        w = Wire(server.port)
        pid = session_pid(server)
        w.login("vera", "pw")
        assert w.cmd("DELE 1").startswith(b"+OK")
        threads = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))["Threads"].strip()
        assert threads == "1"
        assert w.cmd("QUIT").startswith(b"+OK")
    assert (tmp_path / "spool" / "vera").read_bytes() == mbox(b"Subject: two\n\nsecond\n")


def listener_log(server):
    server.stop()
    return server.proc.stderr.read().decode(errors="replace")


def test_a_lying_session_process_cannot_hurt_the_listener(spawn, test_modules):
    """A session process runs as a mailbox's user and serves a client that
    may be hostile: what it tells the listener (the root process) is
    checked; a lie is logged and ends the listener's attention to it."""
    server = spawn({}, {"vera": SPOOL}, auth=test_modules["lying_auth"])
    for lie in range(3):
        w = Wire(server.port)
        w.cmd(f"USER liar-{lie}")
        assert w.cmd("PASS x").startswith(b"-ERR [AUTH]")  # its own copy of the delays decided
        assert server.proc.poll() is None
        w.login("vera", "pw")  # the session itself goes on
        w.cmd("QUIT")  # and lets the mailbox go before the next one logs in
    w = Wire(server.port)
    w.login("vera", "pw")
    assert w.cmd("STAT").startswith(b"+OK 2 ")
    assert w.cmd("QUIT").startswith(b"+OK")
    log = listener_log(server)
    assert log.count("malformed report") == 3, log
    assert "Traceback" not in log


def test_a_session_process_cannot_lie_about_logins_either(spawn, test_modules):
    """The LOGIN-DELAY reports are held to the same rules: a malformed
    mark, or a second login from one session, and the listener stops
    listening to that process."""
    server = spawn({}, {"vera": SPOOL}, {"login_delay": "60"}, auth=test_modules["lying_auth"])
    for lie in (3, 4):
        w = Wire(server.port)
        w.cmd(f"USER liar-{lie}")
        assert w.cmd("PASS x").startswith(b"-ERR [AUTH]")
    w = Wire(server.port)
    w.login("vera", "pw")  # the listener goes on serving
    log = listener_log(server)
    assert log.count("malformed report") == 2, log
    assert "Traceback" not in log


def test_a_session_process_that_cannot_start_is_refused_and_the_listener_goes_on(spawn):
    server = spawn({"vera": "pw"}, {"vera": SPOOL})
    wait_for(lambda: not children(server.proc.pid))  # the start-up check's session ends
    with process_limit(server.proc.pid, 1) as set_limit:  # the listener alone: fork fails
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            assert sock.recv(200) == b"-ERR [SYS/TEMP] no session can be started now, try again later\r\n"
            assert sock.recv(200) == b""
        assert server.proc.poll() is None
        set_limit(10)
        w = Wire(server.port)
        w.login("vera", "pw")
        assert w.cmd("STAT").startswith(b"+OK 2 ")
        assert w.cmd("QUIT").startswith(b"+OK")
    assert "cannot start a session process: Resource temporarily unavailable" in listener_log(server)


def test_rule1_a_spool_of_another_owner_is_refused(tmp_path, spawn):
    server = spawn({"vera": "pw"}, {"vera": SPOOL})
    os.chown(tmp_path / "spool" / "vera", 0, 0)  # root's, not safe_user's
    w = Wire(server.port)
    w.cmd("USER vera")
    assert w.cmd("PASS pw").startswith(b"-ERR [SYS/PERM]")


def test_rule2_auth_needing_root_switches_to_safe_user_after_login(spawn):
    with system_user("mpop3t-gus", "s3cret!") as gus:
        with spawn({}, {"mpop3t-gus": SPOOL}, auth="auth_getpw", mbox_options=ANY_USER) as server:
            w = Wire(server.port)
            assert b"<" not in w.greeting  # auth_getpw has no plaintext: no APOP
            pid = session_pid(server)
            assert identity(pid)[0] == ["0"] * 4  # reading /etc/shadow needs root
            w.login("mpop3t-gus", "s3cret!")
            expect(pid, NOBODY)
            assert w.cmd("STAT").startswith(b"+OK 2 ")
        assert gus.pw_uid != NOBODY.pw_uid


def test_rule3_after_bind_the_whole_server_is_safe_user(spawn):
    users, boxes = {"vera": "pw", "walt": "pw"}, {"vera": SPOOL, "walt": SPOOL}
    server = spawn(users, boxes, {"processes": "2", "max_sessions": "2"}, mbox_options=ANY_USER)
    expect(server.proc.pid, NOBODY)  # before any client: right after bind()
    workers = wait_for(lambda: len(pids := children(server.proc.pid)) == 2 and pids, seconds=5)
    for pid in workers:
        expect(pid, NOBODY)
    time.sleep(0.2)  # Spawned's probe session has ended
    sessions = [Wire(server.port), Wire(server.port)]
    sessions[0].login("vera", "pw")
    sessions[1].login("walt", "pw")
    assert sessions[0].cmd("STAT").startswith(b"+OK 2 ")
    # max_sessions counts the sessions of both server processes
    for _ in range(4):
        extra = Wire(server.port)
        assert extra.greeting.startswith(b"-ERR [SYS/TEMP] too many sessions"), extra.greeting
    sessions[1].cmd("QUIT")
    wait_for(lambda: Wire(server.port).greeting.startswith(b"+OK"), seconds=5, interval=0.05)


def test_rule4_stdin_mode_switches_at_once(tmp_path):
    conf = write_site(tmp_path, {"vera": "pw"}, {"vera": SPOOL}, mbox_options=ANY_USER)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpop3", "-s", "-c", conf], stdin=theirs, stdout=theirs, stderr=subprocess.PIPE
    )
    theirs.close()
    w = Wire.__new__(Wire)
    w.sock, w.buf = ours, b""
    w.greeting = w.line()
    expect(proc.pid, NOBODY)  # greeted already as safe_user
    w.login("vera", "pw")
    assert w.cmd("QUIT").startswith(b"+OK")
    assert proc.wait(10) == 0


def test_killing_a_session_process_spares_the_rest(spawn):
    server = spawn({"vera": "pw", "walt": "pw"}, {"vera": SPOOL, "walt": SPOOL})
    first = Wire(server.port)
    victim = session_pid(server)
    first.login("vera", "pw")
    second = Wire(server.port)
    second.login("walt", "pw")
    os.kill(victim, signal.SIGKILL)
    assert first.closed()
    assert second.cmd("STAT").startswith(b"+OK 2 ")
    third = Wire(server.port)
    assert third.login("vera", "pw").startswith(b"+OK")  # the dead session's mailbox is free again
    assert server.proc.poll() is None


def test_session_limits_and_login_delays_hold_across_session_processes(spawn):
    limits = {"max_sessions": "2", "login_fail_delay": "0.3", "login_fail_delay_max": "2"}
    server = spawn({"vera": "pw"}, {"vera": SPOOL}, limits)
    # let the sessions of Spawned's probe and of this one end: accepted
    # in order, so once this one greets, the probe's has been forked
    Wire(server.port).close()
    wait_for(lambda: not children(server.proc.pid), seconds=5)
    a, b = Wire(server.port), Wire(server.port)
    assert a.greeting.startswith(b"+OK") and b.greeting.startswith(b"+OK")
    c = Wire(server.port)
    assert c.greeting.startswith(b"-ERR [SYS/TEMP]")
    assert c.closed()
    # failed logins in one session process slow down the next one
    delays = []
    for w, guess in ((a, "guess1"), (b, "guess2")):
        w.cmd("USER vera")
        start = time.monotonic()
        assert w.cmd(f"PASS {guess}").startswith(b"-ERR [AUTH]")
        delays.append(time.monotonic() - start)
    assert 0.25 < delays[0] < 0.55 and 0.55 < delays[1] < 1.0, delays
