"""Signals to the running `mpop3` command: SIGTERM stops it gracefully,
SIGHUP reloads what is safe to reload."""

import os
import signal
import time

import pytest
from mbox_helpers import mbox
from pop_server import ANY_USER, Wire, wait_for
from process_limits import children, process_limit

from mpop3.protocol import replies

pytestmark = pytest.mark.slow  # servers in subprocesses, grace periods


USERS = {"bob": "pw", "alice": "pw"}
BOXES = {
    "bob": mbox(b"Subject: 1\n\none\n", b"Subject: 2\n\ntwo\n"),
    "alice": mbox(b"Subject: a\n\nalice\n", b"Subject: b\n\nbee\n"),
}


def count(port, user):
    w = Wire(port)
    w.login(user, "pw")
    n = int(w.cmd("STAT").split()[1])
    w.cmd("QUIT")
    return n


def test_sigterm_lets_sessions_finish_then_closes_them_uncommitted(spawn):
    server = spawn(USERS, BOXES, {"shutdown_grace": "1.5"})
    finishing = Wire(server.port)
    finishing.login("bob", "pw")
    lingering = Wire(server.port)
    lingering.login("alice", "pw")
    assert lingering.cmd("DELE 1") == replies.OK_DELETED.wire[:-2]
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # no new sessions
        refused = Wire(server.port, timeout=2)
        assert not refused.greeting.startswith(b"+OK")
    except (ConnectionRefusedError, ConnectionResetError, EOFError):
        pass
    # a session may finish during the grace period, and its QUIT commits
    assert finishing.cmd("DELE 2") == replies.OK_DELETED.wire[:-2]
    assert finishing.cmd("QUIT") == b"+OK mpop3 signing off (1 deleted, 1 left)"
    # the other is closed when the grace period is over, without committing
    assert lingering.line() == replies.ERR_SHUTTING_DOWN.wire[:-2]
    assert lingering.closed()
    assert 1.3 < time.monotonic() - start < 5
    assert server.proc.wait(10) == 0
    log = server.proc.stderr.read().decode()
    assert "closing 1 session without committing" in log, log
    server = spawn(conf=server.conf_path)
    assert count(server.port, "bob") == 1
    assert count(server.port, "alice") == 2


def test_sigterm_with_no_sessions_exits_at_once(spawn):
    server = spawn(USERS, BOXES)
    start = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - start < 3


def capabilities(w):
    w.cmd("CAPA")
    return w.multi()


def test_sighup_reloads_safe_settings(spawn):
    server = spawn(USERS, BOXES)
    conf = server.conf_path
    try:
        assert not any(line.startswith(b"IMPLEMENTATION") for line in capabilities(Wire(server.port)))
        with open(conf, "a") as f:
            f.write("implementation mpop3-reloaded\nexpire 30\n")
        server.proc.send_signal(signal.SIGHUP)

        def reloaded():
            capa = capabilities(Wire(server.port))
            return b"IMPLEMENTATION mpop3-reloaded" in capa and capa

        capa = wait_for(reloaded, seconds=5, interval=0.05)
        assert b"EXPIRE 30" in capa
        # a broken file is refused and the running settings stay
        with open(conf, "a") as f:
            f.write("no_such_directive 1\n")
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        w = Wire(server.port)
        assert b"IMPLEMENTATION mpop3-reloaded" in capabilities(w)
        assert w.cmd("USER bob") == replies.OK_USER.wire[:-2]
    finally:
        assert server.stop() == 0
    log = server.proc.stderr.read().decode()
    assert "reload failed, keeping the running configuration" in log and "no_such_directive" in log, log
    assert "needs a restart" not in log, log


def greeting_pid(w):
    return int(w.greeting.split(b"<")[1].split(b".")[0])


@pytest.mark.root
def test_a_server_process_that_cannot_be_restarted_is_tried_again(spawn):
    server = spawn(USERS, BOXES, {"processes": "2"}, mbox_options=ANY_USER)
    wait_for(lambda: len(children(server.proc.pid)) == 2)
    survivor, victim = children(server.proc.pid)
    with process_limit(server.proc.pid, 1) as set_limit:  # the parent alone: fork fails
        os.kill(victim, signal.SIGKILL)
        time.sleep(2.5)  # the replacement is refused at least twice
        assert server.proc.poll() is None and children(server.proc.pid) == [survivor]
        # still serving (a connection the kernel gives the victim's sockets waits for its replacement)
        assert survivor in {greeting_pid(w) for w in answering(server.port, tries=20)}
        set_limit(20)
        wait_for(lambda: len(children(server.proc.pid)) == 2)
    assert server.stop() == 0
    log = server.proc.stderr.read().decode(errors="replace")
    assert log.count("cannot start a server process: Resource temporarily unavailable; trying again") >= 2, log


def answering(port, tries):
    """Wire connections that got a greeting within half a second."""
    for _ in range(tries):
        try:
            yield Wire(port, timeout=0.5)
        except TimeoutError:
            continue


def test_several_server_processes_share_the_sockets(spawn):
    # spools opened by the server's user: root switches to safe_user after
    # bind (rule 3) and serves many sessions per process
    server = spawn(USERS, BOXES, {"processes": "3", "shutdown_grace": "1"}, mbox_options=ANY_USER)
    try:
        held = [Wire(server.port) for _ in range(30)]
        pids = {greeting_pid(w) for w in held}

        def three():
            """greetings from three server processes (the others may still be starting)"""
            if len(pids) < 3:
                pids.add(greeting_pid(Wire(server.port)))
            return len(pids) >= 3

        wait_for(three, interval=0.01)
        assert len(pids) == 3 and server.proc.pid not in pids, pids
        # one mailbox, one session, whichever process serves it
        answers = []
        for w in held[:6]:
            w.cmd("USER bob")
            w.send(b"PASS pw\r\n")
        answers = sorted(w.line()[:12] for w in held[:6])
        assert answers == [b"+OK maildrop"] + [b"-ERR [IN-USE"] * 5, answers
        for w in held:
            w.close()
        # a worker that dies is replaced
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: {greeting_pid(Wire(server.port)) for _ in range(20)} - pids - {victim}, interval=0.2)
        assert count(server.port, "alice") == 2
    finally:
        code = server.stop()
    log = server.proc.stderr.read().decode()
    assert code == 0, log
    assert f"server process {victim} ended unexpectedly" in log, log
    assert "all server processes stopped" in log
