"""storage_maildir: the real `mpop3` serving Maildirs that real MDAs
(procmail, getmail_maildir, dovecot-lda) deliver to, fetched by real clients
(poplib, curl, fetchmail, getmail6, mpop) byte for byte; UIDLs and RETR
equal to what a real Dovecot 2.3 answers for the same Maildir; the
listing's Cython kernel against its Python reference; [IN-USE] across two
server processes; mail delivered during a session; vanished messages
refused alone ([SYS/TEMP], the session goes on) and renamed ones found;
kill -9 at every step of QUIT; the sizes cache (damaged, wrong, and a warm
open without a per-message open or stat, counted with strace); the hostile
cases; a system user's ~/Maildir opened as that user (WU_MAILBOX)."""

import glob
import hashlib
import os
import poplib
import pwd
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types

import dovecot_maildir
import pytest
import test_clients as clients
from pop_server import TREE, Spawned, Wire, crlf_size, served_as_safe_user, wait_for, wire_form

from mpop3.errors import MessageGone
from mpop3.loader import import_module_file
from mpop3.maildir import _names, names, uidlist
from mpop3.maildir import box as maildir_box
from mpop3.protocol import replies
from mpop3.protocol.core import CLOSE, Policy, SendMessage, SessionCore

MODULE_PATH = glob.glob(os.path.join(TREE, "modules", "storage_maildir.*.so"))[0]
ROOT = os.geteuid() == 0
# started as root, the server serves every Maildir as safe_user (mailbox_user any)
OWNER = pwd.getpwnam("nobody") if ROOT else None
USERS = [f"u{i}" for i in range(24)] + ["bob"]  # bob: tests/test_clients.py's user

MESSAGES = [
    b"From: a@example.org\nSubject: dots\n\n.starts with a dot\n..two\n.\ncaf\xc3\xa9\n",
    b"From: c@example.org\r\nSubject: crlf\r\n\r\nwritten with CRLF\r\n",
    b"From: d@example.org\nSubject: headers only\n",
    b"From: e@example.org\nSubject: big\n\n" + b"".join(b"line %06d\n" % i for i in range(20000)),
    b"From: f@example.org\nSubject: last\n\nno final newline",
]


def as_owner():
    if ROOT:
        os.setgroups([])
        os.setgid(OWNER.pw_gid)
        os.setuid(OWNER.pw_uid)


def own(path):
    if ROOT:
        for d, subdirs, files in os.walk(path):
            for n in [d] + [os.path.join(d, x) for x in subdirs + files]:
                os.lchown(n, OWNER.pw_uid, OWNER.pw_gid)


class Site:
    """A passwd file (users u0..u23 and bob, password pw), Maildirs under
    root/mail/USER/Maildir, and a config loading storage_maildir."""

    def __init__(self, root, options=None):
        self.root = root
        self.mail = root / "mail"
        self.mail.mkdir(exist_ok=True)
        (root / "passwd").write_text("".join(f"{u}:pw\n" for u in USERS))
        lines = [f"module_dir {TREE}/modules", "login_fail_delay 0.01", "shutdown_grace 0.5", "control_socket none"]
        lines += ["auth_module auth_file", f"> passwd_file {root}/passwd", "storage_module storage_maildir"]
        opts = {"mail_location": f"{self.mail}/%u/Maildir", "mailbox_user": "any", **(options or {})}
        lines += [f"> {k} {v}" for k, v in opts.items()]
        self.conf = root / "mpop3.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        served_as_safe_user(str(self.mail))

    def maildir(self, user, messages=(), names=None):
        md = self.mail / user / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(messages):
            name = names[i] if names else f"{1700000000 + i}.M{i}P{os.getpid()}Q{i}.test"
            (md / ("cur" if ":" in name else "new") / name).write_bytes(m)
        own(self.mail / user)
        return md


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("maildir"))
    with Spawned(str(site.conf)) as server:
        site.port = server.port
        site.server = server
        yield site


def pop(site, user):
    p = poplib.POP3("127.0.0.1", site.port, timeout=10)
    p.user(user)
    p.pass_("pw")
    return p


def retr(p, i):
    return b"\r\n".join(p.retr(i)[1]) + b"\r\n"


def expected(message):
    """What a client gets back through poplib (dots unstuffed), CRLF line ends."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def listing(md):
    return sorted(os.listdir(md / "new")) + sorted(os.listdir(md / "cur"))


# --- kernels against their reference ----------------------------------------------


def test_name_info_matches_the_reference():
    rng = random.Random(13)
    samples = [
        "1700000000.M123P4Q5.host,S=10,W=12:2,S",
        "1700000000.4711_3.vm",
        "1700000000.M544233P32106R4a852ae5db5f3661.localhost",
        "x.y",
        "12345678901234567890.M1.h",
        "17.,W=5,:2,",
        "17.a,W=999999999999999999.h",
        "17.a,W=,W=3",
        "",
        ":2,S",
    ]
    alphabet = "0123456789.MQP_,W=S:2x"
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(3000)]
    for name in samples:
        base = names.base_of(name)
        w = names.size_in_name(base)
        assert _names.name_info(name) == (names.delivery_key(base), base, -1 if w is None else w), name


@pytest.mark.parametrize("message", MESSAGES + [b"", b"\r", b"a\r\r\nb\n\r\n\n", b"x\r"])
def test_size_counter_at_every_split(message):
    want = crlf_size(message)  # what the kernel's DotWriter sends, before stuffing
    for cut in range(0, len(message) + 1, max(1, len(message) // 50)):
        for counter in (names.SizeCounter, _names.SizeCounter):  # the reference and the kernel
            c = counter()
            c.feed(message[:cut])
            c.feed(message[cut:])
            assert c.result() == want, (counter, cut)


def test_filename_uidl_rules():
    assert names.filename_uidl("1700000000.M1P2.host,S=3") == "1700000000.M1P2.host,S=3"
    long = "1700000000." + "x" * 80
    for odd in (long, "1700000000.a b", "1700000000.caf\u00e9"):
        uid = names.filename_uidl(odd)
        assert re.fullmatch(r"[0-9a-f]{40}", uid)
        assert uid == hashlib.blake2b(odd.encode(), digest_size=20).hexdigest()


# --- real clients, real MDAs ------------------------------------------------------


def test_poplib_byte_exact_sizes_uidl_top_in_delivery_order(site):
    # delivery order is by the time in the name, not the name's text
    given = ["1700000010.M5P1Q1.h", "1700000002.M9P1Q2.h:2,S", "1700000002.M10P1Q3.h", "999.1_1.h", "notime.h"]
    md = site.maildir("u0", MESSAGES, given)
    p = pop(site, "u0")
    order = [3, 1, 2, 0, 4]  # 999 < 1700000002.M9 < M10 < 1700000010 < no time
    sizes = [int(line.split()[1]) for line in p.list()[1]]
    uids = [line.split()[1].decode() for line in p.uidl()[1]]
    assert uids == [names.base_of(given[k]) for k in order]
    for i, k in enumerate(order, 1):
        got = retr(p, i)
        assert got == expected(MESSAGES[k]), i
        assert len(got) == sizes[i - 1] == crlf_size(MESSAGES[k])
    assert p.top(2, 0)[1] == [b"From: c@example.org", b"Subject: crlf", b""]
    p.quit()
    # the second session sees the same (the cache is warm now)
    assert (md / "mpop3-sizes").exists()
    p = pop(site, "u0")
    assert [int(line.split()[1]) for line in p.list()[1]] == sizes
    assert [line.split()[1].decode() for line in p.uidl()[1]] == uids
    p.quit()


@pytest.mark.clients
def test_procmail_and_getmail_deliver_fetchmail_keeps_by_uidl(site, tmp_path):
    md = site.maildir("u1")
    rc = tmp_path / "procmailrc"
    rc.write_text(f"DEFAULT={md}/\n")
    os.chmod(tmp_path, 0o755)

    def deliver(command, message):
        subprocess.run(command, input=message, check=True, preexec_fn=as_owner, timeout=30)

    deliver(["procmail", "-m", str(rc)], MESSAGES[0])
    deliver(["getmail_maildir", f"{md}/"], MESSAGES[1])
    home = tmp_path / "home"
    out = tmp_path / "out"
    home.mkdir()
    out.mkdir()
    fetchrc = home / ".fetchmailrc"
    fetchrc.write_text(
        "set no syslog\nset invisible\n"
        f"poll 127.0.0.1 with proto POP3 service {site.port} uidl auth password\n"
        f'  user "u1" there with password "pw" is "root" here keep sslproto ""\n'
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    fetchrc.chmod(0o600)
    env = dict(os.environ, HOME=str(home), LC_ALL="C")

    def fetchmail():
        command = ["fetchmail", "-f", str(fetchrc), "--idfile", str(home / ".fetchids"), "--nosyslog"]
        return subprocess.run(command, env=env, capture_output=True, timeout=60).returncode

    assert fetchmail() == 0
    assert len(os.listdir(out)) == 2
    assert fetchmail() == 1  # 1: nothing new
    deliver(["procmail", "-m", str(rc)], MESSAGES[2])
    assert fetchmail() == 0
    got = sorted(open(f, "rb").read() for f in glob.glob(f"{out}/msg.*"))
    assert len(got) == 3 and any(b"Subject: headers only" in g for g in got)
    # fetched with TOP (fetchmail's keep): nothing counts as retrieved, nothing moved
    assert len(os.listdir(md / "new")) == 3


def test_delivery_during_a_session_waits_and_is_never_deleted(site, tmp_path):
    md = site.maildir("u2", MESSAGES[:2])
    w = Wire(site.port)
    w.login("u2", "pw")
    rc = tmp_path / "rc"
    rc.write_text(f"DEFAULT={md}/\n")
    os.chmod(tmp_path, 0o755)
    subprocess.run(["procmail", "-m", str(rc)], input=MESSAGES[2], check=True, preexec_fn=as_owner, timeout=30)
    assert w.cmd("STAT").split()[1] == b"2"
    assert w.cmd("DELE 1").startswith(b"+OK") and w.cmd("DELE 2").startswith(b"+OK")
    assert w.cmd("QUIT").startswith(b"+OK")
    assert len(listing(md)) == 1
    p = pop(site, "u2")
    assert p.stat()[0] == 1 and retr(p, 1) == expected(MESSAGES[2])
    p.quit()


def test_retr_moves_to_cur_and_the_uidl_stays(site):
    md = site.maildir("u3", MESSAGES[:3])
    p = pop(site, "u3")
    uids = p.uidl()[1]
    retr(p, 2)
    p.top(3, 0)
    p.quit()
    assert os.listdir(md / "cur") == [f"{1700000001}.M1P{os.getpid()}Q1.test:2,S"]
    assert len(os.listdir(md / "new")) == 2
    p = pop(site, "u3")
    assert p.uidl()[1] == uids
    p.quit()


def test_dele_quit_unlinks_and_updates_maildirsize(site):
    md = site.maildir("u4", MESSAGES[:3])
    (md / "maildirsize").write_text("1000000S\n300 3\n")
    own(md)
    p = pop(site, "u4")
    p.dele(1)
    p.dele(3)
    p.quit()
    assert len(listing(md)) == 1
    lines = (md / "maildirsize").read_text().splitlines()
    assert lines[-1] == f"-{len(MESSAGES[0]) + len(MESSAGES[2])} -2"


def test_vanished_message_is_refused_alone_and_a_renamed_one_found(site):
    md = site.maildir("u5", MESSAGES[:3])
    w = Wire(site.port)
    w.login("u5", "pw")
    first, second = sorted(os.listdir(md / "new"))[:2]
    os.unlink(md / "new" / first)  # another client expunged it
    os.rename(md / "new" / second, md / "cur" / (second + ":2,RS"))  # another client flagged it
    assert w.cmd("RETR 1") == b"-ERR [SYS/TEMP] message 1 is no longer there"
    assert w.cmd("TOP 1 0") == b"-ERR [SYS/TEMP] message 1 is no longer there"
    assert w.cmd("STAT").startswith(b"+OK 3 ")  # the session goes on, its listing unchanged
    assert w.cmd("RETR 2").startswith(b"+OK")
    assert w.raw_until() == wire_form(MESSAGES[1])
    assert w.cmd("DELE 1").startswith(b"+OK") and w.cmd("DELE 2").startswith(b"+OK")
    assert w.cmd("QUIT").startswith(b"+OK")  # already gone counts as done
    assert len(listing(md)) == 1


def test_in_use_across_two_server_processes(site):
    site.maildir("u6", MESSAGES[:1])
    with Spawned(str(site.conf)) as other:
        w = Wire(site.port)
        w.login("u6", "pw")
        x = Wire(other.port)
        x.cmd("USER u6")
        assert x.cmd("PASS pw").startswith(b"-ERR [IN-USE]")
        w.cmd("QUIT")
        wait_for(lambda: login_ok(other.port, "u6"), what="the mailbox to be free again")


def login_ok(port, user):
    x = Wire(port)
    x.cmd(f"USER {user}")
    ok = x.cmd("PASS pw").startswith(b"+OK")
    x.cmd("QUIT")
    return ok


# --- hostile cases --------------------------------------------------------------------


def err_on_login(site, user):
    x = Wire(site.port)
    x.cmd(f"USER {user}")
    return x.cmd("PASS pw")


def test_missing_maildir_is_perm_and_not_created(site):
    assert err_on_login(site, "u7").startswith(b"-ERR [SYS/PERM]")
    assert not (site.mail / "u7").exists()


def test_symlinked_cur_is_refused(site, tmp_path):
    md = site.maildir("u8", MESSAGES[:1])
    elsewhere = site.maildir("u9", MESSAGES[1:2])
    shutil.rmtree(md / "cur")
    os.symlink(elsewhere / "cur", md / "cur")
    assert err_on_login(site, "u8").startswith(b"-ERR [SYS/PERM]")


@pytest.mark.root  # a Maildir another user owns
def test_maildir_of_another_user_is_refused(site):
    md = site.maildir("u10", MESSAGES[:1])
    os.chown(md, 0, 0)
    assert err_on_login(site, "u10").startswith(b"-ERR [SYS/PERM]")


def test_links_fifos_odd_and_long_names(site, tmp_path):
    md = site.maildir("u11", MESSAGES[:1])
    secret = tmp_path / "secret"
    secret.write_bytes(b"Subject: not yours\n\n")
    os.symlink(secret, md / "new" / "1700000005.M1P1Q1.link")
    os.mkfifo(md / "new" / "1700000006.M1P1Q1.fifo")
    (md / "new" / "1700000007.M1P1Q1.bad\x01name").write_bytes(MESSAGES[1])
    (md / "new" / ".hidden").write_bytes(MESSAGES[1])
    (md / "tmp" / "1700000008.M1P1Q1.tmp").write_bytes(MESSAGES[1])
    long = "1700000009." + "x" * 90
    (md / "cur" / (long + ":2,S")).write_bytes(MESSAGES[2])
    own(md)
    p = pop(site, "u11")
    assert p.stat()[0] == 2
    uids = [line.split()[1].decode() for line in p.uidl()[1]]
    assert uids[1] == hashlib.blake2b(long.encode(), digest_size=20).hexdigest()
    assert retr(p, 2) == expected(MESSAGES[2])
    p.quit()


def test_damaged_or_wrong_cache_is_rebuilt(site):
    md = site.maildir("u12", MESSAGES[:2])
    pop(site, "u12").quit()
    cache = maildir_box.Cached.decode((md / "mpop3-sizes").read_bytes())
    assert cache.sizes == [crlf_size(m) for m in MESSAGES[:2]] and len(cache.names) == 2
    assert cache.stamps is None  # the directories are too young to vouch for
    (md / "mpop3-sizes").write_text("garbage\n")
    p = pop(site, "u12")
    assert [int(x.split()[1]) for x in p.list()[1]] == [crlf_size(m) for m in MESSAGES[:2]]
    p.quit()
    # a well-formed cache with a wrong size: LIST says it, RETR corrects the cache
    cache.sizes[0] = 7
    (md / "mpop3-sizes").write_bytes(cache.encode())
    p = pop(site, "u12")
    assert int(p.list()[1][0].split()[1]) == 7
    retr(p, 1)
    p.quit()
    p = pop(site, "u12")
    assert int(p.list()[1][0].split()[1]) == crlf_size(MESSAGES[0])
    p.quit()


def test_unchanged_directories_are_not_listed_again(tmp_path, monkeypatch):
    """The cached listing is used without a scan while new/ and cur/ keep
    their stamps; a delivery, a flag change or a removal changes them and
    is seen; directories changed less than TRUST_AFTER_NS ago are never
    vouched for (changes within one timestamp tick would be invisible)."""
    site = Site(tmp_path)
    md = site.maildir("u0", MESSAGES[:3])
    mod = import_module_file(MODULE_PATH, "t")
    mod.module_init({"mail_location": f"{site.mail}/%u/Maildir", "mailbox_user": "any"})
    scans = []
    listing_of = maildir_box.Maildir.listing
    monkeypatch.setattr(maildir_box.Maildir, "listing", lambda box: scans.append(1) or listing_of(box))

    def opened():
        box = mod.storage_lock_mailbox("u0")
        got = (list(box.entries), list(mod.storage_message_sizes(box)))
        mod.storage_unlock_mailbox(box)
        return got

    first = opened()
    assert opened() == first and len(scans) == 2  # young directories: listed each time
    monkeypatch.setattr(maildir_box, "TRUST_AFTER_NS", 0)
    assert opened() == first and len(scans) == 3  # now vouched for, and recorded
    assert opened() == first and len(scans) == 3  # unchanged: not listed
    assert maildir_box.Cached.decode((md / "mpop3-sizes").read_bytes()).stamps is not None
    time.sleep(0.05)  # past the clock tick of the last change
    (md / "new" / "1700000009.M9P1Q9.late").write_bytes(MESSAGES[4])
    entries, sizes = opened()
    assert len(scans) == 4 and entries[-1] == ("new", "1700000009.M9P1Q9.late") and sizes[-1] == crlf_size(MESSAGES[4])
    time.sleep(0.05)
    os.rename(md / "new" / entries[0][1], md / "cur" / (entries[0][1] + ":2,S"))
    assert opened()[0][0] == ("cur", entries[0][1] + ":2,S") and len(scans) == 5
    assert opened()[0][0] == ("cur", entries[0][1] + ":2,S") and len(scans) == 5


def test_dovecot_uidlist(tmp_path):
    site = Site(tmp_path, {"uidl_format": "dovecot", "maildir_move_to_cur": "no"})
    given = [f"{1700000000 + i}.M{i}P7Q{i}.h" for i in range(4)]
    md = site.maildir("u0", MESSAGES[:4], given)
    # Dovecot saw three of them (the second with flags since), in another
    # order; one has a UIDL saved by a migration; the fourth came later
    (md / "dovecot-uidlist").write_text(
        "3 V1700000123 N9 G0123456789abcdef0123456789abcdef\n"
        f"5 :{given[2]}\n"
        f"7 W300 :{given[1]}:2,S\n"
        f"8 Pold-uidl-from-before W12 :{given[0]}\n"
    )
    own(md)
    with Spawned(str(site.conf)) as server:
        site.port = server.port
        p = pop(site, "u0")
        uids = [line.split()[1].decode() for line in p.uidl()[1]]
        assert uids == ["000000056553f17b", "000000076553f17b", "old-uidl-from-before", given[3]]
        assert retr(p, 1) == expected(MESSAGES[2])
        retr(p, 2)
        p.quit()
    assert len(os.listdir(md / "new")) == 4  # maildir_move_to_cur no


def test_uidlist_version_1_and_garbage():
    u = uidlist.parse("1 1700000123 5\n3 1700000000.M1P1.h:2,S\n")
    assert u.lookup("1700000000.M1P1.h") == (3, "000000036553f17b")
    with pytest.raises(ValueError):
        uidlist.parse("7 nonsense\n")


def test_every_setting_is_documented():
    module = import_module_file(MODULE_PATH, "t")
    readme = open(os.path.join(TREE, "README.md")).read()
    for setting in module.MPOP3_SETTINGS:
        assert re.search(rf"^\| `storage_maildir` \| `{setting}` \|", readme, re.M), setting


# --- QUIT killed at every step; the warm open, counted ----------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tree!r})
    from mpop3.loader import import_module_file
    from mpop3.maildir import box as maildir_box
    mod = import_module_file({module!r}, "t")
    mod.module_init({{"mail_location": {location!r}, "mailbox_user": "any"}})
    box = mod.storage_lock_mailbox("u0")
    for i in {retrieved!r}:
        b"".join(mod.storage_dump_fragment(box, i, None))
    steps = [0]
    def hook(name):
        steps[0] += 1
        if steps[0] == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    maildir_box.step_hook = hook
    mod.storage_synch(box, {deleted!r})
    mod.storage_unlock_mailbox(box)
    print(steps[0])
""")


def run_child(location, kill_at, deleted, retrieved):
    script = CHILD.format(
        tree=TREE, module=MODULE_PATH, location=location, kill_at=kill_at, deleted=deleted, retrieved=retrieved
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)


def test_kill_9_at_every_step_of_quit(tmp_path):
    messages = [b"Subject: %d\n\nbody %d\n" % (i, i) for i in range(8)]
    deleted, retrieved = {0, 2, 3, 6}, [1, 4, 5]
    location = f"{tmp_path}/%u/Maildir"

    def fresh():
        shutil.rmtree(tmp_path / "u0", ignore_errors=True)
        md = tmp_path / "u0" / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        for i, m in enumerate(messages):
            (md / "new" / f"{1700000000 + i}.M0P1Q{i}.h").write_bytes(m)
        (md / "maildirsize").write_text("0S\n")
        return md

    fresh()
    done = run_child(location, -1, deleted, retrieved)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout)
    assert steps >= 8
    for kill_at in range(1, steps + 1):
        md = fresh()
        result = run_child(location, kill_at, deleted, retrieved)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.stderr)
        present = {}
        for sub in ("new", "cur"):
            for n in os.listdir(md / sub):
                present[int(n.split("Q")[1].split(".")[0])] = (md / sub / n).read_bytes()
        for i, m in enumerate(messages):
            if i in deleted:
                assert present.get(i, m) == m
            else:
                assert present[i] == m, (kill_at, i)  # every kept message whole
        # the next session opens it and lists what is there, sizes right
        mod = import_module_file(MODULE_PATH, "t")
        mod.module_init({"mail_location": location, "mailbox_user": "any"})
        box = mod.storage_lock_mailbox("u0")
        assert sorted(mod.storage_message_sizes(box)) == sorted(crlf_size(present[i]) for i in present)
        mod.storage_unlock_mailbox(box)


@pytest.mark.slow  # strace (.ci/run installs it)
def test_warm_open_needs_no_open_or_stat_per_message(tmp_path):
    location = f"{tmp_path}/%u/Maildir"

    def calls(count):
        user = f"n{count}"
        md = tmp_path / user / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        for i in range(count):
            (md / "new" / f"{1700000000 + i}.M0P1Q{i}.h").write_bytes(b"Subject: x\n\n.\n")
        script = (
            f"import sys; sys.path.insert(0, {TREE!r})\n"
            "from mpop3.loader import import_module_file\n"
            f"mod = import_module_file({MODULE_PATH!r}, 't')\n"
            f"mod.module_init({{'mail_location': {location!r}, 'mailbox_user': 'any'}})\n"
            f"mod.storage_unlock_mailbox(mod.storage_lock_mailbox({user!r}))\n"  # cold: fills the cache
            "import os; os.write(1, b'WARM\\n')\n"
            f"box = mod.storage_lock_mailbox({user!r}); assert len(mod.storage_message_sizes(box)) == {count}\n"
        )
        out = tmp_path / f"strace-{count}"
        syscalls = "openat,open,stat,lstat,newfstatat,statx,fstat"
        subprocess.run(
            ["strace", "-f", "-o", str(out), "-e", f"trace={syscalls},write", sys.executable, "-c", script],
            check=True,
            capture_output=True,
            timeout=60,
        )
        trace = out.read_text().split("WARM")[1]
        return len(re.findall(r"\b(?:openat|open|stat|lstat|newfstatat|statx|fstat)\(", trace))

    small, large = calls(20), calls(3000)
    assert large - small < 10, (small, large)
    print(f"warm open syscalls (open/stat family): {small} for 20 messages, {large} for 3000")


# --- one message gone: the core's answer ---------------------------------------------


def test_core_refuses_a_gone_message_alone_and_goes_on():
    core = SessionCore(Policy(), "192.0.2.7")
    core.mailbox = "m"
    core.mailbox_opened([10, 20], True)
    assert core.command(b"RETR 2") == [SendMessage(1, None, replies.ok_retr(20))]
    assert core.storage_failed(MessageGone("x")) == [b"-ERR [SYS/TEMP] message 2 is no longer there\r\n"]
    assert core.command(b"TOP 1 3") == [SendMessage(0, 3, replies.OK_TOP)]
    assert core.storage_failed(MessageGone("x")) == [b"-ERR [SYS/TEMP] message 1 is no longer there\r\n"]
    assert not core.busy and core.command(b"STAT") == [replies.ok_stat(2, 30)]
    # outside RETR and TOP it is what it derives from: the mailbox changed, the session ends
    core.command(b"UIDL")
    assert core.storage_failed(MessageGone("x")) == [replies.ERR_CHANGED.wire, CLOSE]


# --- real Dovecot: its LDA delivers, its POP3 server answers the same ----------------------


def owner_entry():
    return OWNER or pwd.getpwuid(os.geteuid())


def fetch_all(port, user):
    """(UIDL listing, LIST sizes, every message as RETR sends it) through poplib; QUIT."""
    p = pop(types.SimpleNamespace(port=port), user)
    uids = p.uidl()[1]
    sizes = [int(line.split()[1]) for line in p.list()[1]]
    got = [retr(p, i) for i in range(1, len(sizes) + 1)]
    p.quit()
    return uids, sizes, got


def lda_conf(tmp_path):
    where = tmp_path / "lda"
    conf = dovecot_maildir.write_conf(str(where), "/nonexistent", owner_entry())
    own(where)
    os.chmod(tmp_path, 0o755)
    return conf


@pytest.mark.clients
def test_dovecot_lda_delivers_mpop3_serves_byte_exact(site, tmp_path):
    md = site.maildir("u13")
    conf = lda_conf(tmp_path)
    for m in MESSAGES:
        dovecot_maildir.deliver(conf, md, m, preexec_fn=as_owner)
    assert all(",W=" in n for n in os.listdir(md / "new"))  # the LDA names its sizes
    _, sizes, got = fetch_all(site.port, "u13")
    assert got == [expected(m) for m in MESSAGES]
    assert sizes[:4] == [len(g) for g in got[:4]]  # its ,W= is what RETR sends
    # except the CRLF RETR adds to a last line without one, which Dovecot's
    # ,W= and its LIST leave out: LIST keeps Dovecot's figure (as Dovecot does)
    assert sizes[4] == len(got[4]) - 2 and not MESSAGES[4].endswith(b"\n")


@pytest.mark.clients
def test_uidls_and_messages_equal_what_dovecot_answers(tmp_path):
    """The same Maildir served by Dovecot 2.3, then by mpop3 (uidl_format
    dovecot), then by Dovecot again: the same UIDLs, sizes and bytes each
    time, though each server renames what it served into cur/."""
    site = Site(tmp_path, {"uidl_format": "dovecot"})
    given = [f"{1700000000 + i}.M{i}P7Q{i}.h" + (":2,S" if i % 2 else "") for i in range(3)]
    md = site.maildir("u0", MESSAGES[:3], given)
    conf = lda_conf(tmp_path)
    for m in MESSAGES[3:]:
        dovecot_maildir.deliver(conf, md, m, preexec_fn=as_owner)
    droot = tempfile.mkdtemp(prefix="dv-", dir="/tmp")  # short: Dovecot's socket paths
    try:
        with dovecot_maildir.Dovecot(droot, site.mail, ["u0"], owner_entry()) as dovecot:
            theirs = fetch_all(dovecot.port, "u0")
            assert (md / "dovecot-uidlist").exists()
            with Spawned(str(site.conf)) as server:
                ours = fetch_all(server.port, "u0")
            assert ours == theirs
            assert fetch_all(dovecot.port, "u0") == theirs, dovecot.log()
    finally:
        shutil.rmtree(droot, ignore_errors=True)
    assert sorted(theirs[2]) == sorted(expected(m) for m in MESSAGES)
    assert not os.listdir(md / "new")  # both servers saved what was read as seen


# --- real clients on a Maildir: the same checks as tests/test_clients.py's on an mbox ------


@pytest.fixture
def bob(site, tmp_path):
    """bob's Maildir holding test_clients.MESSAGES in order, and a HOME for the clients."""
    shutil.rmtree(site.mail / "bob", ignore_errors=True)
    site.maildir("bob", clients.MESSAGES)
    (tmp_path / "home").mkdir()
    return types.SimpleNamespace(root=tmp_path, home=tmp_path / "home", port=site.port)


@pytest.mark.clients
def test_curl_on_a_maildir(bob):
    clients.test_curl(bob)


@pytest.mark.clients
def test_getmail6_on_a_maildir(bob):
    clients.test_getmail_keep_then_nothing_new(bob)


@pytest.mark.clients
def test_mpop_on_a_maildir(bob):
    clients.test_mpop_keep_then_nothing_new(bob)
    clients.test_mpop_delete(bob)


# --- a system user's ~/Maildir, opened as that user ------------------------------------------


@pytest.mark.root  # a system user
def test_system_user_home_maildir_opened_as_its_user(tmp_path):
    from system_users import run as run_command
    from system_users import system_user

    with system_user("mpop3md") as account:
        home = tmp_path / "home"
        run_command("usermod", "-d", str(home), "mpop3md")
        md = home / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        for i, m in enumerate(MESSAGES[:3]):
            (md / "new" / f"{1700000000 + i}.M{i}P1Q{i}.h").write_bytes(m)
        for d, subdirs, files in os.walk(home):
            for n in [d] + [os.path.join(d, x) for x in subdirs + files]:
                os.lchown(n, account.pw_uid, account.pw_gid)
        os.chmod(home, 0o700)
        path = str(tmp_path)
        while path not in ("/", "/tmp"):  # a way down through pytest's 0700 dirs
            os.chmod(path, os.stat(path).st_mode | 0o011)
            path = os.path.dirname(path)
        (tmp_path / "passwd").write_text("mpop3md:pw\n")
        conf = tmp_path / "mpop3.conf"
        conf.write_text(
            f"module_dir {TREE}/modules\nlogin_fail_delay 0.01\nshutdown_grace 0.5\n"
            f"auth_module auth_file\n> passwd_file {tmp_path}/passwd\nstorage_module storage_maildir\n"
        )  # mail_location ~/Maildir and mailbox_user mailbox: the defaults
        with Spawned(str(conf)) as server:
            p = pop(types.SimpleNamespace(port=server.port), "mpop3md")
            assert [retr(p, i) for i in (1, 2, 3)] == [expected(m) for m in MESSAGES[:3]]
            p.dele(1)
            p.quit()
        assert len(listing(md)) == 2
        # what the session wrote is the user's: the sizes cache, the moved messages
        assert os.stat(md / "mpop3-sizes").st_uid == account.pw_uid
        assert {os.stat(md / "cur" / n).st_uid for n in os.listdir(md / "cur")} == {account.pw_uid}
