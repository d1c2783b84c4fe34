"""auth_postgresql: users and passwords in PostgreSQL, through psycopg 3
and its connection pool.

Settings (`> name value` after the module line):
- `connection`: a libpq connection string (`host=/run/postgresql dbname=mail
  user=mpop3`, or a `postgresql://` URI);
- `query`: the SQL that finds a user, with `$1` for the user name, which is
  sent as a bound parameter (never spliced into the SQL). It returns one
  row: the password, and optionally the mailbox (NULL or no column: the
  user name). Default `SELECT password, mailbox FROM users WHERE username = $1`;
- `default_scheme`: the scheme of stored passwords without a `{SCHEME}`
  prefix (default CRYPT);
- `pool_size`: connections per process at most (default: the worker threads
  that check logins at once, min(8, CPUs));
- `connect_timeout`, `query_timeout`: seconds (default 5 each).

Stored passwords, as Dovecot's `passdb sql` reads them: `{PLAIN}` (or
`{CLEARTEXT}`) plaintext, the only ones APOP and CRAM-MD5 can use;
`{CRYPT}` any crypt(3) hash libcrypt checks; `{SHA512-CRYPT}` (`$6$`),
`{SHA256-CRYPT}` (`$5$`), `{BLF-CRYPT}` (`$2a$`, `$2b$`, `$2y$`),
`{MD5-CRYPT}` (`$1$`), `{YESCRYPT}` (`$y$`), checked by libcrypt. A scheme
it cannot verify (`{SSHA}`, `{ARGON2ID}`, a hash that does not match its
scheme), NULL, an empty password or several rows for one name lock that
user: it never logs in, and it is logged once per process.

A database that is down, slow or restarting is `-ERR [SYS/TEMP]` to the
client (StorageTempError), logged, and never counted as a failed login.
Each process opens its own pool the first time it looks a user up (never
before fork(), never shared across it); the pool replaces broken
connections by itself (a restart, pg_terminate_backend).

Every attempt costs the same whoever the user is: one database query, and
one crypt(3) per cost class of the hashes this process has seen
(mpop3.passwords.HashCosts). A class is learnt, and a stored hash checked
for being one libcrypt can verify, the first time the process meets it,
so only that first attempt costs more.
"""

include "mpop3_module.pxi"

import hmac
import logging
import os
import re
import threading
import unicodedata

from mpop3.errors import ModuleInitError, StorageTempError
from mpop3.passwords import HashCosts, hash_problem

MPOP3_MODULE_CLASS = "auth"
MPOP3_SETTINGS = {
    "connection": "the libpq connection string (default: empty, libpq's defaults and PG* variables)",
    "query": "the SQL finding a user; $1 is the user name (default "
    "SELECT password, mailbox FROM users WHERE username = $1)",
    "default_scheme": "the scheme of passwords stored without a {SCHEME} prefix (default CRYPT)",
    "pool_size": "connections per process at most (default min(8, CPUs))",
    "connect_timeout": "seconds to wait for a connection (default 5)",
    "query_timeout": "seconds a query may take (default 5)",
}

log = logging.getLogger("mpop3.auth")

DEFAULT_QUERY = "SELECT password, mailbox FROM users WHERE username = $1"
MAX_NAME = 255  # bytes of a user name sent to the database
DUMMY_PLAIN = "\0no such user\0".encode()
PREFIX = re.compile(r"\{([A-Za-z0-9._-]+)\}")
PARAMETER = re.compile(r"\$([0-9]+)")
DES_OR_BSDI = re.compile(r"[./0-9A-Za-z]{13}|_[./0-9A-Za-z]{19}")

# The schemes we can check: None for plaintext, else the hash prefixes the
# scheme allows (empty: any hash libcrypt checks)
SCHEMES = {
    "PLAIN": None,
    "CLEARTEXT": None,
    "CRYPT": (),
    "SHA512-CRYPT": ("$6$",),
    "SHA256-CRYPT": ("$5$",),
    "BLF-CRYPT": ("$2a$", "$2b$", "$2y$", "$2x$"),
    "MD5-CRYPT": ("$1$",),
    "YESCRYPT": ("$y$",),
}

PLAIN, HASH, LOCKED = "plain", "hash", "locked"


class Settings:
    def __init__(self, values):
        self.connection = values.get("connection", "")
        self.query = values.get("query", DEFAULT_QUERY)
        self.default_scheme = values.get("default_scheme", "CRYPT").upper()
        self.pool_size = whole(values, "pool_size", min(8, os.cpu_count() or 1))
        self.connect_timeout = seconds(values, "connect_timeout", 5)
        self.query_timeout = seconds(values, "query_timeout", 5)
        if self.default_scheme not in SCHEMES:
            raise ModuleInitError(
                f"default_scheme {self.default_scheme!r} is not one of {', '.join(SCHEMES)}"
            )
        if self.pool_size < 1:
            raise ModuleInitError("pool_size must be at least 1")
        numbers = {int(n) for n in PARAMETER.findall(self.query)}
        if numbers != {1}:
            raise ModuleInitError(
                f"query must use the user name as $1 and no other parameter: {self.query!r}"
            )
        import psycopg

        try:
            parsed = psycopg.conninfo.conninfo_to_dict(self.connection)
        except psycopg.Error as e:
            raise ModuleInitError(f"connection {self.connection!r} does not parse: {first_line(e)}") from None
        parsed.setdefault("connect_timeout", max(1, round(self.connect_timeout)))
        # each process's connections say whose they are (pg_stat_activity)
        self.application_name = parsed.pop("application_name", None)
        self.conninfo = psycopg.conninfo.make_conninfo(**parsed)


def whole(values, name, default):
    text = values.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise ModuleInitError(f"{name} {text!r} is not a whole number")
    return int(text)


def seconds(values, name, default):
    text = values.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not 0 < value <= 3600:
        raise ModuleInitError(f"{name} {text!r} is not a number of seconds (more than 0, at most 3600)")
    return value


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class Database:
    """The pool of this process, opened at its first use in the process."""

    def __init__(self, settings):
        self.settings = settings
        self.pool = None
        self.pid = None
        self.lock = threading.Lock()
        self.inherited = []  # pools from before a fork: never used, never closed (their sockets are the parent's)
        self.down = False  # last lookup failed for the database: logged once until it works again

    def connection_pool(self):
        pool = self.pool
        if pool is not None and self.pid == os.getpid():
            return pool
        with self.lock:
            if self.pool is not None and self.pid == os.getpid():
                return self.pool
            if self.pool is not None:
                self.inherited.append(self.pool)
            from psycopg_pool import ConnectionPool

            settings = self.settings
            self.pool = ConnectionPool(
                settings.conninfo,
                kwargs={
                    "autocommit": True,
                    "cursor_factory": raw_cursor(),
                    "prepare_threshold": 0,
                    "application_name": settings.application_name or f"mpop3 auth {os.getpid()}",
                },
                configure=self.configure,
                min_size=1,
                max_size=settings.pool_size,
                timeout=settings.connect_timeout,
                # a pool that gave up reconnecting starts again at the next
                # lookup: a database back after an outage is found within
                # seconds, not after a back-off of minutes
                reconnect_timeout=max(2.0, 2 * settings.connect_timeout),
                name=f"mpop3-auth-{os.getpid()}",
                open=False,
            )
            self.pool.open(wait=False)
            self.pid = os.getpid()
            return self.pool

    def close(self):
        """Close this process's pool (a module loaded again, in tests)."""
        with self.lock:
            if self.pool is not None and self.pid == os.getpid():
                self.pool.close(timeout=1)
            self.pool = None

    def configure(self, conn):
        conn.execute(f"SET statement_timeout = {max(1, int(self.settings.query_timeout * 1000))}")

    def rows(self, user):
        """At most two rows the query gives for `user`; StorageTempError if
        the database cannot answer."""
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = self.connection_pool()
        for attempt in (1, 2):
            conn = None
            try:
                with pool.connection() as conn:
                    rows = conn.execute(self.settings.query, [user]).fetchmany(2)
                if self.down:
                    self.down = False
                    log.warning("PostgreSQL: answering again")
                return rows
            except PoolTimeout:
                raise self.unavailable(f"no connection within {self.settings.connect_timeout:g} s")
            except psycopg.errors.QueryCanceled:
                raise self.unavailable(f"the query took more than query_timeout ({self.settings.query_timeout:g} s)")
            except psycopg.OperationalError as e:
                if attempt == 1 and conn is not None and conn.broken:
                    # the server restarted or ended our connection: the
                    # others in the pool are likely gone too
                    pool.check()
                    continue
                raise self.unavailable(first_line(e))
            except psycopg.Error as e:
                raise self.unavailable(f"{type(e).__name__}: {first_line(e)}")

    def unavailable(self, why):
        if not self.down:
            log.error("PostgreSQL: %s; logins answer [SYS/TEMP] until it works", why)
            self.down = True
        else:
            log.warning("PostgreSQL: %s", why)
        return StorageTempError(f"user database: {why}")


def raw_cursor():
    import psycopg

    return psycopg.RawCursor


def check_query(settings):
    """At start-up, if the database answers: that the query parses, takes
    one parameter and returns one or two columns. A database that does not
    answer is logged, not fatal: it may come back."""
    import psycopg
    from psycopg import pq

    try:
        conn = psycopg.connect(settings.conninfo, autocommit=True, application_name="mpop3 check")
    except psycopg.Error as e:
        log.warning(
            "PostgreSQL: cannot connect at start-up (%s); logins will answer [SYS/TEMP] until it can",
            first_line(e),
        )
        return
    try:
        pgconn = conn.pgconn
        result = pgconn.prepare(b"mpop3_check", settings.query.encode())
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise ModuleInitError(f"query {settings.query!r}: {server_error(result)}")
        described = pgconn.describe_prepared(b"mpop3_check")
        if described.status != pq.ExecStatus.COMMAND_OK:
            raise ModuleInitError(f"query {settings.query!r}: {server_error(described)}")
        if described.nparams != 1:
            raise ModuleInitError(f"query {settings.query!r} takes {described.nparams} parameters, not one ($1)")
        if described.nfields not in (1, 2):
            raise ModuleInitError(
                f"query {settings.query!r} returns {described.nfields} columns: it must return the password "
                "and, optionally, the mailbox"
            )
    finally:
        conn.close()


def server_error(result):
    """The first line of a server's error, without its "ERROR:" label."""
    text = result.error_message.decode("utf-8", "replace").strip()
    line = (text.splitlines() or ["unknown error"])[0]
    return re.sub(r"^[A-Z]+:\s+", "", line)


def valid_name(user):
    """Whether `user` may be sent to the database at all: not empty, UTF-8,
    no control characters (NUL among them), at most MAX_NAME bytes."""
    if not user:
        return False
    try:
        encoded = user.encode("utf-8")
    except UnicodeEncodeError:
        return False
    if len(encoded) > MAX_NAME:
        return False
    return not any(unicodedata.category(c) == "Cc" for c in user)


def read_password(stored, default_scheme):
    """(kind, secret as bytes or None, why locked or None) for a stored password."""
    if stored is None:
        return LOCKED, None, None  # no password: a disabled account, nothing to report
    if isinstance(stored, (bytes, bytearray, memoryview)):
        stored = bytes(stored).decode("utf-8", "surrogateescape")
    if not isinstance(stored, str):
        return LOCKED, None, f"the password column is a {type(stored).__name__}, not text"
    scheme = default_scheme
    prefix = PREFIX.match(stored)
    if prefix is not None:
        scheme = prefix.group(1).upper()
        stored = stored[prefix.end() :]
    if scheme not in SCHEMES:
        return LOCKED, None, f"password scheme {{{scheme}}} is not one mpop3 can check"
    if not stored:
        return LOCKED, None, "empty password"
    prefixes = SCHEMES[scheme]
    secret = stored.encode("utf-8", "surrogateescape")
    if prefixes is None:
        return PLAIN, secret, None
    if prefixes and not stored.startswith(prefixes):
        return LOCKED, None, f"a {{{scheme}}} password must start with {' or '.join(prefixes)}"
    if not stored.startswith("$") and DES_OR_BSDI.fullmatch(stored) is None:
        return LOCKED, None, f"{{{scheme}}} password: not a crypt(3) hash (if it is a plaintext one, write {{PLAIN}} in front of it)"
    problem = checked_hashes.get(secret, False)
    if problem is False:
        # asking libcrypt costs a hash: once per stored hash and process
        problem = hash_problem(secret)
        if len(checked_hashes) >= MAX_REPORTED:
            checked_hashes.clear()
        checked_hashes[secret] = problem
    if problem is not None:
        return LOCKED, None, f"{{{scheme}}} password: {problem}"
    return HASH, secret, None


cdef object settings = None
cdef object database = None
cdef object costs = HashCosts()
reported = set()  # users whose locked entry was logged, in this process
checked_hashes = {}  # stored hash -> why libcrypt cannot check it, or None
MAX_REPORTED = 10000


def module_init(values):
    global settings, database, costs
    settings = Settings(values)
    if database is not None:
        database.close()
    database = Database(settings)
    costs = HashCosts()
    reported.clear()
    checked_hashes.clear()
    check_query(settings)


def lookup(user):
    """(kind, secret, mailbox) for `user`, or None if unknown; raises
    StorageTempError if the database cannot tell."""
    if not valid_name(user):
        return None
    rows = database.rows(user)
    if not rows:
        return None
    if len(rows) > 1:
        return report(user, "the query returns more than one row"), None, None
    row = rows[0]
    if len(row) not in (1, 2):
        log.error("PostgreSQL: the query returns %d columns, not the password and the mailbox", len(row))
        raise StorageTempError("the query returns the wrong columns")
    kind, secret, why = read_password(row[0], settings.default_scheme)
    if kind is LOCKED:
        if why is not None:
            report(user, why)
        return LOCKED, None, None
    mailbox = row[1] if len(row) == 2 and row[1] is not None else user
    if not isinstance(mailbox, str):
        return report(user, f"the mailbox column is a {type(mailbox).__name__}, not text"), None, None
    return kind, secret, mailbox


def report(user, why):
    if user not in reported:
        if len(reported) >= MAX_REPORTED:
            reported.clear()
        reported.add(user)
        log.warning("PostgreSQL: user %r: %s; nobody can log in as this user", user, why)
    return LOCKED


# APOP and CRAM-MD5 ask auth_password, then auth_login, one after the
# other in one thread: the second answers from the first's lookup.
last = threading.local()


def auth_password(user):
    entry = lookup(user)
    last.user, last.entry = user, entry
    if entry is None or entry[0] is not PLAIN:
        return None
    return entry[1].decode("utf-8", "surrogateescape")


def auth_login(user):
    if getattr(last, "user", None) == user:
        entry = last.entry
        last.user = last.entry = None
    else:
        entry = lookup(user)
    return None if entry is None or entry[0] is LOCKED else entry[2]


def auth_attempt_login(user, password):
    """USER/PASS (and AUTH PLAIN, LOGIN). Runs in a worker thread.

    One query, then one hash per cost class whatever the user: known,
    unknown, locked, plaintext or any hash method."""
    entry = lookup(user)
    check = costs
    given = password.encode("utf-8", "surrogateescape")
    if entry is None or entry[0] is LOCKED or not given:
        check.check(given)
        hmac.compare_digest(DUMMY_PLAIN, given)
        return None
    kind, secret, mailbox = entry
    if kind is HASH:
        return mailbox if check.check(given, secret) else None
    matched = hmac.compare_digest(secret, given)
    check.check(given)
    return mailbox if matched else None
