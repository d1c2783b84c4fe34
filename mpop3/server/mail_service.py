"""A mail process of the split model (split.py): one per mailbox user
(uid), forked by the master, which becomes that user at once and then
serves the sessions the master sends it, each from the opening of its
mailbox to its end, all of that uid and no other. Told nothing more (the
master closes the socket once the process has been idle for
`mail_process_idle`), it finishes what it has and ends.

From the master, one record per session (records.py) with the client's
socket beside it; to the master, {"ended": address} as each session ends,
so the counts there stay right.
"""

import logging
import signal
import socket

from . import records
from .connection import Connection
from .service import SERVICE_SIGNALS, Service
from .workers import InlineWorkers

log = logging.getLogger("mpop3.server")


def serve_mail(conf, tables, loop, master, channel, one_user=False):
    """Run on `loop` until the master lets go and every session has ended.
    `one_user`: the process serves one system user's mailbox, so one
    session at a time: its jobs run on the loop's thread, as in a process
    per session (InlineWorkers); no thread is started."""
    workers = InlineWorkers(loop) if one_user else None
    service = Service(conf, tables, loop, workers=workers, limits=(channel.throttle, channel.clock))
    master.setblocking(False)
    state = {"open": True}

    def ended(connection):
        try:
            records.send(master, {"ended": connection.peer})
        except OSError:
            pass
        if not state["open"] and not service.connections:
            service.stop()

    service.session_ended = ended

    def from_master():
        try:
            record, fds = records.take(master)
        except BlockingIOError:
            return
        if record is None:  # let go: no more sessions will come
            loop.remove_reader(master.fileno())
            state["open"] = False
            if not service.connections:
                service.stop()
            return
        try:
            records.send(master, {"took": True})  # first: until it has this, the master may give it to another
        except OSError:
            pass
        if len(fds) != 1:
            records.close_all(fds)
            return
        client = socket.socket(fileno=fds[0])
        client.setblocking(False)
        handover, lines = records.session_from(record)  # the master checked it
        connection = Connection(service, resumed=(handover, lines))
        loop.create_task(service.connect_socket(connection, client, None))

    loop.add_reader(master.fileno(), from_master)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    loop.add_signal_handler(signal.SIGHUP, service.reload)
    service.handle_kicks()
    loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, SERVICE_SIGNALS)
    service.sweep_idle()
    loop.run_until_complete(service.stopped)
    loop.run_until_complete(service.finish_commits())
    return 0
