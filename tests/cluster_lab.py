"""A cluster on one machine (issue 15): what tests/test_cluster.py and
bench/bench_cluster.py run against, built from the parts a site would use.

    with Lab() as lab:
        lab.add_user("alice", "pw")                 # a row in PostgreSQL, a Maildir on disk
        lab.deliver("alice", message)               # procmail (or mda="getmail": getmail_maildir)
        wire = lab.connect()                        # a POP3 client through HAProxy
        lab.kill_node(1); lab.restart_node(1)       # kill -9 of a node's whole process tree
        lab.stop_database(); lab.start_database()

- PostgreSQL: a throw-away cluster (postgres_helpers.Cluster, on a unix
  socket in /tmp) with the `users` table auth_postgresql reads (`{PLAIN}`
  or `{SHA512-CRYPT}` passwords, a mailbox column) and a role `mpop3` that
  may only read it; the nodes' advisory session locks live there too.
- One Maildir tree that every node serves: ROOT/mail/MAILBOX/Maildir.
  The nodes run the shared model (`mailbox_user any`, as root: the whole
  server becomes `safe_user` after bind) and every Maildir belongs to
  `nobody`, the one virtual mail user, as on a site whose users live in a
  database and have no system accounts (Dovecot's `vmail`). Per-user
  ownership would need a system account per row of the table, which is
  what a database of users is there to avoid; the processes-by-role model
  would serve them as one uid anyway (one mail process for all virtual
  users). The MDAs deliver as `nobody` too.
- Three nodes: `python -m mpop3 -c nodeN.conf` on 127.0.0.11, .12, .13,
  each with a `listen_proxy` port (HAProxy's) and a plain `listen` port
  on the same address (direct access for the tests: the health of one
  node, whatever HAProxy thinks), auth_postgresql, storage_maildir with
  `session_lock postgresql`, one server process, no control socket. Each
  runs in a process group of its own, logging to ROOT/nodeN.log.
- HAProxy: `mode tcp`, `balance leastconn`, a health check that reads the
  greeting through a PROXY header (`check-send-proxy`) and says QUIT,
  `send-proxy-v2` to the nodes, a dead node marked down within `inter`
  (200 ms here; its sessions then closed: `on-marked-down
  shutdown-sessions`), and meanwhile a connection that a dead node refuses
  retried on another (`option redispatch 1`). Not `observe layer4` with
  `on-error mark-down`: the refused connection itself counts as one of the
  marked-down node's sessions and is closed instead of redispatched.
  Its frontend is 127.0.0.1:`lab.port`; its stats socket is ROOT/haproxy.sock.

Everything the lab starts is stopped when it ends, however it ends; the
last thing __exit__ does is look through /proc and fail if any of it is
still there. While a lab runs, this process is a child subreaper
(PR_SET_CHILD_SUBREAPER), so that the processes of a node killed with
kill -9, and the postmaster pg_ctl leaves behind, come back to it to be
reaped instead of staying zombies of an init that does not reap them.
"""

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from pop_server import TREE, Wire, wait_for
from postgres_helpers import Cluster
from process_limits import cpu_seconds

from mpop3.passwords import crypt
from mpop3.server import privs

NODE_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
HAPROXY_ADDRESS = "127.0.0.1"
SAFE_USER = "nobody"
PR_SET_CHILD_SUBREAPER = 36
LIBC = ctypes.CDLL(None, use_errno=True)

SCHEMA = """
CREATE TABLE users (
    username text PRIMARY KEY,
    password text,              -- '{SHA512-CRYPT}$6$...', '{PLAIN}secret'
    mailbox  text               -- NULL: the user name
);
CREATE ROLE mpop3 LOGIN;
GRANT SELECT ON users TO mpop3;
"""

# what every node runs with, apart from its addresses (see docs/cluster.md)
NODE_SETTINGS = {
    "processes": "1",
    "login_user": "none",  # the shared model: mailbox_user any, as safe_user after bind
    "safe_user": SAFE_USER,
    "control_socket": "none",
    "log_level": "info",
    "plaintext_auth": "yes",  # no TLS in the lab; a site terminates it at HAProxy (send-proxy-v2-ssl)
    "proxy_trusted_networks": HAPROXY_ADDRESS,
    "proxy_timeout": "3",
    "shutdown_grace": "1",
    "login_fail_delay": "0.01",
    "login_fail_delay_max": "0.04",
    # every client of the lab comes from 127.0.0.1
    "max_sessions_per_ip": "1000",
    "max_login_attempts_per_ip": "64",
    "max_sessions": "5000",
}


class Node:
    def __init__(self, number, address, conf, log):
        self.number = number  # 1, 2, 3
        self.address = address
        self.conf = conf
        self.log_path = log
        self.proc = None
        self.starts = 0

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


class Lab:
    def __init__(self, nodes=3, check_interval="200ms", node_settings=None, session_lock="postgresql"):
        self.node_count = nodes
        self.session_lock = session_lock
        self.check_interval = check_interval
        self.node_settings = {**NODE_SETTINGS, **(node_settings or {})}
        self.stack = contextlib.ExitStack()
        self.nodes = []
        self.haproxy = None
        self.pg = None
        self.root = None
        self.users = {}  # user -> (password, mailbox)
        self.owner = pwd.getpwnam(SAFE_USER) if os.geteuid() == 0 else None
        self.groups = set()  # process groups of everything started (nodes, HAProxy)
        self.reap = set()  # pids that may come back to us as orphans (a killed node's children, postmasters)

    # ---- start and stop the whole lab -------------------------------------------------------

    def __enter__(self):
        try:
            self._subreaper(True)
            if self.owner:  # the nodes run Python as nobody once they have bound (tests/conftest.py does the same)
                privs.open_way_to_python()
            self.root = tempfile.mkdtemp(prefix="mpop3-lab-")
            os.chmod(self.root, 0o755)  # the nodes (nobody) read their files; the MDAs' rc files are here
            if not os.environ.get("MPOP3_LAB_KEEP"):  # set: the directory stays, logs and all, for a post-mortem
                self.stack.callback(shutil.rmtree, self.root, ignore_errors=True)
            self.stack.callback(self.check_nothing_left)
            self.mail = os.path.join(self.root, "mail")
            os.mkdir(self.mail, 0o700)
            self.chown(self.mail)
            self.pg = self.stack.enter_context(Cluster())
            self.postmaster = self._postmaster_pid()
            self.pg.sql(SCHEMA)
            self.db = self.pg.connection.replace("user=postgres", "user=mpop3")
            self.port, self.direct_port = free_ports(2, (HAPROXY_ADDRESS, *NODE_ADDRESSES[: self.node_count]))
            self.stack.callback(self._stop_everything)
            for i in range(self.node_count):
                self.nodes.append(self._write_node(i + 1))
            for node in self.nodes:
                self._start(node)
            for node in self.nodes:
                self.wait_node_listening(node.number)
            self._start_haproxy()
            for node in self.nodes:
                self.wait_state(node.number, "UP")
            return self
        except BaseException:
            self.stack.close()
            self._subreaper(False)
            raise

    def __exit__(self, *exc):
        try:
            self.stack.close()
        finally:
            self._subreaper(False)

    def _stop_everything(self):
        errors = []
        if self.haproxy is not None:
            stop(self.haproxy, signal.SIGTERM)  # a hard stop: a soft one (SIGUSR1) waits for every session
        for node in self.nodes:
            if node.alive():
                try:
                    self.stop_node(node.number)
                except Exception as e:  # one node stuck: kill it, and still stop the others
                    errors.append(e)
                    self.kill_node(node.number)
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self._reap_known()
        if errors:
            raise errors[0]

    @staticmethod
    def _subreaper(on):
        LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0)

    def check_nothing_left(self):
        """Nothing the lab started runs any more: no process of its groups,
        no postmaster of its cluster, no HAProxy on its configuration."""
        self._reap_known()

        def left():
            found = []
            for pid, pgid, state, cmdline in processes():
                ours = pgid in self.groups or self.root in cmdline or (self.pg is not None and self.pg.root in cmdline)
                if ours:
                    if state != "Z" or not self._reap(pid):
                        found.append(f"{pid} {state} {cmdline}")
            return found

        with contextlib.suppress(AssertionError):
            wait_for(lambda: not left(), seconds=10, interval=0.05)
        remaining = left()
        assert not remaining, "the lab left processes behind:\n" + "\n".join(remaining)

    # ---- users and mail ----------------------------------------------------------------------

    def add_user(self, user, password, scheme="PLAIN", mailbox=None, messages=()):
        """A row of the users table ({PLAIN} or {SHA512-CRYPT}) and its
        Maildir (empty, or holding `messages`), owned by the mail user."""
        if scheme == "PLAIN":
            stored = "{PLAIN}" + password
        elif scheme == "SHA512-CRYPT":
            stored = "{SHA512-CRYPT}" + crypt(password.encode(), b"$6$" + os.urandom(6).hex().encode() + b"$").decode()
        else:
            raise ValueError(scheme)
        self.pg.sql("INSERT INTO users VALUES (%s, %s, %s)", (user, stored, mailbox))
        self.users[user] = (password, mailbox or user)
        self.make_maildir(mailbox or user, messages)

    def add_users(self, rows, messages=()):
        """Many users at once: (user, password, mailbox) rows, {PLAIN}, each
        Maildir holding `messages`."""
        with psycopg_connection(self.pg.connection) as conn, conn.cursor() as cursor:
            cursor.executemany("INSERT INTO users VALUES (%s, %s, %s)", [(u, "{PLAIN}" + p, m) for u, p, m in rows])
        for user, password, mailbox in rows:
            self.users[user] = (password, mailbox or user)
            self.make_maildir(mailbox or user, messages)

    def maildir(self, mailbox):
        return os.path.join(self.mail, mailbox, "Maildir")

    def make_maildir(self, mailbox, messages=()):
        md = self.maildir(mailbox)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(md, sub), 0o700, exist_ok=True)
        for i, message in enumerate(messages):
            with open(os.path.join(md, "new", f"{1700000000 + i}.M{i}P{os.getpid()}Q{i}.lab"), "wb") as f:
                f.write(message)
        for path in (os.path.join(self.mail, mailbox), md):
            self.chown(path)
        for sub in ("new", "cur", "tmp"):
            for d, _, files in os.walk(os.path.join(md, sub)):
                self.chown(d)
                for name in files:
                    self.chown(os.path.join(d, name))
        return md

    def chown(self, path):
        if self.owner:
            os.lchown(path, self.owner.pw_uid, self.owner.pw_gid)

    def deliver(self, mailbox, message, mda="procmail"):
        """Deliver `message` (bytes) into the mailbox's Maildir with a real
        MDA, run as the mail user: procmail (a procmailrc whose DEFAULT is
        the Maildir with a trailing slash: Maildir delivery) or getmail6's
        getmail_maildir (which takes the Maildir, trailing slash, as its
        argument)."""
        md = self.maildir(mailbox)
        if mda == "procmail":
            rc = os.path.join(self.root, f"procmailrc-{mailbox}")
            if not os.path.exists(rc):
                with open(rc, "w") as f:
                    f.write(f"DEFAULT={md}/\nLOGFILE=/dev/null\n")
                os.chmod(rc, 0o644)
            command = ["procmail", "-m", rc]
        elif mda == "getmail":
            command = ["getmail_maildir", f"{md}/"]
        else:
            raise ValueError(mda)
        result = subprocess.run(
            command, input=message, capture_output=True, preexec_fn=self._as_mail_user, timeout=30, cwd=self.root
        )
        assert result.returncode == 0, (command, result.stderr)

    def _as_mail_user(self):
        if self.owner:
            os.setgroups([])
            os.setgid(self.owner.pw_gid)
            os.setuid(self.owner.pw_uid)

    def messages(self, mailbox):
        """The bytes of every message in the Maildir now (new/ and cur/)."""
        md = self.maildir(mailbox)
        out = []
        for sub in ("new", "cur"):
            for name in sorted(os.listdir(os.path.join(md, sub))):
                with contextlib.suppress(FileNotFoundError):
                    with open(os.path.join(md, sub, name), "rb") as f:
                        out.append(f.read())
        return out

    # ---- clients -----------------------------------------------------------------------------

    def connect(self, source=None, timeout=10):
        """A raw POP3 connection through HAProxy, greeting read."""
        return Wire(self.port, host=HAPROXY_ADDRESS, timeout=timeout, source=source)

    def connect_node(self, number, timeout=10):
        """A raw POP3 connection to a node's own plain listener (not through HAProxy)."""
        return Wire(self.direct_port, host=self.nodes[number - 1].address, timeout=timeout)

    # ---- nodes ---------------------------------------------------------------------------------

    def _write_node(self, number):
        address = NODE_ADDRESSES[number - 1]
        lines = [
            f"# node {number} of the lab (tests/cluster_lab.py)",
            f"listen {address}:{self.direct_port}",
            f"listen_proxy {address}:{self.port}",
            f"module_dir {TREE}/modules",
        ]
        lines += [f"{name} {value}" for name, value in self.node_settings.items()]
        lines += [
            "auth_module auth_postgresql",
            f"> connection {self.db} application_name=mpop3-node{number}",
            "> connect_timeout 1",  # the pool waits this long for a connection while the database is down
            "storage_module storage_maildir",
            f"> mail_location {self.mail}/%u/Maildir",
            "> mailbox_user any",
        ]
        if self.session_lock == "postgresql":
            lines += [
                "> session_lock postgresql",
                f"> session_lock_connection {self.db} application_name=mpop3-lock-node{number}",
            ]
        conf = os.path.join(self.root, f"node{number}.conf")
        with open(conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(conf, 0o644)
        return Node(number, address, conf, os.path.join(self.root, f"node{number}.log"))

    def _start(self, node):
        with open(node.log_path, "ab") as log:
            log.write(f"--- start {node.starts + 1}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                [sys.executable, "-m", "mpop3", "-c", node.conf],
                cwd=TREE,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a process group of its own: kill_node kills all of it
            )
        node.starts += 1
        self.groups.add(node.proc.pid)

    def wait_node_listening(self, number, seconds=20):
        node = self.nodes[number - 1]

        def listening():
            if node.proc.poll() is not None:
                raise AssertionError(f"node {number} exited: {self.node_log(number)[-3000:]}")
            try:
                socket.create_connection((node.address, self.direct_port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, seconds=seconds, interval=0.05, what=f"node {number} to listen")

    def kill_node(self, number):
        """kill -9 of the node's whole process tree (its process group, and
        any descendant that left it), as a crash or a power cut would; returns
        once every one of them is gone."""
        node = self.nodes[number - 1]
        pids = [node.pid, *descendants(node.pid)]
        self.reap.update(pids[1:])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.proc.wait(10)
        wait_for(lambda: not self._alive_in_group(node.pid), seconds=10, interval=0.01, what=f"node {number} to die")
        self._reap_known()

    def stop_node(self, number, timeout=15):
        """SIGTERM, as an administrator stops a node; waits for it to end."""
        node = self.nodes[number - 1]
        stop(node.proc, signal.SIGTERM, timeout)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not self._alive_in_group(node.pid), seconds=timeout, interval=0.02)
        if self._alive_in_group(node.pid):
            self.kill_node(number)

    def restart_node(self, number, wait_up=True):
        """Start the node again (after kill_node or stop_node), and by
        default wait until HAProxy's health check sees it up."""
        node = self.nodes[number - 1]
        assert not node.alive(), f"node {number} is running"
        self._start(node)
        self.wait_node_listening(number)
        if wait_up:
            self.wait_state(number, "UP")

    def use_session_lock(self, kind):
        """Every node again with `session_lock KIND` (postgresql, or file:
        the marker file, which on this one machine's filesystem also holds
        across nodes), one after another, each back up before the next."""
        self.session_lock = kind
        for node in self.nodes:
            self.stop_node(node.number)
            self.nodes[node.number - 1] = replaced = self._write_node(node.number)
            replaced.starts = node.starts
            self._start(replaced)
            self.wait_node_listening(node.number)
            self.wait_state(node.number, "UP")

    def node_log(self, number):
        with open(self.nodes[number - 1].log_path, errors="replace") as f:
            return f.read()

    def logins(self, user):
        """How many times each node logged `user` in (from the node logs), by node number."""
        return {node.number: self.node_log(node.number).count(f": {user} logged in,") for node in self.nodes}

    def node_pids(self):
        return {node.number: node.pid for node in self.nodes}

    def _alive_in_group(self, pgid):
        return [pid for pid, group, state, _ in processes() if group == pgid and state != "Z"]

    # ---- HAProxy -----------------------------------------------------------------------------

    def _start_haproxy(self):
        inter = self.check_interval
        lines = [
            "global",
            "  maxconn 4000",
            f"  stats socket {self.root}/haproxy.sock mode 600 level admin",
            "defaults",
            "  mode tcp",
            "  timeout connect 1s",  # loopback; across a network, 5s
            "  timeout client 15m",  # longer than any POP3 session (idle_timeout 600s)
            "  timeout server 15m",
            "  timeout check 1s",
            "  retries 3",
            "  option redispatch 1",  # each retry goes to another node
            "frontend pop3",
            f"  bind {HAPROXY_ADDRESS}:{self.port}",
            "  maxconn 4000",
            "  default_backend nodes",
            "backend nodes",
            "  balance leastconn",
            "  option tcp-check",
            "  tcp-check expect string +OK",
            "  tcp-check send QUIT\\r\\n",
            "  tcp-check expect string +OK",
            f"  default-server send-proxy-v2 check-send-proxy inter {inter} fastinter {inter} downinter {inter} "
            "rise 1 fall 1 on-marked-down shutdown-sessions",
        ]
        for node in self.nodes:
            lines.append(f"  server node{node.number} {node.address}:{self.port} check")
        cfg = os.path.join(self.root, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("\n".join(lines) + "\n")
        check = subprocess.run(["haproxy", "-c", "-q", "-f", cfg], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.haproxy_cfg = cfg
        self.start_haproxy()

    def start_haproxy(self):
        """HAProxy in the foreground (-db), in a process group of its own."""
        with open(os.path.join(self.root, "haproxy.log"), "ab") as log:
            self.haproxy = subprocess.Popen(
                ["haproxy", "-db", "-f", self.haproxy_cfg],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.groups.add(self.haproxy.pid)

    def kill_haproxy(self):
        """kill -9 of the balancer (its kernel closes its connections, both ways)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.haproxy.pid, signal.SIGKILL)
        self.haproxy.wait(10)

    def haproxy_command(self, command):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(os.path.join(self.root, "haproxy.sock"))
            s.sendall(command.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def set_state(self, number, state):
        """Take a node out of HAProxy's rotation (`maint`) or put it back (`ready`)."""
        answer = self.haproxy_command(f"set server nodes/node{number} state {state}")
        assert not answer.strip(), answer

    def stats(self):
        """HAProxy's `show stat` for the backend: svname (node1..3, BACKEND) -> {field: value}."""
        try:
            csv = self.haproxy_command("show stat")
        except OSError:
            return {}
        header, *rows = csv.splitlines()
        fields = header.lstrip("# ").split(",")
        out = {}
        for row in rows:
            values = dict(zip(fields, row.split(","), strict=False))
            if values.get("pxname") == "nodes":
                out[values["svname"]] = values
        return out

    def states(self):
        """HAProxy's view of each node: number -> 'UP', 'DOWN', 'MAINT', ..."""
        return {
            int(name[4:]): values["status"].split()[0]
            for name, values in self.stats().items()
            if name.startswith("node")
        }

    def wait_idle(self, seconds=10):
        """Until HAProxy has no session open on any node (a client's close
        reaches it asynchronously; leastconn counts what it has seen)."""
        wait_for(
            lambda: all(v["scur"] == "0" for name, v in self.stats().items() if name.startswith("node")),
            seconds=seconds,
            interval=0.01,
            what="HAProxy to have no session open",
        )

    def wait_state(self, number, state, seconds=15):
        try:
            wait_for(lambda: self.states().get(number) == state, seconds=seconds, interval=0.02)
        except AssertionError:
            raise AssertionError(
                f"HAProxy did not see node {number} {state} within {seconds} s: {self.states()}\n"
                f"{self.haproxy_command('show servers state nodes')}\n{self.node_log(number)[-2000:]}"
            ) from None

    # ---- PostgreSQL --------------------------------------------------------------------------

    def stop_database(self):
        self.pg.stop()
        self._reap_known()  # the postmaster, which pg_ctl left to us

    def start_database(self):
        self.pg.start()
        self.postmaster = self._postmaster_pid()

    def _postmaster_pid(self):
        with open(os.path.join(self.pg.data, "postmaster.pid")) as f:
            pid = int(f.readline())
        self.reap.add(pid)
        return pid

    def database_cpu(self):
        """CPU seconds of the postmaster and every backend, live or ended."""
        return cpu_seconds(self.postmaster)

    # ---- reaping -------------------------------------------------------------------------------

    def _reap(self, pid):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            return done == pid
        except ChildProcessError:
            return False

    def _reap_known(self):
        for pid in list(self.reap):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours (yet: its parent lives), or reaped
                if not os.path.exists(f"/proc/{pid}"):
                    self.reap.discard(pid)
                continue
            if done == pid:
                self.reap.discard(pid)


# ---- helpers -----------------------------------------------------------------------------------


def psycopg_connection(conninfo):
    import psycopg

    return psycopg.connect(conninfo, autocommit=True)


def stop(proc, sig=signal.SIGTERM, timeout=15):
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_ports(count, addresses):
    """`count` distinct TCP ports free on every one of `addresses`."""
    found = []
    while len(found) < count:
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        if port in found:
            continue
        ok = True
        for address in addresses:
            with socket.socket() as s:
                try:
                    s.bind((address, port))
                except OSError:
                    ok = False
                    break
        if ok:
            found.append(port)
    return found


def processes():
    """(pid, process group, state, command line) of every process."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.append((int(entry), int(fields[2]), fields[0], cmdline))
    return out


def descendants(pid):
    """Every live descendant of `pid`, children first."""
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out.append(int(child))
                    out += descendants(int(child))
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def wait_login(lab, user, password, seconds=10):
    """Log `user` in through HAProxy as soon as the cluster lets it; the Wire."""

    def logged_in():
        try:
            wire = lab.connect()
        except OSError:
            return None
        if wire.cmd(f"USER {user}").startswith(b"+OK") and wire.cmd(f"PASS {password}").startswith(b"+OK"):
            return wire
        wire.close()
        return None

    return wait_for(logged_in, seconds=seconds, interval=0.05, what=f"{user} to log in")
