"""The parent of forked server processes, and what their children ask it.

Two process models fork (mpop3/server/models.py): several server processes
(`processes N`) and a process per session. Either way the parent is the one
process that sees every login, so it keeps the limits that must count them
all: the failed-login delays per client address and the LOGIN-DELAY clock
per mailbox (mpop3/server/limits.py). It runs no event loop: a selector
over its children's socket pairs, the wake-up pipe of its signals and, for
a process per session, the listening sockets.

A child asks over a socket pair of its own, one short line each way:

    reserve GROUP USER          seconds to wait before checking a password, as a line
    failed GROUP USER PASSWORD  seconds to wait before answering a failure
    succeeded GROUP USER        a login succeeded: forget the user's failures
    wait MAILBOX                seconds a mailbox must still wait (LOGIN-DELAY)
    logged-in MAILBOX           a mailbox was logged in to, now

GROUP is the client's address group (limits.address_group); USER,
PASSWORD and MAILBOX are 32 hex digits, keyed hashes (LoginThrottle's
user_key and mark, Channel.mailbox_mark), so the parent holds no secrets
and no names. What a child says is not trusted: a session process runs as
a mailbox's user after login, for a client that may be hostile. A session
process's reports must name the address group of the client the parent
accepted, and it gets a budget of them; a child that says anything
malformed is no longer listened to, and falls back on its own copy of the
limits.
"""

import ctypes
import hashlib
import ipaddress
import logging
import os
import selectors
import signal
import socket
import threading
import time

from .. import config
from .. import log as logs
from . import operations, scoreboard, tls
from .limits import LoginDelayClock, LoginThrottle, address_group

log = logging.getLogger("mpop3.server")

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
LONGEST_REPORT = 128
REPORTS_PER_SESSION = 64  # far more than a session can need (logins are limited)


class Supervisor:
    """The selector loop of a parent. A model adds its own readers
    (register) and says what to do when a child ends (child_ended)."""

    def __init__(self, conf):
        self.conf = conf
        self.children = {}  # pid -> what the model keeps of it
        self.throttle = LoginThrottle(conf.values["login_fail_delay"], conf.values["login_fail_delay_max"])
        self.clock = LoginDelayClock()
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.wake = None
        self.board = scoreboard.Board()  # the segments of the children that serve sessions
        self.operations = None  # operations.Operations: the control socket, /metrics
        self.metrics_process = None  # (pid, our end of its socket pair, when it started)
        self.metrics_failures = 0  # times in a row it ended within a second

    def run(self):
        """Serve until stopped and every child has ended; the exit code."""
        self.wake = wake_on_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        self.selector.register(self.wake[0], selectors.EVENT_READ, self.signalled)
        self.started()
        self.start_operations()
        while not (self.stopping and not self.children and self.metrics_process is None):
            for key, _ in self.selector.select(self.timeout()):
                key.data(key.fileobj)
            self.tick()
        return self.finished()

    # --- what a model fills in ------------------------------------------------

    def started(self):
        """Called once the loop is about to run."""

    def timeout(self):
        """The longest select() may wait (None: until something happens)."""
        return None

    def tick(self):
        """Called after each round of events (and each timeout)."""

    def child_ended(self, pid, status):
        """A child has been reaped."""

    def stop_accepting(self):
        """SIGTERM: stop taking new work."""

    def finished(self):
        log.info("stopped")
        return 0

    # --- children --------------------------------------------------------------

    def fork(self, address=None, role=None, slots=0):
        """Fork a child with a channel to us: (pid, its Channel) in the
        parent, (0, its Channel) in the child; OSError if the system
        refuses. `address`: the one client a session process serves.
        `role`: a child that serves sessions gets a scoreboard segment of
        `slots` sessions, counted under that role."""
        segment = scoreboard.Segment.create(slots) if role is not None else None
        try:
            ours, theirs = socket.socketpair()
        except OSError:
            if segment is not None:
                segment.close()
            raise
        # the child starts with our signals held until its loop handles them
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            ours.close()
            theirs.close()
            if segment is not None:
                segment.close()
            raise
        if pid == 0:
            ours.close()
            self.leave(segment)
            return 0, Channel(theirs, self.throttle, self.clock)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if segment is not None:
            self.board.add(pid, role, segment)
        theirs.close()
        ours.setblocking(False)
        self.selector.register(ours, selectors.EVENT_READ, ChildReports(self, ours, address).read)
        return pid, None

    def leave(self, segment=None):
        """In a new child: drop everything of the parent's but what it was
        forked with (signals stay held until its own loop handles them)."""
        scoreboard.own = segment
        self.board.drop_all(keep=segment)
        if self.operations is not None:
            self.operations.close(unlink=False)
            self.operations = None
        for key in list(self.selector.get_map().values()):
            if key.fileobj != self.wake[0]:
                key.fileobj.close()  # listening sockets, other children's channels
        self.selector.close()
        stop_waking(self.wake)

    def child_main(self, what, serve):
        """In a new child: serve() to its end, then exit with its code."""
        name_process(what.split()[0])
        code = 1
        try:
            code = serve()
        except BaseException:
            log.exception("%s failed", what)
        finally:
            logging.shutdown()
            os._exit(code)

    def forward(self, signum):
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # --- signals ------------------------------------------------------------------

    def signalled(self, wake_r):
        try:
            signums = os.read(wake_r, 512)
        except BlockingIOError:
            return
        for signum in signums:
            if signum == signal.SIGCHLD:
                self.reap()
            elif signum == signal.SIGHUP:
                self.reload()
                self.forward(signal.SIGHUP)
            else:
                self.stop()

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.board.retire(pid)
            if self.metrics_process is not None and pid == self.metrics_process[0]:
                self.metrics_ended(status)
            elif pid in self.children:
                self.child_ended(pid, status)

    def reload(self):
        """SIGHUP: the same reload as every server process's (Service.reload),
        for what lives here; children forked from now on inherit it."""
        new = config.reload(self.conf)
        if new is None:
            return
        # a forked process inherits the context: reload it here, before the fork
        new.tls_context = tls.reload(self.conf.tls_context, new)
        logs.reload_level(self.conf, new)
        self.conf = new
        self.throttle.base = new.values["login_fail_delay"]
        self.throttle.maximum = new.values["login_fail_delay_max"]
        self.reloaded(new)
        log.info("reloaded %s", new.path)

    def reloaded(self, new):
        """A model's part of a reload."""

    def stop(self):
        if not self.stopping:
            self.stopping = True
            self.stop_accepting()
            self.close_operations()
        self.forward(signal.SIGTERM)
        if self.metrics_process is not None:
            os.kill(self.metrics_process[0], signal.SIGTERM)

    # --- running it: the control socket and /metrics (operations.py) -----------------

    def start_operations(self):
        ops = self.operations
        if ops is None:
            return
        if ops.control_socket is not None:
            self.selector.register(ops.control_socket, selectors.EVENT_READ, lambda _: ops.answer_control(self.board))
        if ops.metrics_socket is not None:
            self.start_metrics_process()

    def close_operations(self):
        ops, self.operations = self.operations, None
        if ops is None:
            return
        if ops.control_socket is not None:
            self.selector.unregister(ops.control_socket)
        ops.close()

    def processes(self):
        """Processes by role, for /metrics."""
        counts = {"master": 1, **self.board.roles()}
        for kind in self.children.values():
            if type(kind) is tuple and kind and kind[0] in ("auth", "spawner"):
                counts[kind[0]] = counts.get(kind[0], 0) + 1
        if self.metrics_process is not None:
            counts["metrics"] = 1
        return counts

    def start_metrics_process(self):
        ours, theirs = socket.socketpair()
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
            ours.close()
            theirs.close()
            log.error("cannot start the metrics process: %s", e.strerror)
            return
        if pid == 0:
            ours.close()
            listener, self.operations.metrics_socket = self.operations.metrics_socket, None
            self.leave()
            self.child_main("metrics process", lambda: self.be_metrics(listener, theirs))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        theirs.close()
        ours.setblocking(False)
        self.metrics_process = (pid, ours, time.monotonic())
        self.selector.register(ours, selectors.EVENT_READ, self.metrics_asked)

    def be_metrics(self, listener, parent):
        from .privs import safe_identity, switch_or_log

        end_with_parent()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing of it to reload
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        if os.geteuid() == 0 and not switch_or_log(safe_identity(self.conf)):
            return 1
        return operations.serve_metrics_process(listener, parent)

    def metrics_asked(self, sock):
        if not operations.answer_render(sock, self.board, self.processes):
            self.selector.unregister(sock)
            sock.close()

    def metrics_ended(self, status):
        pid, sock, started = self.metrics_process
        self.metrics_process = None
        if sock.fileno() >= 0:
            self.selector.unregister(sock)
            sock.close()
        if self.stopping:
            return
        self.metrics_failures = self.metrics_failures + 1 if time.monotonic() - started < 1.0 else 0
        if self.metrics_failures >= 5:  # it cannot start: no crash loop
            log.error("the metrics process keeps ending at once (status %d); /metrics is not served", status)
            return
        log.error("the metrics process %d ended (status %d); starting another", pid, status)
        self.start_metrics_process()


def wake_on_signals():
    """The signals a selector loop handles (HANDLED) arrive as bytes on a
    pipe, to select on: its two ends, non-blocking."""
    wake = os.pipe()
    for fd in wake:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake[1])
    for signum in HANDLED:
        signal.signal(signum, lambda *_: None)  # the wake-up fd carries them
    return wake


def stop_waking(wake):
    """In a forked child: those signals back to their defaults (still
    held), the pipe closed."""
    signal.set_wakeup_fd(-1)
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_DFL)
    for fd in wake:
        os.close(fd)


class ChildReports:
    """The parent's end of a child's channel: reads its reports, answers
    them. `address`: the client of a session process (its reports must
    name it, and are counted), or None for a server process."""

    def __init__(self, supervisor, sock, address):
        self.supervisor = supervisor
        self.sock = sock
        self.address = address
        self.group = None if address is None else address_group(address, supervisor.conf.values["ipv6_prefix"])
        self.partial = b""  # a report not yet ended by its newline
        self.budget = REPORTS_PER_SESSION if address is not None else None
        self.logins_left = 1 if address is not None else None  # a session logs in once

    def read(self, _):
        """Answer what the child said; its end of file: it has ended."""
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.hang_up()
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > LONGEST_REPORT:
            lines.append(self.partial)  # judged below: too long for a report
        for line in lines:
            if self.budget is not None:
                self.budget -= 1
            answer = None if self.budget is not None and self.budget < 0 else self.answer(line.split(b" "))
            if answer is None:
                log.warning(
                    "process for %s: malformed report %r; no longer listening to it",
                    self.address or "several clients",
                    line[:LONGEST_REPORT],
                )
                self.hang_up()
                return
            if answer is not True:
                try:
                    self.sock.send(answer)
                except OSError:
                    pass

    def answer(self, words):
        """The bytes to answer, True for a report that wants none, None for
        a malformed one."""
        supervisor = self.supervisor
        kind, args = words[0], words[1:]
        if kind in (b"reserve", b"failed", b"succeeded"):
            wanted = 3 if kind == b"failed" else 2
            if len(args) != wanted:
                return None
            group, keys = self.client(args[0]), [hex_mark(word) for word in args[1:]]
            if group is None or None in keys:
                return None
            if kind == b"reserve":
                return b"%r\n" % supervisor.throttle.reserve(group, keys[0])
            if kind == b"failed":
                return b"%r\n" % supervisor.throttle.failed(group, keys[0], keys[1])
            supervisor.throttle.succeeded(group, keys[0])
            return True
        mark = hex_mark(args[0]) if len(args) == 1 else None
        if mark is None:
            return None
        delay = supervisor.conf.values["login_delay"]
        if kind == b"wait":
            return b"%r\n" % float(supervisor.clock.wait_needed(mark, delay))
        if kind == b"logged-in" and self.logins_left != 0:
            if self.logins_left is not None:
                self.logins_left -= 1
            supervisor.clock.logged_in(mark, delay)
            return True
        return None

    def client(self, word):
        """The address group a report names, if it may name it: a session
        process speaks only of its own client."""
        try:
            group = word.decode("ascii")
            if group != tls.NO_PEER:
                ipaddress.ip_network(group, strict=False)
        except ValueError:
            return None
        if self.group is not None and group != self.group:
            return None
        return group

    def hang_up(self):
        self.supervisor.selector.unregister(self.sock)
        self.sock.close()


def hex_mark(word):
    try:
        mark = bytes.fromhex(word.decode("ascii"))
    except ValueError:
        return None
    return mark if len(mark) == 16 else None


class Channel:
    """A child's end: the parent's throttle and LOGIN-DELAY clock, asked
    over the socket pair. Without an answer (the parent is gone, or stopped
    listening), the copies inherited at the fork decide."""

    def __init__(self, sock, throttle, clock):
        self.sock = sock
        sock.settimeout(5)
        self.lock = threading.Lock()  # a server process asks from several worker threads
        self.key = throttle.key  # inherited: the parent's key for the marks
        self.throttle = RemoteThrottle(self, throttle)
        self.clock = RemoteClock(self, clock)

    def mailbox_mark(self, mailbox):
        return hashlib.blake2b(mailbox.encode("utf-8", "surrogateescape"), key=self.key, digest_size=16).digest()

    def ask(self, line):
        """The parent's answer as a float; None if there is none."""
        with self.lock:
            try:
                self.sock.sendall(line)
                return float(self.sock.recv(64).decode())  # one short line
            except (OSError, ValueError):
                return None

    def tell(self, line):
        with self.lock:
            try:
                self.sock.sendall(line)
            except OSError:
                pass


class Remote:
    """A limit of the parent's, asked over the channel, starting from the
    copy inherited at the fork."""

    def __init__(self, channel, inherited):
        self.__dict__.update(inherited.__dict__)
        self.lock = threading.Lock()
        self.channel = channel


class RemoteThrottle(Remote, LoginThrottle):
    def reserve(self, group, user_key):
        local = super().reserve(group, user_key)
        answer = self.channel.ask(b"reserve %s %s\n" % (group.encode(), user_key.hex().encode()))
        return local if answer is None else answer

    def failed(self, group, user_key, mark):
        local = super().failed(group, user_key, mark)
        answer = self.channel.ask(b"failed %s %s %s\n" % (group.encode(), user_key.hex().encode(), mark.hex().encode()))
        return local if answer is None else answer

    def succeeded(self, group, user_key):
        super().succeeded(group, user_key)
        self.channel.tell(b"succeeded %s %s\n" % (group.encode(), user_key.hex().encode()))


class RemoteClock(Remote, LoginDelayClock):
    def wait_needed(self, mailbox, delay):
        if delay <= 0:
            return 0
        local = super().wait_needed(mailbox, delay)
        answer = self.channel.ask(b"wait %s\n" % self.channel.mailbox_mark(mailbox).hex().encode())
        return local if answer is None else answer

    def logged_in(self, mailbox, delay):
        if delay <= 0:
            return
        super().logged_in(mailbox, delay)
        self.channel.tell(b"logged-in %s\n" % self.channel.mailbox_mark(mailbox).hex().encode())


PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
try:
    prctl = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # not Linux
    prctl = None


def name_process(role):
    """Name this process "mpop3-ROLE" where ps, top and /proc/PID/comm show
    it, so that an administrator (and a test) can tell the roles apart.
    Linux only; elsewhere the name stays the interpreter's."""
    if prctl is not None:
        prctl(PR_SET_NAME, ctypes.c_char_p(f"mpop3-{role}".encode()[:15]))


def end_with_parent():
    """Linux: get SIGTERM if the parent dies (even by SIGKILL), so that no
    worker is left serving on its own; the check after it covers a parent
    that died before the request was made."""
    if prctl is None:  # not Linux: the parent's SIGTERM must do
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)


def become_subreaper():
    """Linux: orphans among our descendants (a mail process whose spawner
    died) become our children, for us to reap, not init's."""
    if prctl is not None:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
