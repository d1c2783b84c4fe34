"""The split model (mpop3/server/split.py): processes by role."""

import array
import ctypes
import grp
import json
import os
import poplib
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest
from mbox_helpers import mbox
from pop_server import TREE, Wire, free_port, wait_for, write_site
from process_limits import children, descendants, process_limit
from system_users import system_user

from mpop3.protocol import replies

pytestmark = [pytest.mark.root, pytest.mark.slow]

LOGIN_USER = "mpop3t-login"  # conftest's login_user
SPOOL = mbox(b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n")


def test_cleartext_login_and_retr(spawn, login_user, tmp_path):
    server = spawn({"vera": "pw"}, {"vera": SPOOL}, {"login_user": LOGIN_USER, "processes": "1"})
    w = Wire(server.port)
    w.login("vera", "pw")
    assert w.cmd("STAT").startswith(b"+OK 2 ")
    assert w.cmd("DELE 1").startswith(b"+OK")
    assert w.cmd("QUIT").startswith(b"+OK")
    assert (tmp_path / "spool" / "vera").read_bytes() == mbox(b"Subject: two\n\nsecond\n")


def status(pid):
    return dict(line.rstrip("\n").split(":\t", 1) for line in open(f"/proc/{pid}/status"))


def role(pid):
    """What the process calls itself: "login", "auth", "spawner", "mail", or "gone"
    (it ended while we looked)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip().removeprefix("mpop3-")
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_each_role_has_its_identity(spawn, login_user):
    server = spawn({"vera": "pw"}, {"vera": SPOOL}, {"login_user": LOGIN_USER, "processes": "2"})
    roles = ["auth", "login", "login", "spawner"]
    pids = wait_for(lambda: sorted(map(role, p := children(server.proc.pid))) == roles and p, seconds=10)
    logins = [p for p in pids if role(p) == "login"]
    for pid in logins:
        wait_for(lambda pid=pid: status(pid)["Uid"].split()[0] != "0", seconds=10)  # started, locked in
        s = status(pid)
        assert s["Uid"].split() == [str(login_user.pw_uid)] * 4
        assert s["Gid"].split() == [str(login_user.pw_gid)] * 4
        assert s["Groups"].strip() == ""
        assert int(s["CapEff"], 16) == 0 and int(s["CapPrm"], 16) == 0
        assert os.readlink(f"/proc/{pid}/root") != "/"
    (auth,) = [p for p in pids if role(p) == "auth"]  # auth_file needs no root: safe_user
    assert status(auth)["Uid"].split() == [str(pwd.getpwnam("nobody").pw_uid)] * 4
    (spawner,) = [p for p in pids if role(p) == "spawner"]  # root: it gives each mail process its user
    assert status(spawner)["Uid"].split() == ["0"] * 4


BIG = b"Subject: big\n\n" + b"".join(b"line %07d of a 7 MB message, with text to fill it\n" % n for n in range(135000))


def retr_bytes(p, number):
    _, lines, _ = p.retr(number)
    return b"\r\n".join(lines) + b"\r\n"


@pytest.mark.parametrize("transport", ["clear", "stls", "tls"])
def test_a_7_mb_message_byte_exact_through_the_hand_off_and_the_relay(spawn, login_user, certificate, transport):
    cert, key = certificate
    tls_port = free_port()
    extra = {"login_user": LOGIN_USER, "processes": "1", "tls_cert": cert, "tls_key": key}
    server = spawn({"vera": "pw"}, {"vera": mbox(BIG)}, {**extra, "listen_tls": f"127.0.0.1:{tls_port}"})
    context = ssl.create_default_context(cafile=cert)
    if transport == "tls":
        p = poplib.POP3_SSL("127.0.0.1", tls_port, context=context, timeout=20)
    else:
        p = poplib.POP3("127.0.0.1", server.port, timeout=20)
        if transport == "stls":
            p.stls(context)
    p.user("vera")
    assert p.pass_("pw").startswith(b"+OK maildrop has 1 message")
    got = retr_bytes(p, 1)
    assert len(got) > 7_000_000
    assert got == BIG.replace(b"\n", b"\r\n")
    assert p.quit().startswith(b"+OK")


def test_failed_logins_delay_the_right_password_whichever_login_process_takes_it(spawn, login_user):
    server = spawn(
        {"vera": "pw", "walt": "pw"},
        {"vera": SPOOL, "walt": SPOOL},
        {"login_user": LOGIN_USER, "processes": "2", "login_fail_delay": "1", "login_fail_delay_max": "1"},
    )
    w = Wire(server.port)
    w.cmd("USER vera")
    w.send(b"PASS wrong\r\n")
    time.sleep(0.2)
    w.close()
    for _ in range(4):  # the kernel spreads connections: some land on the other process
        start = time.monotonic()
        w = Wire(server.port)
        w.cmd("USER vera")
        assert w.cmd("PASS pw").startswith(b"+OK maildrop")
        took = time.monotonic() - start
        w.cmd("QUIT")
        if took < 0.5:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the delay never ended")
    w = Wire(server.port)
    start = time.monotonic()
    w.login("walt", "pw")  # another user: not delayed
    assert time.monotonic() - start < 0.5


def split_site(spawn, **extra):
    return spawn(
        {"vera": "pw", "walt": "pw"},
        {"vera": SPOOL, "walt": SPOOL},
        {"login_user": LOGIN_USER, "processes": "1", **extra},
    )


def role_pids(server):
    """The login processes, and the others: the auth process first, then
    the mail processes (the spawner's children), oldest first."""
    roles = {pid: role(pid) for pid in descendants(server.proc.pid)}
    logins = [p for p, r in roles.items() if r == "login"]
    auth = [p for p, r in roles.items() if r == "auth"]
    mail = [p for p, r in roles.items() if r == "mail"]
    return logins, auth + sorted(mail, key=started)


def started(pid):
    """When the process started, in clock ticks since boot (its pid may
    have wrapped around)."""
    return int(stat_fields(pid)[19] or 0)


def stat_fields(pid):
    """/proc/PID/stat from its third field (state) on; empty strings if
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return [""] * 50


def kill_9(pid):
    """kill -9, and wait until the master has reaped it: only then are all
    its threads gone and its descriptors closed (its first thread shows Z
    while a worker thread may still be finishing an fsync). Until then a
    session sent to it is lost with it, as with any process that dies
    holding one."""
    os.kill(pid, 9)
    wait_for(lambda: stat_fields(pid)[0] == "", seconds=10)


def test_kill_9_of_a_login_process_ends_only_its_sessions(spawn, login_user):
    server = split_site(spawn)
    logged_in = Wire(server.port)
    logged_in.login("vera", "pw")  # now in a mail process
    waiting = Wire(server.port)
    waiting.cmd("USER walt")
    (login,), _ = wait_for(lambda: len((r := role_pids(server))[0]) == 1 and r, seconds=10)
    os.kill(login, 9)
    assert waiting.closed()
    assert logged_in.cmd("STAT").startswith(b"+OK 2 ")  # the mail process goes on
    wait_for(lambda: (r := role_pids(server))[0] and r[0][0] != login, seconds=10)
    w = wait_for(lambda: connects(server.port), seconds=10)
    w.login("walt", "pw")
    assert w.cmd("STAT").startswith(b"+OK 2 ")


def connects(port):
    try:
        return Wire(port)
    except OSError:
        return None


def test_kill_9_of_the_auth_process_and_logins_go_on(spawn, login_user):
    server = split_site(spawn)
    logged_in = Wire(server.port)
    logged_in.login("vera", "pw")
    _, others = wait_for(lambda: len((r := role_pids(server))[1]) == 2 and r, seconds=10)
    auth = others[0]
    os.kill(auth, 9)
    time.sleep(1.5)  # the master starts another
    assert logged_in.cmd("STAT").startswith(b"+OK 2 ")
    w = Wire(server.port)
    w.cmd("USER walt")
    reply = w.cmd("PASS pw")
    assert reply.startswith(b"+OK maildrop"), reply


def test_kill_9_of_the_spawner_leaves_its_mail_processes_serving(spawn, login_user):
    """The spawner forks the mail processes: killed, the one it started
    serves on and is reaped by the master (not left a zombie), and a new
    spawner starts the next."""
    server = split_site(spawn, mail_process_idle="0")
    logged_in = Wire(server.port)
    logged_in.login("vera", "pw")
    _, (auth, mail) = wait_for(lambda: len((r := role_pids(server))[1]) == 2 and r, seconds=10)
    (spawner,) = [p for p in children(server.proc.pid) if role(p) == "spawner"]
    kill_9(spawner)
    assert mail in children(server.proc.pid)  # the master's now
    assert logged_in.cmd("STAT").startswith(b"+OK 2 ")
    assert logged_in.cmd("QUIT").startswith(b"+OK")
    wait_for(lambda: stat_fields(mail)[0] == "", seconds=10)  # ended, and reaped
    wait_for(lambda: [p for p in children(server.proc.pid) if role(p) == "spawner"], seconds=10)
    w = Wire(server.port)
    w.login("walt", "pw")  # in a mail process of the new spawner
    assert w.cmd("STAT").startswith(b"+OK 2 ")
    assert [p for p in role_pids(server)[1] if p != auth] != [mail]


def test_a_mail_process_per_uid_reused_and_killed_alone(spawn, login_user, tmp_path):
    """vera and walt have no system account: one mail process serves both
    (mail_owner, here safe_user), one after the other and at once; carl's
    own account gets a process of its own. Killing the first ends vera's
    and walt's sessions only, commits nothing, and the next login starts
    another."""
    with system_user("mpop3t-carl") as carl:
        server = spawn(
            {"vera": "pw", "walt": "pw", "mpop3t-carl": "pw"},
            {"vera": SPOOL, "walt": SPOOL, "mpop3t-carl": SPOOL},
            {"login_user": LOGIN_USER, "processes": "1"},
        )
        spool = tmp_path / "spool"
        os.chown(spool / "mpop3t-carl", carl.pw_uid, carl.pw_gid)
        os.chown(spool, 0, grp.getgrnam("mail").gr_gid)  # as Debian's /var/mail
        os.chmod(spool, 0o2775)
        w = Wire(server.port)
        w.login("vera", "pw")
        w.cmd("QUIT")
        _, (auth, mail) = wait_for(lambda: len((r := role_pids(server))[1]) == 2 and r, seconds=10)
        first, second = Wire(server.port), Wire(server.port)
        first.login("vera", "pw")
        second.login("walt", "pw")
        assert role_pids(server)[1] == [auth, mail]  # the same mail process
        assert status(mail)["Uid"].split() == [str(pwd.getpwnam("nobody").pw_uid)] * 4
        third = Wire(server.port)
        third.login("mpop3t-carl", "pw")
        _, others = wait_for(lambda: len((r := role_pids(server))[1]) == 3 and r, seconds=10)
        assert status(others[2])["Uid"].split() == [str(carl.pw_uid)] * 4  # carl's own
        first.cmd("DELE 1")
        kill_9(mail)
        assert first.closed() and second.closed()
        assert third.cmd("STAT").startswith(b"+OK 2 ")  # another uid's process goes on
        assert (spool / "vera").read_bytes() == SPOOL  # nothing committed
        w = Wire(server.port)
        w.login("vera", "pw")
        assert w.cmd("STAT").startswith(b"+OK 2 ")


def test_an_idle_mail_process_ends(spawn, login_user):
    server = split_site(spawn, mail_process_idle="0.5")
    w = Wire(server.port)
    w.login("vera", "pw")
    wait_for(lambda: len(role_pids(server)[1]) == 2, seconds=10)
    w.cmd("QUIT")
    wait_for(lambda: len(role_pids(server)[1]) == 1, seconds=5)  # the auth process only


def steal_socket(pid, fd):
    """A copy of descriptor `fd` of process `pid` (pidfd_getfd, as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return socket.socket(fileno=got)
    finally:
        os.close(pidfd)


SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike


def hand_off_socket(login_pid):
    """The login process's end of its hand-off socket: its SOCK_SEQPACKET
    socket whose peer the master holds (the others lead to the auth process)."""
    master = int(status(login_pid)["PPid"])
    peers = unix_peers()
    for fd in os.listdir(f"/proc/{login_pid}/fd"):
        target = os.readlink(f"/proc/{login_pid}/fd/{fd}")
        if not target.startswith("socket:["):
            continue
        inode = int(target[8:-1])
        if peers.get(inode) in holders(master):
            sock = steal_socket(login_pid, int(fd))
            if sock.type == socket.SOCK_SEQPACKET:
                return sock
            sock.close()
    raise AssertionError("no hand-off socket found")


def unix_peers():
    """inode -> peer inode, for every UNIX socket (ss)."""
    out = subprocess.run(["ss", "-xanH"], capture_output=True, text=True, check=True).stdout
    peers = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[5].isdigit() and fields[7].isdigit():
            peers[int(fields[5])] = int(fields[7])
    return peers


def holders(pid):
    """The socket inodes process `pid` holds."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def test_a_lying_login_process_cannot_pick_a_mailbox(spawn, login_user, tmp_path):
    """A login process taken over by a client hands the master a session
    for vera with a ticket the auth process never gave: the master refuses
    it, and serves nobody's mailbox."""
    server = split_site(spawn)
    (login,), _ = wait_for(lambda: len((r := role_pids(server))[0]) == 1 and r, seconds=10)
    wait_for(lambda: status(login)["Uid"].split()[0] != "0", seconds=10)
    hand_off = hand_off_socket(login)
    client, given = socket.socketpair()
    forged = {
        "ticket": "00" * 16,
        "peer": "127.0.0.1",
        "user": b"vera".hex(),
        "mailbox": "vera",
        "secure": False,
        "cleartext_ok": True,
        "failures": 0,
        "lines": [],
    }
    rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [given.fileno()]))
    hand_off.sendmsg([json.dumps(forged).encode()], [rights])
    given.close()
    client.settimeout(5)
    assert client.recv(100).startswith(b"-ERR [SYS/TEMP]")
    assert client.recv(100) == b""
    assert len(role_pids(server)[1]) == 1  # the auth process only: no mail process was started
    w = Wire(server.port)  # and the server goes on
    w.login("vera", "pw")


def test_sighup_replaces_the_login_processes_gracefully(spawn, login_user, certificate, tmp_path):
    """A new configuration reaches new clients through new login processes;
    a client in the middle of its login finishes it on the old one, which
    then ends. A certificate that does not load keeps the running ones."""
    cert, key = certificate
    server = split_site(spawn, implementation="first", tls_cert=cert, tls_key=key)
    (old,), _ = wait_for(lambda: len((r := role_pids(server))[0]) == 1 and r, seconds=10)
    wait_for(lambda: status(old)["Uid"].split()[0] != "0", seconds=10)
    midway = Wire(server.port)
    midway.cmd("USER vera")
    relayed = poplib.POP3("127.0.0.1", server.port, timeout=10)
    relayed.stls(ssl.create_default_context(cafile=cert))
    relayed.user("walt")
    relayed.pass_("pw")  # logged in, through the old login process's relay
    conf = tmp_path / "mpop3.conf"
    conf.write_text(conf.read_text().replace("implementation first", "implementation second"))
    os.kill(server.proc.pid, signal.SIGHUP)
    (new,) = wait_for(lambda: [p for p in role_pids(server)[0] if p != old], seconds=10)
    wait_for(lambda: status(new)["Uid"].split()[0] != "0", seconds=10)
    w = Wire(server.port)
    w.cmd("CAPA")
    assert b"IMPLEMENTATION second" in w.multi()
    assert midway.cmd("PASS pw").startswith(b"+OK maildrop")  # finished on the old one
    assert midway.cmd("STAT").startswith(b"+OK 2 ")
    time.sleep(0.5)
    assert old in children(server.proc.pid)  # still relaying walt's session
    assert relayed.stat()[0] == 2
    relayed.quit()
    wait_for(lambda: old not in children(server.proc.pid), seconds=15)  # which then ends
    conf.write_text(conf.read_text().replace(f"tls_key {key}", f"tls_key {tmp_path / 'missing.pem'}"))
    os.kill(server.proc.pid, signal.SIGHUP)
    time.sleep(1.5)
    assert role_pids(server)[0] == [new]  # kept
    Wire(server.port).login("walt", "pw")


def test_mail_processes_started_after_sighup_have_the_new_configuration(spawn, login_user, tmp_path):
    """The spawner re-reads the configuration too: a mail process it
    starts after a SIGHUP ends an idle session at the new idle_timeout."""
    server = split_site(spawn, mail_process_idle="0", idle_timeout="600")
    (old,), _ = wait_for(lambda: len((r := role_pids(server))[0]) == 1 and r, seconds=10)
    conf = tmp_path / "mpop3.conf"
    conf.write_text(conf.read_text().replace("idle_timeout 600", "idle_timeout 1"))
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: [p for p in role_pids(server)[0] if p != old], seconds=10)  # the master has reloaded
    time.sleep(0.5)
    w = Wire(server.port)
    w.login("vera", "pw")
    start = time.monotonic()
    assert w.closed(timeout=10)
    assert 0.8 < time.monotonic() - start < 5


def test_a_login_user_not_made_yet_keeps_a_process_per_session_and_says_so(spawn):
    server = split_site(spawn, login_user="mpop3t-nobody-made-this")
    w = Wire(server.port)
    w.login("vera", "pw")
    assert w.cmd("STAT").startswith(b"+OK 2 ")
    assert not role_pids(server)[0]  # no login process
    server.stop()
    assert "login_user mpop3t-nobody-made-this does not exist" in server.log()


def test_login_user_must_be_an_account_of_its_own(tmp_path):
    conf = write_site(tmp_path, {"vera": "pw"}, {"vera": SPOOL}, {"login_user": "nobody"})
    result = subprocess.run(
        [sys.executable, "-m", "mpop3", "-c", conf, "-l", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=TREE,
    )
    assert result.returncode == 1
    assert "login_user nobody must be an account of its own" in result.stderr


def test_a_refused_fork_is_an_err_and_the_master_goes_on(spawn, login_user):
    server = split_site(spawn)
    (login,), _ = wait_for(lambda: len((r := role_pids(server))[0]) == 1 and r, seconds=10)
    wait_for(lambda: status(login)["Uid"].split()[0] != "0", seconds=10)
    (spawner,) = [p for p in children(server.proc.pid) if role(p) == "spawner"]
    with process_limit(spawner, 1) as set_limit:  # the spawner alone: it cannot fork
        w = Wire(server.port)
        w.cmd("USER vera")
        assert w.cmd("PASS pw") == replies.ERR_NO_SESSION_PROCESS.wire[:-2]
        assert w.closed()
        set_limit(100)
        Wire(server.port).login("vera", "pw")


MESSAGES = [b"Subject: %d\n\n" % n + b"x" * 99 + b"\n" * 1000 for n in range(200)]


@pytest.mark.parametrize("after", [0.0, 0.01, 0.03, 0.1])
def test_a_mail_process_killed_mid_quit_leaves_the_spool_old_or_new(spawn, login_user, tmp_path, after):
    """kill -9 of the mail process at some instant of a QUIT that deletes
    message 1 of a 2 MB spool: the next login finds the old spool or the
    new one, byte for byte (the engine's guarantee, through this path)."""
    old = mbox(*(m * 100 for m in MESSAGES[:20]))
    new = mbox(*(m * 100 for m in MESSAGES[1:20]))
    server = split_site(spawn)
    spool = tmp_path / "spool" / "vera"
    spool.write_bytes(old)
    w = Wire(server.port)
    w.login("vera", "pw")
    _, (auth, mail) = wait_for(lambda: len((r := role_pids(server))[1]) == 2 and r, seconds=10)
    w.cmd("DELE 1")
    w.send(b"QUIT\r\n")
    time.sleep(after)
    kill_9(mail)
    w = Wire(server.port)
    try:
        w.login("vera", "pw")  # repairs a half-done commit first
    except EOFError:
        server.stop()
        raise AssertionError("closed at login; the server's log:\n" + server.log()) from None
    assert spool.read_bytes() in (old, new)


def test_a_session_sent_to_a_mail_process_that_dies_before_taking_it_goes_to_another(spawn, login_user):
    """The master keeps its copy of a client until the mail process says it
    took it: here the process is stopped when the session is sent, then
    killed; the session is served by a new one, not lost."""
    server = split_site(spawn)
    w = Wire(server.port)
    w.login("vera", "pw")
    w.cmd("QUIT")
    _, (auth, mail) = wait_for(lambda: len((r := role_pids(server))[1]) == 2 and r, seconds=10)
    os.kill(mail, signal.SIGSTOP)  # idle, kept for vera's next session
    try:
        w = Wire(server.port)
        w.cmd("USER vera")
        w.send(b"PASS pw\r\n")
        time.sleep(0.5)  # handed to the stopped process (nothing answers)
    finally:
        kill_9(mail)
    assert w.line().startswith(b"+OK maildrop has 2 messages")
    assert w.cmd("STAT").startswith(b"+OK 2 ")
    assert mail not in role_pids(server)[1]


def test_the_auth_and_a_login_process_killed_together_both_come_back(spawn, login_user):
    """A login process restarted while the auth process is down waits for
    it (its sockets come from the auth process) instead of failing the master."""
    server = split_site(spawn)
    (login,), (auth,) = wait_for(lambda: len((r := role_pids(server))[0]) == 1 and len(r[1]) == 1 and r, seconds=10)
    os.kill(login, 9)
    time.sleep(0.2)  # its restart comes due first, while the auth process is down
    os.kill(auth, 9)
    w = wait_for(lambda: logged_in_or_none(server.port), seconds=15)
    assert w.cmd("STAT").startswith(b"+OK 2 ")
    assert server.proc.poll() is None  # the master never fell


def logged_in_or_none(port):
    try:
        w = Wire(port)
        w.cmd("USER vera")
        if w.cmd("PASS pw").startswith(b"+OK"):
            return w
    except (OSError, EOFError):
        pass
    return None


def test_more_pipelined_commands_than_a_hand_off_carries_get_an_err(spawn, login_user):
    """A hand-off carries the commands sent ahead of the login's answer, up
    to a bound: past it the client is told, never left hanging."""
    server = split_site(spawn)
    w = Wire(server.port)
    w.cmd("USER vera")
    w.send(b"PASS pw\r\n" + b"NOOP\r\n" * 200)
    assert w.line() == replies.ERR_TEMP.wire[:-2]
    assert w.closed()
    few = Wire(server.port)
    few.cmd("USER vera")
    few.send(b"PASS pw\r\nSTAT\r\nNOOP\r\n")
    assert few.line().startswith(b"+OK maildrop")
    assert few.line().startswith(b"+OK 2 ")
