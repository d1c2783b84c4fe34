"""max_sessions and max_sessions_per_ip across processes (issue 11, item 6):
the workers of `processes 2`, and the login processes of processes by
role, each count in a column of one shared table and judge on all."""

import os
import socket

import pytest
from conftest import LOGIN_USER
from mbox_helpers import mbox
from pop_server import ANY_USER

from mpop3.server.shared_counts import SharedCounts

KEY = b"k" * 16


def test_columns_add_up_and_an_ended_process_is_cleared():
    counts = SharedCounts.create(3, KEY, keep_fd=True)
    counts.column = 1
    counts.add("192.0.2.1", +1)
    counts.add("192.0.2.1", +1)
    other = SharedCounts.attach(os.dup(counts.fd), 3, KEY, 2)  # as a login process gets it
    other.add("192.0.2.1", +1)
    other.add("2001:db8::/64", +1)
    assert counts.total() == other.total() == 4
    assert counts.at("192.0.2.1") == 3 and counts.at("2001:db8::/64") == 1 and counts.at("192.0.2.2") == 0
    counts.clear(1)  # that process ended
    assert other.total() == 2 and other.at("192.0.2.1") == 1
    other.add("192.0.2.1", -1)
    other.add("192.0.2.1", -1)  # never below zero, whatever a process says
    assert counts.at("192.0.2.1") == 0
    other.close()
    counts.close()


def test_a_bucket_depends_on_the_key():
    """A client cannot aim at another's bucket without the server's key."""
    groups = [f"198.51.100.{i}" for i in range(64)]
    one = [SharedCounts.create(1, b"a" * 16).bucket(g) for g in groups]
    two = [SharedCounts.create(1, b"b" * 16).bucket(g) for g in groups]
    assert one != two


def greeted(port):
    """A connection and its first line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(200)
        if not chunk:
            break
        line += chunk
    return sock, line


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("model", ["prefork", "split"])
def test_per_address_and_total_limits_hold_across_processes(spawn, request, model):
    """Two processes take clients (SO_REUSEPORT spreads them): 12
    connections from one address with max_sessions_per_ip 5 get exactly 5
    greetings; then max_sessions 7 holds for another address too."""
    extra = {"processes": "2", "max_sessions_per_ip": "5", "max_sessions": "7", "login_timeout": "30"}
    options = {}
    if model == "split":
        request.getfixturevalue("login_user")
        extra["login_user"] = LOGIN_USER
    else:
        options["mbox_options"] = ANY_USER
    server = spawn({"bob": "pw"}, {"bob": mbox(b"Subject: x\n\nx\n")}, extra, **options)
    held = [greeted(server.port) for _ in range(12)]
    ok = [sock for sock, line in held if line.startswith(b"+OK")]
    refused = [line for _, line in held if not line.startswith(b"+OK")]
    assert len(ok) == 5
    assert set(refused) == {b"-ERR [SYS/TEMP] too many sessions from your address, try again later\r\n"}
    elsewhere = socket.socket()
    elsewhere.bind(("127.0.0.2", 0))
    elsewhere.settimeout(10)
    extra_ok = []
    for _ in range(4):  # 5 + 2 = max_sessions
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", server.port))
        extra_ok.append((sock, sock.recv(200)))
    answers = [line for _, line in extra_ok]
    assert sum(line.startswith(b"+OK") for line in answers) == 2
    assert sum(line.startswith(b"-ERR [SYS/TEMP] too many sessions,") for line in answers) == 2
    for sock, _ in held + extra_ok:
        sock.close()
    elsewhere.close()
