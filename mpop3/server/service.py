"""One server process's sessions: what they share, and their lifecycle.

A Service holds what every Connection of a process shares: the
configuration and function tables, the protocol Policy, the workers for
blocking jobs, the TLS context, the session counts (Admission), the login
limits (failed-login delays, LOGIN-DELAY) and the open connections. It
listens, or serves a single connection; sweeps idle sessions; stops
gracefully on SIGTERM; applies a SIGHUP. Every process model
(mpop3/server/models.py) runs one Service per process that serves clients.

Signals: SIGTERM (and SIGINT) stop accepting, give sessions
`shutdown_grace` seconds to finish, then close them without committing;
SIGHUP re-reads the configuration and applies what is safe to change in a
running server (limits, timeouts, CAPA extras, log level, the TLS
certificate); listeners and modules need a restart, and a reload that
fails keeps the running settings.
"""

import asyncio
import logging
import os
import signal
import socket
import ssl

from .. import config
from .. import log as logs
from ..auth_functions import AuthFunctions
from ..protocol import replies
from ..protocol.core import Policy
from . import jobs, metrics, proxied, scoreboard, tls
from .accept import Acceptor, limited
from .connection import Connection
from .jobs import Limits
from .limits import Admission, LoginDelayClock, LoginThrottle
from .logins import LoginChecks
from .workers import Workers

log = logging.getLogger("mpop3.server")

SERVICE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # a Service handles these on its loop


class Settings:
    """The reloadable settings as plain attributes (read on every command)."""

    def __init__(self, conf):
        for name in config.RELOADABLE:
            setattr(self, name, conf.values[name])


class Service:
    def __init__(self, conf, tables, loop, *, workers=None, limits=None, counts=None, before_open=None, hand_off=None):
        """`workers`: InlineWorkers in a process of one session (default:
        threads). `limits`: (throttle, clock) of a parent process that sees
        every session (default: this process's own). `counts`: the sessions
        of every process that admits clients (shared_counts.py). `before_open(mailbox)`: where a
        session process gives up root. `hand_off(connection, ticket)`: in a
        login process (login_process.py), where a logged-in session goes
        instead of opening its mailbox here."""
        self.conf = conf
        self.tables = tables
        self.loop = loop
        self.settings = settings = Settings(conf)
        self.policy = Policy(
            settings.max_bad_commands,
            settings.max_login_failures,
            cram_md5=plaintext_passwords(tables.auth),
            **self.capa_extras(conf),
        )
        values = conf.values
        self.workers = workers or Workers(loop, values["worker_threads"])
        # built before any fork (cli.py); tests hand the Service a bare Config
        self.tls_context = conf.tls_context or tls.context_from_config(conf)
        prefix = values["ipv6_prefix"]
        self.admission = Admission(settings.max_sessions, settings.max_sessions_per_ip, counts, prefix)
        throttle, clock = limits or (
            LoginThrottle(settings.login_fail_delay, settings.login_fail_delay_max),
            LoginDelayClock(),
        )
        self.limits = Limits(throttle, clock, settings.login_delay)
        self.logins = LoginChecks(
            loop,
            self.workers,
            throttle,
            settings.max_login_attempts_per_ip,
            prefix,
            # hashing is CPU work: no more at once than CPUs, unless another
            # process hashes (a login process waits on the auth process)
            slots=values["worker_threads"] if hand_off else min(values["worker_threads"], os.cpu_count() or 1),
            queue=values["login_queue"],
        )
        # this process's part of the scoreboard: its parent's making, or our own
        self.scoreboard = scoreboard.own or scoreboard.Segment.create(settings.max_sessions)
        self.cells = self.scoreboard.cells
        self.before_open = before_open
        self.hand_off = hand_off
        self.session_ended = None  # a mail process tells its master (mail_service.py)
        self.relays = set()  # a login process's relays to mail processes (login_service.py)
        self.login_job = jobs.log_in if hand_off is None else jobs.log_in_elsewhere
        self.connections = set()
        self.listeners = []
        self.stopping = False
        self.stopped = loop.create_future()

    def capa_extras(self, conf):
        values = conf.values
        announced = max(values["login_delay"], int(self.tables.auth.auth_default_login_delay() or 0))
        return dict(expire=values["expire"], login_delay=announced, implementation=values["implementation"])

    def apply(self, conf):
        """Take the reloadable settings of `conf` (start-up or SIGHUP)."""
        self.conf = conf
        self.settings = settings = Settings(conf)
        self.policy.apply(settings.max_bad_commands, settings.max_login_failures, **self.capa_extras(conf))
        self.admission.max_sessions = settings.max_sessions
        self.admission.max_per_address = settings.max_sessions_per_ip
        self.logins.gate.limit = settings.max_login_attempts_per_ip
        throttle = self.limits.throttle  # a reload keeps what it remembers of failures
        throttle.base, throttle.maximum = settings.login_fail_delay, settings.login_fail_delay_max
        self.limits.login_delay = settings.login_delay

    # --- sessions ---------------------------------------------------------------

    def admit(self, connection):
        """None to serve a new connection, or the reply that refuses it. A
        connection the acceptor took was counted then."""
        if connection.admitted is None:
            if self.stopping:
                self.cells[metrics.REFUSED] += 1
                return replies.ERR_SHUTTING_DOWN
            refusal = self.admission.admit(connection.peer)
            if refusal is not None:
                self.cells[metrics.REFUSED] += 1
                return refusal
        self.connections.add(connection)
        return None

    def forget(self, connection):
        self.connections.discard(connection)
        self.admission.release(connection.peer)
        if self.session_ended is not None:
            self.session_ended(connection)

    def accepted(self, conn, peer, context, proxy=False):
        """A connection the acceptor took (accept.py): counted now, before
        any TLS handshake; refused at once if over a limit (without a word
        on a TLS port, where a clear -ERR would be garbage to the client).
        `proxy`: a PROXY protocol listener's, whose header comes first."""
        address = peer[0] if isinstance(peer, (tuple, list)) and peer else tls.NO_PEER
        if proxy:
            self.loop.create_task(self.behind_proxy(conn, address, context))
            return
        self.admitted(conn, address, context)

    async def behind_proxy(self, conn, proxy, context):
        try:
            client = await proxied.client_behind(self.loop, conn, proxy, self.settings)
        except BaseException:
            conn.close()
            raise
        if client is None:
            conn.close()
            return
        self.admitted(conn, client.address, context, client)

    def admitted(self, conn, address, context, proxy_client=None):
        refusal = replies.ERR_SHUTTING_DOWN if self.stopping else self.admission.admit(address)
        if refusal is not None:
            self.cells[metrics.REFUSED] += 1
            if context is None:
                try:
                    conn.send(refusal.wire)
                except OSError:
                    pass
            conn.close()
            return
        connection = Connection(self, admitted=address, started=self.loop.time(), proxy_client=proxy_client)
        self.loop.create_task(self.connect(connection, conn, address, context))

    async def connect(self, connection, conn, address, context):
        try:
            await self.connect_socket(connection, conn, context)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            limited.log(logging.INFO, "handshake", "%s: TLS handshake failed: %s", address, e or type(e).__name__)
            if context is not None:
                self.cells[metrics.TLS_FAILED] += 1
            conn.close()
            if not connection.counted:  # it never got to connection_made
                self.admission.release(address)

    async def connect_socket(self, connection, sock, context):
        """Serve `connection` on a connected socket, after a TLS handshake
        (implicit TLS) if `context` is given."""
        if context is None:
            await self.loop.connect_accepted_socket(lambda: connection, sock)
        else:
            await self.loop.connect_accepted_socket(
                lambda: connection, sock, ssl=context, ssl_handshake_timeout=self.handshake_timeout()
            )

    def handshake_timeout(self):
        return max(0.1, self.settings.tls_handshake_timeout)

    def sweep_idle(self):
        """One timer for every session: close those idle for too long, or
        not logged in in time. Runs every quarter of the shorter timeout (at
        most every second)."""
        settings = self.settings
        now = self.loop.time()
        for connection in list(self.connections):
            connection.idle_check(now, settings.idle_timeout, settings.login_timeout)
        shorter = min(settings.idle_timeout, settings.login_timeout)
        self.loop.call_later(min(1.0, max(0.02, shorter / 4)), self.sweep_idle)

    def tls_for(self, sock):
        """The SSLContext for a socket of a listen_tls or listen_tls_proxy
        address (listening or accepted: implicit TLS), None for a plain one."""
        values, address = self.conf.values, sock.getsockname()
        if tls.is_tls_address(values["listen_tls"] + values["listen_tls_proxy"], address):
            return self.tls_context
        return None

    def is_proxied(self, sock):
        """Whether a listening socket's clients come through a load balancer."""
        values = self.conf.values
        return tls.is_tls_address(values["listen_proxy"] + values["listen_tls_proxy"], sock.getsockname())

    async def start_listeners(self, sockets=None):
        """Serve on `sockets` (bound by the caller), or bind every listen
        and listen_tls address; returns the (host, port)s."""
        self.sweep_idle()
        if sockets is None:
            sockets = [bind(host, port) for host, port in config.listen_addresses(self.conf)]
        bound = []
        for sock in sockets:
            context, proxy = self.tls_for(sock), self.is_proxied(sock)
            self.listeners.append(
                Acceptor(self.loop, sock, lambda conn, peer, c=context, p=proxy: self.accepted(conn, peer, c, p))
            )
            bound.append((*sock.getsockname()[:2], context is not None, proxy))
        log.info(
            "listening on %s",
            ", ".join(
                f"{h}:{p}" + (" (TLS)" if secure else "") + (" (PROXY protocol)" if proxy else "")
                for h, p, secure, proxy in bound
            ),
        )
        return [(h, p) for h, p, _, _ in bound]

    async def serve_one(self, connect, resumed=None):
        """One session, wired up by `await connect(connection)`, to its end;
        `resumed`: a session another process logged in (Connection)."""
        self.sweep_idle()
        connection = Connection(self, resumed=resumed)
        connection.closed_waiter = self.loop.create_future()
        await connect(connection)
        await connection.closed_waiter
        await self.finish_commits()

    def handle_kicks(self):
        """Let `mpop3 kick` reach our sessions: the process that reads the
        scoreboard marks their slots, then signals us."""
        self.loop.add_signal_handler(scoreboard.KICK_SIGNAL, self.kick_marked)

    def kick_marked(self):
        board = self.scoreboard
        for connection in list(self.connections):
            if connection.slot is not None and board.kicked(connection.slot):
                connection.kick()

    # --- stopping and reloading ---------------------------------------------------

    def stop(self):
        """SIGTERM: stop accepting, wait out the grace period, then close."""
        if self.stopping:
            return
        self.stopping = True
        open_now = len(self.connections)
        log.info(
            "stopping: %d session%s open, grace period %g s",
            open_now,
            "" if open_now == 1 else "s",
            self.settings.shutdown_grace,
        )
        for listener in self.listeners:
            listener.close()
        self.loop.create_task(self.drain())

    async def drain(self):
        deadline = self.loop.time() + self.settings.shutdown_grace
        while (self.connections or self.relays) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays):  # a login process's logged-in TLS sessions
            relay.abort()
        if self.connections:
            log.info(
                "grace period over: closing %d session%s without committing",
                len(self.connections),
                "" if len(self.connections) == 1 else "s",
            )
            for connection in list(self.connections):
                connection.shut_down()
        await self.finish_commits()
        await asyncio.sleep(0)  # let the transports' close callbacks run
        if not self.stopped.done():
            self.stopped.set_result(None)

    async def finish_commits(self):
        """Let any commit in a worker thread finish before the loop ends."""
        if self.workers.threads:
            await self.loop.run_in_executor(None, self.workers.shutdown)
        await asyncio.sleep(0)  # the callbacks they scheduled

    def reload(self):
        """SIGHUP: apply the safe part of the re-read configuration."""
        new = config.reload(self.conf)
        if new is None:
            return
        self.tls_context = tls.reload(self.tls_context, new)
        logs.reload_level(self.conf, new)
        self.apply(new)
        log.info("reloaded %s", new.path)


def plaintext_passwords(auth):
    """Whether the auth table can give plaintext passwords (CRAM-MD5 needs
    them): a module supplies auth_password, or a subclass overrides it."""
    return (
        auth.supplied_by.get("auth_password", "default") != "default"
        or type(auth).auth_password is not AuthFunctions.auth_password
    )


# A peer that vanished without a word (its machine, or a balancer's, gone)
# is found by TCP keepalive after about KEEPALIVE_IDLE + KEEPALIVE_PROBES *
# KEEPALIVE_INTERVAL seconds (2 minutes), not at idle_timeout: its session,
# and the mailbox it holds, end then.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_PROBES = 4


def bind(host, port, reuse_port=False):
    """A listening socket; TCP_NODELAY and keepalive on it are inherited by
    accepted sockets (without TCP_NODELAY, a reply written in two pieces
    waits ~40 ms for an ACK)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL)):
        if hasattr(socket, option):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if hasattr(socket, "TCP_KEEPCNT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setblocking(False)
    return sock


def new_loop():
    try:
        import uvloop
    except ImportError:  # still works, slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
