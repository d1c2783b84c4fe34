"""One POP3 session (RFC 1939, RFC 2449): the state machine and the commands.

A Session is an asyncio Protocol. Input goes through the Cython LineReader
and parse_command (mpop3/_proto.pyx); each line is handled strictly in
order, and the replies to what one read delivered go out together, in few
writes (pipelining, RFC 2449 section 6.6). Work that may block (checking a
password hash, opening a mailbox, committing deletions) runs in a worker
thread; while it runs, the session is "busy" and later lines wait their
turn. RETR and TOP stream the storage module's chunks and stop while the
client is not reading (pause_writing), so a slow client costs bounded memory.

States: AUTHORIZATION -> TRANSACTION -> UPDATE (only after QUIT) -> CLOSED.
A session that ends any other way (dropped connection, timeout, shutdown,
a storage failure) releases the mailbox without committing anything.
"""

import asyncio
import hashlib
import hmac
import logging
import ssl
from collections import deque

from . import _proto as proto
from . import replies, sasl, tls
from .errors import LoginDelay, MailboxInUse, StorageError, StorageTempError
from .limits import valid_mailbox_name

log = logging.getLogger("mpop3.session")

AUTHORIZATION, TRANSACTION, UPDATE, CLOSED = "AUTHORIZATION", "TRANSACTION", "UPDATE", "CLOSED"

# Lines waiting while the session is busy; past this, stop reading the socket
# until they are handled (bounded memory for a pipelining client).
MAX_PENDING_LINES = 256
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
# The longest a TLS handshake may take (the idle sweep does not see it).
TLS_HANDSHAKE_TIMEOUT = 60.0


class LoginFailed(Exception):
    """Credentials did not check out (unknown user or wrong password)."""


class BadMailboxName(Exception):
    """A module returned a mailbox name that is not safe as a file name."""


def decode(raw):
    return raw.decode("utf-8", "surrogateescape")


def login_job(auth, storage, clock, login_delay, user, secret, apop_timestamp, before_open=None):
    """Authenticate and open the mailbox, in a worker thread.

    `secret` is the password (USER/PASS) or, with `apop_timestamp`, the APOP
    digest. `before_open(mailbox)`, if given, runs between the two: it is
    where a session process gives up root (mpop3/privs.py).
    Returns (mailbox, handle, sizes, uidl_supported).
    """
    if apop_timestamp is None:
        mailbox = auth.auth_attempt_login(user, secret)
    elif isinstance(apop_timestamp, bytes):  # the challenge of an AUTH CRAM-MD5
        mailbox = cram_md5_check(auth, user, secret, apop_timestamp)
    else:
        mailbox = apop_check(auth, user, secret, apop_timestamp)
    if mailbox is None:
        raise LoginFailed()
    if not valid_mailbox_name(mailbox):
        raise BadMailboxName(mailbox)
    if auth.auth_login_delay_needed(user) > 0 or clock.wait_needed(mailbox, login_delay) > 0:
        raise LoginDelay()
    if before_open is not None:
        before_open(mailbox)
    handle = storage.storage_lock_mailbox(mailbox)
    try:
        sizes = list(storage.storage_message_sizes(handle))
        count = storage.storage_message_count(handle)
        if count != len(sizes):
            raise StorageTempError(f"{count} messages but {len(sizes)} sizes")
        uidl = bool(storage.storage_uidl_supported(handle))
    except BaseException:
        storage.storage_unlock_mailbox(handle)
        raise
    clock.logged_in(mailbox, login_delay)
    return mailbox, handle, sizes, uidl


def apop_check(auth, user, digest, timestamp):
    """RFC 1939 APOP: digest = MD5(timestamp + password), in lower-case hex.
    An unknown user costs the same hashing as a known one."""
    password = auth.auth_password(user)
    known = password is not None
    secret = (password if known else "\0no such user\0").encode("utf-8", "surrogateescape")
    expected = hashlib.md5(timestamp.encode() + secret).hexdigest().encode()
    if hmac.compare_digest(expected, digest.lower().encode("utf-8", "surrogateescape")) and known:
        return auth.auth_login(user)
    return None


def cram_md5_check(auth, user, digest, challenge):
    """RFC 2195: digest = HMAC-MD5(password, challenge) in lower-case hex.
    An unknown user costs the same hashing as a known one."""
    password = auth.auth_password(user)
    known = password is not None
    answer = sasl.Credentials(user, challenge=challenge, digest=digest.lower())
    if sasl.cram_md5_matches(answer, password if known else "\0no such user\0") and known:
        return auth.auth_login(user)
    return None


def cleartext_allowed(policy, peer):
    """plaintext_auth: may this client send a password in clear?"""
    return policy == "yes" or (policy == "loopback" and tls.is_local(peer))


def commit_job(storage, handle, deleted):
    """UPDATE state, in a worker thread: commit deletions, then release."""
    try:
        storage.storage_synch(handle, deleted)
    finally:
        storage.storage_unlock_mailbox(handle)


class Session:
    """asyncio Protocol for one client. `shared` is the server's Shared:
    configuration, function tables, worker threads and server-wide counters."""

    __slots__ = (
        "shared", "loop", "transport", "peer", "reader", "pending", "state", "busy", "out",
        "user", "mailbox", "handle", "sizes", "deleted", "uidl", "uids", "bad", "too_long",
        "failures", "last_active", "stream", "write_paused", "pump_scheduled",
        "timestamp", "eof", "reading_paused", "closed_waiter", "counted",
        "secure", "cleartext_ok", "sasl",
    )

    def __init__(self, shared):
        self.shared = shared
        self.secure = False  # TLS is up: implicit (a listen_tls address) or after STLS
        self.cleartext_ok = False  # USER/PASS, AUTH PLAIN/LOGIN allowed (plaintext_auth)
        self.sasl = None  # the AUTH exchange in progress (mpop3/sasl.py)
        self.loop = shared.loop
        self.transport = None
        self.peer = "?"
        self.reader = proto.LineReader(shared.settings.max_line_length)
        self.pending = None  # deque of lines waiting while busy
        self.state = AUTHORIZATION
        self.busy = False
        self.out = []
        self.user = None  # bytes, after USER
        self.mailbox = None
        self.handle = None
        self.sizes = None
        self.deleted = None  # set of 0-based indexes
        self.uidl = False
        self.uids = None
        self.bad = 0  # bad commands in a row
        self.too_long = False  # an over-long line was seen already
        self.failures = 0
        self.last_active = 0.0  # loop.time() of the last sign of life (the server's idle sweep reads it)
        self.stream = None  # the iterator of the message being sent
        self.write_paused = False
        self.pump_scheduled = False
        self.timestamp = None  # APOP timestamp of the greeting
        self.eof = False
        self.reading_paused = False
        self.closed_waiter = None  # a future stdin mode waits on
        self.counted = False

    # --- connection events ---------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        shared = self.shared
        self.peer = peer_address(transport)
        refusal = shared.admit(self)
        if refusal is not None:
            self.state = CLOSED
            transport.write(refusal.wire)
            transport.close()
            return
        self.counted = True
        self.last_active = self.loop.time()
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.cleartext_ok = cleartext_allowed(shared.settings.plaintext_auth, self.peer)
        if transport.get_extra_info("ssl_object") is not None:  # implicit TLS (RFC 8314)
            self.tls_started(transport)
        greeting = replies.GREETING
        timestamp = shared.tables.auth.auth_timestamp()
        if timestamp:
            self.timestamp = timestamp
            greeting += b" " + timestamp.encode("utf-8", "surrogateescape")
        transport.write(replies.ok(greeting))

    def data_received(self, data):
        if self.state is CLOSED:
            return
        self.last_active = self.loop.time()
        lines = self.reader.feed(data)
        if self.pending is None:
            self.pending = deque(lines)
        else:
            self.pending.extend(lines)
        self.run()

    def eof_received(self):
        # The client will send nothing more: finish what it sent, then close.
        # Keeping the transport open lets a pipelined QUIT still be answered.
        self.eof = True
        if not self.busy:
            self.run()
        return True

    def connection_lost(self, exc):
        if self.state is not UPDATE:
            self.release()  # without committing
        self.state = CLOSED
        self.stream = None
        self.pending = None
        if self.counted:
            self.counted = False
            self.shared.forget(self)
        if self.closed_waiter is not None and not self.closed_waiter.done():
            self.closed_waiter.set_result(None)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        self.last_active = self.loop.time()
        if self.stream is not None:
            self.pump()
        elif self.pending:
            self.run()

    # --- the command loop ------------------------------------------------------

    def run(self):
        """Handle waiting lines in order until done or busy, then write."""
        pending = self.pending
        out = self.out
        while pending and not self.busy and not self.write_paused and self.state is not CLOSED:
            self.handle_line(pending.popleft())
            if len(out) >= REPLIES_PER_WRITE or (out and len(out[-1]) > BIG_REPLY):
                self.flush()  # may pause us: a client that does not read gets no more
        if self.state is CLOSED:
            return
        self.flush()
        if pending and len(pending) > MAX_PENDING_LINES:
            if not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        elif self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.eof and not self.busy and not pending:
            self.close(None)

    def flush(self):
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def reply(self, reply):
        self.out.append(reply.wire)

    def handle_line(self, line):
        if self.sasl is not None:  # a line of an AUTH exchange, not a command
            self.sasl_line(line)
            return
        if line is proto.TOO_LONG:
            if self.too_long:  # the second one: this is no confused client
                log.warning("%s: over-long command lines, closing", self.peer)
                self.close(replies.ERR_TOO_LONG_BYE)
            else:
                self.too_long = True
                self.bad_command(replies.ERR_TOO_LONG)
            return
        cmd, arg1, arg2 = proto.parse_command(line)
        if cmd <= 0:
            if cmd == proto.UNKNOWN:
                self.bad_command(replies.ERR_UNKNOWN)
            else:
                self.bad_command(replies.ERR_USAGE[proto.NAMES[arg1]])
            return
        handler = HANDLERS[self.state].get(cmd)
        if handler is None:
            self.bad_command(replies.ERR_NOT_NOW)
            return
        self.bad = 0
        try:
            handler(self, arg1, arg2)
        except StorageError as exc:
            self.storage_failure(exc)
        except Exception:
            log.exception("%s: internal error in %s", self.peer, proto.NAMES[cmd])
            self.close(replies.ERR_INTERNAL)

    def bad_command(self, reply):
        self.bad += 1
        if self.bad >= self.shared.settings.max_bad_commands:
            log.warning("%s: too many bad commands, closing", self.peer)
            self.close(replies.ERR_TOO_MANY_BAD)
        else:
            self.reply(reply)

    def storage_failure(self, exc):
        """A storage error while serving a command: say so; a temporary one
        means the spool changed under us, so end the session uncommitted."""
        log.warning("%s: mailbox %s: %s", self.peer, self.mailbox, exc or type(exc).__name__)
        if isinstance(exc, StorageTempError):
            self.close(replies.ERR_CHANGED)
        else:
            self.reply(replies.error_reply(exc))

    def close(self, reply):
        """End the session: a last reply, then close; commits nothing."""
        if self.state is CLOSED:
            return
        if reply is not None:
            self.reply(reply)
        self.flush()
        if self.state is not UPDATE:
            self.release()
        self.state = CLOSED
        self.stream = None
        self.transport.close()

    def release(self):
        """Give the mailbox back without committing."""
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                self.shared.tables.storage.storage_unlock_mailbox(handle)
            except Exception:
                log.exception("%s: unlocking mailbox %s failed", self.peer, self.mailbox)

    def idle_check(self, now, timeout):
        """Called by the server's idle sweep: close if idle too long. Time
        spent waiting on our own work (hashing, opening) is not idleness."""
        if self.state is CLOSED or (self.busy and self.stream is None):
            return
        idle = now - self.last_active
        if idle >= timeout:
            log.info("%s: idle for %.1f s, closing", self.peer, idle)
            self.close(replies.ERR_IDLE)

    def shut_down(self):
        """Server shutdown after the grace period: close, commit nothing."""
        if self.state is UPDATE:
            return  # committing right now: let it finish
        self.close(replies.ERR_SHUTTING_DOWN)

    # --- AUTHORIZATION ---------------------------------------------------------

    def cmd_user(self, name, _):
        if not self.cleartext_ok:
            self.reply(replies.ERR_CLEARTEXT)
            return
        # +OK whether or not the user exists (no user enumeration)
        self.user = name
        self.reply(replies.OK_USER)

    def cmd_pass(self, password, _):
        if not self.cleartext_ok:
            self.reply(replies.ERR_CLEARTEXT)
            return
        if self.user is None:
            self.reply(replies.ERR_PASS_FIRST)
            return
        user, self.user = self.user, None
        self.start_login(user, password, None)

    def cmd_apop(self, name, digest):
        if self.timestamp is None:
            self.reply(replies.ERR_NO_APOP)
            return
        self.user = None
        self.start_login(name, digest, self.timestamp)

    # --- AUTH (RFC 5034) ------------------------------------------------------------

    def cmd_auth(self, mechanism, initial_response):
        self.user = None
        name = mechanism.upper().decode("ascii", "replace")
        if name not in self.shared.sasl_mechanisms(self.cleartext_ok):
            sends_password = sasl.MECHANISMS.get(name)
            self.reply(replies.ERR_CLEARTEXT if sends_password else replies.ERR_NO_MECHANISM)
            return
        exchange = sasl.Exchange(name, sasl.new_cram_challenge() if name == "CRAM-MD5" else None)
        self.sasl_result(exchange, exchange.start(initial_response))

    def sasl_line(self, line):
        exchange, self.sasl = self.sasl, None
        if line is proto.TOO_LONG:
            self.bad_command(replies.ERR_TOO_LONG)
            return
        self.sasl_result(exchange, exchange.step(line))

    def sasl_result(self, exchange, result):
        if isinstance(result, sasl.Challenge):
            self.sasl = exchange
            self.out.append(replies.sasl_challenge(result.data))
        elif isinstance(result, sasl.Credentials):
            user = result.user.encode("utf-8", "surrogateescape")
            if result.challenge is None:
                self.start_login(user, result.password.encode("utf-8", "surrogateescape"), None)
            else:
                self.start_login(user, result.digest.encode(), result.challenge)
        elif result is sasl.CANCELLED:
            self.reply(replies.Reply(False, result.text.encode()))
        else:  # malformed: counts like a bad command, so a flood of them ends
            self.bad_command(replies.Reply(False, result.text.encode()))

    def start_login(self, user, secret, apop_timestamp):
        shared = self.shared
        self.busy = True
        shared.workers.submit(
            lambda result, exc: self.login_done(result, exc, user, secret),
            login_job, shared.tables.auth, shared.tables.storage, shared.login_clock,
            shared.settings.login_delay, decode(user), decode(secret), apop_timestamp, shared.before_open)

    def login_done(self, result, exc, user, secret):
        if exc is None:
            mailbox, handle, sizes, uidl = result
            if self.state is CLOSED:
                self.handle = handle
                self.release()
                return
            self.logged_in(mailbox, handle, sizes, uidl)
            return
        if self.state is CLOSED:
            return
        if isinstance(exc, LoginFailed):
            self.login_failed(user, secret)
            return
        elif isinstance(exc, BadMailboxName):
            log.error("%s: user %r maps to an unsafe mailbox name %r; refused",
                      self.peer, decode(user), exc.args[0])
            self.reply(replies.ERR_BAD_MAILBOX)
        elif isinstance(exc, (StorageError, LoginDelay)):
            level = logging.INFO if isinstance(exc, (MailboxInUse, LoginDelay)) else logging.WARNING
            log.log(level, "%s: login of %r refused: %s", self.peer, decode(user),
                    type(exc).__name__ + (f": {exc}" if str(exc) else ""))
            self.reply(replies.error_reply(exc))
        else:
            log.error("%s: login of %r failed", self.peer, decode(user), exc_info=exc)
            self.reply(replies.ERR_INTERNAL)
        self.busy = False
        self.run()

    def logged_in(self, mailbox, handle, sizes, uidl):
        self.shared.throttle.succeeded(self.peer)
        self.state = TRANSACTION
        self.mailbox = mailbox
        self.handle = handle
        self.sizes = sizes
        self.deleted = set()
        self.uidl = uidl
        total = sum(sizes)
        if log.isEnabledFor(logging.INFO):
            log.info("%s: %s logged in, %d message%s (%d octets)", self.peer, mailbox,
                     len(sizes), "" if len(sizes) == 1 else "s", total)
        self.out.append(replies.ok_maildrop(len(sizes), total))
        self.busy = False
        self.run()

    def login_failed(self, user, secret):
        shared = self.shared
        self.failures += 1
        delay = shared.throttle.failed(self.peer, user, secret)
        last = self.failures >= shared.settings.max_login_failures
        log.warning("%s: failed login%s; answering in %.1f s", self.peer,
                    ", closing" if last else "", delay)
        self.loop.call_later(delay, self.login_failed_answer, last)

    def login_failed_answer(self, last):
        if self.state is CLOSED:
            return
        if last:
            self.close(replies.ERR_TOO_MANY_FAILURES)
            return
        self.reply(replies.ERR_AUTH)
        self.busy = False
        self.run()

    # --- TRANSACTION -------------------------------------------------------------

    def message(self, number):
        """The 0-based index of a live message, or None after replying -ERR."""
        if number < 1 or number > len(self.sizes):
            self.reply(replies.ERR_NO_SUCH_MESSAGE)
            return None
        if number - 1 in self.deleted:
            self.reply(replies.ERR_DELETED)
            return None
        return number - 1

    def live_totals(self):
        sizes, deleted = self.sizes, self.deleted
        if not deleted:
            return len(sizes), sum(sizes)
        return len(sizes) - len(deleted), sum(sizes) - sum(sizes[i] for i in deleted)

    def cmd_stat(self, _, __):
        self.out.append(replies.ok_stat(*self.live_totals()))

    def cmd_list(self, number, _):
        if number is not None:
            index = self.message(number)
            if index is not None:
                self.out.append(replies.ok_scan_listing(number, self.sizes[index]))
            return
        deleted = self.deleted
        lines = [replies.ok_list(*self.live_totals())]
        lines += [b"%d %d\r\n" % (i + 1, size) for i, size in enumerate(self.sizes) if i not in deleted]
        lines.append(replies.END)
        self.out.append(b"".join(lines))

    def unique_ids(self):
        if self.uids is None:
            uids = [u if isinstance(u, bytes) else u.encode() for u in
                    self.shared.tables.storage.storage_unique_ids(self.handle)]
            if len(uids) != len(self.sizes):
                raise StorageTempError(f"{len(uids)} unique ids for {len(self.sizes)} messages")
            self.uids = uids
        return self.uids

    def cmd_uidl(self, number, _):
        if not self.uidl:
            self.reply(replies.ERR_NO_UIDL)
            return
        uids = self.unique_ids()
        if number is not None:
            index = self.message(number)
            if index is not None:
                self.out.append(replies.ok_uidl_one(number, uids[index]))
            return
        deleted = self.deleted
        lines = [replies.OK_UIDL]
        lines += [b"%d %s\r\n" % (i + 1, uid) for i, uid in enumerate(uids) if i not in deleted]
        lines.append(replies.END)
        self.out.append(b"".join(lines))

    def cmd_retr(self, number, _):
        index = self.message(number)
        if index is not None:
            chunks = self.shared.tables.storage.storage_dump_message(self.handle, index)
            self.send_message(replies.ok_retr(self.sizes[index]), chunks)

    def cmd_top(self, number, lines):
        index = self.message(number)
        if index is None:
            return
        storage = self.shared.tables.storage
        if lines == 0:
            chunks = storage.storage_dump_headers(self.handle, index)
        else:
            chunks = storage.storage_dump_message_lines(self.handle, index, lines)
        self.send_message(replies.OK_TOP, chunks)

    def cmd_dele(self, number, _):
        index = self.message(number)
        if index is not None:
            self.deleted.add(index)
            self.reply(replies.OK_DELETED)

    def cmd_noop(self, _, __):
        self.reply(replies.OK_NOOP)

    def cmd_rset(self, _, __):
        self.deleted.clear()
        self.out.append(replies.ok_rset(*self.live_totals()))

    def cmd_capa(self, _, __):
        uidl = self.uidl or self.state is not TRANSACTION
        stls = self.state is AUTHORIZATION and self.can_stls()
        self.out.append(self.shared.capabilities(uidl, stls, self.cleartext_ok))

    # --- TLS: STLS (RFC 2595) and implicit TLS (RFC 8314) ---------------------------

    def can_stls(self):
        # a socket can switch to TLS; stdin mode's pipes cannot
        return (not self.secure and self.shared.tls_context is not None
                and self.transport.get_extra_info("socket") is not None)

    def cmd_stls(self, _, __):
        if self.secure:
            self.reply(replies.ERR_TLS_ACTIVE)
        elif not self.can_stls():
            self.reply(replies.ERR_NO_TLS)
        else:
            self.reply(replies.OK_STLS)
            self.begin_tls()

    def begin_tls(self):
        """Switch the connection to TLS. Whatever the client sent before the
        handshake is dropped unread (CVE-2011-0411): the lines waiting, the
        part-line in the reader, and (reading stops now) nothing more is
        read in clear; start_tls reads the rest as TLS records."""
        self.flush()  # the +OK to STLS goes out in clear, before the handshake
        if self.pending:
            self.pending.clear()
        self.reader = proto.LineReader(self.shared.settings.max_line_length)
        self.user = None
        self.busy = True
        self.reading_paused = False  # run() must not resume reading: start_tls will
        self.transport.pause_reading()
        self.loop.create_task(self.handshake())

    async def handshake(self):
        clear = self.transport
        timeout = min(TLS_HANDSHAKE_TIMEOUT, max(1.0, self.shared.settings.idle_timeout))
        try:
            transport = await self.loop.start_tls(clear, self, self.shared.tls_context, server_side=True,
                                                  ssl_handshake_timeout=timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("%s: TLS handshake failed: %s", self.peer, exc or type(exc).__name__)
            clear.abort()
            self.connection_lost(exc)
            return
        if self.state is CLOSED:  # shut down or timed out meanwhile
            transport.abort()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self.tls_started(transport)
        self.last_active = self.loop.time()
        self.busy = False
        self.run()

    def tls_started(self, transport):
        self.secure = True
        self.cleartext_ok = True  # the password no longer crosses in clear
        log.info("%s: TLS %s", self.peer, tls.describe(transport.get_extra_info("ssl_object")))

    def cmd_quit_authorization(self, _, __):
        self.close(replies.OK_BYE)

    def cmd_quit(self, _, __):
        """Enter UPDATE: commit the deletions, then say goodbye. The commit
        goes ahead even if the client has already gone (Outlook closes
        right after sending QUIT)."""
        self.state = UPDATE
        self.busy = True
        handle, self.handle = self.handle, None
        deleted = sorted(self.deleted)
        storage = self.shared.tables.storage
        if not deleted:
            try:
                storage.storage_unlock_mailbox(handle)
            except Exception:
                log.exception("%s: unlocking mailbox %s failed", self.peer, self.mailbox)
            self.quit_done(None, 0)
            return
        self.flush()
        self.shared.workers.submit(lambda result, exc: self.quit_done(exc, len(deleted)),
                                   commit_job, storage, handle, deleted)

    def quit_done(self, exc, deleted):
        left = len(self.sizes) - deleted
        if exc is None:
            log.info("%s: %s logged out, %d deleted, %d left", self.peer, self.mailbox, deleted, left)
            reply = replies.ok_bye_update(deleted, left)
        else:
            log.error("%s: %s: committing %d deletions failed: %s", self.peer, self.mailbox,
                      deleted, exc or type(exc).__name__)
            reply = replies.error_reply(exc).wire
        if self.state is CLOSED:
            return  # the client went away; the commit happened all the same
        self.out.append(reply)
        self.flush()
        self.state = CLOSED
        self.transport.close()

    # --- RETR and TOP: streaming with back-pressure -------------------------------

    def send_message(self, first_line, chunks):
        """Send `first_line`, then the chunks. The first chunk is fetched
        before +OK goes out, so an error there can still be an -ERR."""
        chunks = iter(chunks)
        try:
            first = next(chunks)
        except StopIteration:
            first, chunks = None, None
        self.out.append(first_line)
        if first is not None:
            self.out.append(first)
        if chunks is None:
            return
        self.flush()
        self.stream = chunks
        self.busy = True
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
                self.busy = False
                self.run()
                return
            except StorageError as exc:
                # the message is half sent: all we can do is hang up
                log.warning("%s: mailbox %s failed while sending a message: %s",
                            self.peer, self.mailbox, exc or type(exc).__name__)
                self.stream = None
                self.close(None)
                return
            except Exception:
                log.exception("%s: internal error while sending a message", self.peer)
                self.stream = None
                self.close(None)
                return
            transport.write(chunk)
        if not self.pump_scheduled:
            self.pump_scheduled = True
            self.loop.call_soon(self.pump)


def peer_address(transport):
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return "stdin" if peer is None else str(peer)


HANDLERS = {
    AUTHORIZATION: {
        proto.USER: Session.cmd_user,
        proto.PASS: Session.cmd_pass,
        proto.APOP: Session.cmd_apop,
        proto.QUIT: Session.cmd_quit_authorization,
        proto.CAPA: Session.cmd_capa,
        proto.STLS: Session.cmd_stls,
        proto.AUTH: Session.cmd_auth,
        proto.NOOP: None,
    },
    TRANSACTION: {
        proto.STAT: Session.cmd_stat,
        proto.LIST: Session.cmd_list,
        proto.RETR: Session.cmd_retr,
        proto.DELE: Session.cmd_dele,
        proto.NOOP: Session.cmd_noop,
        proto.RSET: Session.cmd_rset,
        proto.QUIT: Session.cmd_quit,
        proto.TOP: Session.cmd_top,
        proto.UIDL: Session.cmd_uidl,
        proto.CAPA: Session.cmd_capa,
    },
}
HANDLERS[AUTHORIZATION] = {cmd: h for cmd, h in HANDLERS[AUTHORIZATION].items() if h is not None}
HANDLERS[UPDATE] = {}
HANDLERS[CLOSED] = {}
