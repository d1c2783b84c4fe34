"""storage_maildir against Dovecot and against storage_mbox, in one run
(issue 13's speed targets; `make bench`, or `pytest bench/bench_maildir.py`).

- open 100,000 messages: login + STAT + QUIT over the wire on mpop3
  (storage_maildir, sizes cache warm) and on a real Dovecot 2.3 (its index
  warm) serving the same Maildir; the ratio (target <= 0.5x); the cold
  first opens of both (mpop3: no sizes cache, every file read once;
  Dovecot: no index); and the in-process open, against merely listing the
  two directories. The Maildir is generated once into $MPOP3_BENCH_DIR
  (/tmp/mpop3-bench), its names without ,W= so that sizes come from the
  cache.
- RETR MB/s at 4 clients, each fetching test_load's 30 MB mailbox again and
  again: storage_maildir against storage_mbox on the same messages (target
  >= 0.8x);
- logins/s at 32 clients (USER, PASS, STAT, QUIT), 10 messages a mailbox:
  storage_maildir against storage_mbox (target >= 0.8x).

Both mpop3s run as bench/test_load.py runs its shared-process server
(`processes 1`, `mailbox_user any`: as root, safe_user serves every
mailbox), on files in RAM (/dev/shm) where there is one, driven by
bench/loadgen.
"""

import glob
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import test_load
from test_load import BENCH_DIR, SECONDS, loadgen, retr_mailbox, small_mailbox, start_mpop3

from mpop3.loader import import_module_file

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TREE, "tests"))
import dovecot_maildir  # noqa: E402  (tests/, as test_load imports pop_server)

CACHE = os.environ.get("MPOP3_BENCH_DIR", "/tmp/mpop3-bench")
MODULE = glob.glob(os.path.join(TREE, "modules", "storage_maildir.*.so"))[0]
MESSAGES = 100_000
MBOX_FROM = b"From bench@example.org Thu Nov 19 10:00:00 2026\n"
OWNER = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())


def own(path):
    """Everything under `path` to the user the servers serve it as."""
    if os.geteuid() == 0:
        for d, subdirs, files in os.walk(path):
            for n in [d] + [os.path.join(d, x) for x in subdirs + files]:
                os.lchown(n, OWNER.pw_uid, OWNER.pw_gid)


def big_maildir():
    root = os.path.join(CACHE, "maildir")
    md = os.path.join(root, "bench", "Maildir")
    if not os.path.exists(os.path.join(root, "done-2")):
        shutil.rmtree(root, ignore_errors=True)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(md, sub))
        body = b"".join(b"line %d of the body\n" % i for i in range(40))
        for i in range(MESSAGES):
            sub = "cur" if i % 3 else "new"
            name = f"{1700000000 + i // 7}.M{i % 7 * 1000}P{4000 + i}Q{i}.bench" + (":2,S" if sub == "cur" else "")
            with open(os.path.join(md, sub, name), "wb") as f:
                f.write(b"Subject: message %d\n\n" % i + body)
        own(root)
        path = CACHE
        while path != "/":  # a way down for the servers' user
            os.chmod(path, os.stat(path).st_mode | 0o011)
            path = os.path.dirname(path)
        open(os.path.join(root, "done-2"), "w").close()
    return root, md


def best(f, rounds=3):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def login_stat(port, user="bench"):
    """Connect, USER, PASS, STAT, QUIT: the STAT count."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        f = s.makefile("rwb")

        def cmd(line):
            if line:
                f.write(line + b"\r\n")
                f.flush()
            reply = f.readline()
            assert reply.startswith(b"+OK"), (line, reply)
            return reply

        cmd(b"")
        cmd(b"USER " + user.encode())
        cmd(b"PASS pw")
        count = int(cmd(b"STAT").split()[1])
        cmd(b"QUIT")
        return count


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_open_100k_against_dovecot(report):
    root, md = big_maildir()
    # in process: the engine alone, against listing the two directories
    mod = import_module_file(MODULE, "bench")
    mod.module_init({"mail_location": f"{root}/%u/Maildir", "mailbox_user": "any"})

    def open_close():
        box = mod.storage_lock_mailbox("bench")
        assert mod.storage_message_count(box) >= MESSAGES
        mod.storage_unlock_mailbox(box)

    def drop_cache():
        try:
            os.unlink(os.path.join(md, "mpop3-sizes"))
        except FileNotFoundError:
            pass

    drop_cache()
    cold_s = best(open_close, 1)
    warm_s = best(open_close)
    list_s = best(lambda: (os.listdir(os.path.join(md, "new")), os.listdir(os.path.join(md, "cur"))))
    own(md)  # the cache the in-process open wrote (as root), for the servers' user
    report("maildir open 100k in process, cold (sizes counted, cache written)", f"{cold_s:.3f} s")
    report(
        "maildir open 100k in process, warm",
        f"{warm_s:.3f} s = {warm_s / list_s:.1f}x listing the dirs ({list_s:.3f} s)",
    )

    # over the wire: mpop3 and Dovecot, login + STAT + QUIT
    site = pathlib.Path(tempfile.mkdtemp(prefix="mpop3-md-", dir=CACHE))  # readable by the servers' user
    os.chmod(site, 0o755)
    (site / "passwd").write_text("bench:pw\n")
    server, port = start_mpop3(
        site,
        f"processes 1\nauth_module auth_file\n> passwd_file {site}/passwd\nstorage_module storage_maildir\n"
        f"> mail_location {root}/%u/Maildir\n> mailbox_user any\n",
    )
    droot = tempfile.mkdtemp(prefix="dv-", dir="/tmp")  # short: Dovecot's socket paths
    try:
        for name in os.listdir(md):  # Dovecot's index, so that its first open is cold
            if name.startswith("dovecot"):
                os.unlink(os.path.join(md, name))
        with dovecot_maildir.Dovecot(droot, root, ["bench"], OWNER) as dovecot:
            dovecot_cold = best(lambda: login_stat(dovecot.port), 1)
            dovecot_warm = best(lambda: login_stat(dovecot.port))
            # after a delivery: new/ changed, so both list it again (mpop3:
            # sizes from its cache; a directory changed under 2 s ago is listed
            # again each time, see box.TRUST_AFTER_NS)
            dovecot_new = best(lambda: (deliver(md), login_stat(dovecot.port)))
        drop_cache()
        ours_cold = best(lambda: login_stat(port), 1)
        ours_warm = best(lambda: login_stat(port))
        ours_new = best(lambda: (deliver(md), login_stat(port)))
    finally:
        stop(server)
        shutil.rmtree(droot, ignore_errors=True)
        shutil.rmtree(site, ignore_errors=True)
    report(
        "maildir 100k login+STAT, cold",
        f"mpop3 {ours_cold:.3f} s (no sizes cache), Dovecot {dovecot_cold:.3f} s (no index)",
    )
    report(
        "maildir 100k login+STAT, warm (target <= 0.5x)",
        f"mpop3 {ours_warm:.3f} s, Dovecot {dovecot_warm:.3f} s, ratio {ours_warm / dovecot_warm:.2f}",
    )
    report(
        "maildir 100k login+STAT, just after a delivery",
        f"mpop3 {ours_new:.3f} s, Dovecot {dovecot_new:.3f} s, ratio {ours_new / dovecot_new:.2f}",
    )


def deliver(md):
    """One more message in new/ (time is excluded from `best` only by being small)."""
    global delivered
    delivered += 1
    name = f"{1800000000 + delivered}.M1P{os.getpid()}Q{delivered}.bench"
    with open(os.path.join(md, "tmp", name), "wb") as f:
        f.write(b"Subject: late\n\nlate\n")
    if os.geteuid() == 0:
        os.chown(os.path.join(md, "tmp", name), OWNER.pw_uid, OWNER.pw_gid)
    os.rename(os.path.join(md, "tmp", name), os.path.join(md, "new", name))


delivered = 0


# --- against storage_mbox: RETR at 4 clients, logins at 32 ----------------------------------


def split_mbox(data):
    """The messages of an mbox test_load wrote (each From_ line, and the blank line after)."""
    parts = data.split(MBOX_FROM)
    assert parts[0] == b""
    return [p[:-1] for p in parts[1:]]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = (
        pathlib.Path(tempfile.mkdtemp(prefix="mpop3-md-", dir=BENCH_DIR))
        if BENCH_DIR
        else tmp_path_factory.mktemp("md")
    )
    spool, mail = root / "spool", root / "mail"
    spool.mkdir()
    users = [f"r{i}" for i in range(4)] + [f"u{i}" for i in range(200)]
    (root / "passwd").write_text("".join(f"{u}:pw\n" for u in users))
    big = retr_mailbox()
    messages = {f"r{i}": split_mbox(big) for i in range(4)}
    for i in range(200):
        # test_load's 3-message spools, made 10 messages
        messages[f"u{i}"] = split_mbox(small_mailbox(i) + small_mailbox(i + 1000) + small_mailbox(i + 2000))[:10]
    for user, ms in messages.items():
        (spool / user).write_bytes(b"".join(MBOX_FROM + m + b"\n" for m in ms))
        md = mail / user / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        for n, m in enumerate(ms):
            (md / "new" / f"{1700000000 + n}.M{n}P1Q{n}.bench").write_bytes(m)
    own(root)
    path = str(root)
    while path != "/":
        os.chmod(path, os.stat(path).st_mode | 0o011)
        path = os.path.dirname(path)
    common = f"processes 1\nauth_module auth_file\n> passwd_file {root}/passwd\n"
    mbox, mbox_port = start_mpop3(
        root, common + f"storage_module storage_mbox\n> storage_dir {spool}\n> mailbox_user any\n"
    )
    maildir, maildir_port = start_mpop3(
        root,
        common + f"storage_module storage_maildir\n> mail_location {mail}/%u/Maildir\n> mailbox_user any\n",
    )
    yield {"mbox": (mbox, mbox_port), "maildir": (maildir, maildir_port)}
    stop(mbox)
    stop(maildir)
    shutil.rmtree(root, ignore_errors=True)


def rate(site, which, mode, clients, userfmt, amount):
    proc, port = site[which]
    before = test_load.cpu_seconds(proc.pid)
    r = loadgen(mode, port, clients, SECONDS, userfmt)
    assert r["errors"] == 0, (which, mode, r)
    return amount(r) / r["seconds"], (test_load.cpu_seconds(proc.pid) - before) / r["seconds"]


def test_retr_4_clients_against_mbox(servers, report):
    mb = lambda r: r["bytes"] / 1e6  # noqa: E731
    for which in ("mbox", "maildir"):  # warm: the sizes cache, the page cache
        loadgen("retr", servers[which][1], 4, 0.5, "r%d")
    time.sleep(0.3)
    mbox, mbox_cpu = rate(servers, "mbox", "retr", 4, "r%d", mb)
    time.sleep(0.3)
    maildir, maildir_cpu = rate(servers, "maildir", "retr", 4, "r%d", mb)
    report(
        "RETR 4 clients, maildir vs mbox (target >= 0.8x)",
        f"maildir {maildir:.0f} MB/s, mbox {mbox:.0f} MB/s, ratio {maildir / mbox:.2f}; "
        f"server CPU {maildir_cpu:.2f} / {mbox_cpu:.2f} cores",
    )


def test_logins_32_clients_against_mbox(servers, report):
    sessions = lambda r: r["sessions"]  # noqa: E731
    # each its own users (u0..u31, u100..u131): no session of one run still
    # closing when the other starts; each warmed once (sizes cache written)
    for which, fmt in (("mbox", "u%d"), ("maildir", "u1%02d")):
        loadgen("login", servers[which][1], 32, 0.5, fmt)
    time.sleep(0.5)
    mbox, mbox_cpu = rate(servers, "mbox", "login", 32, "u%d", sessions)
    time.sleep(0.5)
    maildir, maildir_cpu = rate(servers, "maildir", "login", 32, "u1%02d", sessions)
    report(
        "logins 32 clients, 10 messages, maildir vs mbox (target >= 0.8x)",
        f"maildir {maildir:.0f}/s, mbox {mbox:.0f}/s, ratio {maildir / mbox:.2f}; "
        f"server CPU per login {1e6 * maildir_cpu / maildir:.0f} / {1e6 * mbox_cpu / mbox:.0f} us",
    )
