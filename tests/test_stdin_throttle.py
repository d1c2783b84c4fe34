"""The failed-login throttle across connections in stdin mode (`mpop3 -s`,
a process per connection): its records live in files in state_dir
(mpop3/server/file_throttle.py), so a guesser who reconnects is slowed
down as if the connection had stayed.

Each test starts real `mpop3 -s` processes, greeted before the clock
starts (Python takes longer to start than the delay lasts): on pipes the
client's address is "stdin", on a socket handed over as inetd does it is
the peer's address. A guesser closes the connection once its failure is
recorded, without waiting for the -ERR.
"""

import os
import pwd
import select
import socket
import stat
import subprocess
import sys
import time

import pytest
from mbox_helpers import mbox
from pop_server import ANY_USER, SAFE_USER, TREE, wait_for, write_site

from mpop3.server import file_throttle
from mpop3.server.file_throttle import KEY_NAME, KEY_SIZE, FileLoginThrottle
from mpop3.server.limits import FAILURE_MEMORY

pytestmark = pytest.mark.slow  # server processes and timing

DELAY = 0.3
AT_ONCE = 0.2  # an answer sooner than this was not held back by the throttle
USERS = {"bob": "pw", "alice": "pw"}
BOXES = {"bob": mbox(b"Subject: b\n\nbob\n"), "alice": mbox(b"Subject: a\n\nalice\n")}


class Session:
    """One `mpop3 -s` process: on pipes, or on a TCP socket it is handed as
    descriptors 0 and 1 (inetd nowait, systemd Accept=yes)."""

    def __init__(self, conf, via="pipes"):
        command = [sys.executable, "-m", "mpop3", "-c", conf, "-s"]
        if via == "pipes":
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=TREE
            )
            self.rfd, self.wfd = self.proc.stdout.fileno(), self.proc.stdin.fileno()
            self.client = None
        else:
            with socket.create_server(("127.0.0.1", 0)) as listener:
                self.client = socket.create_connection(listener.getsockname())
                conn, _ = listener.accept()
            with conn:
                self.proc = subprocess.Popen(command, stdin=conn, stdout=conn, stderr=subprocess.PIPE, cwd=TREE)
            self.rfd = self.wfd = self.client.fileno()
        self.buf = b""
        self.greeting = None

    def greeted(self):
        self.greeting = self.line()
        assert self.greeting.startswith(b"+OK"), self.greeting
        return self

    def line(self, seconds=10):
        deadline = time.monotonic() + seconds
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                raise AssertionError(f"no answer in {seconds} s; so far {self.buf!r}")
            data = os.read(self.rfd, 4096)
            if not data:
                raise EOFError(f"closed; so far {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def send(self, text):
        """Send a command line; when it went (time.monotonic())."""
        sent = time.monotonic()
        os.write(self.wfd, text.encode() + b"\r\n")
        return sent

    def ask(self, text):
        """(reply, seconds it took)."""
        sent = self.send(text)
        reply = self.line()
        return reply, time.monotonic() - sent

    def end(self, kill=False):
        """Hang up (or kill the process, a guesser who does not wait); what
        it logged."""
        if kill:
            self.proc.kill()
        if self.client is not None:
            self.client.close()
        else:
            self.proc.stdin.close()
        self.proc.wait(10)
        log = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return log


def sessions(conf, count, via="pipes"):
    """`count` greeted sessions, started side by side."""
    started = [Session(conf, via) for _ in range(count)]
    return [s.greeted() for s in started]


def make_site(tmp_path, as_safe_user=False, state=None):
    """The config and state_dir. as_safe_user: storage that needs no user,
    so a process started as root becomes safe_user at once (rule 4) and
    makes the records as that user; else it stays root until the login."""
    if state is None:
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        if as_safe_user and os.geteuid() == 0:
            nobody = pwd.getpwnam(SAFE_USER)
            os.chown(state, nobody.pw_uid, nobody.pw_gid)
    extra = {"login_fail_delay": str(DELAY), "login_fail_delay_max": "2", "state_dir": str(state)}
    conf = write_site(tmp_path, USERS, BOXES, extra, mbox_options=ANY_USER if as_safe_user else None)
    return conf, state


def record_of(state, user, address="stdin"):
    """The file of `user`'s record from `address`, named with the key the
    servers made (the first failure makes it)."""
    t = FileLoginThrottle(str(state), DELAY, 2, key=(state / KEY_NAME).read_bytes())
    return t.path(address, t.user_key(user.encode()))


def make_key(state):
    """The key, as the first failure would have made it."""
    fd = os.open(state / KEY_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(KEY_SIZE))
    os.close(fd)


def fail(session, state, user, address="stdin"):
    """A wrong password for `user`, the session killed as soon as the
    failure is on disk; when the PASS went."""
    assert session.ask(f"USER {user}")[0].startswith(b"+OK")
    sent = session.send("PASS wrong")

    def on_disk():
        try:
            return os.path.getsize(record_of(state, user, address)) > 0
        except FileNotFoundError:
            return False

    wait_for(on_disk, what=f"{user}'s failure on disk")
    session.end(kill=True)
    return sent


@pytest.mark.parametrize(
    "via,as_safe_user",
    [("pipes", False), ("socket", False), ("pipes", True)],
    ids=["pipes", "inetd-socket", "pipes-as-safe-user"],
)
def test_a_failure_delays_the_right_password_in_the_next_connection(tmp_path, via, as_safe_user):
    conf, state = make_site(tmp_path, as_safe_user)
    guesser, next_one = sessions(conf, 2, via)
    assert os.listdir(state) == []  # nothing written before a failure
    address = "stdin" if via == "pipes" else "127.0.0.1"
    assert next_one.ask("USER bob")[0].startswith(b"+OK")
    failed_at = fail(guesser, state, "bob", address)
    sent = next_one.send("PASS pw")
    reply = next_one.line()
    answered = time.monotonic()
    assert reply.startswith(b"+OK maildrop"), reply
    assert answered - failed_at >= DELAY  # checked a delay after the failure, not before
    assert answered - sent >= DELAY / 2  # and held back for it: the failure was not long gone
    next_one.ask("QUIT")
    next_one.end()
    assert not os.path.exists(record_of(state, "bob", address))  # the success cleared it
    key = os.stat(state / KEY_NAME)
    assert stat.S_IMODE(key.st_mode) == 0o600
    if as_safe_user and os.geteuid() == 0:
        assert key.st_uid == pwd.getpwnam(SAFE_USER).pw_uid
    names = os.listdir(state)
    assert not any("bob" in name or address in name for name in names), names


def test_another_user_from_that_address_is_answered_at_once(tmp_path):
    conf, state = make_site(tmp_path)
    guesser, alice = sessions(conf, 2)
    assert alice.ask("USER alice")[0].startswith(b"+OK")
    fail(guesser, state, "bob")
    reply, took = alice.ask("PASS pw")
    assert reply.startswith(b"+OK maildrop"), reply
    assert took < AT_ONCE
    alice.ask("QUIT")
    alice.end()
    assert os.path.exists(record_of(state, "bob"))  # alice's login did not clear bob's record


def test_a_success_clears_that_user_only(tmp_path):
    conf, state = make_site(tmp_path)
    bob_guesser, alice_guesser, bob, alice = sessions(conf, 4)
    for session, user in ((bob, "bob"), (alice, "alice")):
        assert session.ask(f"USER {user}")[0].startswith(b"+OK")
    fail(bob_guesser, state, "bob")
    time.sleep(DELAY * 2 / 3)  # alice's failure comes later, so hers outlasts bob's
    alice_failed_at = fail(alice_guesser, state, "alice")
    reply, _ = bob.ask("PASS pw")  # after bob's delay
    assert reply.startswith(b"+OK maildrop"), reply
    assert not os.path.exists(record_of(state, "bob"))
    assert os.path.exists(record_of(state, "alice"))
    reply = alice.ask("PASS pw")[0]
    assert reply.startswith(b"+OK maildrop"), reply
    assert time.monotonic() - alice_failed_at >= DELAY  # alice still waited hers out
    for session in (bob, alice):
        session.ask("QUIT")
        session.end()


def test_spraying_many_users_slows_the_address_down_across_connections(tmp_path):
    """Failures for more than 3 users from one address (each in its own
    connection) slow down every user from it, even one who never failed."""
    conf, state = make_site(tmp_path)
    *guessers, alice = sessions(conf, 5)
    assert alice.ask("USER alice")[0].startswith(b"+OK")
    for number, guesser in enumerate(guessers):
        last_failure = fail(guesser, state, f"user{number}")
    reply = alice.ask("PASS pw")[0]
    assert reply.startswith(b"+OK maildrop"), reply
    assert time.monotonic() - last_failure >= DELAY
    alice.ask("QUIT")
    alice.end()


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_a_planted_file_at_a_record_name_is_neither_followed_nor_waited_on(tmp_path, planted):
    conf, state = make_site(tmp_path)
    make_key(state)
    path = record_of(state, "bob")
    target = tmp_path / "target"
    target.write_bytes(b"not a record")
    if planted == "symlink":
        os.symlink(target, path)
    else:
        os.mkfifo(path, 0o600)
    first, second = sessions(conf, 2)
    assert first.ask("USER bob")[0].startswith(b"+OK")
    reply, took = first.ask("PASS wrong")
    assert reply == b"-ERR [AUTH] authentication failed"
    assert took < 5
    first.ask("QUIT")
    log = first.end()
    assert "left alone" in log or "cannot open" in log, log
    assert target.read_bytes() == b"not a record"
    kind = stat.S_ISLNK if planted == "symlink" else stat.S_ISFIFO
    assert kind(os.lstat(path).st_mode)
    assert second.ask("USER bob")[0].startswith(b"+OK")
    reply, took = second.ask("PASS pw")  # the login goes on, without the record
    assert reply.startswith(b"+OK maildrop"), reply
    second.ask("QUIT")
    second.end()
    assert kind(os.lstat(path).st_mode)  # the success did not remove it either


@pytest.mark.parametrize("where", ["missing", pytest.param("not-writable", marks=pytest.mark.root)])
def test_a_state_dir_that_cannot_be_used_lets_logins_through(tmp_path, where):
    if where == "missing":
        conf, _ = make_site(tmp_path, state=tmp_path / "nowhere")
    else:
        state = tmp_path / "state"
        state.mkdir(mode=0o755)  # root's: safe_user, whom the server becomes at once, cannot write it
        conf, _ = make_site(tmp_path, as_safe_user=True, state=state)
    session = Session(conf).greeted()
    assert session.ask("USER bob")[0].startswith(b"+OK")
    reply, took = session.ask("PASS wrong")
    assert reply == b"-ERR [AUTH] authentication failed"
    assert took >= DELAY  # the session's own memory still delays the answer
    assert session.ask("USER bob")[0].startswith(b"+OK")
    assert session.ask("PASS pw")[0].startswith(b"+OK maildrop")
    session.ask("QUIT")
    log = session.end()
    assert "cannot keep failed-login records" in log, log


def test_a_session_that_only_logs_in_writes_nothing(tmp_path):
    conf, state = make_site(tmp_path)
    session = Session(conf).greeted()
    assert session.ask("USER bob")[0].startswith(b"+OK")
    assert session.ask("PASS pw")[0].startswith(b"+OK maildrop")
    session.ask("QUIT")
    session.end()
    assert os.listdir(state) == []


# --- the files themselves, in this process ----------------------------------------


def test_forgotten_records_are_swept_and_nothing_else(tmp_path):
    t = FileLoginThrottle(str(tmp_path), DELAY, 2)
    group = "192.0.2.1"
    for n in range(3):
        t.failed(group, t.user_key(b"user%d" % n), t.mark(b"user%d" % n, b"x"))
    old = [t.path(group, t.user_key(b"user0")), t.path(group, t.user_key(b"user1"))]
    fresh = t.path(group, t.user_key(b"user2"))
    long_ago = time.time() - FAILURE_MEMORY - 60
    for path in old:
        os.utime(path, (long_ago, long_ago))
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep")
    os.utime(target, (long_ago, long_ago))
    link = tmp_path / (file_throttle.USER_PREFIX + "0" * 40)
    os.symlink(target, link)
    other = tmp_path / "login.0123"  # LOGIN-DELAY's, not ours to sweep
    other.write_bytes(b"")
    os.utime(other, (long_ago, long_ago))
    file_throttle.sweep(str(tmp_path), time.time())
    assert not any(os.path.exists(path) for path in old)
    assert os.path.exists(fresh) and os.path.exists(t.path(group))
    assert os.path.islink(link) and target.read_bytes() == b"keep" and other.exists()


def test_a_forgotten_or_garbled_record_starts_afresh(tmp_path):
    t = FileLoginThrottle(str(tmp_path), DELAY, 2)
    bob = t.user_key(b"bob")  # made before the directory has a key
    assert t.failed("stdin", bob, t.mark(b"bob", b"1")) == DELAY
    path = t.path("stdin", t.user_key(b"bob"))  # with the directory's key, made by that failure
    assert os.path.getsize(path) > 0
    assert t.failed("stdin", bob, t.mark(b"bob", b"2")) == 2 * DELAY  # distinct: doubled
    assert t.failed("stdin", bob, t.mark(b"bob", b"2")) == 2 * DELAY  # a repeat: not
    assert 0 < t.reserve("stdin", bob) <= 2 * DELAY
    t.wall = lambda: time.time() + FAILURE_MEMORY + 1
    assert t.reserve("stdin", bob) == 0  # forgotten, and removed
    assert not os.path.exists(path)
    t.wall = time.time
    t.failed("stdin", bob, t.mark(b"bob", b"1"))
    t.failed("stdin", bob, t.mark(b"bob", b"2"))
    with open(path, "r+b") as f:
        f.write(b"garbage")
    assert t.failed("stdin", bob, t.mark(b"bob", b"3")) == DELAY  # counted from nothing
