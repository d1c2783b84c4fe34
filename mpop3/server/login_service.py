"""What a login process runs once locked in (login_process.py): a Service
whose logged-in sessions leave for the master, and the relay that keeps a
TLS session's encryption here while its mail process serves it in clear."""

import asyncio
import logging
import os
import signal
import socket

from ..protocol import replies
from . import records
from .service import SERVICE_SIGNALS, Service, new_loop

log = logging.getLogger("mpop3.server")

RELAY_HIGH = 256 * 1024  # bytes queued toward one side before the other is no longer read


def serve_logins(conf, tables, listening, channel, handoffs, counts=None):
    loop = new_loop()
    asyncio.set_event_loop(loop)
    handoffs.setblocking(False)
    service = None

    def hand_off(connection, ticket):
        hand_over(service, handoffs, connection, ticket)

    service = Service(conf, tables, loop, limits=(channel.throttle, channel.clock), hand_off=hand_off, counts=counts)
    loop.add_reader(handoffs.fileno(), from_master, handoffs, tables.auth, service)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master replaces login processes instead
    service.handle_kicks()
    loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, SERVICE_SIGNALS)
    try:
        loop.run_until_complete(service.start_listeners(listening))
        loop.run_until_complete(service.stopped)
        log.info("stopped")
    finally:
        loop.close()
    return 0


def from_master(handoffs, auth, service):
    """New sockets to a restarted auth process; or the master has gone."""
    try:
        record, fds = records.take(handoffs)
    except BlockingIOError:
        return
    if record is None:
        service.loop.remove_reader(handoffs.fileno())
        service.stop()  # no master: nobody to hand sessions to
        return
    if record.get("auth") is True:
        auth.replace(fds)
        return
    records.close_all(fds)
    if record.get("retire") is True:  # a reload: newer login processes take the new clients
        retire(service)


def retire(service):
    """Take no new client; end once the sessions here (those logging in,
    and the relays of logged-in TLS sessions) have ended, however long."""
    for listener in service.listeners:
        listener.close()
    service.listeners = []

    def check():
        if service.connections or service.relays:
            service.loop.call_later(0.2, check)
        else:
            service.stop()

    check()


def hand_over(service, handoffs, connection, ticket):
    """A logged-in session on its way to the master: with the client's
    socket (cleartext), or one end of a socket pair this process then
    relays the TLS session to; and the lines the client already sent."""
    handover = connection.core.handover()
    lines = list(connection.pending or ())
    while connection.reader.backlog and len(lines) <= records.MOST_LINES:
        lines.extend(connection.reader.more(records.MOST_LINES))
    if len(lines) > records.MOST_LINES:  # more than a client pipelines after PASS
        log.warning("%s: more than %d commands sent ahead of the login's answer; closing", connection.peer, len(lines))
        connection.close(replies.ERR_TEMP)
        return
    transport = connection.transport
    if transport.get_extra_info("ssl_object") is not None:
        ours, theirs = socket.socketpair()
        given = theirs.detach()
    else:
        ours = None
        given = os.dup(transport.get_extra_info("socket").fileno())
    try:
        records.send(handoffs, records.session(handover, lines, ticket=ticket), [given])
    except (OSError, ValueError) as e:  # ValueError: too long a record
        log.error("%s: cannot hand the session over: %s", connection.peer, getattr(e, "strerror", None) or e)
        if ours is not None:
            ours.close()
        connection.close(replies.ERR_TEMP)
        return
    finally:
        os.close(given)
    if ours is None:
        connection.leave()  # the mail process has the socket now
    else:
        Relay.start(service.loop, connection, ours)


class Relay:
    """Bytes between a TLS client (the transport the session had) and its
    mail process's end of a socket pair, both ways, with back-pressure."""

    @classmethod
    def start(cls, loop, connection, ours):
        client = connection.transport
        relay = cls(connection)
        client.set_protocol(relay.client_side)
        connection.detach()
        connection.service.relays.add(relay)
        loop.create_task(relay.connect(loop, ours))

    def abort(self):
        for side in (self.client_side, self.mail_side):
            if side.transport is not None:
                side.transport.abort()

    def ended(self):
        self.connection.service.relays.discard(self)
        self.connection.relay_ended()

    def __init__(self, connection):
        self.connection = connection
        self.client_side = Side(self)
        self.mail_side = Side(self)
        self.client_side.other = self.mail_side
        self.mail_side.other = self.client_side
        self.client_side.transport = connection.transport

    async def connect(self, loop, ours):
        ours.setblocking(False)
        try:
            await loop.connect_accepted_socket(lambda: self.mail_side, ours)
        except OSError:
            self.client_side.transport.abort()


class Side(asyncio.Protocol):
    def __init__(self, relay):
        self.relay = relay
        self.transport = None
        self.other = None
        self.early = []  # what came before the other side was connected
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=RELAY_HIGH)
        if self.other.early:
            transport.writelines(self.other.early)
            self.other.early = []
        if self.other.lost:
            transport.close()

    def data_received(self, data):
        other = self.other.transport
        if other is None:
            self.early.append(data)
        else:
            other.write(data)

    def eof_received(self):
        other = self.other.transport
        if other is not None and other.can_write_eof():
            other.write_eof()
            return True
        if other is not None:
            other.close()
        return False

    def connection_lost(self, exc):
        self.lost = True
        other = self.other.transport
        if other is not None:
            other.close()
        self.relay.ended()

    def pause_writing(self):
        if self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self):
        if self.other.transport is not None:
            self.other.transport.resume_reading()
