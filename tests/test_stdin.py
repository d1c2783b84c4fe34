"""`mpop3 -s`: one session on stdin/stdout, as inetd, xinetd, systemd
Accept=yes or socat start it: through pipes, and on a socket."""

import os
import poplib
import socket
import subprocess
import sys
import threading

import pytest
from mbox_helpers import mbox
from pop_server import TREE, Wire, free_port, listening, wait_for, write_site

MESSAGES = [b"Subject: one\n\n.dot line\nbody one\n", b"Subject: two\n\nbody two\n"]


@pytest.fixture
def conf(tmp_path):
    return write_site(tmp_path, {"bob": "pw"}, {"bob": mbox(*MESSAGES)})


def mpop3_command(conf):
    return [sys.executable, "-m", "mpop3", "-c", conf, "-s"]


def through_pipe(conf, data):
    result = subprocess.run(mpop3_command(conf), input=data, capture_output=True, cwd=TREE, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_whole_session_through_a_pipe(conf):
    out = through_pipe(conf, b"CAPA\r\nUSER bob\r\nPASS pw\r\nSTAT\r\nRETR 1\r\nDELE 2\r\nQUIT\r\n")
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"+OK mpop3 ready <")
    assert lines[1:11] == [
        b"+OK capability list follows",
        b"TOP",
        b"UIDL",
        b"USER",
        b"RESP-CODES",
        b"AUTH-RESP-CODE",
        b"PIPELINING",
        b"SASL PLAIN LOGIN CRAM-MD5",
        b".",
        b"+OK send PASS",
    ]
    assert out.endswith(
        b"+OK 2 63\r\n+OK 37 octets\r\nSubject: one\r\n\r\n..dot line\r\nbody one\r\n.\r\n"
        b"+OK message deleted\r\n+OK mpop3 signing off (1 deleted, 1 left)\r\n"
    )
    again = through_pipe(conf, b"USER bob\nPASS pw\nSTAT\nQUIT\n")  # bare LF works too
    assert b"+OK 1 37\r\n" in again


def test_end_of_input_without_quit_commits_nothing(conf):
    out = through_pipe(conf, b"USER bob\r\nPASS pw\r\nDELE 1\r\n")
    assert out.endswith(b"+OK message deleted\r\n")
    assert b"+OK 2 " in through_pipe(conf, b"USER bob\r\nPASS pw\r\nSTAT\r\nQUIT\r\n")


def test_a_failed_login_through_a_pipe(conf):
    out = through_pipe(conf, b"USER bob\r\nPASS nope\r\nQUIT\r\n")
    assert out.split(b"\r\n")[1:4] == [b"+OK send PASS", b"-ERR [AUTH] authentication failed", b"+OK mpop3 signing off"]


@pytest.mark.clients
@pytest.mark.parametrize("mode", ["socketpair", "pipes"])
def test_socat_spawns_a_session_per_connection(conf, mode):
    port = free_port()
    exec_options = ",pipes" if mode == "pipes" else ""
    command = " ".join(mpop3_command(conf))
    socat = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{command}{exec_options}"],
        cwd=TREE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: listening(port), interval=0.05, what="socat to listen")
        p = poplib.POP3("127.0.0.1", port, timeout=20)
        p.user("bob")
        assert p.pass_("pw").startswith(b"+OK maildrop has 2 messages")
        assert b"\r\n".join(p.retr(2)[1]) == b"Subject: two\r\n\r\nbody two"
        assert [line.split()[0] for line in p.uidl()[1]] == [b"1", b"2"]
        p.dele(1)
        assert p.quit() == b"+OK mpop3 signing off (1 deleted, 1 left)"
        p = poplib.POP3("127.0.0.1", port, timeout=20)
        p.user("bob")
        assert p.pass_("pw").startswith(b"+OK maildrop has 1 message ")
        p.quit()
    finally:
        socat.terminate()
        socat.wait(10)


def test_inetd_style_socket_on_stdin(conf):
    """inetd `nowait` and systemd Accept=yes hand the accepted socket over as
    fds 0 and 1; the session then knows the client's address."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    children = []

    def spawner():
        conn, _ = listener.accept()
        children.append(
            subprocess.Popen(mpop3_command(conf), stdin=conn, stdout=conn, cwd=TREE, stderr=subprocess.PIPE)
        )
        conn.close()

    t = threading.Thread(target=spawner)
    t.start()
    w = Wire(port, timeout=20)
    t.join()
    w.login("bob", "pw")
    w.send(b"TOP 1 1\r\nQUIT\r\n")
    assert w.line() == b"+OK top of message follows"
    assert w.raw_until() == b"Subject: one\r\n\r\n..dot line\r\n.\r\n"
    assert w.line().startswith(b"+OK mpop3 signing off")
    assert w.closed()
    children[0].wait(10)
    log = children[0].stderr.read().decode()
    assert children[0].returncode == 0, log
    assert "127.0.0.1: bob logged in" in log
    listener.close()
    assert os.path.exists(conf)
