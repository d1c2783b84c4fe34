"""A throw-away PostgreSQL cluster for tests: initdb and pg_ctl from the
system's server package, run as an unprivileged user (PostgreSQL refuses
root; CI runs as root, so there the cluster belongs to `nobody`), serving
on a unix socket in a private temporary directory only, removed at the end.

    with Cluster() as pg:
        pg.sql("CREATE TABLE ...")
        pg.connection   # the libpq string mpop3's auth_postgresql uses
        pg.stop(); pg.start()
"""

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile

import psycopg


def server_bin(name):
    """The path of a PostgreSQL server program (Debian keeps them off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def available():
    return server_bin("initdb") is not None and server_bin("pg_ctl") is not None


class Cluster:
    PORT = 5432  # only names the socket file: nothing listens on TCP

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="mpop3-pg-")  # under /tmp: reachable by `nobody`
        self.data = os.path.join(self.root, "data")
        self.owner = None
        if os.geteuid() == 0:
            self.owner = pwd.getpwnam("nobody")
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        self.connection = f"host={self.root} port={self.PORT} dbname=postgres user=postgres"

    def run(self, *command, check=True):
        prefix = ["runuser", "-u", self.owner.pw_name, "--"] if self.owner else []
        return subprocess.run(
            prefix + list(command), capture_output=True, text=True, check=check, timeout=120, cwd=self.root
        )

    def __enter__(self):
        try:
            self.run(
                server_bin("initdb"),
                "-D",
                self.data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
                f.write(
                    f"listen_addresses = ''\nunix_socket_directories = '{self.root}'\nport = {self.PORT}\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 100\n"
                )
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self.stop()
        self.remove()

    def start(self):
        self.run(server_bin("pg_ctl"), "-D", self.data, "-l", os.path.join(self.root, "log"), "-w", "start")

    def stop(self):
        self.run(server_bin("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def is_up(self):
        try:
            self.sql("SELECT 1")
            return True
        except Exception:
            return False

    def sql(self, statement, params=None):
        """Run one statement as the superuser; the rows it returns, if any."""
        with psycopg.connect(self.connection, autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
