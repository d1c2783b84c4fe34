"""One POP3 session's protocol state and decisions, without I/O.

A SessionCore is told what happened (a command line, or the outcome of
something it asked for) and answers with a list of actions for whoever runs
it: mpop3/server/connection.py over asyncio, or a test with nothing at all.
It touches no socket, event loop, thread, clock or function table, so its
tests are tables of (state, input) -> actions (tests/test_core.py).

The actions, and the event that answers each:

    bytes                    send these bytes: a whole reply, one or many lines
    CheckLogin(...)          check the credentials: login_checked(mailbox),
                             login_failed() once the failure's delay is over,
                             or login_refused(error)
    OpenMailbox(mailbox)     open it for this session: mailbox_opened(sizes,
                             uidl_supported) or login_refused(error)
    LOAD_UIDS                fetch the unique ids: uids_loaded(uids)
    SendMessage(index, n, head)  send `head` (the +OK line), then message
                             `index` (n body lines; None: all of it):
                             message_sent(), or storage_failed(error) if it
                             failed before anything was sent
    START_TLS                drop unread input, do the TLS handshake: tls_started()
    Commit(deleted)          UPDATE: remove these messages, release the
                             mailbox: committed(error)
    CLOSE                    close the connection once the bytes before it are out

While an action other than bytes is outstanding the core is `busy`, and its
runner feeds it no command line until the answer came (pipelined lines
wait, in order). The runner also tells the core when the session ends for
reasons of its own (closed(): a dropped connection, a timeout, shutdown).

The login is the seam between the two halves of a session. Everything up to
login_checked() is AUTHORIZATION; handover() then captures what the
TRANSACTION half needs (user, mailbox, TLS or not, client address,
counters), and SessionCore.resume() rebuilds a core from it, possibly in
another process, to open the mailbox and serve the rest.
"""

import logging
from dataclasses import dataclass

from ..errors import MessageGone, StorageTempError
from . import replies, sasl
from ._parser import TOO_LONG, UNKNOWN, parse_command
from .commands import AUTHORIZATION, CLOSED, COMMANDS, TRANSACTION, UPDATE, State

log = logging.getLogger("mpop3.session")

# how CheckLogin's secret is to be checked
PASSWORD = "password"  # USER/PASS, AUTH PLAIN and LOGIN: the password itself
APOP = "APOP"  # RFC 1939: secret = MD5(challenge + password), hex
CRAM_MD5 = "CRAM-MD5"  # RFC 2195: secret = HMAC-MD5(password, challenge), hex


@dataclass(frozen=True, slots=True)
class CheckLogin:
    user: bytes
    secret: bytes
    method: str = PASSWORD
    challenge: bytes | None = None  # APOP's greeting timestamp, CRAM-MD5's challenge


@dataclass(frozen=True, slots=True)
class OpenMailbox:
    mailbox: str


@dataclass(frozen=True, slots=True)
class SendMessage:
    index: int  # 0-based
    body_lines: int | None  # TOP's count; None: the whole message (RETR)
    head: bytes  # the +OK line, sent only once the message can be read


@dataclass(frozen=True, slots=True)
class Commit:
    deleted: tuple  # sorted 0-based indexes; empty: just release the mailbox


class Signal:
    """An action with no data."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


LOAD_UIDS = Signal("LOAD_UIDS")
START_TLS = Signal("START_TLS")
CLOSE = Signal("CLOSE")


@dataclass(frozen=True, slots=True)
class Handover:
    """A session at the moment its credentials checked out."""

    peer: str
    user: bytes
    mailbox: str
    secure: bool
    cleartext_ok: bool
    failures: int  # failed logins before this one


class Policy:
    """What the server decides for its sessions: limits, and what CAPA and
    AUTH offer. The server keeps one and changes it in place on reload, so
    sessions already open follow."""

    def __init__(self, max_bad_commands=20, max_login_failures=3, cram_md5=False, **capa_extras):
        self.cram_md5 = cram_md5  # the auth module has plaintext passwords to check digests against
        self.apply(max_bad_commands, max_login_failures, **capa_extras)

    def apply(self, max_bad_commands, max_login_failures, expire=None, login_delay=0, implementation=None):
        self.max_bad_commands = max_bad_commands
        self.max_login_failures = max_login_failures
        self.capa_extras = dict(expire=expire, login_delay=login_delay, implementation=implementation)
        self.capa_cache = {}

    def sasl_mechanisms(self, cleartext_ok):
        """PLAIN and LOGIN where the password may cross in clear, CRAM-MD5
        if there are plaintext passwords to check its digest against."""
        return [
            name
            for name, sends_password in sasl.MECHANISMS.items()
            if (cleartext_ok if sends_password else self.cram_md5)
        ]

    def capabilities(self, uidl, stls, cleartext_ok):
        """The CAPA reply for a session in this situation (built once)."""
        key = (uidl, stls, cleartext_ok)
        capa = self.capa_cache.get(key)
        if capa is None:
            capa = self.capa_cache[key] = replies.capabilities(
                uidl=uidl, user=cleartext_ok, stls=stls, sasl=self.sasl_mechanisms(cleartext_ok), **self.capa_extras
            )
        return capa


class SessionCore:
    __slots__ = (
        "policy",
        "peer",
        "state",
        "busy",
        "secure",
        "cleartext_ok",
        "tls_available",
        "timestamp",
        "user",
        "login_user",
        "mailbox",
        "sizes",
        "deleted",
        "uidl",
        "uids",
        "bad",
        "too_long",
        "failures",
        "sasl",
        "pending_uidl",
        "sending",
        "ended_by",
        "deles",
    )

    def __init__(self, policy, peer, *, secure=False, cleartext_ok=False, tls_available=False, timestamp=None):
        self.policy = policy
        self.peer = peer  # the client's address, for the log
        self.state = AUTHORIZATION
        self.busy = False  # an action is outstanding
        self.secure = secure  # TLS is up: implicit (a listen_tls address) or after STLS
        self.cleartext_ok = cleartext_ok or secure  # USER/PASS, AUTH PLAIN/LOGIN allowed
        self.tls_available = tls_available  # STLS can be offered (a socket, a certificate)
        self.timestamp = timestamp  # APOP's, from the greeting (bytes), or None: no APOP
        self.user = None  # after USER, until PASS
        self.login_user = None  # whose login is being checked, or was
        self.mailbox = None
        self.sizes = None
        self.deleted = None  # set of 0-based indexes
        self.uidl = False  # the mailbox supports UIDL
        self.uids = None  # loaded on the first UIDL
        self.pending_uidl = None  # the UIDL argument waiting for LOAD_UIDS
        self.sending = None  # the index of the message a SendMessage asked for
        self.bad = 0  # bad commands in a row
        self.too_long = False  # an over-long line was seen already
        self.failures = 0  # failed logins
        self.sasl = None  # the AUTH exchange in progress
        self.ended_by = None  # why the core ended the session (the logout line)
        self.deles = 0  # DELE commands that marked a message

    def greeting(self):
        text = replies.GREETING
        if self.timestamp:
            text += b" " + self.timestamp
        return replies.ok(text)

    # --- command lines ----------------------------------------------------------

    def command(self, line):
        """One line from the client (TOO_LONG for an over-long one)."""
        if self.sasl is not None:  # a line of an AUTH exchange, not a command
            return self.sasl_line(line)
        if line is TOO_LONG:
            if self.too_long:  # the second one: this is no confused client
                log.warning("%s: over-long command lines, closing", self.peer)
                return self.end(replies.ERR_TOO_LONG_BYE, "bad commands")
            self.too_long = True
            return self.bad_command(replies.ERR_TOO_LONG)
        cmd, arg1, arg2 = parse_command(line)
        if cmd <= 0:
            if cmd == UNKNOWN:
                return self.bad_command(replies.ERR_UNKNOWN)
            return self.bad_command(replies.ERR_USAGE[COMMANDS[arg1 - 1].verb])
        handler = DISPATCH[self.state].get(cmd)
        if handler is None:
            return self.bad_command(replies.ERR_NOT_NOW)
        self.bad = 0
        try:
            return handler(self, arg1, arg2)
        except Exception:
            log.exception("%s: internal error in %s", self.peer, COMMANDS[cmd - 1].verb)
            return self.end(replies.ERR_INTERNAL)

    def bad_command(self, reply):
        self.bad += 1
        if self.bad >= self.policy.max_bad_commands:
            log.warning("%s: too many bad commands, closing", self.peer)
            return self.end(replies.ERR_TOO_MANY_BAD, "bad commands")
        return [reply.wire]

    def end(self, reply, why="error"):
        """A last reply, then close; commits nothing."""
        self.state = CLOSED
        self.ended_by = why
        return [reply.wire, CLOSE]

    # --- AUTHORIZATION ------------------------------------------------------------

    def cmd_user(self, name, _):
        if not self.cleartext_ok:
            return [replies.ERR_CLEARTEXT.wire]
        self.user = name  # +OK whether or not the user exists (no user enumeration)
        return [replies.OK_USER.wire]

    def cmd_pass(self, password, _):
        if not self.cleartext_ok:
            return [replies.ERR_CLEARTEXT.wire]
        if self.user is None:
            return [replies.ERR_PASS_FIRST.wire]
        user, self.user = self.user, None
        return self.check_login(CheckLogin(user, password))

    def cmd_apop(self, name, digest):
        if self.timestamp is None:
            return [replies.ERR_NO_APOP.wire]
        self.user = None
        return self.check_login(CheckLogin(name, digest, APOP, self.timestamp))

    def cmd_auth(self, mechanism, initial_response):
        self.user = None
        name = mechanism.upper().decode("ascii", "replace")
        if name not in self.policy.sasl_mechanisms(self.cleartext_ok):
            sends_password = sasl.MECHANISMS.get(name)
            return [(replies.ERR_CLEARTEXT if sends_password else replies.ERR_NO_MECHANISM).wire]
        exchange = sasl.Exchange(name, sasl.new_cram_challenge() if name == CRAM_MD5 else None)
        return self.sasl_result(exchange, exchange.start(initial_response))

    def sasl_line(self, line):
        exchange, self.sasl = self.sasl, None
        if line is TOO_LONG:
            return self.bad_command(replies.ERR_TOO_LONG)
        return self.sasl_result(exchange, exchange.step(line))

    def sasl_result(self, exchange, result):
        if isinstance(result, sasl.Challenge):
            self.sasl = exchange
            return [replies.sasl_challenge(result.data)]
        if isinstance(result, sasl.Credentials):
            user = result.user.encode("utf-8", "surrogateescape")
            if result.challenge is None:
                return self.check_login(CheckLogin(user, result.password.encode("utf-8", "surrogateescape")))
            return self.check_login(CheckLogin(user, result.digest.encode(), CRAM_MD5, result.challenge))
        if result is sasl.CANCELLED:
            return [replies.Reply(False, result.text.encode()).wire]
        # malformed: counts like a bad command, so a flood of them ends
        return self.bad_command(replies.Reply(False, result.text.encode()))

    def check_login(self, action):
        self.busy = True
        self.login_user = action.user
        return [action]

    def login_checked(self, mailbox):
        """The credentials are good; `mailbox` has been validated."""
        self.mailbox = mailbox
        return [OpenMailbox(mailbox)]

    def login_failed(self):
        """Wrong credentials (or an unknown user): the delay for it is over."""
        self.busy = False
        self.failures += 1
        if self.failures >= self.policy.max_login_failures:
            return self.end(replies.ERR_TOO_MANY_FAILURES, "failed logins")
        return [replies.ERR_AUTH.wire]

    def last_chance(self):
        """Whether one more failed login ends the session."""
        return self.failures + 1 >= self.policy.max_login_failures

    def login_refused(self, error):
        """The login cannot go ahead now: LOGIN-DELAY, the mailbox in use or
        not to be opened, a module's unsafe mailbox name, an internal error."""
        self.busy = False
        self.mailbox = None
        return [replies.error_reply(error).wire]

    def mailbox_opened(self, sizes, uidl_supported):
        self.busy = False
        self.state = TRANSACTION
        self.sizes = sizes
        self.deleted = set()
        self.uidl = uidl_supported
        return [replies.ok_maildrop(len(sizes), sum(sizes))]

    def handover(self):
        """What the TRANSACTION half needs, once login_checked() has run."""
        assert self.mailbox is not None and self.state is AUTHORIZATION
        return Handover(self.peer, self.login_user, self.mailbox, self.secure, self.cleartext_ok, self.failures)

    @classmethod
    def resume(cls, policy, handover):
        """A core waiting for mailbox_opened(), from a handover()."""
        core = cls(policy, handover.peer, secure=handover.secure, cleartext_ok=handover.cleartext_ok)
        core.failures = handover.failures
        core.login_user = handover.user
        core.mailbox = handover.mailbox
        core.busy = True
        return core

    # --- STLS (RFC 2595) -------------------------------------------------------------

    def cmd_stls(self, _, __):
        if self.secure:
            return [replies.ERR_TLS_ACTIVE.wire]
        if not self.tls_available:
            return [replies.ERR_NO_TLS.wire]
        self.user = None
        self.busy = True
        return [replies.OK_STLS.wire, START_TLS]

    def tls_started(self):
        self.busy = False
        self.secure = True
        self.cleartext_ok = True  # the password no longer crosses in clear
        return []

    # --- TRANSACTION --------------------------------------------------------------------

    def message(self, number):
        """The 0-based index of a live message, or the -ERR to answer."""
        if number < 1 or number > len(self.sizes):
            return replies.ERR_NO_SUCH_MESSAGE
        if number - 1 in self.deleted:
            return replies.ERR_DELETED
        return number - 1

    def live_totals(self):
        sizes, deleted = self.sizes, self.deleted
        if not deleted:
            return len(sizes), sum(sizes)
        return len(sizes) - len(deleted), sum(sizes) - sum(sizes[i] for i in deleted)

    def cmd_stat(self, _, __):
        return [replies.ok_stat(*self.live_totals())]

    def cmd_list(self, number, _):
        if number is not None:
            index = self.message(number)
            if type(index) is not int:
                return [index.wire]
            return [replies.ok_scan_listing(number, self.sizes[index])]
        deleted = self.deleted
        lines = [replies.ok_list(*self.live_totals())]
        lines += [b"%d %d\r\n" % (i + 1, size) for i, size in enumerate(self.sizes) if i not in deleted]
        lines.append(replies.END)
        return [b"".join(lines)]

    def cmd_uidl(self, number, _):
        if not self.uidl:
            return [replies.ERR_NO_UIDL.wire]
        if self.uids is None:
            self.pending_uidl = number
            self.busy = True
            return [LOAD_UIDS]
        return self.uidl_reply(number)

    def uids_loaded(self, uids):
        self.busy = False
        uids = [u if isinstance(u, bytes) else u.encode() for u in uids]
        if len(uids) != len(self.sizes):
            return self.storage_failed(StorageTempError(f"{len(uids)} unique ids for {len(self.sizes)} messages"))
        self.uids = uids
        return self.uidl_reply(self.pending_uidl)

    def uidl_reply(self, number):
        uids = self.uids
        if number is not None:
            index = self.message(number)
            if type(index) is not int:
                return [index.wire]
            return [replies.ok_uidl_one(number, uids[index])]
        deleted = self.deleted
        lines = [replies.OK_UIDL]
        lines += [b"%d %s\r\n" % (i + 1, uid) for i, uid in enumerate(uids) if i not in deleted]
        lines.append(replies.END)
        return [b"".join(lines)]

    def cmd_retr(self, number, _):
        index = self.message(number)
        if type(index) is not int:
            return [index.wire]
        self.busy = True
        self.sending = index
        return [SendMessage(index, None, replies.ok_retr(self.sizes[index]))]

    def cmd_top(self, number, lines):
        index = self.message(number)
        if type(index) is not int:
            return [index.wire]
        self.busy = True
        self.sending = index
        return [SendMessage(index, lines, replies.OK_TOP)]

    def message_sent(self):
        self.busy = False
        self.sending = None
        return []

    def storage_failed(self, error):
        """Storage failed while serving a command (before any of the answer
        went out). One message gone (MessageGone, for RETR or TOP): refused
        alone, the session goes on. Another temporary failure means the
        mailbox changed under us: end the session, uncommitted."""
        self.busy = False
        sending, self.sending = self.sending, None
        log.warning("%s: mailbox %s: %s", self.peer, self.mailbox, error or type(error).__name__)
        if isinstance(error, MessageGone) and sending is not None:
            return [replies.err_message_gone(sending + 1)]
        if isinstance(error, StorageTempError):
            return self.end(replies.ERR_CHANGED)
        return [replies.error_reply(error).wire]

    def cmd_dele(self, number, _):
        index = self.message(number)
        if type(index) is not int:
            return [index.wire]
        self.deleted.add(index)
        self.deles += 1
        return [replies.OK_DELETED.wire]

    def cmd_noop(self, _, __):
        return [replies.OK_NOOP.wire]

    def cmd_rset(self, _, __):
        self.deleted.clear()
        return [replies.ok_rset(*self.live_totals())]

    def cmd_capa(self, _, __):
        uidl = self.uidl or self.state is not TRANSACTION
        stls = self.state is AUTHORIZATION and self.tls_available and not self.secure
        return [self.policy.capabilities(uidl, stls, self.cleartext_ok)]

    # --- QUIT and UPDATE --------------------------------------------------------------

    def cmd_quit(self, _, __):
        if self.state is AUTHORIZATION:
            return self.end(replies.OK_BYE, "quit")
        # Commit even if the client has gone meanwhile: Outlook closes right
        # after sending QUIT, without reading the answer.
        self.state = UPDATE
        self.busy = True
        return [Commit(tuple(sorted(self.deleted)))]

    def committed(self, error=None):
        self.busy = False
        self.state = CLOSED
        self.ended_by = "quit" if error is None else "error"
        if error is None:
            return [replies.ok_bye_update(len(self.deleted), len(self.sizes) - len(self.deleted)), CLOSE]
        return [replies.error_reply(error).wire, CLOSE]

    def closed(self):
        """The runner ended the session (connection lost, timeout, shutdown)."""
        self.state = CLOSED
        self.sasl = None


def _dispatch():
    """state -> {command id: handler}, from the command table."""
    table = {state: {} for state in State}
    for command in COMMANDS:
        handler = getattr(SessionCore, command.handler)
        for state in State:
            if state in command.states:
                table[state][command.id] = handler
    return table


DISPATCH = _dispatch()
