"""Logins under attack (mpop3/server/logins.py, limits.py): the failed-login
delay comes before the password is checked, for one (address, user) at a
time; other users from that address are not slowed unless many fail
(spraying); attempts in progress per address are few; the queue of hashes
is bounded and forgets clients that have gone; slots are counted from
accept() and freed when a client does not log in in time. Real sockets,
the in-thread server, and the real auth_file module where hashing matters.

Another client is another loopback address (127.0.0.2, ...): Linux
routes all of 127.0.0.0/8 to lo."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from pop_server import ServerThread, Wire, free_port, memory_tables

from mpop3 import config, loader
from mpop3.passwords import crypt
from mpop3.protocol import replies
from mpop3.server.limits import address_group

pytestmark = [pytest.mark.usefixtures("loop_kind"), pytest.mark.slow]  # timing: seconds of delays

USERS = {"bob": "secret", "alice": "wonderland"}
DELAYS = {"login_fail_delay": "0.3", "login_fail_delay_max": "1.2"}
ERR_AUTH = replies.ERR_AUTH.wire[:-2]


def tables():
    return memory_tables(dict(USERS), {"bob": [b"Subject: 1\n\none\n"], "alice": []})


def attempt(port, user, password, source=None, wait=True):
    """USER and PASS on a connection of its own; the answer and how long it
    took, or (None, 0) right after sending if not `wait` (the connection
    is then dropped: a guesser who does not wait for answers)."""
    w = Wire(port, source=source)
    w.cmd(f"USER {user}")
    start = time.monotonic()
    if not wait:
        w.send(f"PASS {password}\r\n".encode())
        time.sleep(0.02)  # on its way before the connection goes
        w.close()
        return None, 0.0
    reply = w.cmd(f"PASS {password}")
    took = time.monotonic() - start
    w.close()
    return reply, took


def test_a_right_password_after_a_failure_waits_the_delay_first():
    with ServerThread(tables(), DELAYS) as s:
        attempt(s.port, "bob", "guess", wait=False)
        reply, took = attempt(s.port, "bob", "secret")
    assert reply.startswith(b"+OK maildrop")
    assert took >= 0.25, took  # not checked before the delay of the failure


def test_one_users_failures_do_not_slow_another_user_or_another_address():
    with ServerThread(tables(), DELAYS) as s:
        for guess in ("guess1", "guess2"):
            attempt(s.port, "bob", guess, wait=False)
        reply, took = attempt(s.port, "alice", "wonderland")
        assert reply.startswith(b"+OK") and took < 0.15, took
        reply, took = attempt(s.port, "bob", "secret", source="127.0.0.2")
        assert reply.startswith(b"+OK") and took < 0.15, took


def test_guessers_waiting_out_their_delay_do_not_hold_up_another_user():
    """Guessers for bob who wait for their answers hold no place among the
    address's checks in progress while they wait."""
    with ServerThread(tables(), {"login_fail_delay": "2", "login_fail_delay_max": "2"}) as s:
        attempt(s.port, "bob", "guess", wait=False)
        waiting = [Wire(s.port) for _ in range(5)]
        for n, w in enumerate(waiting):
            w.cmd("USER bob")
            w.send(f"PASS guess{n}\r\n".encode())
        time.sleep(0.1)
        reply, took = attempt(s.port, "alice", "wonderland")
        assert reply.startswith(b"+OK") and took < 0.15, took
        for w in waiting:
            w.close()


def test_two_hundred_guessers_who_hang_up_do_not_delay_a_real_login(tmp_path):
    """From 200 addresses, USER and PASS, then hang up: a login from
    elsewhere is answered within a second (the 200 hashes, at libxcrypt's
    default cost, would take ~7 s here)."""
    slow = crypt(b"slow-pw", b"$y$j9T$abcdefghijklmnop$").decode()
    with ServerThread(auth_file(tmp_path, f"slow:{slow}\nfast:pw\n"), {"max_sessions": "1000"}) as s:
        guessers = []
        for n in range(200):
            w = Wire(s.port, source=f"127.0.5.{n + 1}")
            w.cmd("USER slow")
            w.send(b"PASS guess\r\n")
            guessers.append(w)
        for w in guessers:
            w.close()
        reply, took = attempt(s.port, "fast", "pw", source="127.0.6.1")
    assert reply.startswith(b"+OK") and took < 1.0, took


def test_a_success_clears_only_that_users_record():
    with ServerThread(tables(), DELAYS) as s:
        attempt(s.port, "bob", "guess", wait=False)
        assert attempt(s.port, "alice", "wonderland")[0].startswith(b"+OK")
        reply, took = attempt(s.port, "bob", "secret")
    assert reply.startswith(b"+OK") and took >= 0.25, took


def test_failures_over_many_users_slow_the_address_down():
    """Password spraying: one guess each for many users, from a guesser who
    does not wait for the answers. Past SPRAY_USERS users, the address gets
    one attempt per delay, whoever it is for."""
    with ServerThread(tables(), DELAYS) as s:
        for n in range(6):
            attempt(s.port, f"user{n}", "Summer2026", wait=False)
        reply, took = attempt(s.port, "alice", "wonderland")
        assert reply.startswith(b"+OK") and took >= 0.5, took
        reply, took = attempt(s.port, "alice", "wonderland", source="127.0.0.2")  # not another address
        assert took < 0.15, took


def test_guesses_in_parallel_are_checked_one_delay_apart():
    with ServerThread(tables(), {"login_fail_delay": "0.1", "login_fail_delay_max": "0.4"}) as s:
        answers = []

        def guess(n):
            answers.append((attempt(s.port, "bob", f"guess{n}")[0], time.monotonic()))

        start = time.monotonic()
        guessers = [threading.Thread(target=guess, args=(n,)) for n in range(8)]
        for t in guessers:
            t.start()
        for t in guessers:
            t.join(30)
    assert [reply for reply, _ in answers] == [ERR_AUTH] * 8
    times = sorted(when - start for _, when in answers)
    # each check waits for the delay the failures before it set (0.1, 0.2,
    # then 0.4 s apart), however many guessers wait at once
    assert times[0] < 0.3 and times[-1] >= 2.0, times


def test_a_hash_whose_client_has_gone_is_not_computed(tmp_path):
    """With one thread and slow hashes, 20 guessers who hang up at once,
    from 20 addresses, delay a real login by a hash or two, not twenty."""
    slow = crypt(b"slow-pw", b"$y$jDT$abcdefghijklmnop$").decode()  # ~0.3 s a check
    with ServerThread(auth_file(tmp_path, f"slow:{slow}\nfast:pw\n"), {"worker_threads": "1"}) as s:
        for n in range(20):
            attempt(s.port, "slow", "guess", source=f"127.0.1.{n + 1}", wait=False)
        reply, took = attempt(s.port, "fast", "pw", source="127.0.2.1")
    assert reply.startswith(b"+OK") and took < 1.0, took


def test_a_full_queue_of_hashes_refuses_at_once(tmp_path):
    slow = crypt(b"slow-pw", b"$y$jDT$abcdefghijklmnop$").decode()
    extra = {"worker_threads": "1", "login_queue": "2"}
    with ServerThread(auth_file(tmp_path, f"slow:{slow}\n"), extra) as s:
        replies_seen = []

        def guess(n):
            replies_seen.append(attempt(s.port, "slow", "guess", source=f"127.0.3.{n + 1}")[0])

        guessers = [threading.Thread(target=guess, args=(n,)) for n in range(8)]
        for t in guessers:
            t.start()
        for t in guessers:
            t.join(30)
    busy = replies.ERR_BUSY.wire[:-2]
    assert busy in replies_seen and ERR_AUTH in replies_seen, replies_seen
    assert set(replies_seen) == {busy, ERR_AUTH}


def test_a_session_that_does_not_log_in_in_time_is_closed():
    with ServerThread(tables(), {"login_timeout": "0.6"}) as s:
        w = Wire(s.port)
        start = time.monotonic()
        while True:  # busy, but never logging in
            try:
                reply = w.cmd("CAPA")
            except (EOFError, OSError):
                break
            if reply.startswith(b"-ERR"):
                break
            w.multi()
            time.sleep(0.1)
        assert time.monotonic() - start < 2
        assert reply == replies.ERR_LOGIN_TIMEOUT.wire[:-2]
        logged_in = Wire(s.port)
        logged_in.login("bob", "secret")
        time.sleep(1.0)
        assert logged_in.cmd("NOOP").startswith(b"+OK")  # after login, only idle_timeout applies


def test_silent_connections_to_the_tls_port_are_capped_and_time_out(certificate):
    """A thousand connections that never start their TLS handshake, from
    one address: counted from accept(), so all but max_sessions_per_ip are
    closed at once, and those are closed after tls_handshake_timeout."""
    cert, key = certificate
    tls_port = free_port()
    extra = {"tls_cert": cert, "tls_key": key, "listen_tls": f"127.0.0.1:{tls_port}", "tls_handshake_timeout": "1"}
    with ServerThread(tables(), extra) as s:
        silent = [socket.create_connection(("127.0.0.1", tls_port)) for _ in range(1000)]
        time.sleep(0.3)
        closed = sum(1 for sock in silent if closed_by_server(sock, 0.01))
        assert closed == 1000 - 32, closed  # max_sessions_per_ip 32
        refused = Wire(s.port)  # the same address: its slots are taken
        assert refused.greeting == replies.ERR_TOO_MANY_FROM_YOU.wire[:-2]
        assert Wire(s.port, source="127.0.0.2").greeting.startswith(b"+OK")  # anyone else is served
        time.sleep(1.3)
        assert all(closed_by_server(sock, 0.5) for sock in silent)
        assert Wire(s.port).greeting.startswith(b"+OK")  # the slots are free again
        for sock in silent:
            sock.close()


def closed_by_server(sock, timeout):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_ipv6_addresses_are_grouped_by_prefix():
    assert address_group("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_group("2001:db8:1:2::9") == address_group("2001:db8:1:2:ffff::1")
    assert address_group("2001:db8:1:3::1") != address_group("2001:db8:1:2::1")
    assert address_group("2001:db8:1:2:3::1", 48) == "2001:db8:1::/48"
    assert address_group("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_group("192.0.2.7") == "192.0.2.7"
    assert address_group("stdin") == "stdin"


IPV6_CLIENTS = textwrap.dedent("""
    # in a network namespace of its own: IPv6 addresses on lo, the real
    # Service, clients from several addresses of two /64 networks
    import subprocess, sys
    sys.path.insert(0, sys.argv[1])
    from pop_server import ServerThread, Wire, memory_tables
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2::3", "2001:db8:1:3::1"):
        subprocess.run(["ip", "-6", "addr", "add", address + "/64", "dev", "lo", "nodad"], check=True)
    tables = memory_tables({"bob": "pw"}, {"bob": []})
    extra = {"max_sessions_per_ip": "2", "ipv6_prefix": sys.argv[2]}
    with ServerThread(tables, extra, listen="[2001:db8:1:2::1]:1110") as s:  # any port: the namespace is ours
        clients = [Wire(s.port, host="2001:db8:1:2::1", source=f"2001:db8:1:2::{n}") for n in (1, 2, 3)]
        clients.append(Wire(s.port, host="2001:db8:1:2::1", source="2001:db8:1:3::1"))
        print(" ".join("ok" if w.greeting.startswith(b"+OK") else "refused" for w in clients))
""")


@pytest.mark.root
@pytest.mark.parametrize("prefix, expected", [("64", "ok ok refused ok"), ("128", "ok ok ok ok")])
def test_ipv6_clients_of_one_network_share_the_per_address_limit(prefix, expected):
    """Real IPv6 connections, in a network namespace: with max_sessions_per_ip
    2, a third address of the same /64 is refused, another /64 is not; with
    ipv6_prefix 128 every address counts alone."""
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", IPV6_CLIENTS, tests, prefix],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=TREE),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == expected


def auth_file(tmp_path, passwd):
    """The in-thread server's tables with the real auth_file module on
    `passwd`, and in-memory mailboxes."""
    path = tmp_path / "passwd"
    path.write_text(passwd)
    conf = config.parse(f"module_dir {TREE}/modules\nauth_module auth_file\n> passwd_file {path}\n", "test.conf")
    loaded = loader.load_modules(conf)
    memory = memory_tables({}, {"slow": [], "fast": []})
    return loader.Tables(loaded.auth, memory.storage, loaded.modules)


TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
