"""Listeners, signals and the event loop: everything around the sessions.

One process serves many sessions on uvloop. `run()` is what the mpop3
command calls; `Server` is usable on its own (the tests start one in a
thread). Shaped so that later work slots in at one place each: TLS is a
different `ssl=` for a listener (start_listeners), and a process per
session (privilege switching, DESIGN section 5) would hand an accepted
socket to serve_socket() in a child.

Signals: SIGTERM (and SIGINT) stop accepting, give sessions
`shutdown_grace` seconds to finish, then close them without committing;
SIGHUP re-reads the configuration and applies what is safe to change in a
running server (limits, timeouts, CAPA extras, log level); listeners and
modules need a restart, and a reload that fails keeps the old settings.
"""

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import stat

from . import config as config_module
# everything is imported before the switch away from root: safe_user may
# not be able to read the Python tree later
from . import prefork, privs, replies, session_processes
from .errors import StoragePermError
from . import sasl, tls
from .auth_functions import AuthFunctions
from .limits import LoginDelayClock, LoginThrottle
from .session import Session
from .workers import InlineWorkers, Workers

log = logging.getLogger("mpop3.server")

# settings a SIGHUP may change; anything else needs a restart
RELOADABLE = ("max_line_length", "max_bad_commands", "max_login_failures", "login_fail_delay",
              "login_fail_delay_max", "idle_timeout", "max_sessions", "max_sessions_per_ip",
              "shutdown_grace", "login_delay", "expire", "implementation", "log_level",
              "plaintext_auth")


class Settings:
    """The session settings as plain attributes (read on every command)."""

    def __init__(self, conf):
        for name in RELOADABLE:
            setattr(self, name, conf.values[name])


class Shared:
    """What every session of a server shares."""

    def __init__(self, conf, tables, loop):
        self.conf = conf
        self.tables = tables
        self.loop = loop
        self.workers = Workers(loop, conf.values["worker_threads"])
        self.sessions = set()
        self.per_address = {}
        self.stopping = False
        self.login_clock = LoginDelayClock()
        self.throttle = None
        # built before any fork (cli.py); tests hand the Server a bare Config
        self.tls_context = conf.tls_context or tls.context_from_config(conf)
        self.plaintext_passwords = plaintext_passwords(tables.auth)
        self.before_open = None  # called with the mailbox name before opening it (privs)
        self.tally = None  # the sessions of all server processes (prefork.SessionTally)
        self.apply(conf)

    def apply(self, conf):
        self.settings = settings = Settings(conf)
        if self.throttle is None:
            self.throttle = LoginThrottle(settings.login_fail_delay, settings.login_fail_delay_max)
        else:  # a reload keeps what the throttle remembers of failures
            self.throttle.base, self.throttle.maximum = settings.login_fail_delay, settings.login_fail_delay_max
        announced_delay = max(settings.login_delay, int(self.tables.auth.auth_default_login_delay() or 0))
        extras = dict(expire=settings.expire, login_delay=announced_delay,
                      implementation=settings.implementation)
        self.capa_extras = extras
        self.capa_cache = {}

    def capabilities(self, uidl, stls, cleartext):
        """The CAPA reply for a session in this situation (built once)."""
        key = (uidl, stls, cleartext)
        capa = self.capa_cache.get(key)
        if capa is None:
            capa = self.capa_cache[key] = replies.capabilities(
                uidl=uidl, user=cleartext, stls=stls, sasl=self.sasl_mechanisms(cleartext),
                **self.capa_extras)
        return capa

    def sasl_mechanisms(self, cleartext):
        """What AUTH accepts: PLAIN and LOGIN where the policy lets the
        password cross in clear, CRAM-MD5 if the auth module has plaintext
        passwords to check its digest against."""
        return [name for name, sends_password in sasl.MECHANISMS.items()
                if (cleartext if sends_password else self.plaintext_passwords)]

    def sweep_idle(self):
        """One timer for every session: close those idle for too long.
        Runs every quarter of the timeout (at most every second)."""
        timeout = self.settings.idle_timeout
        now = self.loop.time()
        for session in list(self.sessions):
            session.idle_check(now, timeout)
        self.loop.call_later(min(1.0, max(0.02, timeout / 4)), self.sweep_idle)

    def admit(self, session):
        """None to serve a new session, or the reply that refuses it."""
        if self.stopping:
            return replies.ERR_SHUTTING_DOWN
        open_now = len(self.sessions) if self.tally is None else self.tally.total()
        if open_now >= self.settings.max_sessions:
            log.warning("%s: refused, %d sessions already", session.peer, open_now)
            return replies.ERR_TOO_MANY_SESSIONS
        count = self.per_address.get(session.peer, 0)
        if count >= self.settings.max_sessions_per_ip:
            log.warning("%s: refused, %d sessions from there already", session.peer, count)
            return replies.ERR_TOO_MANY_FROM_YOU
        self.per_address[session.peer] = count + 1
        self.sessions.add(session)
        if self.tally is not None:
            self.tally.set(len(self.sessions))
        return None

    def forget(self, session):
        self.sessions.discard(session)
        if self.tally is not None:
            self.tally.set(len(self.sessions))
        count = self.per_address.get(session.peer, 1) - 1
        if count > 0:
            self.per_address[session.peer] = count
        else:
            self.per_address.pop(session.peer, None)


class Server:
    def __init__(self, conf, tables, loop=None):
        self.loop = loop or asyncio.get_event_loop()
        self.shared = Shared(conf, tables, self.loop)
        self.listeners = []
        self.stopped = self.loop.create_future()

    def new_session(self):
        return Session(self.shared)

    def tls_for(self, sock):
        """The SSLContext for a socket of a listen_tls address (listening
        or accepted: implicit TLS), None for a plain one."""
        if tls.is_tls_address(self.shared.conf.values["listen_tls"], sock.getsockname()):
            return self.shared.tls_context
        return None

    async def start_listeners(self, sockets=None):
        """Bind every `listen` address, or serve on `sockets` already bound
        (by the parent of several server processes); returns (host, port)s."""
        self.shared.sweep_idle()
        if sockets is None:
            sockets = [bind(host, port) for host, port in self.shared.conf.listen]
            sockets += [bind(host, port) for host, port in self.shared.conf.listen_tls]
        bound = []
        for sock in sockets:
            listener = await self.loop.create_server(self.new_session, sock=sock, backlog=1024,
                                                     ssl=self.tls_for(sock))
            self.listeners.append(listener)
            bound.append(sock.getsockname()[:2])
        log.info("listening on %s", ", ".join(
            f"{h}:{p}" + (" (TLS)" if (h, p) in self.shared.conf.listen_tls else "") for h, p in bound))
        return bound

    async def serve_one(self, connect):
        """One session, wired up by `await connect(session)`, to its end."""
        self.shared.sweep_idle()
        session = self.new_session()
        session.closed_waiter = self.loop.create_future()
        await connect(session)
        await session.closed_waiter
        await self.finish_commits()

    async def serve_stdin(self):
        """One session on file descriptors 0 and 1 (inetd, systemd Accept=yes)."""
        async def connect(session):
            if stat.S_ISSOCK(os.fstat(0).st_mode):  # inetd, systemd Accept=yes, socat
                sock = socket.socket(fileno=os.dup(0))
                await self.loop.connect_accepted_socket(lambda: session, sock, ssl=self.tls_for(sock))
            elif stat.S_ISFIFO(os.fstat(0).st_mode) and stat.S_ISFIFO(os.fstat(1).st_mode):
                await connect_pipes(self.loop, session)
            else:  # a terminal or a file: someone trying it by hand
                PlainFiles(self.loop, session).start()

        await self.serve_one(connect)

    async def serve_accepted(self, sock):
        """One session on a socket the listener accepted (a session process)."""
        async def connect(session):
            await self.loop.connect_accepted_socket(lambda: session, sock, ssl=self.tls_for(sock))

        await self.serve_one(connect)

    async def finish_commits(self):
        """Let any commit in a worker thread finish before the loop ends."""
        if self.shared.workers.threads:
            await self.loop.run_in_executor(None, self.shared.workers.shutdown)
        await asyncio.sleep(0)  # the callbacks they scheduled

    def stop(self):
        """SIGTERM: stop accepting, wait out the grace period, then close."""
        if self.shared.stopping:
            return
        self.shared.stopping = True
        log.info("stopping: %d session%s open, grace period %g s", len(self.shared.sessions),
                 "" if len(self.shared.sessions) == 1 else "s", self.shared.settings.shutdown_grace)
        for listener in self.listeners:
            listener.close()
        self.loop.create_task(self.drain())

    async def drain(self):
        deadline = self.loop.time() + self.shared.settings.shutdown_grace
        while self.shared.sessions and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.shared.sessions:
            log.info("grace period over: closing %d session%s without committing",
                     len(self.shared.sessions), "" if len(self.shared.sessions) == 1 else "s")
            for session in list(self.shared.sessions):
                session.shut_down()
        await self.finish_commits()
        await asyncio.sleep(0)  # let the transports' close callbacks run
        if not self.stopped.done():
            self.stopped.set_result(None)

    def reload(self):
        """SIGHUP: apply the safe part of a re-read configuration."""
        old = self.shared.conf
        try:
            new = config_module.load(old.path)
        except Exception as e:  # ConfigError, or anything a broken file causes
            log.error("reload failed, keeping the running configuration: %s", e)
            return
        if new.values["listen"] != old.file_listen:
            log.warning("reload: listen addresses changed; that needs a restart")
        if [(m.kind, m.file, m.settings) for m in new.modules] != [(m.kind, m.file, m.settings) for m in old.modules]:
            log.warning("reload: module lines changed; that needs a restart")
        if new.values["listen_tls"] != old.values["listen_tls"]:
            log.warning("reload: listen_tls addresses changed; that needs a restart")
        self.reload_tls(new)
        for name in ("worker_threads", "processes"):
            if new.values[name] != old.values[name]:
                log.warning("reload: %s changed; that needs a restart", name)
        merged = dataclasses.replace(old, values=dict(old.values))
        for name in RELOADABLE:
            merged.values[name] = new.values[name]
        self.shared.conf = merged
        self.shared.apply(merged)
        if new.values["log_level"] != old.values["log_level"]:  # else keep -d's debug
            logging.getLogger("mpop3").setLevel(logging.getLevelName(new.values["log_level"].upper()))
        log.info("reloaded %s", old.path)


    def reload_tls(self, new):
        self.shared.tls_context = reload_tls(self.shared.tls_context, new)


def reload_tls(context, new):
    """SIGHUP: re-read tls_* into the running context (the listen_tls
    listeners hold it, a forked process inherits it): new sessions get the
    new certificate, open ones keep theirs, a bad file keeps the running
    one. Returns the context to use from now on."""
    try:
        if context is None:  # no TLS so far: STLS from now on
            return tls.context_from_config(new)
        if new.values["tls_cert"] is None:
            log.warning("reload: turning TLS off needs a restart")
        else:
            tls.reload_into(context, new)
    except tls.TLSSetupError as e:
        log.error("reload: %s; keeping the running TLS certificate", e)
    return context


def plaintext_passwords(auth):
    """Whether the auth table can give plaintext passwords (CRAM-MD5 needs
    them): a module supplies auth_password, or a subclass overrides it."""
    return (auth.supplied_by.get("auth_password", "default") != "default"
            or type(auth).auth_password is not AuthFunctions.auth_password)


class PipeReader(asyncio.Protocol):
    """stdin in stdin mode: input for the session. Its end is the client's
    end of input, never the end of the session (replies may still be due)."""

    def __init__(self, session, on_made):
        self.session = session
        self.on_made = on_made
        self.ended = False

    def connection_made(self, transport):
        self.on_made(transport)

    def data_received(self, data):
        self.session.data_received(data)

    def eof_received(self):
        self.ended = True
        self.session.eof_received()

    def connection_lost(self, exc):
        if not self.ended:
            self.ended = True
            self.session.eof_received()


class PipeWriter(asyncio.Protocol):
    """stdout in stdin mode: when it is gone, so is the session."""

    def __init__(self, session):
        self.session = session

    def pause_writing(self):
        self.session.pause_writing()

    def resume_writing(self):
        self.session.resume_writing()

    def connection_lost(self, exc):
        self.session.connection_lost(exc)


class PipeDuplex(asyncio.Transport):
    """stdin and stdout as one transport, for a session."""

    def __init__(self, reader, writer):
        super().__init__()
        self.reader = reader
        self.writer = writer

    def write(self, data):
        self.writer.write(data)

    def writelines(self, lines):
        self.writer.writelines(lines)

    def pause_reading(self):
        self.reader.pause_reading()

    def resume_reading(self):
        self.reader.resume_reading()

    def set_write_buffer_limits(self, high=None, low=None):
        self.writer.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self):
        return self.writer.get_write_buffer_size()

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self):
        return self.writer.is_closing()

    def close(self):
        self.reader.close()
        self.writer.close()

    def abort(self):
        self.reader.close()
        self.writer.abort()


class PlainFiles(asyncio.Transport):
    """stdin mode on a terminal or regular files, which the event loop cannot
    poll: a thread reads, writes block. Only for trying mpop3 by hand."""

    def __init__(self, loop, session):
        super().__init__()
        self.loop = loop
        self.session = session
        self.closing = False

    def start(self):
        self.session.connection_made(self)
        self.loop.create_task(self.read_all())

    async def read_all(self):
        while not self.closing:
            data = await self.loop.run_in_executor(None, os.read, 0, 65536)
            if self.closing:
                break
            if not data:
                self.session.eof_received()
                break
            self.session.data_received(data)

    def write(self, data):
        if not self.closing:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(1, view):]
            except OSError:
                self.close()

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self):
        return self.closing

    def close(self):
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.session.connection_lost, None)

    abort = close


async def connect_pipes(loop, session):
    stdout = os.fdopen(os.dup(1), "wb", buffering=0)
    stdin = os.fdopen(os.dup(0), "rb", buffering=0)
    writer, _ = await loop.connect_write_pipe(lambda: PipeWriter(session), stdout)

    def made(reader):
        duplex = PipeDuplex(reader, writer)
        # uvloop keeps only the descriptors: closing these file objects (as
        # the garbage collector would) would close them under it
        duplex.files = (stdin, stdout)
        session.connection_made(duplex)

    await loop.connect_read_pipe(lambda: PipeReader(session, made), stdin)


def bind(host, port, reuse_port=False):
    """A listening socket; TCP_NODELAY on it is inherited by accepted sockets
    (without it, a reply written in two pieces waits ~40 ms for an ACK)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def new_loop():
    try:
        import uvloop
    except ImportError:  # still works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def run(conf, tables, stdin_mode=False):
    """Serve until told to stop; the process exit code.

    Started as root, this is where the privilege rules (mpop3/privs.py)
    decide when root is given up: at once (stdin mode), right after
    bind(), or after each login in a process of the session's own.
    """
    plan = privilege_plan(tables, stdin_mode)
    before_open = after_login_switch(plan, conf)
    if stdin_mode:
        if plan is not None and plan.when == privs.AT_ONCE and not switch_or_log(safe_identity(conf)):
            return 1
        return serve(conf, tables, stdin_mode=True, before_open=before_open)
    # A client may connect as soon as we listen, and a SIGTERM may follow:
    # hold our signals until the loop has handlers for them (serve()).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    addresses = conf.listen + conf.listen_tls
    # several server processes: a set of sockets each (SO_REUSEPORT), so
    # the kernel spreads connections evenly instead of waking them all
    processes = 1 if plan is not None and plan.process_per_session else conf.values["processes"]
    try:
        socket_sets = [[bind(host, port, reuse_port=processes > 1) for host, port in addresses]
                       for _ in range(processes)]
    except OSError as e:
        log.error("cannot listen: %s", e.strerror or e)
        return 1
    if plan is not None and plan.process_per_session:
        return session_processes.serve(conf, tables, socket_sets[0], serve_session_process(before_open))
    if plan is not None and not switch_or_log(safe_identity(conf)):
        return 1
    if processes > 1:
        return prefork.supervise(conf, tables, socket_sets, serve)
    return serve(conf, tables, sockets=socket_sets[0])


def privilege_plan(tables, stdin_mode):
    """The privilege rules' plan, or None when not started as root."""
    if not privs.running_as_root():
        log.info("not started as root: running as uid %d, no user switching", os.geteuid())
        return None
    plan = privs.plan(tables.storage.storage_need_user(), tables.auth.auth_need_root(), stdin_mode)
    log.info("started as root: switching users %s%s", plan.when,
             " to each mailbox's user" if plan.to_mailbox_user else " to safe_user")
    closed = privs.python_closed_at()
    if closed is not None:
        log.warning("%s is closed to other users, and Python runs from under it: after giving up "
                    "root, mpop3 may fail to import (chmod o+x %s, or use a system Python)", closed, closed)
    return plan


def safe_identity(conf):
    return privs.identity(conf.values["safe_user"], conf.values["mail_group"])


def switch_or_log(who):
    try:
        privs.switch_to(who)
    except privs.PrivilegeError as e:
        log.error("%s", e)
        return False
    return True


def after_login_switch(plan, conf):
    """The session's before_open hook for rules 1 and 2: become the
    mailbox's user (or safe_user) before the mailbox is opened. The
    configuration has checked that safe_user and mail_owner exist."""
    if plan is None or plan.when != privs.AFTER_AUTH:
        return None
    identities = privs.SessionIdentities(plan, conf.values)

    def before_open(mailbox):
        try:
            who = identities.for_mailbox(mailbox)
        except (privs.PrivilegeError, KeyError) as e:  # nothing has changed yet
            log.error("mailbox %s: cannot tell whom to serve it as: %s", mailbox, e)
            raise StoragePermError() from None
        if not switch_or_log(who):
            # half switched is worse than not serving: end the process now
            logging.shutdown()
            os._exit(1)

    return before_open


def serve_session_process(before_open):
    def serve_connection(conf, tables, sock, reports):
        return serve(conf, tables, accepted=sock, throttle=reports, before_open=before_open)

    return serve_connection


def unblock_signals_once_running(loop):
    """Let held signals in only when the loop runs: between two
    run_until_complete() calls uvloop has no wakeup fd, and a signal
    delivered then would be lost (a SIGTERM during start-up ignored)."""
    loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, HANDLED_SIGNALS)


def serve(conf, tables, sockets=None, stdin_mode=False, accepted=None, throttle=None, before_open=None,
          tally=None):
    """One server process: its loop, its sessions, its signal handlers."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    server = Server(conf, tables, loop)
    server.shared.before_open = before_open
    server.shared.tally = tally
    if throttle is not None:
        server.shared.throttle = throttle
    if accepted is not None or stdin_mode:  # a process with one session
        server.shared.workers = InlineWorkers(loop)
    try:
        if stdin_mode:
            loop.run_until_complete(server.serve_stdin())
            return 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, server.stop)
        loop.add_signal_handler(signal.SIGHUP, server.reload)
        if accepted is not None:
            unblock_signals_once_running(loop)
            loop.run_until_complete(server.serve_accepted(accepted))
            if server.shared.stopping:  # SIGTERM came: let stop() finish its work
                loop.run_until_complete(server.stopped)
            return 0
        loop.run_until_complete(server.start_listeners(sockets))
        unblock_signals_once_running(loop)
        loop.run_until_complete(server.stopped)
        log.info("stopped")
        return 0
    finally:
        loop.close()
