"""A process per session, for the privilege rules that switch users after
login (DESIGN section 5, rules 1 and 2): a uid belongs to a process.

The listener keeps root only for this: it accepts, counts, and forks. It
runs no event loop and no session code, so the child starts clean: it closes
the listening sockets, serves its one connection on a new uvloop loop, and
gives up root for good once the user has authenticated. A session process
that crashes takes nothing else with it.

What must outlive one session lives here, in the listener: the session
counts (max_sessions, max_sessions_per_ip) and the failed-login delays per
client address. A child asks the listener for the delay of each failed
login over a socket pair of its own (one line each way), so failures in
other sessions from the same address count at once. What a child says
there is not trusted: a session process runs as a mailbox's user after
login, and serves a client that may be hostile. The address a report
counts against is the one the listener accepted, and a child that says
anything malformed is no longer listened to.
"""

import asyncio
import errno
import gc
import logging
import os
import selectors
import signal
import socket
from collections import Counter

from . import prefork, replies
from .limits import LoginThrottle

log = logging.getLogger("mpop3.server")

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
# A report is `failed HEX` (a keyed 16-byte fingerprint) or `succeeded`.
LONGEST_REPORT = 64


class Listener:
    def __init__(self, conf, tables, sockets, serve_connection):
        self.conf = conf
        self.tables = tables
        self.sockets = sockets
        self.serve_connection = serve_connection  # (conf, tables, sock, throttle), in the child
        self.children = {}  # pid -> client address
        self.per_address = Counter()
        self.throttle = LoginThrottle(conf.values["login_fail_delay"], conf.values["login_fail_delay_max"])
        self.stopping = False
        self.selector = selectors.DefaultSelector()

    def run(self):
        self.wake = wake_r, wake_w = os.pipe()
        for fd in self.wake:
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w)
        for signum in HANDLED:
            signal.signal(signum, lambda *_: None)  # the wake-up fd carries them
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        for sock in self.sockets:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, self.accept)
        self.selector.register(wake_r, selectors.EVENT_READ, self.signalled)
        log.info("serving each session in a process of its own")
        self.prepare()
        while not (self.stopping and not self.children):
            for key, _ in self.selector.select():
                if isinstance(key.data, ChildChannel):
                    self.answer_child(key.data)
                else:
                    key.data(key.fileobj)
        log.info("stopped")
        return 0

    def prepare(self):
        """Do once here what every session process would otherwise do on
        its own: an event loop's first creation imports and caches a good
        deal. Then freeze what is loaded, so that the collector in a session
        process does not touch (and so copy) the pages it shares with us."""
        from .server import new_loop

        loop = new_loop()
        asyncio.set_event_loop(loop)
        loop.close()
        asyncio.set_event_loop(None)
        gc.collect()
        gc.freeze()

    # --- connections -------------------------------------------------------

    def accept(self, listening):
        try:
            conn, peer = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and friends: wait for a child to end
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("cannot accept: %s", e.strerror)
                return
            raise
        address = peer[0]
        refusal = self.refusal(address)
        if refusal is not None:
            refuse(conn, refusal)
            return
        try:
            ours, theirs = socket.socketpair()
        except OSError as e:
            log.error("%s: refused, no socket pair for a session process: %s", address, e.strerror)
            refuse(conn, replies.ERR_NO_SESSION_PROCESS)
            return
        # the child starts with our signals held until its loop handles them
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
        except OSError as e:  # EAGAIN (a process limit), ENOMEM
            log.error("%s: refused, cannot start a session process: %s", address, e.strerror)
            pid = None
        if pid == 0:
            ours.close()
            self.become_session(conn, address, theirs)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        theirs.close()
        if pid is None:
            ours.close()
            refuse(conn, replies.ERR_NO_SESSION_PROCESS)
            return
        conn.close()
        ours.setblocking(False)
        self.selector.register(ours, selectors.EVENT_READ, ChildChannel(ours, address))
        self.children[pid] = address
        self.per_address[address] += 1

    def refusal(self, address):
        values = self.conf.values
        if len(self.children) >= values["max_sessions"]:
            log.warning("%s: refused, %d sessions already", address, len(self.children))
            return replies.ERR_TOO_MANY_SESSIONS
        if self.per_address[address] >= values["max_sessions_per_ip"]:
            log.warning("%s: refused, %d sessions from there already", address, self.per_address[address])
            return replies.ERR_TOO_MANY_FROM_YOU
        return None

    def become_session(self, conn, address, channel):
        """In the child: drop everything of the listener's, serve, exit."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in HANDLED:
                signal.signal(signum, signal.SIG_DFL)
            for fd in self.wake:
                os.close(fd)
            for sock in self.sockets:
                sock.close()
            for key in list(self.selector.get_map().values()):
                if isinstance(key.data, ChildChannel):
                    key.fileobj.close()  # other sessions' channels
            self.selector.close()
            conn.setblocking(False)
            code = self.serve_connection(self.conf, self.tables, conn, SharedThrottle(channel, self.throttle))
        except BaseException:
            log.exception("session process failed")
        finally:
            logging.shutdown()
            os._exit(code)

    # --- signals and reports -----------------------------------------------

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

    def reload(self):
        """SIGHUP: sessions started from now on get the reloadable settings
        (the running ones reload their own, like a single server)."""
        from .config import load
        from .server import RELOADABLE, reload_tls

        try:
            new = load(self.conf.path)
        except Exception as e:  # ConfigError, or anything a broken file causes
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        for name in RELOADABLE:
            self.conf.values[name] = new.values[name]
        # a session process inherits the context: reload it here, before the fork
        self.conf.tls_context = reload_tls(self.conf.tls_context, new)
        self.throttle.base = new.values["login_fail_delay"]
        self.throttle.maximum = new.values["login_fail_delay_max"]
        log.info("reloaded %s", self.conf.path)

    def stop(self):
        """Stop accepting; each session gets its grace period in its process."""
        if not self.stopping:
            self.stopping = True
            log.info("stopping: %d session%s open", len(self.children), "" if len(self.children) == 1 else "s")
            for sock in self.sockets:
                self.selector.unregister(sock)
                sock.close()
        self.forward(signal.SIGTERM)

    def forward(self, signum):
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def reap(self):
        for pid, status in prefork.reap():
            address = self.children.pop(pid, None)
            if address is None:
                continue
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]
            if os.WIFSIGNALED(status):
                log.error("session process %d (%s) killed by signal %d", pid, address, os.WTERMSIG(status))

    def answer_child(self, channel):
        """A session process reports a login: `failed HEX` is answered
        with the delay, `succeeded` with nothing; both count for the
        address we accepted the session from. End of file: the session
        process is gone. Anything else: we stop listening to it, and it
        falls back on its own copy of the delays."""
        try:
            data = channel.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.hang_up(channel)
            return
        lines = (channel.partial + data).split(b"\n")
        channel.partial = lines.pop()
        if len(channel.partial) > LONGEST_REPORT:
            lines.append(channel.partial)  # judged below: too long for a report
        for line in lines:
            kind, _, mark = line.partition(b" ")
            if kind == b"succeeded" and not mark:
                self.throttle.succeeded(channel.address)
                continue
            try:
                mark = bytes.fromhex(mark.decode("ascii"))
            except ValueError:
                mark = b""
            if kind != b"failed" or len(mark) != 16:
                log.warning("session process for %s: malformed report %r; no longer listening to it",
                            channel.address, line[:LONGEST_REPORT])
                self.hang_up(channel)
                return
            try:
                channel.sock.send(b"%r\n" % self.throttle.failed_mark(channel.address, mark))
            except OSError:
                pass

    def hang_up(self, channel):
        self.selector.unregister(channel.sock)
        channel.sock.close()


class ChildChannel:
    """The listener's end of a session process's socket pair, and the
    client address the session was accepted from."""

    __slots__ = ("sock", "address", "partial")

    def __init__(self, sock, address):
        self.sock = sock
        self.address = address
        self.partial = b""  # a report not yet ended by its newline


class SharedThrottle(LoginThrottle):
    """A session process's throttle: the listener's, asked over a socket
    pair. Without an answer (the listener is gone), the inherited copy
    decides."""

    def __init__(self, channel, inherited):
        self.__dict__.update(inherited.__dict__)
        self.channel = channel
        channel.settimeout(5)

    def failed_mark(self, address, mark):
        local = super().failed_mark(address, mark)
        try:
            self.channel.sendall(b"failed %s\n" % mark.hex().encode())
            return float(self.channel.recv(64).decode())  # one short line: the delay
        except (OSError, ValueError):
            return local

    def succeeded(self, address):
        super().succeeded(address)
        try:
            self.channel.sendall(b"succeeded\n")
        except OSError:
            pass


def refuse(conn, reply):
    try:
        conn.setblocking(False)
        conn.send(reply.wire)
    except OSError:
        pass
    finally:
        conn.close()


def serve(conf, tables, sockets, serve_connection):
    return Listener(conf, tables, sockets, serve_connection).run()

