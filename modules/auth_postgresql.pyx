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
Each process opens its own pool the second time it looks a user up (never
before fork(), never shared across it); its first lookup goes through a
connection opened and closed for it, which is all a process of one
session needs. The pool replaces broken connections by itself (a restart,
pg_terminate_backend); the query is prepared once on each, and run
through libpq from C without the interpreter lock.

A setting that cannot work is a ModuleInitError naming the setting
(`error.setting`), which the loader reports at its `> setting` line.

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
import weakref

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

STATEMENT = b"mpop3_lookup"  # the query, prepared on each connection of the pool
BYTEA_OID = 17
RETRY = object()


def bytea(text):
    """A bytea column's text form (hex: \\x...) as bytes."""
    return bytes.fromhex(text[2:].decode("ascii")) if text.startswith(b"\\x") else text


class Settings:
    def __init__(self, values):
        self.connection = values.get("connection", "")
        self.query = values.get("query", DEFAULT_QUERY)
        self.default_scheme = values.get("default_scheme", "CRYPT").upper()
        self.pool_size = whole(values, "pool_size", min(8, os.cpu_count() or 1))
        self.connect_timeout = seconds(values, "connect_timeout", 5)
        self.query_timeout = seconds(values, "query_timeout", 5)
        if self.default_scheme not in SCHEMES:
            raise setting_error(
                "default_scheme",
                f"default_scheme {self.default_scheme!r} is not one of {', '.join(SCHEMES)}"
            )
        if self.pool_size < 1:
            raise setting_error("pool_size", "pool_size must be at least 1")
        numbers = {int(n) for n in PARAMETER.findall(self.query)}
        if numbers != {1}:
            raise setting_error(
                "query",
                f"query must use the user name as $1 and no other parameter: {self.query!r}"
            )
        import psycopg

        try:
            parsed = psycopg.conninfo.conninfo_to_dict(self.connection)
        except psycopg.Error as e:
            raise setting_error(
                "connection", f"connection {self.connection!r} does not parse: {first_line(e)}"
            ) from None
        parsed.setdefault("connect_timeout", max(1, round(self.connect_timeout)))
        # each process's connections say whose they are (pg_stat_activity)
        self.application_name = parsed.pop("application_name", None)
        self.conninfo = psycopg.conninfo.make_conninfo(**parsed)


def setting_error(name, message):
    """A ModuleInitError blaming setting `name`: the loader points at its
    `> name` line when the file has one (mpop3.loader.setting_where)."""
    error = ModuleInitError(message)
    error.setting = name
    return error


def whole(values, name, default):
    text = values.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise setting_error(name, f"{name} {text!r} is not a whole number")
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
        raise setting_error(name, f"{name} {text!r} is not a number of seconds (more than 0, at most 3600)")
    return value


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# The lookup itself goes to libpq from C, without the interpreter lock:
# psycopg's pure-Python pq (ctypes) spends more Python per query than a
# login's whole check. The functions are the very ones psycopg loaded
# (its ctypes library's addresses), so that both use one libpq; with
# psycopg's C implementations (their libpq may be a copy of their own)
# the lookup goes through psycopg's pgconn instead.
ctypedef void *(*exec_prepared_f)(void *, const char *, int, const char * const *, const int *, const int *,
                                  int) noexcept nogil
ctypedef int (*result_int_f)(const void *) noexcept nogil
ctypedef unsigned int (*ftype_f)(const void *, int) noexcept nogil
ctypedef char *(*getvalue_f)(const void *, int, int) noexcept nogil
ctypedef int (*cell_int_f)(const void *, int, int) noexcept nogil
ctypedef char *(*error_field_f)(const void *, int) noexcept nogil
ctypedef char *(*result_text_f)(const void *) noexcept nogil
ctypedef void (*clear_f)(void *) noexcept nogil

cdef struct libpq_functions:
    exec_prepared_f exec_prepared
    result_int_f result_status
    result_int_f ntuples
    result_int_f nfields
    ftype_f ftype
    getvalue_f getvalue
    cell_int_f getlength
    cell_int_f getisnull
    error_field_f error_field
    result_text_f error_message
    clear_f clear

cdef libpq_functions libpq
cdef bint libpq_found = False
cdef int PGRES_TUPLES_OK = 2
cdef int PG_DIAG_SQLSTATE = ord("C")
cdef const char *C_STATEMENT = b"mpop3_lookup"


cdef size_t address(lib, name) except 0:
    import ctypes

    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def find_libpq():
    """Whether the lookup can call psycopg's libpq from C (see above)."""
    global libpq_found
    from psycopg import pq

    if pq.__impl__ != "python":
        return False
    from psycopg.pq import _pq_ctypes

    lib = _pq_ctypes.pq
    libpq.exec_prepared = <exec_prepared_f>address(lib, "PQexecPrepared")
    libpq.result_status = <result_int_f>address(lib, "PQresultStatus")
    libpq.ntuples = <result_int_f>address(lib, "PQntuples")
    libpq.nfields = <result_int_f>address(lib, "PQnfields")
    libpq.ftype = <ftype_f>address(lib, "PQftype")
    libpq.getvalue = <getvalue_f>address(lib, "PQgetvalue")
    libpq.getlength = <cell_int_f>address(lib, "PQgetlength")
    libpq.getisnull = <cell_int_f>address(lib, "PQgetisnull")
    libpq.error_field = <error_field_f>address(lib, "PQresultErrorField")
    libpq.error_message = <result_text_f>address(lib, "PQresultErrorMessage")
    libpq.clear = <clear_f>address(lib, "PQclear")
    libpq_found = True
    return True


cdef object exec_lookup(pointer, bytes name):
    """The rows (at most two, tuples of str, bytes for bytea, or None) the
    prepared lookup gives for `name` on the PGconn at `pointer`, or
    (SQLSTATE or None, the error's first line) if it failed."""
    if pointer is None:
        return None, "connection closed"
    cdef void *conn = <void *><size_t>pointer
    cdef const char *value = name
    cdef int length = len(name)
    cdef void *result
    with nogil:
        result = libpq.exec_prepared(conn, C_STATEMENT, 1, &value, &length, NULL, 0)
    if result == NULL:
        return None, "no result (out of memory, or the connection is lost)"
    cdef int nrows, ncolumns, row, column
    cdef const char *field
    try:
        if libpq.result_status(result) != PGRES_TUPLES_OK:
            field = libpq.error_field(result, PG_DIAG_SQLSTATE)
            code = <bytes>field if field != NULL else None
            return code, error_line(<bytes>libpq.error_message(result))
        nrows = min(libpq.ntuples(result), 2)
        ncolumns = libpq.nfields(result)
        rows = []
        for row in range(nrows):
            values = []
            for column in range(ncolumns):
                if libpq.getisnull(result, row, column):
                    values.append(None)
                    continue
                text = libpq.getvalue(result, row, column)[: libpq.getlength(result, row, column)]
                if libpq.ftype(result, column) == BYTEA_OID:
                    values.append(bytea(text))
                else:
                    values.append(text.decode("utf-8", "surrogateescape"))
            rows.append(tuple(values))
        return rows
    finally:
        libpq.clear(result)


class Database:
    """The pool of this process, opened at its second lookup in the process.

    The first lookup of a process goes through a connection of its own,
    closed after it: a process of one session (a process per session,
    stdin mode) looks up once, and a pool there (its threads, a connection
    left for the process's exit to cut) cost 16 ms of a login where the
    connection alone costs 5."""

    def __init__(self, settings):
        self.settings = settings
        self.pool = None
        self.pid = None
        self.lock = threading.Lock()
        self.inherited = []  # pools from before a fork: never used, never closed (their sockets are the parent's)
        self.down = False  # last lookup failed for the database: logged once until it works again
        self.prepared = weakref.WeakSet()  # the libpq connections STATEMENT is prepared on
        self.looked_up_in = None  # the process that made its first lookup

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
                kwargs=self.connection_options(),
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
        conn.execute(self.statement_timeout())

    def rows(self, user):
        """At most two rows the query gives for `user`, as tuples of str
        (bytes for bytea) or None; StorageTempError if the database cannot
        answer."""
        if self.looked_up_in != os.getpid() and (self.pool is None or self.pid != os.getpid()):
            self.looked_up_in = os.getpid()
            return self.rows_once(user)
        return self.pooled_rows(user)

    def rows_once(self, user):
        """rows(), through a connection opened and closed for it: libpq's
        own blocking connect (psycopg.connect costs 1.6 ms more of Python)."""
        import psycopg
        from psycopg import pq

        conninfo = psycopg.conninfo.make_conninfo(self.settings.conninfo, **self.connection_options(False))
        pgconn = pq.PGconn.connect(conninfo.encode("utf-8"))
        try:
            if pgconn.status != pq.ConnStatus.OK:
                raise self.unavailable(error_line(pgconn.error_message))
            result = pgconn.exec_(self.statement_timeout().encode())
            if result.status == pq.ExecStatus.COMMAND_OK:
                result = pgconn.exec_params(self.settings.query.encode("utf-8"), [user.encode("utf-8")])
            if result.status != pq.ExecStatus.TUPLES_OK:
                # raises; the retries it may ask for are of prepared statements, not used here
                self.failed(pgconn, result.error_field(pq.DiagnosticField.SQLSTATE), server_error(result))
                raise self.unavailable(server_error(result))
            rows = result_rows(result)
        except psycopg.Error as e:
            raise self.unavailable(first_line(e))
        finally:
            pgconn.finish()
        self.answering()
        return rows

    def connection_options(self, autocommit=True):
        options = {"application_name": self.settings.application_name or f"mpop3 auth {os.getpid()}"}
        if autocommit:
            options["autocommit"] = True
        return options

    def statement_timeout(self):
        return f"SET statement_timeout = {max(1, int(self.settings.query_timeout * 1000))}"

    def answering(self):
        if self.down:
            self.down = False
            log.warning("PostgreSQL: answering again")

    def pooled_rows(self, user):
        """rows(), through this process's pool.

        One round trip on a connection of the pool: the query, prepared
        once per connection, executed through libpq itself (psycopg's
        pgconn) with the name as a text parameter. A cursor costs ~80 us of
        Python per lookup, which at 32 clients was half the login rate."""
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = self.connection_pool()
        name = user.encode("utf-8")
        for attempt in (1, 2):
            conn = None
            try:
                # getconn/putconn, not pool.connection(): its `with conn`
                # would commit, a wait on the socket, for nothing (autocommit)
                conn = pool.getconn()
                try:
                    result = self.execute(conn.pgconn, name)
                finally:
                    pool.putconn(conn)
                if result is RETRY:
                    if attempt == 1:
                        continue
                    raise self.unavailable("the prepared query keeps disappearing")
                self.answering()
                return result
            except PoolTimeout:
                raise self.unavailable(f"no connection within {self.settings.connect_timeout:g} s")
            except psycopg.OperationalError as e:
                if attempt == 1 and conn is not None and conn.broken:
                    # the server restarted or ended our connection: the
                    # others in the pool are likely gone too
                    pool.check()
                    continue
                raise self.unavailable(first_line(e))
            except psycopg.Error as e:
                raise self.unavailable(f"{type(e).__name__}: {first_line(e)}")

    def execute(self, pgconn, name):
        """The rows for `name` (bytes) on the libpq connection `pgconn`; RETRY
        if the connection broke or lost the prepared statement (once)."""
        from psycopg import pq

        if pgconn not in self.prepared:
            result = pgconn.prepare(STATEMENT, self.settings.query.encode("utf-8"))
            if result.status != pq.ExecStatus.COMMAND_OK:
                return self.failed(pgconn, result.error_field(pq.DiagnosticField.SQLSTATE), server_error(result))
            self.prepared.add(pgconn)
        if libpq_found:
            outcome = exec_lookup(pgconn.pgconn_ptr, name)
            if isinstance(outcome, list):
                return outcome
            return self.failed(pgconn, *outcome)
        result = pgconn.exec_prepared(STATEMENT, [name])
        if result.status != pq.ExecStatus.TUPLES_OK:
            return self.failed(pgconn, result.error_field(pq.DiagnosticField.SQLSTATE), server_error(result))
        return result_rows(result)

    def failed(self, pgconn, code, message):
        """A statement that did not work (its SQLSTATE and error message):
        RETRY, or raises (OperationalError for a broken connection, which
        rows() retries once; else the StorageTempError)."""
        import psycopg
        from psycopg import pq

        if pgconn.status != pq.ConnStatus.OK:
            self.prepared.discard(pgconn)
            raise psycopg.OperationalError(message or "connection lost")
        if code == b"26000":  # the prepared statement is gone (DISCARD ALL): prepare it again
            self.prepared.discard(pgconn)
            return RETRY
        if code == b"42P05":  # prepared already (a session a pooler hands over again)
            self.prepared.add(pgconn)
            return RETRY
        if code == b"57014":
            raise self.unavailable(f"the query took more than query_timeout ({self.settings.query_timeout:g} s)")
        raise self.unavailable(message)

    def unavailable(self, why):
        if not self.down:
            log.error("PostgreSQL: %s; logins answer [SYS/TEMP] until it works", why)
            self.down = True
        else:
            log.warning("PostgreSQL: %s", why)
        return StorageTempError(f"user database: {why}")


def result_rows(result):
    """The rows (at most two) of a psycopg PGresult, as exec_lookup gives them."""
    ncolumns = result.nfields
    binary = [result.ftype(column) == BYTEA_OID for column in range(ncolumns)]
    rows = []
    for row in range(min(result.ntuples, 2)):
        values = []
        for column in range(ncolumns):
            value = result.get_value(row, column)
            if value is not None:
                value = bytea(value) if binary[column] else value.decode("utf-8", "surrogateescape")
            values.append(value)
        rows.append(tuple(values))
    return rows


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
            raise setting_error("query", f"query {settings.query!r}: {server_error(result)}")
        described = pgconn.describe_prepared(b"mpop3_check")
        if described.status != pq.ExecStatus.COMMAND_OK:
            raise setting_error("query", f"query {settings.query!r}: {server_error(described)}")
        if described.nparams != 1:
            raise setting_error(
                "query", f"query {settings.query!r} takes {described.nparams} parameters, not one ($1)"
            )
        if described.nfields not in (1, 2):
            raise setting_error(
                "query",
                f"query {settings.query!r} returns {described.nfields} columns: it must return the password "
                "and, optionally, the mailbox"
            )
        for column, role in zip(range(described.nfields), ("password", "mailbox")):
            oid = described.ftype(column)
            found = conn.execute("SELECT typname, typcategory FROM pg_type WHERE oid = %s", [oid]).fetchone()
            name, category = found if found else (f"oid {oid}", None)
            if category != "S" and oid != BYTEA_OID:  # text, varchar, char, name, citext, ...: strings
                raise setting_error(
                    "query",
                    f"query {settings.query!r}: column {column + 1} ({described.fname(column).decode()}) is "
                    f"of type {name}: the {role} must be text",
                )
    finally:
        conn.close()


def server_error(result):
    """The first line of a server's error, without its "ERROR:" label."""
    return error_line(result.error_message)


def error_line(message):
    text = message.decode("utf-8", "replace").strip()
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
    find_libpq()
    import psycopg_pool  # noqa: F401  (imported once, before any fork, not in each process)
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
