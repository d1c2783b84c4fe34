"""storage_maildir's `session_lock postgresql` (issue 15): one [IN-USE]
across servers sharing Maildirs, through an advisory lock in a real
PostgreSQL; gone with a server killed holding it; checked before QUIT
commits; the database down is [SYS/TEMP], back is service without a
restart."""

import os
import signal
import time

import pytest
from pop_server import Spawned, Wire, wait_for
from postgres_helpers import Cluster
from test_storage_maildir import MESSAGES, MODULE_PATH, Site

from mpop3.errors import ModuleInitError
from mpop3.loader import import_module_file


@pytest.fixture(scope="module")
def pg():
    with Cluster() as cluster:
        yield cluster


@pytest.fixture
def nodes(pg, tmp_path):
    """Two servers on one Maildir tree, the lock in `pg`."""
    site = Site(tmp_path, {"session_lock": "postgresql", "session_lock_connection": pg.connection})
    with Spawned(str(site.conf)) as a, Spawned(str(site.conf)) as b:
        site.nodes = (a, b)
        yield site
    if not pg.is_up():
        pg.start()


def log_in(port, user="u1"):
    w = Wire(port)
    w.cmd(f"USER {user}")
    return w, w.cmd("PASS pw")


@pytest.mark.slow  # PostgreSQL and servers in subprocesses
def test_one_session_across_two_servers(nodes):
    nodes.maildir("u1", MESSAGES[:2])
    a, b = nodes.nodes
    first, reply = log_in(a.port)
    assert reply.startswith(b"+OK maildrop has 2 messages")
    start = time.monotonic()
    _, reply = log_in(b.port)
    assert reply.startswith(b"-ERR [IN-USE]")
    assert 0.8 < time.monotonic() - start < 3  # it waited for a session that might be ending
    first.cmd("QUIT")
    _, reply = log_in(b.port)
    assert reply.startswith(b"+OK")  # at once: the lock went with the session


@pytest.mark.slow  # PostgreSQL and servers in subprocesses
def test_a_lock_connection_serves_one_session_at_a_time_and_then_the_next(nodes, pg):
    """Sequential sessions of a server take one connection in turn (no new
    backend per login); each end's unlock is through before the other
    server's login, at once."""
    nodes.maildir("u5", MESSAGES[:1])
    a, b = nodes.nodes
    for _ in range(5):
        w, reply = log_in(a.port, "u5")
        assert reply.startswith(b"+OK")
        w.cmd("QUIT")
        start = time.monotonic()
        x, reply = log_in(b.port, "u5")
        assert reply.startswith(b"+OK") and time.monotonic() - start < 0.5
        x.cmd("QUIT")
    names = pg.sql("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'mpop3 lock %%'")
    # ten logins, and a connection at most per server process (each server has two: processes auto)
    assert len(names) == len(set(names)) <= 4


@pytest.mark.slow  # PostgreSQL and servers in subprocesses
def test_a_server_killed_holding_the_lock_frees_it_at_once(nodes):
    nodes.maildir("u2", MESSAGES[:1])
    a, b = nodes.nodes
    _, reply = log_in(a.port, "u2")
    assert reply.startswith(b"+OK")
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    start = time.monotonic()
    _, reply = log_in(b.port, "u2")
    assert reply.startswith(b"+OK") and time.monotonic() - start < 2


@pytest.mark.slow  # PostgreSQL and servers in subprocesses
def test_a_lost_lock_commits_nothing(nodes, pg):
    md = nodes.maildir("u3", MESSAGES[:2])
    a, _ = nodes.nodes
    w, reply = log_in(a.port, "u3")
    assert reply.startswith(b"+OK")
    assert w.cmd("DELE 1").startswith(b"+OK")
    # the database restarts, say: our lock's backend is gone
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'")
    assert w.cmd("QUIT").startswith(b"-ERR [SYS/TEMP]")
    assert len(os.listdir(md / "new")) == 2  # nothing deleted


@pytest.mark.slow  # PostgreSQL and servers in subprocesses
def test_the_database_down_is_temporary_and_back_is_service(nodes, pg):
    nodes.maildir("u4", MESSAGES[:1])
    a, _ = nodes.nodes
    pg.stop()
    _, reply = log_in(a.port, "u4")
    assert reply.startswith(b"-ERR [SYS/TEMP]")
    pg.start()
    wait_for(lambda: log_in(a.port, "u4")[1].startswith(b"+OK"), seconds=10, what="a login once the database is back")


@pytest.mark.parametrize(
    "settings, problem",
    [
        ({"session_lock": "postgresql"}, "needs session_lock_connection"),
        ({"session_lock_connection": "host=/tmp"}, "is for session_lock postgresql"),
        ({"session_lock": "redis"}, "neither 'file' nor 'postgresql'"),
    ],
)
def test_settings_that_cannot_work_stop_the_start(settings, problem):
    module = import_module_file(MODULE_PATH, "t")
    with pytest.raises(ModuleInitError, match=problem):
        module.module_init({"mail_location": "/srv/%u/Maildir", **settings})
