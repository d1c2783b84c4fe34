"""What the core's blocking actions do with the function tables. Each runs
in a worker (mpop3/server/workers.py), off the event loop, and returns what
the connection feeds back to the core.

- check_login: CheckLogin. The auth table checks the credentials (the
  wait before that is LoginChecks', mpop3/server/logins.py); a failure asks
  the throttle how long to delay the answer; a success clears the user's
  failures and is held to the mailbox name rules and to LOGIN-DELAY.
- open_mailbox: OpenMailbox. Gives up root if this process must (a hook,
  mpop3/server/privs.py), then locks and indexes the mailbox.
- log_in: both in one job. Good credentials are always followed by
  OpenMailbox, and where one process does both, one trip to a worker thread
  instead of two saves a quarter of a login's CPU.
- commit: Commit. UPDATE: remove the deleted messages, release.

The `limits` argument is a Limits: the throttle and the LOGIN-DELAY clock
of this process or, where several processes serve, of their parent.
"""

import hashlib
import hmac
import time
from dataclasses import dataclass

from ..errors import BadMailboxName, LoginDelay, LoginFailed, StorageTempError
from ..protocol import core, sasl
from .limits import valid_mailbox_name

UNKNOWN_USER_PASSWORD = "\0no such user\0"  # what an unknown user's digest is checked against


@dataclass
class Limits:
    """The throttle and LOGIN-DELAY clock a login consults, and the delay."""

    throttle: object  # LoginThrottle or a supervisor's remote one
    clock: object  # LoginDelayClock or a supervisor's remote one
    login_delay: int  # seconds; 0: off


def verify(auth, action):
    """The auth table's verdict on a CheckLogin: (the mailbox name, or None
    for bad credentials; whether the auth module wants this login delayed).
    An empty password never logs in, whatever a module would say."""
    user = decode(action.user)
    secret = decode(action.secret)
    if action.method == core.PASSWORD:
        mailbox = auth.auth_attempt_login(user, secret) if secret else None
    elif action.method == core.APOP:
        mailbox = apop_check(auth, user, secret, action.challenge)
    else:
        mailbox = cram_md5_check(auth, user, secret, action.challenge)
    if mailbox is None:
        return None, False
    return mailbox, auth.auth_login_delay_needed(user) > 0


def check_login(auth, limits, group, action, verifier=verify):
    """The mailbox name for good credentials. LoginFailed(delay) for bad
    ones, LoginDelay or BadMailboxName when the login may not go on.
    `group`: the client's address group, as the throttle knows it;
    `verifier`: where the credentials are checked (verify, here, or the
    auth process's, mpop3/server/auth_service.py)."""
    mailbox, delay_asked = verifier(auth, action)
    throttle = limits.throttle
    user_key = throttle.user_key(action.user)
    if mailbox is None:
        raise LoginFailed(throttle.failed(group, user_key, throttle.mark(action.user, action.secret)))
    throttle.succeeded(group, user_key)
    if not valid_mailbox_name(mailbox):
        raise BadMailboxName(mailbox)
    if delay_asked or limits.clock.wait_needed(mailbox, limits.login_delay) > 0:
        raise LoginDelay()
    return mailbox


@dataclass
class Opened:
    """An open_mailbox outcome: the module's handle and what the core needs,
    or the error that stopped it."""

    mailbox: str
    handle: object = None
    sizes: list = None
    uidl: bool = False
    error: Exception | None = None
    seconds: float | None = None  # how long opening took


def log_in(tables, limits, group, action, before_open=None, checked=None):
    """check_login, then open_mailbox: (mailbox, Opened). Bad credentials
    raise as check_login does; a mailbox that does not open is in Opened.
    checked(), if given, is called between the two (LoginChecks' slot)."""
    try:
        mailbox = check_login(tables.auth, limits, group, action)
    finally:
        if checked is not None:
            checked()
    try:
        return mailbox, open_mailbox(tables.storage, limits, mailbox, before_open)
    except Exception as e:
        return mailbox, Opened(mailbox, error=e)


@dataclass
class HandOff:
    """A login the auth process vouched for (the split model, split.py):
    the ticket the master redeems to learn which mailbox it may serve."""

    ref: str


def log_in_elsewhere(tables, limits, group, action, before_open=None, checked=None):
    """log_in for a login process: the credentials are checked by the auth
    process (tables.auth is its AuthClient) and nothing is opened here:
    (mailbox, HandOff)."""
    auth = tables.auth
    try:
        mailbox = check_login(auth, limits, group, action, verifier=auth.verify)
    finally:
        if checked is not None:
            checked()
    return mailbox, HandOff(auth.last_ref())


def open_mailbox(storage, limits, mailbox, before_open=None):
    """The opened mailbox, as an Opened.
    `before_open(mailbox)`, if given, is where a process gives up root."""
    if before_open is not None:
        before_open(mailbox)
    start = time.monotonic()
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
    limits.clock.logged_in(mailbox, limits.login_delay)
    return Opened(mailbox, handle, sizes, uidl, seconds=time.monotonic() - start)


def commit(storage, handle, deleted):
    """UPDATE: commit the deletions (if any), then release."""
    try:
        if deleted:
            storage.storage_synch(handle, list(deleted))
    finally:
        storage.storage_unlock_mailbox(handle)


def apop_check(auth, user, digest, timestamp):
    """RFC 1939 APOP: digest = MD5(timestamp + password), in lower-case hex.
    An unknown user costs the same hashing as a known one."""
    password = auth.auth_password(user)
    known = bool(password)  # an empty password never logs in
    secret = (password if known else UNKNOWN_USER_PASSWORD).encode("utf-8", "surrogateescape")
    expected = hashlib.md5(timestamp + secret).hexdigest().encode()
    if hmac.compare_digest(expected, digest.lower().encode("utf-8", "surrogateescape")) and known:
        return auth.auth_login(user)
    return None


def cram_md5_check(auth, user, digest, challenge):
    """RFC 2195: digest = HMAC-MD5(password, challenge) in lower-case hex.
    An unknown user costs the same hashing as a known one."""
    password = auth.auth_password(user)
    known = bool(password)
    answer = sasl.Credentials(user, challenge=challenge, digest=digest.lower())
    if sasl.cram_md5_matches(answer, password if known else UNKNOWN_USER_PASSWORD) and known:
        return auth.auth_login(user)
    return None


def decode(raw):
    return raw.decode("utf-8", "surrogateescape")
