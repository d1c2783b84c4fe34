"""Helpers for the protocol tests: servers to talk to and a raw client.

- ServerThread: the real Service (mpop3/server/service.py) in a thread, on
  uvloop or asyncio's own loop (LOOPS; the `loop_kind` fixture picks),
  with function tables the test builds (in-memory storage, a dict of users);
- Spawned: the real `mpop3` command in a subprocess, on a site that
  write_site makes: auth_file and storage_mbox on files in a temporary
  directory (for the real clients);
- Wire: a raw socket client for what poplib hides (pipelining, NUL bytes,
  over-long lines);
- wait_for: the one way a test waits for something to happen.
Tests get servers from the fixtures in conftest.py (`spawn`,
`server_thread`), which stop them at the end; import the rest explicitly:
`from pop_server import ...`. Spools come from mbox_helpers.mbox.
"""

import asyncio
import inspect
import os
import pathlib
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
# quick delays; and a process per session where the rules switch after
# login, whatever accounts this machine has (tests of processes by role
# name their login_user)
FAST = {
    "login_fail_delay": "0.01",
    "login_fail_delay_max": "0.04",
    "shutdown_grace": "0.5",
    "login_user": "none",
    "control_socket": "none",  # tests that use one name their own: servers run side by side
}


def wait_for(condition, seconds=10, interval=0.02, what=None):
    """Call condition() every `interval` seconds until it returns something
    true, and return that. A condition may do work each round (connect,
    reconnect, collect). If `seconds` pass first, fail naming what was
    awaited: `what`, else the condition's docstring, else its source line."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {seconds} s for {what or awaited(condition)}")
        time.sleep(interval)
    return result


def awaited(condition):
    if condition.__doc__:
        return condition.__doc__.strip()
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


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


class EmptyStorage(StorageFunctions):
    """Empty mailboxes; remembers which were opened."""

    def __init__(self):
        super().__init__()
        self.opened = []

    def storage_lock_mailbox(self, mailbox):
        self.opened.append(mailbox)
        return mailbox

    def storage_message_count(self, handle):
        return 0

    def storage_message_sizes(self, handle):
        return []


def memory_tables(users, boxes, mailboxes=None):
    return loader.Tables(MemoryAuth(users, mailboxes), MemoryStorage(boxes), [])


LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
LOOP = "uvloop"  # what ServerThread runs on; a test module may ask for both (loop_kind)


class ServerThread:
    """The real Service on an event loop in a daemon thread."""

    def __init__(self, tables, extra=None, listen=None):
        self.conf = make_conf(extra, listen)
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

    def __init__(self, port, host="127.0.0.1", timeout=5, source=None):
        """`source`: the client's own address (127.0.0.2, say: another client)."""
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
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


def write_site(root, users, boxes, extra=None, *, auth=None, mbox_options=None, spool=None):
    """A passwd file, an mbox spool dir and a config under `root`; the config path.

    users: name -> password line part (plaintext or hash), or (password, mailbox)
    boxes: mailbox -> mbox file contents (bytes)
    extra: more directives, name -> value
    auth: an auth module (name or path) to load instead of auth_file on the
        passwd file
    mbox_options: more storage_mbox settings (`> name value`), name -> value
    spool: the spool directory, if not `root`/spool
    """
    root = str(root)
    spool = str(spool or os.path.join(root, "spool"))
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
    lines += [f"auth_module {auth}"] if auth else ["auth_module auth_file", f"> passwd_file {root}/passwd"]
    lines += ["storage_module storage_mbox", f"> storage_dir {spool}"]
    lines += [f"> {name} {value}" for name, value in (mbox_options or {}).items()]
    path = os.path.join(root, "mpop3.conf")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


SAFE_USER = "nobody"  # the default safe_user, which serves virtual users' mailboxes
ANY_USER = {"mailbox_user": "any"}  # write_site's mbox_options: spools opened as the server's own user


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


def listening(port, host="127.0.0.1"):
    """Whether something accepts connections on host:port now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


class Spawned:
    """`python -m mpop3 -c CONF -l 127.0.0.1:PORT` until stopped; `root` is
    the directory of CONF (write_site's root). Tests start it through the
    `spawn` fixture (conftest.py)."""

    def __init__(self, conf_path, port=None, args=()):
        self.port = port or free_port()
        self.conf_path = conf_path
        self.root = pathlib.Path(conf_path).parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpop3", "-c", conf_path, "-l", f"127.0.0.1:{self.port}", *args],
            cwd=TREE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def started():
            if self.proc.poll() is not None:
                raise RuntimeError("mpop3 exited: " + self.proc.stderr.read().decode())
            return listening(self.port)

        try:
            wait_for(started, seconds=15, interval=0.05, what=f"mpop3 to listen on port {self.port}")
        except BaseException:
            self.stop()
            raise

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


def make_certificate(directory, name):
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.231.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)
