"""The cluster (issue 15): three mpop3 nodes behind real HAProxy, users in
PostgreSQL, one Maildir tree, a PostgreSQL advisory lock per session
(tests/cluster_lab.py starts it all on this machine). One `[IN-USE]` across
nodes; a node killed with kill -9 frees its mailboxes at once; MDAs deliver
while real clients fetch through HAProxy and nodes die and come back, and
nothing is lost or fetched twice; the database going away is `[SYS/TEMP]`
and its return needs no restart."""

import collections
import os
import re
import subprocess
import threading
import time

import pytest
from cluster_lab import Lab, wait_login
from pop_server import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.clients]  # PostgreSQL, HAProxy, MDAs, clients

MESSAGE_ID = re.compile(rb"^message-id:\s*(<[^>]+>)", re.IGNORECASE | re.MULTILINE)


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        yield lab
    # Lab.__exit__ has checked that nothing it started runs any more


@pytest.fixture
def cluster(lab):
    """The lab with every node up and the database running, whatever the test before left."""
    if not os.path.exists(os.path.join(lab.pg.data, "postmaster.pid")):
        lab.start_database()
    if lab.haproxy.poll() is not None:
        lab.start_haproxy()
    for node in lab.nodes:
        if not node.alive():
            lab.restart_node(node.number, wait_up=False)
    for node in lab.nodes:
        lab.wait_state(node.number, "UP")
    return lab


def message(mailbox, tag):
    """A message to count by its Message-ID, with a line RETR must dot-stuff."""
    head = f"From: lab@example.org\nTo: {mailbox}@example.org\nSubject: {tag}\n"
    return (head + f"Message-ID: <{tag}.{mailbox}@lab.example.org>\n\na line\n.a line with a dot\n").encode()


def message_id(data):
    found = MESSAGE_ID.search(data)
    assert found, data[:300]
    return found.group(1).decode()


def ids_in(lab, mailbox):
    return collections.Counter(message_id(m) for m in lab.messages(mailbox))


def node_of(lab, mailbox, before):
    """The node that logged `mailbox` in since `before` (lab.logins)."""
    after = lab.logins(mailbox)
    grown = [n for n in after if after[n] > before[n]]
    assert len(grown) == 1, (before, after)
    return grown[0]


ADVISORY_HOLDERS = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
"""


def refusals(lab, mailbox):
    return {n.number: lab.node_log(n.number).count(f"login of '{mailbox}' refused: MailboxInUse") for n in lab.nodes}


def at_once(wires, command):
    """Send `command` on every wire at the same instant (a barrier); the replies."""
    start = threading.Barrier(len(wires))
    replies = [None] * len(wires)

    def send(i):
        start.wait()
        replies[i] = wires[i].cmd(command)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(wires))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    return replies


# --- one [IN-USE] across nodes --------------------------------------------------------------


def test_two_logins_to_one_mailbox_through_different_nodes_exactly_one_wins(cluster):
    lab = cluster
    lab.add_user("ann", "ann-pw", scheme="SHA512-CRYPT", messages=[message("ann", "1")])
    for round in range(3):
        lab.wait_idle()
        logins, refused = lab.logins("ann"), refusals(lab, "ann")
        # both connections are open (greeting read) before either logs in:
        # leastconn gives the second another node than the first
        wires = [lab.connect(), lab.connect()]
        for wire in wires:
            assert wire.cmd("USER ann").startswith(b"+OK")
        replies = at_once(wires, "PASS ann-pw")
        won = [r for r in replies if r.startswith(b"+OK")]
        lost = [r for r in replies if r.startswith(b"-ERR [IN-USE]")]
        assert len(won) == 1 and len(lost) == 1, replies
        winner = node_of(lab, "ann", logins)
        after = refusals(lab, "ann")
        loser = [n for n in after if after[n] > refused[n]]
        assert loser and loser[0] != winner, (winner, loser)  # two nodes, one lock
        # the lock: one advisory lock, held by the winning node's session connection
        assert lab.pg.sql(ADVISORY_HOLDERS) == [(f"mpop3-lock-node{winner}",)]
        if round == 0:  # the third node says the same while the winner holds the mailbox
            third = lab.connect()
            assert third.cmd("USER ann").startswith(b"+OK")
            assert third.cmd("PASS ann-pw").startswith(b"-ERR [IN-USE]")
            third.close()
        session = wires[replies.index(won[0])]
        assert session.cmd("QUIT").startswith(b"+OK")
        for wire in wires:
            wire.close()
        # the lock went with the session: the next login, wherever it lands, is served
        wire = lab.connect()
        wire.login("ann", "ann-pw")
        assert wire.cmd("QUIT").startswith(b"+OK")
        wire.close()


# --- kill -9 of a node ----------------------------------------------------------------------


def test_kill_9_of_the_node_holding_a_session_frees_its_mailbox_at_once(cluster):
    lab = cluster
    lab.add_user("ben", "ben-pw", messages=[message("ben", "1"), message("ben", "2")])
    killed = []
    for _ in range(3):
        before = lab.logins("ben")
        held = lab.connect()
        held.login("ben", "ben-pw")
        assert held.cmd("DELE 1").startswith(b"+OK")  # never committed: the node dies first
        node = node_of(lab, "ben", before)
        assert lab.pg.sql(ADVISORY_HOLDERS) == [(f"mpop3-lock-node{node}",)]
        lab.kill_node(node)
        killed.append(node)
        started = time.monotonic()
        wire = wait_login(lab, "ben", "ben-pw", seconds=2)
        took = time.monotonic() - started
        assert took < 1.0, took  # well within 2 s: PostgreSQL dropped the lock with the dead node's connection
        assert wire.cmd("STAT").startswith(b"+OK 2 ")  # the killed session committed nothing
        assert wire.cmd("QUIT").startswith(b"+OK")
        wire.close()
        assert held.closed(timeout=5)  # HAProxy ended the client's side too
        held.close()
        lab.restart_node(node)
    assert len(lab.messages("ben")) == 2
    print(f"killed nodes {killed}; each restarted")


# --- MDAs and real clients while nodes die --------------------------------------------------

ROUNDS = 10
KILL_ROUNDS = (1, 3, 5, 7, 9)  # rounds that kill -9 the node serving the deleting session before its QUIT
KILL_OTHER_ROUNDS = (2, 6)  # rounds that kill -9 another node just before fetchmail and getmail connect


class Popper:
    """A deleting client (a raw POP3 session through HAProxy): RETR and
    DELE everything listed, then QUIT, or not (its node killed first).
    Records what each session retrieved and whether its QUIT committed."""

    def __init__(self, lab, user, password, mailbox):
        self.lab, self.user, self.password, self.mailbox = lab, user, password, mailbox
        self.sessions = []  # (Message-IDs retrieved, committed)

    def open(self):
        before = self.lab.logins(self.mailbox)
        wire = wait_login(self.lab, self.user, self.password, seconds=2)
        node = node_of(self.lab, self.mailbox, before)
        count = int(wire.cmd("STAT").split()[1])
        got = []
        for i in range(1, count + 1):
            assert wire.cmd(f"RETR {i}").startswith(b"+OK")
            got.append(message_id(b"\n".join(wire.multi())))
            assert wire.cmd(f"DELE {i}").startswith(b"+OK")
        return wire, node, got

    def quit(self, wire, got):
        try:
            reply = wire.cmd("QUIT")
        except (EOFError, OSError):
            reply = b""
        wire.close()
        committed = reply.startswith(b"+OK")
        self.sessions.append((got, committed))
        return committed


def fetchmail(lab, home, out):
    """fetchmail, keep and uidl, through HAProxy; its exit status (0: mail, 1: none)."""
    rc = home / ".fetchmailrc"
    if not rc.exists():
        rc.write_text(
            "set no syslog\nset invisible\n"
            f"poll 127.0.0.1 with proto POP3 service {lab.port} uidl auth password timeout 20\n"
            '  user "fetch@example.org" there with password "fetch-pw" is "root" here keep sslproto ""\n'
            f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
        )
        rc.chmod(0o600)
    command = ["fetchmail", "-f", str(rc), "--idfile", str(home / ".fetchids"), "--nosyslog"]
    env = dict(os.environ, HOME=str(home), LC_ALL="C")
    result = subprocess.run(command, env=env, capture_output=True, timeout=60)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.returncode


def getmail(lab, home, out):
    """getmail6, deleting, through HAProxy (an external MDA: getmail refuses Maildir delivery as root)."""
    rc = home / "getmailrc"
    if not rc.exists():
        rc.write_text(
            "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
            f"port = {lab.port}\nusername = getter\npassword = getter-pw\ntimeout = 20\n"
            "[destination]\ntype = MDA_external\npath = /bin/sh\n"
            f'arguments = ("-c", "cat > {out}/msg.$$")\nallow_root_commands = true\nunixfrom = false\n'
            "[options]\ndelete = true\nread_all = false\nreceived = false\ndelivered_to = false\nverbose = 1\n"
        )
    getmaildir = home / ".getmail"
    getmaildir.mkdir(exist_ok=True)
    result = subprocess.run(
        ["getmail", f"--getmaildir={getmaildir}", f"--rcfile={rc}"], capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def fetched(out):
    return collections.Counter(message_id((out / name).read_bytes()) for name in os.listdir(out))


def test_mdas_deliver_while_clients_fetch_through_all_nodes_and_nodes_die(cluster, tmp_path):
    """Bounded rounds, each: procmail and getmail_maildir deliver into the
    three mailboxes; a deleting session logs in and RETRs and DELEs all it
    lists; while it is open, fetchmail (keep, uidl) and getmail (delete)
    fetch through HAProxy (leastconn spreads the three sessions over the
    nodes) and the MDAs deliver more; then the deleting session QUITs, or,
    in KILL_ROUNDS, its node is killed with kill -9 first and the mailbox is
    at once logged in again through HAProxy and emptied. In KILL_OTHER_ROUNDS
    another node is killed just before fetchmail and getmail connect, so
    HAProxy may send them to a node that is gone (it retries on another).
    A killed node is started again at the next round. At the end every message delivered was
    fetched exactly once by fetchmail and is still in its Maildir (keep);
    fetched exactly once by getmail and gone; and retrieved by exactly one
    committed deleting session (and again only after a session that did not
    commit) and gone."""
    lab = cluster
    lab.add_user("fetch@example.org", "fetch-pw", mailbox="keepbox")
    lab.add_user("getter", "getter-pw", scheme="SHA512-CRYPT", mailbox="getbox")
    lab.add_user("popper", "popper-pw", mailbox="popbox")
    boxes = ("keepbox", "getbox", "popbox")
    delivered = {box: [] for box in boxes}
    home, fetch_out, get_out = tmp_path / "home", tmp_path / "fetchmail", tmp_path / "getmail"
    for d in (home, fetch_out, get_out):
        d.mkdir()
    popper = Popper(lab, "popper", "popper-pw", "popbox")
    logins_before = {box: lab.logins(box) for box in boxes}
    during = []  # (round, the Message-ID delivered while a deleting session was open)
    dead = []
    started = time.monotonic()

    def deliver(box, tag, mda):
        lab.deliver(box, message(box, tag), mda=mda)
        delivered[box].append(f"<{tag}.{box}@lab.example.org>")

    def in_parallel(*jobs):
        errors = []

        def run(job):
            try:
                job()
            except BaseException as e:  # noqa: B036 (reported below, in the test's thread)
                errors.append(e)

        threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]

    for r in range(ROUNDS):
        while dead:  # the nodes killed last round come back (HAProxy sees them within 200 ms)
            lab.restart_node(dead.pop(), wait_up=False)
        in_parallel(
            *[
                (lambda box=box, mda=mda, r=r: deliver(box, f"r{r}-{mda}", mda))
                for box in boxes
                for mda in ("procmail", "getmail")
            ]
        )
        wire, node, got = popper.open()
        if r in KILL_OTHER_ROUNDS:
            other = next(n.number for n in lab.nodes if n.alive() and n.number != node)
            lab.kill_node(other)
            dead.append(other)
        in_parallel(
            lambda: fetchmail(lab, home, fetch_out),
            lambda: getmail(lab, home, get_out),
            lambda r=r: [deliver(box, f"r{r}-during", "procmail") for box in boxes],
        )
        during.append((len(popper.sessions), f"<r{r}-during.popbox@lab.example.org>"))
        if r in KILL_ROUNDS:
            lab.kill_node(node)
            dead.append(node)
            assert not popper.quit(wire, got)
            # at once, through HAProxy, on a node that lives: everything is still there
            again, _, got_again = popper.open()
            assert set(got) <= set(got_again)
            assert popper.quit(again, got_again)
        else:
            assert popper.quit(wire, got)
    # the end: every node up, each client once more
    while dead:
        lab.restart_node(dead.pop())
    for n in lab.nodes:
        lab.wait_state(n.number, "UP")
    fetchmail(lab, home, fetch_out)
    getmail(lab, home, get_out)
    wire, _, got = popper.open()
    assert popper.quit(wire, got)
    took = time.monotonic() - started

    # fetchmail (keep, uidl): each message exactly once, and all still in the Maildir
    want = collections.Counter(delivered["keepbox"])
    assert len(want) == len(delivered["keepbox"]) == 3 * ROUNDS
    assert fetched(fetch_out) == want
    assert ids_in(lab, "keepbox") == want
    # getmail (delete): each exactly once, none left
    assert fetched(get_out) == collections.Counter(delivered["getbox"])
    assert ids_in(lab, "getbox") == {}
    # the deleting sessions: each message deleted by exactly one committed
    # session; retrieved again only after a session that did not commit
    committed = collections.Counter(m for got, ok in popper.sessions if ok for m in got)
    uncommitted = collections.Counter(m for got, ok in popper.sessions if not ok for m in got)
    retrieved = collections.Counter(m for got, _ in popper.sessions for m in got)
    assert committed == collections.Counter(delivered["popbox"])
    assert retrieved == committed + uncommitted
    assert sum(1 for _, ok in popper.sessions if not ok) == len(KILL_ROUNDS)
    assert ids_in(lab, "popbox") == {}
    # a message delivered while a session was open was not that session's to see
    for index, mid in during:
        assert mid not in popper.sessions[index][0]
    # every node served some of it
    served = collections.Counter()
    for box in boxes:
        after = lab.logins(box)
        for n in after:
            served[n] += after[n] - logins_before[box][n]
    assert all(served[n.number] > 0 for n in lab.nodes), served
    total = sum(map(len, delivered.values()))
    backend = lab.stats()["BACKEND"]
    print(
        f"{ROUNDS} rounds in {took:.1f} s; sessions per node {dict(served)}; {total} messages delivered; "
        f"HAProxy retried {backend['wretr']} connections, {backend['wredis']} on another node"
    )


# --- the balancer dies ----------------------------------------------------------------------


def test_the_balancer_killed_frees_its_sessions_mailboxes_at_once(cluster):
    """kill -9 of HAProxy: its kernel closes both sides of every
    connection, so each node ends its sessions (nothing committed) and their
    locks go; the balancer back (or its standby), the users log in at once."""
    lab = cluster
    lab.add_user("fay", "fay-pw", messages=[message("fay", "1"), message("fay", "2")])
    held = lab.connect()
    held.login("fay", "fay-pw")
    assert held.cmd("DELE 1").startswith(b"+OK")
    lab.kill_haproxy()
    assert held.closed(timeout=5)
    held.close()
    lab.start_haproxy()
    for n in lab.nodes:
        lab.wait_state(n.number, "UP")
    started = time.monotonic()
    wire = wait_login(lab, "fay", "fay-pw", seconds=2)
    assert time.monotonic() - started < 1.0
    assert wire.cmd("STAT").startswith(b"+OK 2 ")
    assert wire.cmd("QUIT").startswith(b"+OK")
    wire.close()


# --- the database goes away and comes back --------------------------------------------------


def test_database_down_is_sys_temp_and_its_return_needs_no_restart(cluster):
    lab = cluster
    lab.add_user("dora", "dora-pw", messages=[message("dora", "1"), message("dora", "2")])
    lab.add_user("ed", "ed-pw", scheme="SHA512-CRYPT")
    pids = lab.node_pids()
    starts = [n.starts for n in lab.nodes]
    held = lab.connect()
    held.login("dora", "dora-pw")
    assert held.cmd("DELE 1").startswith(b"+OK")

    lab.stop_database()
    # every node, through HAProxy and directly: a temporary failure, not a wrong password
    wires = [lab.connect() for _ in lab.nodes] + [lab.connect_node(n.number) for n in lab.nodes]
    replies = {}

    def log_in(i, wire):
        replies[i] = [wire.cmd("USER ed"), wire.cmd("PASS ed-pw")]
        if i == 0:  # the session goes on: not a failed login
            replies[i] += [wire.cmd("USER ed"), wire.cmd("PASS ed-pw")]
        wire.cmd("QUIT")
        wire.close()

    # at once: each waits up to connect_timeout (1 s in the lab) for its pool
    threads = [threading.Thread(target=log_in, args=(i, wire)) for i, wire in enumerate(wires)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(replies) == len(wires)
    for lines in replies.values():
        for user, password in zip(lines[::2], lines[1::2], strict=True):
            assert user.startswith(b"+OK") and password.startswith(b"-ERR [SYS/TEMP]"), lines
    # the session that held dora's lock lost it with the database: nothing committed
    assert held.cmd("QUIT").startswith(b"-ERR [SYS/TEMP]")
    held.close()
    assert len(lab.messages("dora")) == 2
    assert lab.states() == {n.number: "UP" for n in lab.nodes}  # the nodes greet: HAProxy keeps them

    lab.start_database()
    started = time.monotonic()
    for n in lab.nodes:  # each node's own pool and locks reconnect by themselves

        def direct(number=n.number):
            wire = lab.connect_node(number)
            wire.cmd("USER ed")
            ok = wire.cmd("PASS ed-pw").startswith(b"+OK")
            wire.cmd("QUIT")
            wire.close()
            return ok

        wait_for(direct, seconds=15, interval=0.1, what=f"node {n.number} to log ed in again")
    took = time.monotonic() - started
    wire = lab.connect()
    wire.login("dora", "dora-pw")
    assert wire.cmd("STAT").startswith(b"+OK 2 ")
    assert wire.cmd("QUIT").startswith(b"+OK")
    wire.close()
    assert lab.node_pids() == pids and [n.starts for n in lab.nodes] == starts
    assert all(n.alive() for n in lab.nodes)
    print(f"logins on every node again {took:.2f} s after the database")
