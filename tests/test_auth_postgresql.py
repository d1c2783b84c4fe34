"""auth_postgresql against a real PostgreSQL (a throw-away cluster made by
initdb and pg_ctl, postgres_helpers.Cluster): every password scheme over
TCP, the mailbox column, bound parameters, the database going away and
coming back, slow queries, equal costs, one pool per process."""

import base64
import logging
import os
import re
import subprocess
import threading
import time

import pytest
from conftest import run_mpop3
from pop_server import FAST, TREE, EmptyStorage, Spawned, Wire, served_as_safe_user, wait_for
from postgres_helpers import Cluster
from test_auth_file import CLEARTEXT, EVERY_WAY, NO_FAIL_DELAY, failures_cost_alike, logins

from mpop3 import config, loader
from mpop3.passwords import crypt

# a throwaway cluster (initdb, pg_ctl, as an unprivileged user: .ci/run installs the server)
pytestmark = [pytest.mark.root, pytest.mark.slow]

SHA512 = crypt(b"sha512-pw", b"$6$saltsalt$").decode()
SHA256 = crypt(b"sha256-pw", b"$5$saltsalt$").decode()
BLF = crypt(b"blf-pw", b"$2b$04$abcdefghijklmnopqrstuu").decode()
MD5 = crypt(b"md5-pw", b"$1$saltsalt$").decode()
YESCRYPT = crypt(b"yes-pw", b"$y$j9T$abcdefghijklmnop$").decode()

# user, stored password, mailbox, the password, the ways it logs in
USERS = [
    ("plain", "{PLAIN}plain-pw", None, "plain-pw", EVERY_WAY),
    ("cleartext", "{cleartext}clear-pw", "clearbox", "clear-pw", EVERY_WAY),
    ("sha512", "{SHA512-CRYPT}" + SHA512, None, "sha512-pw", CLEARTEXT),
    ("sha256", "{SHA256-CRYPT}" + SHA256, None, "sha256-pw", CLEARTEXT),
    ("blf", "{BLF-CRYPT}" + BLF, None, "blf-pw", CLEARTEXT),
    ("md5", "{MD5-CRYPT}" + MD5, None, "md5-pw", CLEARTEXT),
    ("crypt", "{CRYPT}" + YESCRYPT, "cryptbox", "yes-pw", CLEARTEXT),
    ("yes", YESCRYPT, None, "yes-pw", CLEARTEXT),  # no prefix: default_scheme CRYPT
    ("o'brien", "{PLAIN}quote-pw", "obrien", "quote-pw", EVERY_WAY),
    ("100%", "{PLAIN}percent-pw", "percent", "percent-pw", EVERY_WAY),
]
# entries nobody logs in with, and what is logged of them
LOCKED = [
    ("ssha", "{SSHA}abcdefgh", "password scheme {SSHA}"),
    ("argon", "{ARGON2ID}$argon2id$v=19$m=65536,t=2,p=1$c29tZQ$abc", "password scheme {ARGON2ID}"),
    ("mismatch", "{SHA512-CRYPT}" + YESCRYPT, r"must start with \$6\$"),
    ("truncated", "{CRYPT}" + SHA512[:30], "not a hash libcrypt can check"),
    ("unprefixed", "plain-looking", r"not a crypt\(3\) hash.*\{PLAIN\}"),
    ("empty", "{PLAIN}", "empty password"),
    ("twice", "{PLAIN}twice-pw", "more than one row"),
]

SCHEMA = """
CREATE TABLE users (username text NOT NULL, password text, mailbox text);
CREATE TABLE asked (name text);
-- a lookup that records every name the database is asked about
CREATE FUNCTION lookup(wanted text) RETURNS TABLE (password text, mailbox text) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO asked VALUES (wanted);
    RETURN QUERY SELECT u.password, u.mailbox FROM users u WHERE u.username = wanted;
END $$;
CREATE FUNCTION slow_lookup(wanted text) RETURNS TABLE (password text, mailbox text) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(3);
    RETURN QUERY SELECT u.password, u.mailbox FROM users u WHERE u.username = wanted;
END $$;
"""


@pytest.fixture(scope="module")
def pg():
    with Cluster() as cluster:
        cluster.sql(SCHEMA)
        for user, stored, mailbox, _, _ in USERS:
            cluster.sql("INSERT INTO users VALUES (%s, %s, %s)", (user, stored, mailbox))
        for user, stored, _ in LOCKED:
            cluster.sql("INSERT INTO users VALUES (%s, %s, NULL)", (user, stored))
        cluster.sql("INSERT INTO users VALUES ('twice', '{PLAIN}other-pw', NULL), ('nopassword', NULL, NULL)")
        yield cluster


@pytest.fixture
def running(pg):
    """The cluster up at the start and at the end of the test."""
    if not pg.is_up():
        pg.start()
    yield pg
    if not pg.is_up():
        pg.start()


def conf_text(pg, **settings):
    settings = {"connection": pg.connection, **settings}
    lines = [f"module_dir {TREE}/modules", "auth_module auth_postgresql"]
    lines += [f"> {name} {value}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def load(pg, **settings):
    tables = loader.load_modules(config.parse(conf_text(pg, **settings), "test.conf"))
    storage = EmptyStorage()
    return loader.Tables(tables.auth, storage, tables.modules), storage


def module():
    path = config.resolve_module_file("auth_postgresql", config.DIRECTIVES["module_dir"].default)
    return loader.import_module_file(path, "t")


# --- schemes, mailboxes, names ------------------------------------------------------------


def test_every_scheme_logs_in_by_the_ways_it_can_and_wrong_passwords_fail(running, server_thread):
    tables, storage = load(running)
    server = server_thread(tables)
    for user, _, mailbox, password, ways in USERS:
        assert logins(server.port, user, password) == ways, user
        assert logins(server.port, user, password + "x") == set(), user
        assert storage.opened[-1] == (mailbox or user), user
    assert logins(server.port, "nobody", "x") == set()


def test_locked_entries_never_log_in_and_are_logged_once(running, server_thread, caplog):
    caplog.set_level(logging.WARNING, logger="mpop3.auth")
    tables, _ = load(running)
    server = server_thread(tables)
    for user, stored, why in LOCKED:
        candidates = {stored, stored.partition("}")[2], "twice-pw", "other-pw", ""}
        for password in candidates - {""}:
            assert logins(server.port, user, password) == set(), (user, password)
        lines = [r for r in caplog.records if f"user {user!r}" in r.getMessage()]
        assert len(lines) == 1, (user, [r.getMessage() for r in lines])
        assert re.search(why, lines[0].getMessage()), lines[0].getMessage()
    assert logins(server.port, "nopassword", "x") == set()


def test_a_one_column_query_logs_in_to_the_mailbox_named_like_the_user(running):
    tables, _ = load(running, query="SELECT password FROM users WHERE username = $1")
    for _ in range(3):  # a connection of its own, then the pool's, prepared, then prepared already
        assert tables.auth.auth_attempt_login("cleartext", "clear-pw") == "cleartext"


def test_string_columns_of_any_kind_and_bytea(running):
    """A varchar mailbox, and a bytea password (its hex text form read back
    as bytes), are read as text columns are."""
    query = "SELECT convert_to(password, 'UTF8'), mailbox::varchar(40) FROM users WHERE username = $1"
    tables, _ = load(running, query=query)
    for _ in range(2):  # a connection of its own, then the pool's
        assert tables.auth.auth_attempt_login("cleartext", "clear-pw") == "clearbox"
        assert tables.auth.auth_attempt_login("sha512", "sha512-pw") == "sha512"
        assert tables.auth.auth_attempt_login("sha512", "sha512-px") is None


def test_an_unsafe_mailbox_name_is_refused(running, server_thread):
    running.sql("INSERT INTO users VALUES ('escaper', '{PLAIN}esc-pw', '../root')")
    try:
        tables, storage = load(running)
        server = server_thread(tables)
        wire = Wire(server.port)
        wire.cmd("USER escaper")
        assert wire.cmd("PASS esc-pw").startswith(b"-ERR")
        assert storage.opened == []
    finally:
        running.sql("DELETE FROM users WHERE username = 'escaper'")


def test_names_are_bound_parameters_and_impossible_names_never_reach_the_database(running, server_thread):
    """Through a query that records what it is asked: SQL-shaped names are
    looked up as names (and are nobody); names with NUL or other control
    characters, or bytes that are not UTF-8, are not sent at all."""
    tables, _ = load(running, query="SELECT password, mailbox FROM lookup($1)")
    server = server_thread(tables)
    running.sql("DELETE FROM asked")
    shaped = ["x' OR '1'='1", "'; DROP TABLE users; --", "%", "%s", "$1", "plain'--", "plain' OR ''='"]
    for name in shaped:
        wire = Wire(server.port)
        plain = base64.b64encode(b"\0" + name.encode() + b"\0plain-pw")
        assert wire.cmd(b"AUTH PLAIN " + plain).startswith(b"-ERR [AUTH]"), name
        if " " not in name:
            assert logins(server.port, name, "plain-pw") == set(), name
    assert logins(server.port, "o'brien", "quote-pw") == EVERY_WAY
    auth = tables.auth
    for name in ("nul\0plain", "tab\tx", "bad\udcffbytes", "x" * 300):
        assert auth.auth_attempt_login(name, "plain-pw") is None
        assert auth.auth_password(name) is None
    asked = {name for (name,) in running.sql("SELECT name FROM asked")}
    assert asked == set(shaped) | {"o'brien"}, asked
    assert running.sql("SELECT count(*) FROM users WHERE username = 'plain'") == [(1,)]


# --- the database away, slow, restarted ------------------------------------------------------


def test_the_database_down_is_a_temporary_failure_without_penalty_and_it_comes_back(running, server_thread):
    """Stopped in the middle of a run: [SYS/TEMP], no failed-login delay
    (the penalty does not grow, the session is not closed after
    max_login_failures), then logins work again once it is back, without
    restarting mpop3; and again after pg_terminate_backend ends the
    pool's connections."""
    tables, _ = load(running, connect_timeout="1")
    delays = {"login_fail_delay": "0.5", "login_fail_delay_max": "4", "max_login_failures": "3"}
    server = server_thread(tables, delays)
    wire = Wire(server.port)
    wire.login("plain", "plain-pw")
    running.stop()
    wire = Wire(server.port)
    for _ in range(5):  # more than max_login_failures
        assert wire.cmd("USER sha512").startswith(b"+OK")
        start = time.monotonic()
        assert wire.cmd("PASS sha512-pw").startswith(b"-ERR [SYS/TEMP]")
        assert time.monotonic() - start < 1.5  # connect_timeout at most, not a growing delay
    running.start()

    def back():
        """a login once the database is back"""
        reply = wire.cmd("PASS sha512-pw") if wire.cmd("USER sha512").startswith(b"+OK") else b""
        return reply.startswith(b"+OK")

    start = time.monotonic()
    wait_for(back, seconds=15, interval=0.2)
    print(f"logins again {time.monotonic() - start:.2f} s after the database started")
    # no penalty was counted: a good login answers at once
    start = time.monotonic()
    Wire(server.port).login("sha256", "sha256-pw")
    assert time.monotonic() - start < 0.4
    # the pool's connections killed under it: the next login still works
    ended = running.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'mpop3 auth %'"
    )
    assert ended, "no connection of the pool was found"
    for user, _, _, password, _ in USERS[:4]:
        Wire(server.port).login(user, password)


def test_a_query_slower_than_query_timeout_is_a_temporary_failure(running, server_thread):
    tables, _ = load(running, query="SELECT password, mailbox FROM slow_lookup($1)", query_timeout="0.3")
    server = server_thread(tables)
    wire = Wire(server.port)
    wire.cmd("USER plain")
    start = time.monotonic()
    assert wire.cmd("PASS plain-pw").startswith(b"-ERR [SYS/TEMP]")
    assert time.monotonic() - start < 2
    # and the connection is usable again afterwards
    tables, _ = load(running)
    assert tables.auth.auth_attempt_login("plain", "plain-pw") == "plain"


# --- configuration ----------------------------------------------------------------------------


def check_config(tmp_path, text, start=False):
    """`mpop3 --check-config` on `text`, or with start=True a real start-up
    (which, for a bad configuration, ends before listening)."""
    path = tmp_path / "mpop3.conf"
    path.write_text(text)
    return run_mpop3(*(() if start else ("--check-config",)), "-c", str(path)), path


BAD_SETTINGS = [
    ({"connection": "host=/tmp dbname='unterminated"}, r"connection .* does not parse"),
    ({"connection": "nosuchkey=1"}, r"connection .* does not parse"),
    ({"query": "SELECT password FROM users WHERE username = 'x'"}, r"\$1"),
    ({"query": "SELECT password FROM users WHERE username = $1 AND mailbox = $2"}, r"\$1"),
    ({"query": "SELECT password, mailbox, username FROM users WHERE username = $1"}, r"returns 3 columns"),
    ({"query": "SELECT length(password) FROM users WHERE username = $1"}, r"type int4: the password must be text"),
    ({"query": "SELECT password, 7 FROM users WHERE username = $1"}, r"type int4: the mailbox must be text"),
    ({"query": "SELECT password FROM no_such_table WHERE username = $1"}, r"no_such_table"),
    ({"query": "SELEC password FROM users WHERE username = $1"}, r"syntax error"),
    ({"default_scheme": "SSHA"}, r"default_scheme"),
    ({"pool_size": "0"}, r"pool_size"),
    ({"query_timeout": "soon"}, r"query_timeout"),
]


def setting_line(text, name):
    """The line number of `> name` in a configuration text."""
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(f"> {name} "))


@pytest.mark.parametrize("settings, error", BAD_SETTINGS)
def test_bad_settings_are_one_line_naming_the_setting_line(running, tmp_path, settings, error):
    """From --check-config and from a real start-up alike: one line, at the
    `> setting` line the module blames."""
    text = conf_text(running, **settings)
    (name,) = settings
    for start in (False, True):
        result, path = check_config(tmp_path, text, start)
        assert result.returncode == 2, (start, result.stderr)
        lines = result.stderr.strip().splitlines()
        where = f"{re.escape(str(path))}:{setting_line(text, name)}"
        assert len(lines) == 1 and re.match(rf"{where}: .*{error}", lines[0]), (start, result.stderr)


def test_the_default_query_without_its_table_names_the_module_line(running, tmp_path):
    """No `> query` line to point at: the error is at the auth_module line."""
    text = conf_text(running).replace("dbname=postgres", "dbname=postgres options='-c search_path=nowhere'")
    result, path = check_config(tmp_path, text)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"{re.escape(str(path))}:2: .*\"users\" does not exist", lines[0]), lines


def test_an_unreachable_database_at_start_up_is_logged_not_fatal(tmp_path):
    text = f"module_dir {TREE}/modules\nauth_module auth_postgresql\n"
    text += f"> connection host={tmp_path} port=1 dbname=x connect_timeout=1\n"
    result, _ = check_config(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert "cannot connect at start-up" in result.stderr


def test_every_setting_is_documented():
    with open(os.path.join(TREE, "README.md")) as f:
        readme = f.read()
    for setting in module().MPOP3_SETTINGS:
        assert re.search(rf"^\| `auth_postgresql` \| `{setting}` \|", readme, re.M), setting


# --- processes and cost ----------------------------------------------------------------------


def test_pools_are_opened_in_each_serving_process_not_before_fork(running, tmp_path):
    """Loading the module (in the parent) leaves no connection open; two
    server processes each open their own pool when they first look up."""
    spool = tmp_path / "spool"
    spool.mkdir()
    served_as_safe_user(spool)
    text = conf_text(running)
    text += f"storage_module storage_mbox\n> storage_dir {spool}\n> mailbox_user any\nprocesses 2\n"
    text += "".join(f"{name} {value}\n" for name, value in FAST.items())
    path = tmp_path / "mpop3.conf"
    path.write_text(text)
    names = "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'mpop3%'"
    with Spawned(str(path)) as server:

        def two_children():
            """both server processes started (the parent listens before it forks them)"""
            found = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True)
            return len(found.stdout.split()) == 2 and found.stdout.split()

        children = wait_for(two_children, seconds=10)
        ours = {f"mpop3 auth {pid}" for pid in [*children, server.proc.pid]}

        def pools():
            return {name for (name,) in running.sql(names)} & ours

        assert pools() == set()

        def both():
            """a pool in each of the two server processes, none in their parent"""
            Wire(server.port).login("plain", "plain-pw")
            return pools() == {f"mpop3 auth {pid}" for pid in children}

        wait_for(both, seconds=15, interval=0.05)


def test_the_first_lookup_of_a_process_opens_no_pool(running):
    """A process of one session looks up once: that lookup connects, asks
    and closes (no pool, no pool threads, no connection left for the
    process's exit to cut); the second lookup of a process opens its pool.
    A database down at the first lookup is [SYS/TEMP] there too."""
    from mpop3.errors import StorageTempError

    named = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    ours = f"mpop3 auth {os.getpid()}"
    tables, _ = load(running, connect_timeout="1")
    wait_for(lambda: running.sql(named, (ours,)) == [(0,)], seconds=5)  # earlier tests' pools are closed
    threads = threading.active_count()
    assert tables.auth.auth_attempt_login("plain", "plain-pw") == "plain"
    assert threading.active_count() == threads
    wait_for(lambda: running.sql(named, (ours,)) == [(0,)], seconds=5)
    assert tables.auth.auth_attempt_login("sha512", "sha512-pw") == "sha512"
    assert running.sql(named, (ours,))[0][0] >= 1  # the pool's (it may have grown to two at once)
    assert threading.active_count() > threads
    running.stop()
    tables, _ = load(running, connect_timeout="1")
    with pytest.raises(StorageTempError):
        tables.auth.auth_attempt_login("plain", "plain-pw")
    running.start()
    assert tables.auth.auth_attempt_login("plain", "plain-pw") == "plain"


@pytest.mark.slow
def test_an_unknown_user_costs_what_a_known_one_costs(running, server_thread):
    """A wrong password for an unknown user, a plaintext one and two hash
    methods take the same time (median within 10%): one query, one hash
    per class seen. Each class is seen once first (what a process learns)."""
    tables, _ = load(running)
    server = server_thread(tables, NO_FAIL_DELAY)
    for user, password in (("sha512", "sha512-pw"), ("yes", "yes-pw")):
        Wire(server.port).login(user, password)
    medians = failures_cost_alike(server.port, ["nobody", "plain", "sha512", "yes", "ssha"])
    assert medians["nobody"] > 0.005, medians  # the hashes' cost, not only a query's
