"""Every POP3 reply text in one place, and the one way replies are encoded.

Single-line replies are constants built here; handlers pick one, or call
one of the small builders below for replies that carry numbers. Every
`+OK`/`-ERR` has text after the space (old clients need it, RFC 1957);
response codes follow RFC 2449 section 8 and RFC 3206.
Never put exception text or class names in a reply.
"""

import base64

from ..errors import BadMailboxName, LoginDelay, LoginsBusy, MailboxInUse, StoragePermError, StorageTempError
from .commands import CAPABILITIES, COMMANDS

CRLF = b"\r\n"
END = b".\r\n"  # ends a multi-line reply


class Reply:
    """One single-line reply: `+OK text` or `-ERR [CODE] text`."""

    __slots__ = ("ok", "text", "code", "wire")

    def __init__(self, ok, text, code=None):
        self.ok = ok
        self.text = text
        self.code = code
        status = b"+OK " if ok else b"-ERR "
        tag = b"[" + code.encode() + b"] " if code else b""
        self.wire = status + tag + text + CRLF

    def __repr__(self):
        return f"Reply({self.wire!r})"


def ok(text):
    return b"+OK " + text + CRLF


# --- greeting and connection limits ---------------------------------------
GREETING = b"mpop3 ready"
ERR_TOO_MANY_SESSIONS = Reply(False, b"too many sessions, try again later", "SYS/TEMP")
ERR_TOO_MANY_FROM_YOU = Reply(False, b"too many sessions from your address, try again later", "SYS/TEMP")
ERR_SHUTTING_DOWN = Reply(False, b"server shutting down, try again later", "SYS/TEMP")
ERR_BUSY = Reply(False, b"too many logins at once, try again later", "SYS/TEMP")
ERR_NO_SESSION_PROCESS = Reply(False, b"no session can be started now, try again later", "SYS/TEMP")

# --- AUTHORIZATION ---------------------------------------------------------
OK_USER = Reply(True, b"send PASS")  # the same whether or not the user exists
ERR_AUTH = Reply(False, b"authentication failed", "AUTH")
ERR_PASS_FIRST = Reply(False, b"send USER first")
ERR_TOO_MANY_FAILURES = Reply(False, b"too many failed logins, goodbye", "AUTH")
ERR_LOGIN_DELAY = Reply(False, b"logged in too recently, wait before logging in again", "LOGIN-DELAY")
ERR_IN_USE = Reply(False, b"maildrop already locked by another session", "IN-USE")
ERR_BAD_MAILBOX = Reply(False, b"mailbox unavailable", "SYS/PERM")
ERR_NO_APOP = Reply(False, b"APOP is not available here")
# cleartext policy (plaintext_auth) and SASL (RFC 5034)
ERR_CLEARTEXT = Reply(False, b"cleartext logins are refused here: use STLS or the POP3S port first", "AUTH")
ERR_NO_MECHANISM = Reply(False, b"unsupported SASL mechanism")

# --- STLS (RFC 2595) -----------------------------------------------------------
OK_STLS = Reply(True, b"begin TLS negotiation")
ERR_NO_TLS = Reply(False, b"STLS is not available here")
ERR_TLS_ACTIVE = Reply(False, b"TLS is already active")


def ok_maildrop(count, octets):
    return ok(b"maildrop has %d message%s (%d octets)" % (count, b"" if count == 1 else b"s", octets))


# --- TRANSACTION -------------------------------------------------------------
ERR_NO_SUCH_MESSAGE = Reply(False, b"no such message")
ERR_DELETED = Reply(False, b"message is deleted")
ERR_NO_UIDL = Reply(False, b"UIDL is not supported for this mailbox")
OK_NOOP = Reply(True, b"nothing happens")
OK_DELETED = Reply(True, b"message deleted")
OK_CAPA = b"+OK capability list follows\r\n"


def ok_stat(count, octets):
    return ok(b"%d %d" % (count, octets))


def ok_scan_listing(number, size):
    return ok(b"%d %d" % (number, size))


def ok_list(count, octets):
    return ok(b"%d message%s (%d octets)" % (count, b"" if count == 1 else b"s", octets))


def ok_uidl_one(number, uid):
    return ok(b"%d %s" % (number, uid))


OK_UIDL = b"+OK unique-id listing follows\r\n"


def err_message_gone(number):
    return Reply(False, b"message %d is no longer there" % number, "SYS/TEMP").wire


def ok_retr(size):
    return ok(b"%d octets" % size)


OK_TOP = b"+OK top of message follows\r\n"


def ok_rset(count, octets):
    return ok(b"maildrop has %d message%s (%d octets)" % (count, b"" if count == 1 else b"s", octets))


# --- QUIT / UPDATE -----------------------------------------------------------
OK_BYE = Reply(True, b"mpop3 signing off")


def ok_bye_update(deleted, left):
    return ok(b"mpop3 signing off (%d deleted, %d left)" % (deleted, left))


# --- errors anywhere ---------------------------------------------------------
ERR_UNKNOWN = Reply(False, b"unknown command")
ERR_NOT_NOW = Reply(False, b"command not valid in this state")
ERR_TOO_LONG = Reply(False, b"command line too long")
ERR_TOO_LONG_BYE = Reply(False, b"command lines too long, goodbye")
ERR_TOO_MANY_BAD = Reply(False, b"too many bad commands, goodbye")
ERR_IDLE = Reply(False, b"idle for too long, goodbye", "SYS/TEMP")
ERR_KICKED = Reply(False, b"session ended by the administrator")
ERR_LOGIN_TIMEOUT = Reply(False, b"no login in time, goodbye")
ERR_TEMP = Reply(False, b"temporary failure, try again later", "SYS/TEMP")
ERR_PERM = Reply(False, b"permanent failure", "SYS/PERM")
ERR_INTERNAL = Reply(False, b"internal error", "SYS/TEMP")
ERR_CHANGED = Reply(False, b"mailbox changed on the server, try again later", "SYS/TEMP")

ERR_USAGE = {command.verb: Reply(False, b"usage: " + command.usage) for command in COMMANDS}


def error_reply(exc):
    """The one mapping of failures to replies (RFC 2449 / RFC 3206 codes)."""
    if isinstance(exc, MailboxInUse):
        return ERR_IN_USE
    if isinstance(exc, LoginDelay):
        return ERR_LOGIN_DELAY
    if isinstance(exc, StorageTempError):
        return ERR_TEMP
    if isinstance(exc, StoragePermError):
        return ERR_PERM
    if isinstance(exc, BadMailboxName):
        return ERR_BAD_MAILBOX
    if isinstance(exc, LoginsBusy):
        return ERR_BUSY
    return ERR_INTERNAL


def sasl_challenge(data):
    """`+ base64` (RFC 5034 section 4); an empty challenge is `+ `."""
    return b"+ " + base64.b64encode(data) + CRLF


def capabilities(*, uidl=True, expire=None, login_delay=0, implementation=None, user=True, stls=False, sasl=()):
    """The CAPA reply (RFC 2449 section 6): exactly what works, in the order
    of commands.CAPABILITIES. `user`: USER/PASS is allowed; `stls`: STLS is
    offered; `sasl`: the mechanisms AUTH accepts on this connection."""
    lines = {
        "TOP": b"TOP",
        "UIDL": b"UIDL" if uidl else None,
        "USER": b"USER" if user else None,
        "RESP-CODES": b"RESP-CODES",
        "AUTH-RESP-CODE": b"AUTH-RESP-CODE",
        "PIPELINING": b"PIPELINING",
        "STLS": b"STLS" if stls else None,
        "SASL": b"SASL " + " ".join(sasl).encode() if sasl else None,
        "EXPIRE": b"EXPIRE " + str(expire).upper().encode() if expire is not None else None,
        "LOGIN-DELAY": b"LOGIN-DELAY %d" % login_delay if login_delay else None,
        "IMPLEMENTATION": b"IMPLEMENTATION " + implementation.encode("ascii", "replace") if implementation else None,
    }
    return OK_CAPA + b"".join(lines[name] + CRLF for name in CAPABILITIES if lines[name] is not None) + END
