"""One client connection: the asyncio Protocol that runs a session's core.

The core (mpop3/protocol/core.py) decides; a Connection carries out. It
splits the input into lines (the Cython LineReader), feeds them to the core
strictly in order, and writes the replies to what one read delivered
together, in few writes (pipelining, RFC 2449 section 6.6). It runs the
core's blocking actions in workers (mpop3/server/jobs.py); while one runs,
later lines wait their turn. It streams RETR and TOP from the storage
module's chunks and stops while the client is not reading (pause_writing),
so a slow client costs bounded memory. It switches to TLS, and ends the
session on an idle timeout or at shutdown (the Service's sweep and drain).

A session that ends any other way than QUIT in TRANSACTION (a dropped
connection, a timeout, shutdown, a storage failure, a kick) releases the
mailbox without committing anything. Its end is one log line (the logout
line): who, how it ended, what was retrieved and deleted. Along the way it
keeps its slot of the process's scoreboard and the metrics (metrics.py)
up to date.
"""

import logging
import ssl
from collections import deque

from ..errors import BadMailboxName, LoginDelay, LoginFailed, LoginsBusy, MailboxInUse, StorageError
from ..protocol import replies
from ..protocol._parser import LineReader
from ..protocol.core import (
    AUTHORIZATION,
    CLOSE,
    LOAD_UIDS,
    START_TLS,
    TRANSACTION,
    UPDATE,
    CheckLogin,
    Commit,
    OpenMailbox,
    SendMessage,
    SessionCore,
    Signal,
)
from . import jobs, metrics, tls
from .jobs import decode

log = logging.getLogger("mpop3.session")

# Lines split off what the client sent at a time; the rest of a read waits
# unscanned in the reader, and the socket is not read while lines or bytes
# wait (one 256 KB read of "ab\n" would otherwise be 85,000 objects).
LINES_PER_READ = 64
# Commands handled in one turn of the loop before the other sessions get
# theirs (a pipelining client cannot hold the loop).
LINES_PER_TURN = 64
# Replies gathered before they are written; more pipelined commands wait
# until the client has read enough (pause_writing), so a client that sends
# and never reads cannot make the server buffer without bound.
REPLIES_PER_WRITE = 64
BIG_REPLY = 16 * 1024  # a listing this long is written at once
# While streaming a message, hand the loop back to other sessions after
# this many chunks even if the socket keeps accepting them.
CHUNKS_PER_TURN = 8
# Stop producing when this much waits for a slow client (the bound on a
# session's memory); 256 KiB rather than the default 64 KiB keeps fast
# clients streaming instead of stopping and starting.
WRITE_BUFFER_HIGH = 256 * 1024
# the scoreboard's and the sessions gauge's word for each state
STATE_INDEX = {AUTHORIZATION: 0, TRANSACTION: 1, UPDATE: 2}
LOGGED_OUT = "logged out"  # `ending` once the logout line is written, or is not ours to write


class Connection:
    """asyncio Protocol for one client of `service` (mpop3/server/service.py)."""

    __slots__ = (
        "service",
        "loop",
        "transport",
        "peer",
        "core",
        "reader",
        "pending",
        "out",
        "handle",
        "closed",
        "last_active",
        "stream",
        "write_paused",
        "pump_scheduled",
        "eof",
        "reading_paused",
        "turn_scheduled",
        "closed_waiter",
        "counted",
        "opened",
        "attempt",
        "admitted",
        "started",
        "resumed",
        "cells",
        "slot",
        "gauge",
        "ending",
        "login_started",
        "commit_started",
        "retrieved",
        "retrieved_bytes",
        "tops",
        "top_bytes",
        "sending_top",
        "proxy_client",
    )

    def __init__(self, service, admitted=None, started=None, resumed=None, proxy_client=None):
        """`admitted`: the client address the service counted at accept
        (accept.py), else the connection asks for admission when it is made;
        `started`: loop.time() of the accept; `resumed`: (core.Handover,
        lines) of a session logged in by another process; `proxy_client`:
        what a load balancer's header said of the client (proxied.Client)."""
        self.service = service
        self.admitted = admitted
        self.loop = service.loop
        self.transport = None
        self.peer = "?"
        self.core = None
        self.reader = LineReader(service.settings.max_line_length)
        self.pending = None  # deque of lines waiting while the core is busy
        self.out = []  # replies not yet written
        self.handle = None  # the storage module's, while the mailbox is ours
        self.closed = False
        self.last_active = 0.0  # loop.time() of the last sign of life (the idle sweep reads it)
        self.stream = None  # the chunks of the message being sent
        self.write_paused = False
        self.pump_scheduled = False
        self.eof = False
        self.reading_paused = False
        self.turn_scheduled = False  # run() will come again on its own
        self.closed_waiter = None  # a future a one-session process waits on
        self.counted = False  # admitted: the service counts us
        self.opened = None  # a jobs.Opened the login job got ahead of the core
        self.attempt = None  # the login being checked (logins.Attempt)
        self.started = started  # loop.time() of the accept: login_timeout counts from it
        self.resumed = resumed
        self.cells = service.scoreboard.cells  # this process's metrics (metrics.py)
        self.slot = None  # our session's slot in the scoreboard, if one was free
        self.gauge = None  # the sessions-gauge cell that counts us now
        self.ending = None  # why we closed it: the logout line's reason, if not the core's
        self.login_started = None  # loop.time() of the login command being answered
        self.commit_started = None
        self.retrieved = self.retrieved_bytes = self.tops = self.top_bytes = 0  # the logout line's
        self.sending_top = False
        self.proxy_client = proxy_client

    # --- connection events ---------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        service = self.service
        if self.admitted:
            peer = self.admitted
        elif self.resumed is not None:  # a mail process's: the socket may be a login process's relay
            peer = self.resumed[0].peer
        else:
            peer = peer_address(transport)
        self.peer = peer
        refusal = service.admit(self)
        if refusal is not None:
            self.closed = True
            self.ending = "refused"
            transport.write(refusal.wire)
            transport.close()
            return
        self.counted = True
        self.last_active = self.loop.time()
        if self.started is None:
            self.started = self.last_active
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        if self.resumed is not None:
            self.resume(*self.resumed)
            return
        self.cells[metrics.SESSIONS_TOTAL] += 1
        secure = transport.get_extra_info("ssl_object") is not None  # implicit TLS (RFC 8314)
        proxy = self.proxy_client
        timestamp = service.tables.auth.auth_timestamp()
        self.core = SessionCore(
            service.policy,
            peer,
            secure=secure or (proxy is not None and proxy.tls),
            cleartext_ok=cleartext_allowed(service.settings.plaintext_auth, peer, proxy),
            # a socket can switch to TLS; stdin mode's pipes (no peer) cannot
            tls_available=service.tls_context is not None and peer != tls.NO_PEER,
            timestamp=timestamp.encode("utf-8", "surrogateescape") if timestamp else None,
        )
        if secure:
            self.log_tls(transport)
        elif self.core.secure:
            log.info("%s: TLS at the proxy", peer)
        self.show()
        greeting = self.core.greeting()
        self.cells[metrics.SENT_BYTES] += len(greeting)
        transport.write(greeting)

    def resume(self, handover, lines):
        """A session another process logged in (a mail process of the split
        model, split.py): no greeting; its mailbox is opened here, then the
        lines the client had already sent are served."""
        self.core = SessionCore.resume(self.service.policy, handover)
        self.pending = deque(lines)
        self.show()
        self.open_mailbox(OpenMailbox(handover.mailbox))

    def data_received(self, data):
        if self.closed:
            return
        self.last_active = self.loop.time()
        lines = self.reader.feed(data, LINES_PER_READ)
        if self.pending is None:
            self.pending = deque(lines)
        else:
            self.pending.extend(lines)
        self.run()

    def eof_received(self):
        # The client will send nothing more: finish what it sent, then close.
        # Keeping the transport open lets a pipelined QUIT still be answered.
        self.eof = True
        if self.attempt is not None and self.attempt.cancel():
            # hung up before its password was checked (a guesser who does
            # not wait for answers): it never will be, and nobody is left
            # to answer
            self.attempt = None
            self.close()
            return True
        if self.core is not None and not self.core.busy:
            self.run()
        return True

    def connection_lost(self, exc):
        self.withdraw_login()
        self.release()  # without committing (a commit under way holds its own handle)
        self.closed = True
        self.stream = None
        self.pending = None
        if self.core is not None:
            if self.core.state is not UPDATE:  # else committed() writes it
                self.log_out()
            self.core.closed()
        self.hide()
        if self.counted:
            self.counted = False
            self.service.forget(self)
        if self.closed_waiter is not None and not self.closed_waiter.done():
            self.closed_waiter.set_result(None)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        self.last_active = self.loop.time()
        if self.stream is not None:
            self.pump()
        elif self.pending or self.reader.backlog:
            self.run()

    # --- feeding the core, in order ------------------------------------------

    def run(self):
        """Feed waiting lines to the core until done or busy (or this turn's
        share is used), then write."""
        self.turn_scheduled = False
        if self.closed:
            return
        if self.pending is None:  # nothing came yet: an end of input, say
            self.pending = deque()
        pending, out, core, reader = self.pending, self.out, self.core, self.reader
        handled = 0
        while not core.busy and not self.write_paused and not self.closed:
            if not pending:
                if not reader.backlog:
                    break
                pending.extend(reader.more(LINES_PER_READ))
                continue
            if handled == LINES_PER_TURN:
                if not self.turn_scheduled:
                    self.turn_scheduled = True
                    self.loop.call_soon(self.run)
                break
            self.perform(core.command(pending.popleft()))
            handled += 1
            if len(out) >= REPLIES_PER_WRITE or (out and len(out[-1]) > BIG_REPLY):
                self.flush()  # may pause us: a client that does not read gets no more
        if self.closed:
            return
        self.flush()
        if len(pending) >= LINES_PER_READ or reader.backlog:
            if not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        elif self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.eof and not core.busy and not pending and not reader.backlog:
            self.close()

    def perform(self, actions):
        """Carry out the core's actions, in order."""
        for action in actions:
            if type(action) is bytes:
                self.out.append(action)
            elif type(action) is Signal:
                SIGNALS[action](self)
            else:
                ACTIONS[type(action)](self, action)

    def answer(self, actions):
        """Carry out what the core says to an event, then go on with the lines."""
        self.perform(actions)
        self.run()

    def flush(self):
        out = self.out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.cells[metrics.SENT_BYTES] += len(data)
            self.transport.write(data)
            out.clear()

    def close(self, reply=None):
        """End the session: a last reply, then close; commits nothing."""
        if self.closed:
            return
        # the mailbox first: a client told +OK to QUIT may log in again at
        # once, maybe in another process, and must not find it [IN-USE]
        self.release()
        if reply is not None:
            self.out.append(reply.wire)
        self.flush()
        self.closed = True
        if self.core.state is not UPDATE:  # else committed() writes it
            self.log_out()
        self.core.closed()
        self.hide()
        self.withdraw_login()
        self.stream = None
        self.transport.close()

    def leave(self):
        """A login process gave this session, socket and all, to a mail
        process: let go of it without a word (our copy of the socket only)."""
        self.closed = True
        self.core.closed()
        self.hide()
        self.transport.abort()  # connection_lost forgets us

    def detach(self):
        """The session goes on in a mail process through a relay that now
        owns the transport (login_service.Relay); it stays counted until
        the relay ends."""
        self.closed = True
        self.core.closed()
        self.hide()
        self.service.connections.discard(self)

    def kick(self):
        """`mpop3 kick`: end the session now, committing nothing (a commit
        already under way finishes)."""
        if self.closed or self.core.state is UPDATE:
            return
        log.info("%s: session ended by the administrator", self.peer)
        self.cells[metrics.KICKED] += 1
        self.ending = "kicked"
        self.close(replies.ERR_KICKED)

    # --- the scoreboard and the logout line ------------------------------------------

    def show(self):
        """Our slot and the sessions gauge follow the core's state."""
        core, cells = self.core, self.cells
        index = STATE_INDEX.get(core.state)
        if index is None:
            return
        if self.gauge is not None:
            cells[self.gauge] -= 1
        self.gauge = metrics.session_cell(index, core.secure)
        cells[self.gauge] += 1
        board = self.service.scoreboard
        user = core.login_user or b"" if core.mailbox is not None else b""
        if self.slot is None:
            self.slot = board.claim(self.peer.encode("ascii", "replace"), index, core.secure, user)
        else:
            board.update(self.slot, index, core.secure, user)

    def hide(self):
        """The session ends here: off the scoreboard, its counts in."""
        if self.gauge is not None:
            self.cells[self.gauge] -= 1
            self.gauge = None
            self.cells[metrics.DELE] += self.core.deles
        slot, self.slot = self.slot, None
        if slot is not None:
            self.service.scoreboard.release(slot)

    def log_out(self, committed=False):
        """The logout line: one per session, whoever ended it and how."""
        core = self.core
        if core is None or self.ending is LOGGED_OUT or not log.isEnabledFor(logging.INFO):
            return
        how = self.ending or core.ended_by or "disconnect"
        self.ending = LOGGED_OUT
        if core.sizes is None:  # never logged in
            log.info("%s: disconnected before login (%s)", self.peer, how)
            return
        deleted = len(core.deleted) if committed else 0
        marked = "" if committed or not core.deleted else f" ({len(core.deleted)} marked, not committed)"
        log.info(
            "%s: %s logged out (%s): retrieved %d (%d bytes), top %d (%d bytes), deleted %d%s, left %d",
            self.peer,
            decode(core.login_user) if core.login_user else core.mailbox,
            how,
            self.retrieved,
            self.retrieved_bytes,
            self.tops,
            self.top_bytes,
            deleted,
            marked,
            len(core.sizes) - deleted,
        )

    def relay_ended(self):
        if self.counted:
            self.counted = False
            self.service.admission.release(self.peer)

    def withdraw_login(self):
        """The client is gone: a password not yet checked never will be."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()

    def release(self):
        """Give the mailbox back without committing."""
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                self.service.tables.storage.storage_unlock_mailbox(handle)
            except Exception:
                log.exception("%s: unlocking mailbox %s failed", self.peer, self.core.mailbox)

    def idle_check(self, now, timeout, login_timeout):
        """Called by the service's idle sweep: close a session not logged in
        login_timeout after the accept (whatever it does meanwhile), or idle
        for `timeout`. Time spent waiting on our own work (hashing, opening)
        is not idleness."""
        if self.closed:
            return
        if self.core.state is AUTHORIZATION and now - self.started >= login_timeout:
            log.info("%s: not logged in after %.1f s, closing", self.peer, now - self.started)
            self.ending = "timeout"
            self.close(replies.ERR_LOGIN_TIMEOUT)
            return
        if self.core.busy and self.stream is None:
            return
        idle = now - self.last_active
        if idle >= timeout:
            log.info("%s: idle for %.1f s, closing", self.peer, idle)
            self.ending = "timeout"
            self.close(replies.ERR_IDLE)

    def shut_down(self):
        """Server shutdown after the grace period: close, commit nothing."""
        if self.core.state is UPDATE:
            return  # committing right now: let it finish
        self.ending = "shutdown"
        self.close(replies.ERR_SHUTTING_DOWN)

    # --- logging in -------------------------------------------------------------

    def check_login(self, action):
        """The limits decide when (mpop3/server/logins.py); then one job
        checks the credentials and, since good ones are always followed by
        OpenMailbox, opens the mailbox too."""
        service = self.service
        group = service.logins.group(self.peer)
        self.login_started = self.loop.time()
        self.attempt = service.logins.submit(
            group,
            action.user,
            lambda result, exc: self.login_checked(result, exc, action),
            service.login_job,
            service.tables,
            service.limits,
            group,
            action,
            service.before_open,
        )

    def login_checked(self, result, exc, action):
        self.attempt = None
        if exc is None:
            mailbox, opened = result
            if self.closed:
                self.mailbox_opened(opened)  # only to release it
                return
            self.opened = opened
            self.answer(self.core.login_checked(mailbox))
        elif self.closed:
            return
        elif isinstance(exc, LoginFailed):
            delay = exc.args[0]
            log.warning(
                "%s: failed login%s; answering in %.1f s",
                self.peer,
                ", closing" if self.core.last_chance() else "",
                delay,
            )
            self.loop.call_later(delay, self.login_failed)
        elif isinstance(exc, LoginsBusy):
            log.warning("%s: refused a login: too many logins waiting to be checked", self.peer)
            self.login_answered(metrics.LOGIN_REFUSED)
            self.answer(self.core.login_refused(exc))
        else:
            self.login_refused(exc, action.user, metrics.AUTH_ERRORS)

    def login_failed(self):
        if not self.closed:
            self.login_answered(metrics.LOGIN_BAD)
            self.answer(self.core.login_failed())

    def login_answered(self, outcome):
        self.cells[outcome] += 1
        if self.login_started is not None:
            metrics.observe(self.cells, metrics.LOGIN_TIME, self.loop.time() - self.login_started)
            self.login_started = None

    def login_refused(self, exc, user, module_errors):
        if isinstance(exc, LoginDelay):
            self.login_answered(metrics.LOGIN_REFUSED)
        else:
            self.login_answered(metrics.LOGIN_TEMPORARY)
            if not isinstance(exc, MailboxInUse):
                self.cells[module_errors] += 1
        if isinstance(exc, BadMailboxName):
            log.error("%s: user %r maps to an unsafe mailbox name %r; refused", self.peer, decode(user), exc.args[0])
        elif isinstance(exc, (StorageError, LoginDelay)):
            level = logging.INFO if isinstance(exc, (MailboxInUse, LoginDelay)) else logging.WARNING
            log.log(
                level,
                "%s: login of %r refused: %s",
                self.peer,
                decode(user),
                type(exc).__name__ + (f": {exc}" if str(exc) else ""),
            )
        else:
            log.error("%s: login of %r failed", self.peer, decode(user), exc_info=exc)
        self.answer(self.core.login_refused(exc))

    def open_mailbox(self, action):
        opened, self.opened = self.opened, None
        if type(opened) is jobs.HandOff:  # a login process: the mailbox is another process's business
            if self.login_started is not None:  # the mail process counts the login's outcome
                metrics.observe(self.cells, metrics.LOGIN_TIME, self.loop.time() - self.login_started)
            self.ending = LOGGED_OUT  # the mail process writes it
            self.service.hand_off(self, opened.ref)
            return
        if opened is not None and opened.mailbox == action.mailbox:  # the login job did it
            self.mailbox_opened(opened)
            return
        service = self.service
        service.workers.submit(
            lambda opened, exc: self.mailbox_opened(opened or jobs.Opened(action.mailbox, error=exc)),
            jobs.open_mailbox,
            service.tables.storage,
            service.limits,
            action.mailbox,
            service.before_open,
        )

    def mailbox_opened(self, opened):
        if opened.error is not None:
            if not self.closed:
                self.login_refused(opened.error, self.core.login_user, metrics.STORAGE_ERRORS)
            return
        self.handle, sizes = opened.handle, opened.sizes
        if self.closed:
            self.release()
            return
        self.login_answered(metrics.LOGIN_OK)
        if opened.seconds is not None:
            metrics.observe(self.cells, metrics.OPEN_TIME, opened.seconds)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s: %s logged in, %d message%s (%d octets)",
                self.peer,
                self.core.mailbox,
                len(sizes),
                "" if len(sizes) == 1 else "s",
                sum(sizes),
            )
        actions = self.core.mailbox_opened(sizes, opened.uidl)
        self.show()
        self.answer(actions)

    # --- TRANSACTION: what needs the storage module --------------------------

    def load_uids(self):
        try:
            uids = self.service.tables.storage.storage_unique_ids(self.handle)
        except StorageError as exc:
            self.perform(self.core.storage_failed(exc))
        except Exception:
            self.internal_error("UIDL")
        else:
            self.perform(self.core.uids_loaded(uids))

    def send_message(self, action):
        """The first chunk is fetched before the +OK goes out, so a failure
        there can still be an -ERR."""
        storage = self.service.tables.storage
        try:
            if action.body_lines is None:
                chunks = storage.storage_dump_message(self.handle, action.index)
            elif action.body_lines == 0:
                chunks = storage.storage_dump_headers(self.handle, action.index)
            else:
                chunks = storage.storage_dump_message_lines(self.handle, action.index, action.body_lines)
            chunks = iter(chunks)
            first = next(chunks, None)
        except StorageError as exc:
            self.perform(self.core.storage_failed(exc))
            return
        except Exception:
            self.internal_error("RETR" if action.body_lines is None else "TOP")
            return
        self.out.append(action.head)
        self.sending_top = top = action.body_lines is not None
        if top:
            self.cells[metrics.TOP] += 1
            self.tops += 1
        else:
            self.cells[metrics.RETR] += 1
            self.retrieved += 1
        if first is None:
            self.perform(self.core.message_sent())
            return
        self.count_message_bytes(len(first))
        self.out.append(first)
        self.flush()
        self.stream = chunks
        self.pump()

    def pump(self):
        self.pump_scheduled = False
        transport = self.transport
        for _ in range(CHUNKS_PER_TURN):
            if self.stream is None or self.write_paused:
                return
            try:
                chunk = next(self.stream)
            except StopIteration:
                self.stream = None
                self.answer(self.core.message_sent())
                return
            except StorageError as exc:
                # the message is half sent: all we can do is hang up
                self.ending = "error"
                self.cells[metrics.STORAGE_ERRORS] += 1
                log.warning(
                    "%s: mailbox %s failed while sending a message: %s",
                    self.peer,
                    self.core.mailbox,
                    exc or type(exc).__name__,
                )
                self.close()
                return
            except Exception:
                log.exception("%s: internal error while sending a message", self.peer)
                self.ending = "error"
                self.close()
                return
            self.count_message_bytes(len(chunk))
            self.cells[metrics.SENT_BYTES] += len(chunk)
            transport.write(chunk)
        if not self.pump_scheduled:
            self.pump_scheduled = True
            self.loop.call_soon(self.pump)

    def count_message_bytes(self, count):
        if self.sending_top:
            self.top_bytes += count
        else:
            self.retrieved_bytes += count

    def internal_error(self, command):
        log.exception("%s: internal error in %s", self.peer, command)
        self.cells[metrics.STORAGE_ERRORS] += 1
        self.ending = "error"
        self.close(replies.ERR_INTERNAL)

    # --- QUIT: UPDATE -----------------------------------------------------------

    def commit(self, action):
        """The commit goes ahead even if the client has already gone
        (Outlook closes right after sending QUIT)."""
        handle, self.handle = self.handle, None
        storage = self.service.tables.storage
        self.show()  # UPDATE
        self.commit_started = self.loop.time()
        if not action.deleted:
            try:
                storage.storage_unlock_mailbox(handle)
            except Exception:
                log.exception("%s: unlocking mailbox %s failed", self.peer, self.core.mailbox)
            self.committed(None, None)
            return
        self.flush()
        self.service.workers.submit(self.committed, jobs.commit, storage, handle, action.deleted)

    def committed(self, _, exc):
        core, cells = self.core, self.cells
        metrics.observe(cells, metrics.COMMIT_TIME, self.loop.time() - self.commit_started)
        if exc is None:
            cells[metrics.DELETED] += len(core.deleted)
        else:
            cells[metrics.STORAGE_ERRORS] += 1
            log.error(
                "%s: %s: committing %d deletions failed: %s",
                self.peer,
                core.mailbox,
                len(core.deleted),
                exc or type(exc).__name__,
            )
        self.ending = "quit" if exc is None else "error"
        self.log_out(committed=exc is None)
        if not self.closed:  # else the client went away; the commit happened all the same
            self.perform(core.committed(exc))

    # --- TLS: STLS (RFC 2595) and implicit TLS (RFC 8314) ---------------------------

    def start_tls(self):
        """Switch the connection to TLS. Whatever the client sent before the
        handshake is dropped unread (CVE-2011-0411): the lines waiting, the
        part-line in the reader, and (reading stops now) nothing more is
        read in clear; start_tls reads the rest as TLS records."""
        self.flush()  # the +OK to STLS goes out in clear, before the handshake
        if self.pending:
            self.pending.clear()
        self.reader = LineReader(self.service.settings.max_line_length)
        self.reading_paused = False  # run() must not resume reading: start_tls will
        self.transport.pause_reading()
        self.loop.create_task(self.handshake())

    async def handshake(self):
        clear = self.transport
        timeout = max(0.1, self.service.settings.tls_handshake_timeout)
        try:
            transport = await self.loop.start_tls(
                clear, self, self.service.tls_context, server_side=True, ssl_handshake_timeout=timeout
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer, exc or type(exc).__name__)
            self.cells[metrics.TLS_FAILED] += 1
            self.ending = "TLS handshake failed"
            clear.abort()
            self.connection_lost(exc)
            return
        if self.closed:  # shut down or timed out meanwhile
            transport.abort()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.log_tls(transport)
        self.last_active = self.loop.time()
        actions = self.core.tls_started()
        self.show()
        self.answer(actions)

    def log_tls(self, transport):
        log.info("%s: TLS %s", self.peer, tls.describe(transport.get_extra_info("ssl_object")))


ACTIONS = {
    CheckLogin: Connection.check_login,
    OpenMailbox: Connection.open_mailbox,
    SendMessage: Connection.send_message,
    Commit: Connection.commit,
}
SIGNALS = {
    LOAD_UIDS: Connection.load_uids,
    START_TLS: Connection.start_tls,
    CLOSE: Connection.close,
}


def peer_address(transport):
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return tls.NO_PEER if peer is None else str(peer)


def cleartext_allowed(policy, peer, proxy=None):
    """plaintext_auth: may this client send a password in clear? A proxy's
    own connection (a LOCAL header) is never a client on this machine."""
    if policy == "loopback" and proxy is not None and proxy.local:
        return False
    return policy == "yes" or (policy == "loopback" and tls.is_local(peer))
