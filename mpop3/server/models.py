"""The process models, side by side, and run(): which one serves.

The privilege rules (mpop3/server/privs.py) choose:

    stdin        `mpop3 -s`: one session on descriptors 0 and 1, a process
                 started by inetd or systemd for it (rule 4, or rules 1-2)
    shared       one process, many sessions, as safe_user after bind (rule 3)
    prefork      `processes N` > 1 of those, under a parent (prefork.py)
    per session  a listener forks a process per connection, which gives up
                 root after login (rules 1 and 2, per_session.py)

Each process that serves clients runs one Service (service.py) on its own
event loop, with signal handlers for SIGTERM, SIGINT and SIGHUP. The models
differ only in what they hand it: the sockets to listen on or the one
connection to serve, threads or not for blocking jobs, and whose limits
count the logins (its own, or those of the parent that sees them all).
"""

import asyncio
import logging
import os
import pwd
import signal

from .. import config
from . import dnssd, operations, privs, scoreboard
from .file_throttle import FileLoginThrottle
from .limits import FileLoginClock
from .operations import Operations
from .per_session import SessionProcesses
from .prefork import Prefork
from .service import SERVICE_SIGNALS, Service, bind, new_loop
from .split import Split
from .stdio import connect_socket, connect_stdin
from .supervisor import HANDLED
from .workers import InlineWorkers

log = logging.getLogger("mpop3.server")


def run(conf, tables, stdin_mode=False, debug=False):
    """Serve until told to stop; the process exit code."""
    plan = privs.plan_for(tables, stdin_mode)
    before_open = privs.after_login_switch(plan, conf)
    if stdin_mode:
        if plan is not None and plan.when == privs.AT_ONCE and not privs.switch_or_log(privs.safe_identity(conf)):
            return 1
        return serve_stdin(conf, tables, before_open)
    # A client may connect as soon as we listen, and a SIGTERM may follow:
    # hold our signals until something handles them.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    recover(tables)
    per_session = plan is not None and plan.process_per_session
    try:
        by_role = per_session and split_by_role(conf)
    except ValueError as e:
        log.error("%s", e)
        return 1
    processes = 1 if per_session and not by_role else conf.values["processes"]
    try:
        # several processes that accept (server or login processes): a set
        # of sockets each (SO_REUSEPORT), so the kernel spreads connections
        # evenly instead of waking them all
        socket_sets = [
            [bind(host, port, reuse_port=processes > 1) for host, port in config.listen_addresses(conf)]
            for _ in range(processes)
        ]
    except OSError as e:
        log.error("cannot listen: %s", e.strerror or e)
        return 1
    try:
        if per_session and not by_role and (conf.values["listen_proxy"] or conf.values["listen_tls_proxy"]):
            # the listener would have to read the header, and it is root
            raise ValueError(
                "listen_proxy and listen_tls_proxy need processes by role (login_user) where each session "
                "would get a process of its own"
            )
        ops = Operations.bind(conf)
    except ValueError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        log.error("cannot listen for metrics: %s", e.strerror or e)
        return 1
    try:
        with dnssd.advertised(conf):
            return serve_bound(conf, tables, plan, socket_sets, per_session, by_role, before_open, debug, ops)
    finally:
        ops.close()


def serve_bound(conf, tables, plan, socket_sets, per_session, by_role, before_open, debug, ops):
    """Run the chosen model on the bound sockets until it stops."""
    if by_role:
        return supervised(Split(conf, tables, socket_sets, plan, debug=debug), ops)
    if per_session:

        def serve_session(conf, sock, channel):
            return serve_connection(conf, tables, sock, channel, before_open)

        return supervised(SessionProcesses(conf, socket_sets[0], serve_session), ops)
    if plan is not None and not privs.switch_or_log(privs.safe_identity(conf)):
        return 1
    if len(socket_sets) > 1:

        def serve_worker(conf, sockets, counts, channel):
            return serve_shared(conf, tables, sockets, counts, channel)

        return supervised(Prefork(conf, socket_sets, serve_worker), ops)
    return serve_shared(conf, tables, socket_sets[0], ops=ops)


def supervised(supervisor, ops):
    supervisor.operations = ops
    return supervisor.run()


def split_by_role(conf):
    """Whether rules 1 and 2 get processes by role (split.py): login_user
    names an account of its own. An account that does not exist yet keeps
    a process per session, which stays root until the login: said at
    every start."""
    values = conf.values
    name = values["login_user"]
    if name is None:
        return False
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        log.warning(
            "login_user %s does not exist: each session runs in a process of its own that is root until its "
            "login; make the account (make install-user, or useradd --system --no-create-home "
            "--shell /usr/sbin/nologin %s) for processes by role, or say `login_user none`",
            name,
            name,
        )
        return False
    taken = {values["safe_user"], values["mail_owner"]}
    if account.pw_uid == 0 or name in taken:
        raise ValueError(f"login_user {name} must be an account of its own: not root, safe_user or mail_owner")
    return True


def recover(tables):
    """Let storage finish what a crash left half done, before anyone connects."""
    try:
        tables.storage.storage_recover()
    except Exception:
        log.exception("the storage module failed to recover at start-up; going on")


def serve_shared(conf, tables, sockets, counts=None, channel=None, ops=None):
    """Many sessions in this process, on listening `sockets`; in a worker
    of several, `counts` are the sessions of all and `channel` reaches
    the parent's limits. `ops`: this process alone serves, so it answers
    the control socket and /metrics itself."""

    def main(service):
        if ops is not None:
            serve_operations(service, ops)
        service.loop.run_until_complete(service.start_listeners(sockets))
        service.loop.run_until_complete(service.stopped)
        log.info("stopped")

    limits = (channel.throttle, channel.clock) if channel is not None else None
    return in_service(conf, tables, main, limits=limits, counts=counts)


def serve_operations(service, ops):
    """The control socket and /metrics of a server of one process."""
    board = scoreboard.Board()
    board.add(os.getpid(), "server", service.scoreboard)
    loop = service.loop
    if ops.control_socket is not None:
        loop.add_reader(ops.control_socket.fileno(), ops.answer_control, board)
    if ops.metrics_socket is not None:
        loop.run_until_complete(operations.serve_metrics(ops.metrics_socket, lambda: operations.render(board, {})))


def serve_connection(conf, tables, sock, channel, before_open):
    """One session, on a socket the listener accepted; then the process ends."""

    def main(service):
        service.loop.run_until_complete(service.serve_one(lambda c: connect_socket(service, c, sock)))
        if service.stopping:  # SIGTERM came: let stop() finish its work
            service.loop.run_until_complete(service.stopped)

    return in_service(
        conf, tables, main, workers=InlineWorkers, limits=(channel.throttle, channel.clock), before_open=before_open
    )


def serve_stdin(conf, tables, before_open):
    """One session on descriptors 0 and 1. Nothing outlives it here but
    files: LOGIN-DELAY's clock and the failed-login records are kept in
    state_dir (a throttle that cannot use it is logged and lets logins
    through, throttled within the session only)."""
    delay = conf.values["login_delay"]
    state_dir = conf.values["state_dir"]
    if delay > 0 and not os.access(state_dir, os.W_OK | os.X_OK):
        log.error(
            "login_delay needs state_dir %s, a directory this process (uid %d) can write: "
            "in stdin mode the last login times are kept there",
            state_dir,
            os.geteuid(),
        )
        return 1
    limits = (
        FileLoginThrottle(state_dir, conf.values["login_fail_delay"], conf.values["login_fail_delay_max"]),
        FileLoginClock(state_dir),
    )

    def main(service):
        service.loop.run_until_complete(service.serve_one(lambda c: connect_stdin(service, c)))

    return in_service(conf, tables, main, workers=InlineWorkers, limits=limits, before_open=before_open, signals=False)


def in_service(conf, tables, main, *, workers=None, signals=True, **options):
    """Run `main(service)` on a new loop, with SIGTERM, SIGINT and SIGHUP
    handled by the Service; the exit code."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    try:
        service = Service(conf, tables, loop, workers=workers(loop) if workers else None, **options)
        if signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, service.stop)
            loop.add_signal_handler(signal.SIGHUP, service.reload)
            service.handle_kicks()
            # Let held signals in only when the loop runs: between two
            # run_until_complete() calls uvloop has no wakeup fd, and a signal
            # delivered then would be lost (a SIGTERM during start-up ignored).
            loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, SERVICE_SIGNALS)
        main(service)
        return 0
    finally:
        loop.close()
