"""Helpers for the protocol tests: servers to talk to and a raw client.

- ServerThread: the real Service (mpop3/server/service.py) in a thread, on
  uvloop or asyncio's own loop (LOOPS; the `loop_kind` fixture picks),
  with function tables the test builds (in-memory storage, a dict of users);
- spawn(): the real `mpop3` command in a subprocess, with auth_file and
  storage_mbox on files in a temporary directory (for the real clients);
- Wire: a raw socket client for what poplib hides (pipelining, NUL bytes,
  over-long lines).
Import what you need explicitly: `from pop_server import ...`.
"""

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time

import uvloop

from mpop3 import config, loader
from mpop3.auth_functions import AuthFunctions
from mpop3.errors import MailboxInUse, StorageTempError
from mpop3.server.service import Service
from mpop3.storage_functions import StorageFunctions

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fast settings for tests: small delays, so a failed login costs milliseconds.
FAST = {"login_fail_delay": "0.01", "login_fail_delay_max": "0.04", "shutdown_grace": "0.5"}


def make_conf(extra=None, listen=None):
    lines = [f"listen {listen or f'127.0.0.1:{free_port()}'}"]
    for name, value in {**FAST, **(extra or {})}.items():
        lines.append(f"{name} {value}")
    return config.parse("\n".join(lines) + "\n", "test.conf")


# --- in-memory tables ----------------------------------------------------------


def wire_form(message):
    """A message (bytes, LF or CRLF lines) as RETR sends it: CRLF, dot-stuffed, .CRLF."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(out) + b".\r\n"


def top_form(message, count):
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    blank = lines.index(b"") if b"" in lines else len(lines)
    kept = lines[: blank + 1 + count]
    return wire_form(b"\n".join(kept) + b"\n") if kept else b".\r\n"


def crlf_size(message):
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return sum(len(line) + 2 for line in lines)


class MemoryAuth(AuthFunctions):
    """Users from a dict: name -> password (APOP works)."""

    def __init__(self, users, mailboxes=None):
        super().__init__()
        self.users = users
        self.mailboxes = mailboxes or {}

    def auth_password(self, user):
        return self.users.get(user)

    def auth_login(self, user):
        return self.mailboxes.get(user, user)


class MemoryStorage(StorageFunctions):
    """Mailboxes in a dict: name -> list of messages (bytes). Records commits."""

    def __init__(self, boxes, chunk=64 * 1024):
        super().__init__()
        self.boxes = boxes
        self.chunk = chunk
        self.locked = set()
        self.commits = []  # (mailbox, [deleted indexes])
        self.fail_dump = set()  # (mailbox, index) whose dump raises StorageTempError
        self.dumped = 0  # chunks produced (for back-pressure tests)

    def storage_lock_mailbox(self, mailbox):
        if mailbox in self.locked:
            raise MailboxInUse(mailbox)
        self.locked.add(mailbox)
        return [mailbox, list(self.boxes.get(mailbox, []))]

    def storage_message_count(self, handle):
        return len(handle[1])

    def storage_message_sizes(self, handle):
        return [crlf_size(m) for m in handle[1]]

    def storage_uidl_supported(self, handle):
        return True

    def storage_unique_ids(self, handle):
        return [f"uid-{handle[0]}-{i}" for i in range(len(handle[1]))]

    def storage_dump_fragment(self, handle, index, body_lines):
        if (handle[0], index) in self.fail_dump:
            raise StorageTempError("spool changed")
        message = handle[1][index]
        data = wire_form(message) if body_lines is None else top_form(message, body_lines)
        for i in range(0, len(data), self.chunk):
            self.dumped += 1
            yield data[i : i + self.chunk]

    def storage_synch(self, handle, deleted):
        self.commits.append((handle[0], list(deleted)))
        keep = [m for i, m in enumerate(handle[1]) if i not in set(deleted)]
        self.boxes[handle[0]] = keep

    def storage_unlock_mailbox(self, handle):
        self.locked.discard(handle[0])


def memory_tables(users, boxes, mailboxes=None):
    return loader.Tables(MemoryAuth(users, mailboxes), MemoryStorage(boxes), [])


LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
LOOP = "uvloop"  # what ServerThread runs on; a test module may ask for both (loop_kind)


class ServerThread:
    """The real Service on an event loop in a daemon thread."""

    def __init__(self, tables, extra=None):
        self.conf = make_conf(extra)
        self.tables = tables
        self.loop = LOOPS[LOOP]()
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        try:
            self.server = Service(self.conf, self.tables, self.loop)
            self.address = self.loop.run_until_complete(self.server.start_listeners())[0]
        except Exception as e:
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_until_complete(self.server.stopped)

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        if self.error:
            raise self.error
        self.port = self.address[1]
        return self

    def call(self, function, *args):
        """Run function(*args) on the server's loop and return its result."""
        done = threading.Event()
        box = []
        self.loop.call_soon_threadsafe(lambda: (box.append(function(*args)), done.set()))
        done.wait(5)
        return box[0]

    def __exit__(self, *exc):
        # the test is over: no grace period for the sessions it left open
        self.server.settings.shutdown_grace = 0
        self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(15)


# --- a raw client ------------------------------------------------------------------


class Wire:
    """A raw POP3 connection: send bytes, read lines and multi-line replies."""

    def __init__(self, port, host="127.0.0.1", timeout=5):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.line()

    def send(self, data):
        self.sock.sendall(data)

    def line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unterminated: {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def multi(self):
        """The lines of a multi-line reply body (still dot-stuffed) up to '.'."""
        out = []
        while True:
            line = self.line()
            if line == b".":
                return out
            out.append(line)

    def raw_until(self, end=b"\r\n.\r\n"):
        while end not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("closed")
            self.buf += data
        i = self.buf.index(end) + len(end)
        data, self.buf = self.buf[:i], self.buf[i:]
        return data

    def cmd(self, text):
        self.send(text.encode() + b"\r\n" if isinstance(text, str) else text + b"\r\n")
        return self.line()

    def closed(self, timeout=5):
        """True if the server closes the connection (after any data)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def login(self, user, password):
        assert self.cmd(f"USER {user}").startswith(b"+OK")
        reply = self.cmd(f"PASS {password}")
        assert reply.startswith(b"+OK"), reply
        return reply

    def close(self):
        self.sock.close()


# --- the real command, as a subprocess --------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_site(root, users, boxes, extra=None):
    """A passwd file, an mbox spool dir and a config under `root`; the config path.

    users: name -> password line part (plaintext or hash), or (password, mailbox)
    boxes: mailbox -> mbox file contents (bytes)
    """
    root = str(root)
    spool = os.path.join(root, "spool")
    os.makedirs(spool, exist_ok=True)
    with open(os.path.join(root, "passwd"), "w") as f:
        for name, value in users.items():
            if isinstance(value, tuple):
                f.write(f"{name}:{value[0]}:{value[1]}\n")
            else:
                f.write(f"{name}:{value}\n")
    for mailbox, data in boxes.items():
        with open(os.path.join(spool, mailbox), "wb") as f:
            f.write(data)
    served_as_safe_user(spool)
    lines = [f"module_dir {TREE}/modules"]
    for name, value in {**FAST, **(extra or {})}.items():
        lines.append(f"{name} {value}")
    lines += [
        "auth_module auth_file",
        f"> passwd_file {root}/passwd",
        "storage_module storage_mbox",
        f"> storage_dir {spool}",
    ]
    path = os.path.join(root, "mpop3.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


SAFE_USER = "nobody"  # the default safe_user, which serves virtual users' mailboxes


def served_as_safe_user(spool):
    """Started as root (as in CI), mpop3 opens a virtual user's spool as
    safe_user after login (privilege rule 1): give it the spool directory
    and its spools, and a way down to them through pytest's 0700 dirs."""
    if os.geteuid() != 0:
        return
    import pwd

    nobody = pwd.getpwnam(SAFE_USER)
    for name in [""] + os.listdir(spool):
        os.chown(os.path.join(spool, name), nobody.pw_uid, nobody.pw_gid)
    path = os.path.dirname(os.path.abspath(spool))
    while path not in ("/", "/tmp"):
        os.chmod(path, os.stat(path).st_mode | 0o011)
        path = os.path.dirname(path)


class Spawned:
    """`python -m mpop3 -c CONF -l 127.0.0.1:PORT` until stopped."""

    def __init__(self, conf_path, port=None, args=()):
        self.port = port or free_port()
        self.conf_path = conf_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpop3", "-c", conf_path, "-l", f"127.0.0.1:{self.port}", *args],
            cwd=TREE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mpop3 exited: " + self.proc.stderr.read().decode())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mpop3 did not start listening")

    def stop(self, sig=15, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def log(self):
        return self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def mbox(*messages, sender="MAILER-DAEMON", date="Thu Nov 19 10:00:00 2026"):
    """An mbox file: each message (bytes, LF lines) after a From_ line.
    Body lines starting with "From " must already be quoted by the caller."""
    out = b""
    for m in messages:
        if not m.endswith(b"\n"):
            m += b"\n"
        out += b"From %s %s\n" % (sender.encode(), date.encode()) + m + b"\n"
    return out


def strip_trailing_blank(message):
    return re.sub(rb"\n+\Z", b"\n", message)
