"""auth_postgresql against auth_file (issue 14, "Speed"): logins/s at 32
clients (bench/loadgen: connect, USER, PASS, STAT, QUIT, a user per
client) for {PLAIN} users and for {SHA512-CRYPT} users, the same 32 users
with the same passwords in a password file and in a table of a throw-away
PostgreSQL cluster (tests/postgres_helpers.Cluster, on a unix socket),
same run, printed as ratios. The target: {PLAIN} >= 0.7x auth_file.

Each (module, scheme) is a server of its own (no storage module: every
mailbox empty, so that the figure is the login's), since
every login costs one hash per method a server has seen (equal cost):
one server for both schemes would hash SHA-512 for {PLAIN} users too.
max_login_attempts_per_ip is raised to 32 on all of them: the load comes
from one address, a site's from many. The rounds alternate between the
servers; the median of ROUNDS is reported, with the server's and the
database's CPU per login. Two process models: `processes auto` (the
default, a process per CPU), where the target is checked, and
`processes 1`, shown: there the loop waits for each lookup's round trip
(the worker hand-off, mpop3/server/workers.py), and on a small machine
PostgreSQL's backends share the CPUs with the server and the load."""

import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TREE, "tests"))
from postgres_helpers import Cluster, available  # noqa: E402
from test_load import LOADGEN, cpu_seconds, loadgen, start_mpop3  # noqa: E402

from mpop3.passwords import crypt  # noqa: E402

CLIENTS = 32
SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PASSWORD = "pw"
TARGET = 0.7  # {PLAIN} in PostgreSQL / the same users in a file

pytestmark = [
    pytest.mark.skipif(not available(), reason="PostgreSQL's server package (initdb, pg_ctl) is missing"),
    pytest.mark.skipif(not os.path.exists(LOADGEN), reason="bench/loadgen is not built (make bench/loadgen)"),
]


def sha512(i):
    return crypt(PASSWORD.encode(), f"$6$bench{i:04d}$".encode()).decode()


def users(scheme):
    """(name, password as auth_file writes it, as the table stores it) of
    the CLIENTS users of a scheme; loadgen logs in as {scheme}%d."""
    for i in range(CLIENTS):
        if scheme == "plain":
            yield f"plain{i}", f"{{PLAIN}}{PASSWORD}", f"{{PLAIN}}{PASSWORD}"
        else:
            hashed = sha512(i)
            yield f"sha{i}", f"{{CRYPT}}{hashed}", f"{{SHA512-CRYPT}}{hashed}"


def postmaster(pg):
    with open(os.path.join(pg.data, "postmaster.pid")) as f:
        return int(f.readline())


@pytest.fixture(scope="module", params=["1", "auto"], ids=["processes 1", "processes auto"])
def servers(request):
    # readable by safe_user, whom the server becomes after bind (as root)
    root = pathlib.Path(tempfile.mkdtemp(prefix="mpop3-bench-auth-"))
    os.chmod(root, 0o755)
    with Cluster() as pg:
        pg.sql("CREATE TABLE users (username text PRIMARY KEY, password text, mailbox text)")
        procs = {}
        try:
            common = f"processes {request.param}\nmax_login_attempts_per_ip 32\n"
            for scheme in ("plain", "sha"):
                passwd = root / f"passwd-{scheme}"
                passwd.write_text("".join(f"{name}:{stored}\n" for name, stored, _ in users(scheme)))
                os.chmod(passwd, 0o644)
                for name, _, stored in users(scheme):
                    pg.sql("INSERT INTO users VALUES (%s, %s, NULL)", (name, stored))
                procs["file", scheme] = start_mpop3(root, common + f"auth_module auth_file\n> passwd_file {passwd}\n")
                procs["postgresql", scheme] = start_mpop3(
                    root, common + f"auth_module auth_postgresql\n> connection {pg.connection}\n"
                )
            yield procs, pg, request.param
        finally:
            for proc, _ in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(root, ignore_errors=True)


def run(procs, pg, module, scheme):
    proc, port = procs[module, scheme]
    database = postmaster(pg)
    before, db_before = cpu_seconds(proc.pid), cpu_seconds(database)
    r = loadgen("login", port, CLIENTS, SECONDS, f"{scheme}%d")
    assert r["errors"] == 0, (module, scheme, r)
    rate = r["sessions"] / r["seconds"]
    server_us = 1e6 * (cpu_seconds(proc.pid) - before) / r["sessions"]
    db_us = 1e6 * (cpu_seconds(database) - db_before) / r["sessions"]
    time.sleep(0.2)  # the sessions loadgen hung up on end before the next run
    return rate, server_us, db_us


def test_postgresql_logins_against_auth_file(servers, report, capsys):
    procs, pg, processes = servers
    for key in procs:  # each server opens its pool, learns its hash classes
        run(procs, pg, *key)
    results = {key: [] for key in procs}
    for _ in range(ROUNDS):
        for key in procs:
            results[key].append(run(procs, pg, *key))
    ratios = {}
    for scheme, label in (("plain", "{PLAIN}"), ("sha", "{SHA512-CRYPT}")):
        file_rate, file_cpu, _ = (statistics.median(x) for x in zip(*results["file", scheme], strict=True))
        pg_rate, pg_cpu, db_cpu = (statistics.median(x) for x in zip(*results["postgresql", scheme], strict=True))
        ratios[scheme] = pg_rate / file_rate
        line = (
            f"auth_postgresql {pg_rate:5.0f} logins/s, auth_file {file_rate:5.0f}/s, ratio {ratios[scheme]:.2f}; "
            f"server CPU per login {pg_cpu:.0f} / {file_cpu:.0f} us, PostgreSQL {db_cpu:.0f} us"
        )
        what = f"auth {label} users, {CLIENTS} clients, processes {processes}"
        report(what, line)
        with capsys.disabled():
            print(f"\n{what}: {line}")
    if processes == "auto":
        assert ratios["plain"] >= TARGET, ratios
