"""The auth process of the split model (split.py), and its clients.

It is the one process that checks credentials: the only one that reads a
password database or, for APOP and CRAM-MD5, holds a plaintext password.
Login processes send it what a client gave (AuthClient, over sockets of
their own, one per worker thread: no request waits behind another's
reply); it answers with the verdict and, for good credentials, a ticket.
The master redeems a ticket (once, within TICKET_LIFE seconds) to learn
the mailbox a login process may hand over, so a login process taken over
by a client cannot pick a mailbox: it can only pass on tickets it got for
credentials that checked out.

Requests, one record each (records.py), bytes as hex:
    login process: {"method", "user", "secret", "challenge"}
        -> {"mailbox": str|null, "delay": bool, "ticket": str|null} or {"error": "temporary"}
    master:        {"redeem": ticket} -> {"mailbox": str, "user": hex} or {"error": "unknown"}
                   {"serve": n} with n sockets -> (serves them; no answer)
"""

import collections
import logging
import queue
import secrets
import socket
import threading
import time

from ..auth_functions import AuthFunctions
from ..errors import StorageTempError
from ..protocol import core
from . import records
from .jobs import verify

log = logging.getLogger("mpop3.auth")

TICKET_LIFE = 60.0  # seconds from a good check to the master's redeeming it
MOST_TICKETS = 10000  # unredeemed ones kept (the oldest go first)
METHODS = {core.PASSWORD, core.APOP, core.CRAM_MD5}


class AuthServer:
    """Serves checks on sockets from login processes and the master's
    control socket, a thread per socket (a check blocks: hashing, a
    database), until the control socket closes."""

    def __init__(self, auth, control):
        self.auth = auth
        self.control = control
        self.tickets = collections.OrderedDict()  # ticket -> (mailbox, user, expiry)
        self.lock = threading.Lock()

    def run(self):
        while True:
            try:
                record, fds = records.receive(self.control)
            except records.BadRecord as e:
                log.error("the master sent a bad record (%s)", e)
                continue
            except OSError:
                return 0
            if record is None:
                return 0
            if "serve" in record:
                for fd in fds:
                    threading.Thread(target=self.serve, args=(fd,), daemon=True).start()
            elif "redeem" in record:
                records.close_all(fds)
                records.send(self.control, self.redeem(record.get("redeem")))

    def serve(self, fd):
        sock = socket.socket(fileno=fd)
        with sock:
            while True:
                try:
                    record, fds = records.receive(sock)
                except records.BadRecord as e:
                    log.warning("a login process sent a bad request (%s); no longer serving it", e)
                    return
                except OSError:
                    return
                if record is None:
                    return
                records.close_all(fds)
                try:
                    answer = self.check(record)
                except records.BadRecord as e:
                    log.warning("a login process sent a bad request (%s); no longer serving it", e)
                    return
                try:
                    records.send(sock, answer)
                except OSError:
                    return

    def check(self, record):
        method = records.text(record, "method", 16)
        if method not in METHODS:
            raise records.BadRecord("bad method")
        try:
            user = bytes.fromhex(records.text(record, "user", 2048))
            secret = bytes.fromhex(records.text(record, "secret", 4096))
            challenge = record.get("challenge")
            challenge = None if challenge is None else bytes.fromhex(records.text(record, "challenge", 1024))
        except ValueError:
            raise records.BadRecord("bad hex") from None
        try:
            mailbox, delay = verify(self.auth, core.CheckLogin(user, secret, method, challenge))
        except StorageTempError:
            return {"error": "temporary"}
        except Exception:
            log.exception("checking a login failed")
            return {"error": "temporary"}
        ticket = None
        if mailbox is not None:
            ticket = secrets.token_hex(16)
            with self.lock:
                self.tickets[ticket] = (mailbox, user.hex(), time.monotonic() + TICKET_LIFE)
                while len(self.tickets) > MOST_TICKETS:
                    self.tickets.popitem(last=False)
        return {"mailbox": mailbox, "delay": delay, "ticket": ticket}

    def redeem(self, ticket):
        with self.lock:
            entry = self.tickets.pop(ticket, None) if isinstance(ticket, str) else None
        if entry is None or entry[2] < time.monotonic():
            return {"error": "unknown"}
        return {"mailbox": entry[0], "user": entry[1]}


class AuthClient(AuthFunctions):
    """A login process's end: the auth table the core's jobs see, whose
    verify() asks the auth process; the rest are the defaults. Thread-safe:
    each worker thread takes a socket of its own from the pool."""

    def __init__(self, fds, apop, cram_md5, login_delay=0):
        super().__init__()
        self.login_delay = login_delay  # what the auth module announces as LOGIN-DELAY
        self.pool = queue.SimpleQueue()
        for fd in fds:
            self.pool.put(socket.socket(fileno=fd))
        self.apop = apop
        if cram_md5:  # the auth process has plaintext passwords: CAPA offers CRAM-MD5
            self.supplied_by["auth_password"] = "the auth process"
        self.local = threading.local()

    def replace(self, fds):
        """The auth process was restarted: new sockets (the old ones are dead)."""
        while True:
            try:
                self.pool.get_nowait().close()
            except queue.Empty:
                break
        for fd in fds:
            self.pool.put(socket.socket(fileno=fd))

    def verify(self, _auth, action):
        request = {
            "method": action.method,
            "user": action.user.hex(),
            "secret": action.secret.hex(),
            "challenge": None if action.challenge is None else action.challenge.hex(),
        }
        sock = self.pool.get()
        try:
            records.send(sock, request)
            answer, fds = records.receive(sock)
        except (OSError, records.BadRecord):
            answer, fds = None, []
        finally:
            self.pool.put(sock)
        records.close_all(fds)
        if not isinstance(answer, dict) or "error" in answer:
            raise StorageTempError("the auth process did not answer")
        self.local.ticket = answer.get("ticket")
        mailbox = answer.get("mailbox")
        return (mailbox if isinstance(mailbox, str) else None), answer.get("delay") is True

    def last_ref(self):
        return getattr(self.local, "ticket", None)

    # --- what the core asks of an auth table, answered here ---------------------

    def auth_timestamp(self):
        """The default's, if the auth module offers APOP (it said so at start-up)."""
        return super().auth_timestamp() if self.apop else None

    def auth_default_login_delay(self):
        return self.login_delay

    def auth_attempt_login(self, user, password):
        raise AssertionError("a login process checks no password: verify() asks the auth process")
