"""Running it (issue 16): /metrics scraped during and after real sessions in
every process model, checked by promtool; `mpop3 who` and `mpop3 kick`
through the control socket, which refuses others than root; the logout
line after a fetchmail run."""

import os
import poplib
import pwd
import re
import socket
import stat
import subprocess
import sys
import urllib.request

import pytest
from conftest import LOGIN_USER
from mbox_helpers import mbox
from pop_server import TREE, Wire, free_port, wait_for
from process_limits import children, descendants
from test_models import MODELS, site

from mpop3.server.operations import ask

pytestmark = [pytest.mark.root, pytest.mark.slow]  # processes by role and per session need root

ALL_MODELS = sorted([*MODELS, "split"])
BOB = [b"Subject: one\nMessage-ID: <1@x>\n\nfirst\n", b"Subject: two\nMessage-ID: <2@x>\n\n" + (b"x" * 99 + b"\n") * 50]
USERS = {"bob": "pw", "alice": "pw"}


def boxes():
    return {"bob": mbox(*BOB), "alice": mbox(b"Subject: a\n\nalice\n")}


def start(spawn, request, model, **extra):
    """The real server in `model`, with `extra` directives."""
    if model == "split":
        request.getfixturevalue("login_user")
        settings = {"extra": {"login_user": LOGIN_USER, "processes": "1", **extra}}
    else:
        settings = site(model, **extra)
    return spawn(USERS, boxes(), **settings)


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return answer.read().decode()


def samples(text):
    """{'name{labels}': value} of a scrape."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def value(port, name):
    return samples(scrape(port)).get(name, 0.0)


def promtool_accepts(text):
    result = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


TRANSACTION_CLEAR = 'mpop3_sessions{state="transaction",tls="no"}'
LOGINS_OK = 'mpop3_logins_total{outcome="ok"}'
BAD = 'mpop3_logins_total{outcome="bad_credentials"}'


@pytest.mark.parametrize("model", ALL_MODELS)
def test_metrics_follow_real_sessions(spawn, request, model):
    port = free_port()
    server = start(spawn, request, model, metrics_listen=f"127.0.0.1:{port}")
    wait_for(lambda: scrape(port), seconds=10)
    before = samples(scrape(port))
    assert before[LOGINS_OK] == 0 and before[TRANSACTION_CLEAR] == 0

    p = poplib.POP3("127.0.0.1", server.port, timeout=20)
    p.user("bob")
    p.pass_("pw")
    _, lines, octets = p.retr(2)
    p.dele(1)
    during = samples(scrape(port))
    assert during[TRANSACTION_CLEAR] == 1
    assert during[LOGINS_OK] == 1
    assert during['mpop3_commands_total{command="RETR"}'] == 1
    assert during["mpop3_sent_bytes_total"] > 5000
    assert during['mpop3_mailbox_open_duration_seconds_bucket{le="+Inf"}'] == 1

    wrong = Wire(server.port)
    wrong.cmd("USER alice")
    assert wrong.cmd("PASS nope").startswith(b"-ERR")
    assert value(port, BAD) == 1
    wrong.cmd("QUIT")

    assert p.quit().startswith(b"+OK")
    # the session's end is written just after its last reply goes out
    wait_for(lambda: value(port, TRANSACTION_CLEAR) == 0 and value(port, 'mpop3_commands_total{command="DELE"}') == 1)
    after = samples(scrape(port))
    assert after[LOGINS_OK] == 1  # kept after the session's process (if its own) ended
    assert after[BAD] == 1
    assert after["mpop3_deleted_messages_total"] == 1
    assert after["mpop3_commit_duration_seconds_count"] == 1
    assert after["mpop3_login_duration_seconds_count"] >= 2
    assert after["mpop3_sessions_total"] >= 2
    assert after['mpop3_processes{role="master"}'] == (0 if model == "shared" else 1)
    if model == "split":
        assert after['mpop3_processes{role="login"}'] == 1 and after['mpop3_processes{role="auth"}'] == 1
        assert after['mpop3_processes{role="spawner"}'] == 1
    if model == "prefork":
        assert after['mpop3_processes{role="server"}'] == 2
    text = scrape(port)
    assert "bob" not in text and "127.0.0.1" not in text  # no names, no addresses
    promtool_accepts(text)


def test_failed_handshakes_and_refused_connections_are_counted(spawn, request, certificate):
    cert, key = certificate
    port, tls_port = free_port(), free_port()
    server = start(
        spawn,
        request,
        "shared",
        metrics_listen=f"127.0.0.1:{port}",
        tls_cert=cert,
        tls_key=key,
        listen_tls=f"127.0.0.1:{tls_port}",
        max_sessions_per_ip="1",
    )
    wait_for(lambda: scrape(port), seconds=10)
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as sock:
        sock.sendall(b"USER bob\r\n" * 100)  # no TLS hello
        try:
            assert sock.recv(100) == b""  # closed
        except ConnectionResetError:
            pass
    wait_for(lambda: value(port, "mpop3_tls_handshakes_failed_total") == 1)
    first = Wire(server.port)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert sock.recv(200).startswith(b"-ERR [SYS/TEMP] too many sessions from your address")
    assert value(port, "mpop3_connections_refused_total") == 1
    first.cmd("QUIT")


def test_the_metrics_process_of_a_root_master_is_safe_user(spawn, request):
    port = free_port()
    server = start(spawn, request, "split", metrics_listen=f"127.0.0.1:{port}")
    wait_for(lambda: scrape(port), seconds=10)
    (metrics_pid,) = [pid for pid in children(server.proc.pid) if comm(pid) == "mpop3-metrics"]
    uid = int(status(metrics_pid)["Uid"].split()[0])
    assert uid == pwd.getpwnam("nobody").pw_uid
    os.kill(metrics_pid, 9)  # restarted: scrapes go on
    wait_for(lambda: scrape(port), seconds=10)


def test_bad_scrapes_get_http_errors(spawn, request):
    port = free_port()
    start(spawn, request, "shared", metrics_listen=f"127.0.0.1:{port}")
    wait_for(lambda: scrape(port), seconds=10)
    for request_line, status_line in [
        (b"GET / HTTP/1.1", b"HTTP/1.1 404"),
        (b"POST /metrics HTTP/1.1", b"HTTP/1.1 405"),
        (b"garbage", b"HTTP/1.1 400"),
    ]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request_line + b"\r\nHost: x\r\n\r\n")
            assert sock.recv(100).startswith(status_line)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # a head that never ends
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 9000)
        assert sock.recv(100) == b""  # closed, nothing read past the bound


# --- who and kick ------------------------------------------------------------------------


def mpop3(conf, *args, user=None):
    return subprocess.run(
        [sys.executable, "-m", "mpop3", "-c", str(conf), *args],
        capture_output=True,
        cwd=TREE,
        timeout=30,
        user=user,
        env=dict(os.environ, PYTHONPATH=TREE),
    )


@pytest.mark.parametrize("model", ALL_MODELS)
def test_who_lists_a_session_and_kick_ends_it_without_committing(spawn, request, tmp_path, model):
    control = tmp_path / "run" / "control"
    server = start(spawn, request, model, control_socket=str(control))
    wait_for(control.exists, seconds=10)
    p = poplib.POP3("127.0.0.1", server.port, timeout=20)
    p.user("bob")
    p.pass_("pw")
    p.dele(1)
    waiting = Wire(server.port)  # not logged in
    who = mpop3(server.conf_path, "who")
    assert who.returncode == 0, who.stderr
    lines = who.stdout.decode().splitlines()
    assert lines[0].split() == ["USER", "ADDRESS", "TLS", "SINCE", "STATE", "PID"]
    bob = [line.split() for line in lines if line.startswith("bob ")]
    assert len(bob) == 1 and bob[0][1:3] == ["127.0.0.1", "no"] and bob[0][5] == "transaction"
    assert int(bob[0][6]) in [server.proc.pid, *descendants(server.proc.pid)]
    assert any(line.split()[0] == "-" and "authorization" in line for line in lines[1:])  # the one not logged in

    kick = mpop3(server.conf_path, "kick", "bob")
    assert kick.stdout == b"+OK 1 session kicked\n", kick
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        p.stat()  # the answer to it, or the closed connection
    spool = server.root / "spool" / "bob"
    w = Wire(server.port)
    w.login("bob", "pw")
    assert w.cmd("STAT").startswith(b"+OK 2 ")  # DELE 1 was not committed
    w.cmd("QUIT")
    assert spool.read_bytes() == mbox(*BOB)

    by_address = mpop3(server.conf_path, "kick", "127.0.0.1")
    assert by_address.stdout == b"+OK 1 session kicked\n"  # the one waiting before its login
    assert waiting.closed()
    assert mpop3(server.conf_path, "kick", "nobody-here").stdout == b"+OK 0 sessions kicked\n"
    server.stop()
    log = server.log()
    assert re.search(r"127\.0\.0\.1: bob logged out \(kicked\): .*deleted 0 \(1 marked, not committed\), left 2", log)


def test_the_control_socket_refuses_an_unprivileged_user(spawn, request, tmp_path):
    run_dir = tmp_path / "run"
    control = run_dir / "control"
    start(spawn, request, "shared", control_socket=str(control))
    wait_for(control.exists, seconds=10)
    assert stat.S_IMODE(control.stat().st_mode) == 0o600 and control.stat().st_uid == 0
    tmp_path.chmod(0o755)
    run_dir.chmod(0o755)
    assert as_nobody(lambda: ask(str(control), "who")) == "PermissionError"
    control.chmod(0o666)  # even so: the server checks who is asking
    assert as_nobody(lambda: ask(str(control), "who")) == "-ERR not allowed\n"
    assert ask(str(control), "who").startswith("USER ")  # root may


def as_nobody(work):
    """What work() returns (text), or the name of what it raised, run in a
    child process that has become nobody."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                result = work()
            except Exception as e:
                result = type(e).__name__
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def test_who_and_kick_without_a_server_say_so(tmp_path):
    conf = tmp_path / "mpop3.conf"
    conf.write_text(f"control_socket {tmp_path}/nothing\n")
    result = mpop3(conf, "who")
    assert result.returncode == 1 and b"cannot reach the running server at" in result.stderr
    conf.write_text("control_socket none\n")
    assert mpop3(conf, "kick", "bob").returncode == 2
    assert mpop3(conf, "frobnicate").returncode == 2


# --- the logout line -----------------------------------------------------------------------


@pytest.mark.clients
def test_the_logout_line_after_fetchmail_says_what_it_took(spawn, request, tmp_path):
    server = start(spawn, request, "per-session")
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "fetched"
    out.mkdir()
    rc = home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\nset invisible\n"
        f"poll 127.0.0.1 with proto POP3 service {server.port} uidl auth password\n"
        '  user "bob" there with password "pw" is "root" here nokeep sslproto ""\n'
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), LC_ALL="C")
    fetch = subprocess.run(
        ["fetchmail", "-f", str(rc), "--idfile", str(home / ".ids"), "--nosyslog"], env=env, capture_output=True
    )
    assert fetch.returncode == 0, fetch.stderr
    assert len(os.listdir(out)) == 2
    server.stop()
    (line,) = [line for line in server.log().splitlines() if "bob logged out" in line]
    # fetchmail reads with TOP (not RETR): both messages, every byte, then deletes both
    found = re.search(
        r"bob logged out \(quit\): retrieved 0 \(0 bytes\), top 2 \((\d+) bytes\), deleted 2, left 0", line
    )
    assert found, line
    assert int(found[1]) >= sum(len(m) for m in BOB)


# --- helpers ------------------------------------------------------------------------------


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def status(pid):
    return dict(line.rstrip("\n").split(":\t", 1) for line in open(f"/proc/{pid}/status"))
