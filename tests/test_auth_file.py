"""auth_file: the password file as an administrator writes it, checked
through the real module and, where it matters, over TCP."""

import base64
import hashlib
import hmac
import logging
import os
import random
import re
import statistics
import subprocess
import threading
import time

import pytest
from conftest import run_mpop3
from pop_server import TREE, ServerThread, Wire

from mpop3 import config, loader
from mpop3.passwords import crypt
from mpop3.protocol import replies

YESCRYPT = crypt(b"yes-pw", b"$y$j9T$abcdefghijklmnop$").decode()
SLOW_YESCRYPT = crypt(b"slow-pw", b"$y$jDT$abcdefghijklmnop$").decode()  # ~0.3 s per check
SHA512 = subprocess.run(
    ["openssl", "passwd", "-6", "-salt", "NaCl", "sha-pw"], capture_output=True, text=True, check=True
).stdout.strip()
BCRYPT = crypt(b"bf-pw", b"$2b$04$abcdefghijklmnopqrstuu").decode()

PASSWD = f"""# users of the test site
plain:plain-pw
tagged:{{PLAIN}}tagged-pw
yes:{YESCRYPT}
sha:{SHA512}:shabox
bf:{BCRYPT}
crypted:{{CRYPT}}{SHA512}
spaces:two words
"""


def load(tmp_path, text):
    passwd = tmp_path / "passwd"
    passwd.write_text(text)
    conf = config.parse(f"module_dir {TREE}/modules\nauth_module auth_file\n> passwd_file {passwd}\n")
    return loader.load_modules(conf), passwd


@pytest.mark.parametrize(
    "user, password, mailbox",
    [
        ("plain", "plain-pw", "plain"),
        ("tagged", "tagged-pw", "tagged"),
        ("yes", "yes-pw", "yes"),
        ("sha", "sha-pw", "shabox"),
        ("bf", "bf-pw", "bf"),
        ("crypted", "sha-pw", "crypted"),
        ("spaces", "two words", "spaces"),
    ],
)
def test_every_password_form_logs_in(tmp_path, user, password, mailbox):
    tables, _ = load(tmp_path, PASSWD)
    assert tables.auth.auth_attempt_login(user, password) == mailbox
    assert tables.auth.auth_attempt_login(user, password + "x") is None
    assert tables.auth.auth_attempt_login(user, "") is None


def test_apop_sees_plaintext_passwords_only(tmp_path):
    tables, _ = load(tmp_path, PASSWD)
    assert tables.auth.auth_password("plain") == "plain-pw"
    assert tables.auth.auth_password("tagged") == "tagged-pw"
    assert tables.auth.auth_password("yes") is None
    assert tables.auth.auth_password("sha") is None
    assert tables.auth.auth_password("nobody") is None
    assert tables.auth.auth_login("sha") == "shabox"
    assert tables.auth.auth_login("nobody") is None


def test_the_file_is_re_read_when_it_changes(tmp_path):
    tables, passwd = load(tmp_path, "bob:old\n")
    assert tables.auth.auth_attempt_login("bob", "old") == "bob"
    passwd.write_text("bob:new:bobbox\ncarol:c\n")
    assert tables.auth.auth_attempt_login("bob", "old") is None
    assert tables.auth.auth_attempt_login("bob", "new") == "bobbox"
    assert tables.auth.auth_attempt_login("carol", "c") == "carol"
    os.unlink(passwd)  # gone: nobody logs in, nothing crashes
    assert tables.auth.auth_attempt_login("carol", "c") is None


BROKEN = """alice:a
this line has no colon
:nouser
bob:
carol:c:box:extra
dave:{CRYPT}notahash
alice:again
erin:e
"""


def check_config(tmp_path, passwd):
    """`mpop3 --check-config` on a configuration with auth_file reading
    `passwd`: the CompletedProcess (what it reports is on stderr)."""
    conf = tmp_path / "mpop3.conf"
    conf.write_text(f"module_dir {TREE}/modules\nauth_module auth_file\n> passwd_file {passwd}\n")
    return run_mpop3("--check-config", "-c", str(conf))


def test_malformed_lines_are_reported_with_their_numbers(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(BROKEN)
    result = check_config(tmp_path, passwd)
    assert result.returncode == 0, result.stderr
    for number in (2, 3, 4, 5, 6, 7):
        assert f"{passwd}:{number}:" in result.stderr, result.stderr
    assert f"{passwd}:1:" not in result.stderr and f"{passwd}:8:" not in result.stderr
    tables, _ = load(tmp_path, BROKEN)
    assert tables.auth.auth_attempt_login("alice", "a") == "alice"
    assert tables.auth.auth_attempt_login("alice", "again") is None  # the first line wins
    assert tables.auth.auth_attempt_login("erin", "e") == "erin"


def test_hashing_does_not_stall_other_sessions(tmp_path):
    """A slow crypt() runs in a worker thread; meanwhile others are served."""
    tables, _ = load(tmp_path, f"slow:{SLOW_YESCRYPT}\nfast:f\n")
    with ServerThread(tables) as s:
        slow = Wire(s.port)
        slow.cmd("USER slow")
        result = []
        t = threading.Thread(target=lambda: result.append(slow.cmd("PASS slow-pw")))
        start = time.monotonic()
        t.start()
        time.sleep(0.02)
        other = Wire(s.port)
        latencies = []
        for _ in range(5):
            before = time.monotonic()
            assert other.cmd("CAPA").startswith(b"+OK")
            other.multi()
            latencies.append(time.monotonic() - before)
        t.join()
        hashing = time.monotonic() - start
        assert result[0].startswith(b"+OK maildrop has 0 messages")
        assert hashing > 0.2 and max(latencies) < 0.05, (hashing, latencies)
        assert other.cmd("USER fast") == replies.OK_USER.wire[:-2]


# --- entries that must not log in by accident (issue 12, item 5) --------------------


def logins(port, user, password):
    """Which ways of logging in let `user` in with `password`, over TCP:
    USER/PASS, AUTH PLAIN, APOP (on the greeting's timestamp) and AUTH
    CRAM-MD5, each on a connection of its own."""
    secret = password.encode()
    name = user.encode()
    answers = {}
    wire = Wire(port)
    wire.cmd(b"USER " + name)
    answers["PASS"] = wire.cmd(b"PASS " + secret)
    wire = Wire(port)
    answers["PLAIN"] = wire.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0" + name + b"\0" + secret))
    wire = Wire(port)
    timestamp = re.search(rb"<[^<>]+>", wire.greeting)[0]
    answers["APOP"] = wire.cmd(b"APOP " + name + b" " + hashlib.md5(timestamp + secret).hexdigest().encode())
    wire = Wire(port)
    challenge = base64.b64decode(wire.cmd("AUTH CRAM-MD5")[2:])
    digest = hmac.new(secret, challenge, "md5").hexdigest().encode()
    answers["CRAM-MD5"] = wire.cmd(base64.b64encode(name + b" " + digest))
    for way, reply in answers.items():
        assert reply.startswith((b"+OK maildrop", b"-ERR [AUTH]", b"-ERR usage: PASS")), (way, reply)
    return {way for way, reply in answers.items() if reply.startswith(b"+OK")}


EVERY_WAY = {"PASS", "PLAIN", "APOP", "CRAM-MD5"}
CLEARTEXT = {"PASS", "PLAIN"}  # the ways a hashed entry can check: the password itself

# Hashes libcrypt checks, in formats a list of prefixes would miss
DES = crypt(b"des-pw", b"dS").decode()
BSDI = crypt(b"bsdi-pw", b"_J9..salt").decode()
SUN_MD5 = crypt(b"sun-pw", b"$md5,rounds=5000$GUBv0xjJ$").decode()
NT = crypt(b"nt-pw", b"$3$$").decode()
# ... and entries nobody can check
ARGON2 = "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG"
TRUNCATED = SHA512[:40]


def test_an_empty_password_never_logs_in(tmp_path, server_thread):
    blank = crypt(b"", b"$y$j9T$abcdefghijklmnop$").decode()  # a hash of the empty password
    tables, _ = load(tmp_path, f"guest:{{PLAIN}}\nblank:{blank}\nwithmail:{{PLAIN}}:guestbox\n")
    server = server_thread(tables)
    for user in ("guest", "blank", "withmail"):
        assert logins(server.port, user, "") == set(), user
    assert tables.auth.auth_password("guest") is None  # nothing for APOP or CRAM-MD5 to use
    assert tables.auth.auth_login("guest") is None


@pytest.mark.parametrize(
    "entry, password",
    [(DES, "des-pw"), (BSDI, "bsdi-pw"), (SUN_MD5, "sun-pw"), (NT, "nt-pw"), ("{CRYPT}" + DES, "des-pw")],
    ids=["des", "bsdi", "sun-md5", "nt", "crypt-des"],
)
def test_a_hash_is_checked_by_libcrypt_and_never_logs_in_as_itself(tmp_path, server_thread, entry, password):
    tables, _ = load(tmp_path, f"user:{entry}\n")
    server = server_thread(tables)
    hash_itself = entry.removeprefix("{CRYPT}")
    assert logins(server.port, "user", hash_itself) == set()
    assert logins(server.port, "user", password) == CLEARTEXT
    assert tables.auth.auth_password("user") is None


# The entries nobody can log in with, and what --check-config says of each
LOCKED = [
    ("argon", ARGON2, None, r"not a hash libcrypt can check"),
    ("dollar", "$ecret", None, r"not a hash libcrypt can check.*\{PLAIN\}"),
    ("truncated", TRUNCATED, None, r"not a hash libcrypt can check"),
    ("empty", "{PLAIN}", None, r"empty password"),
    ("bare", "", None, r"empty password"),
    ("bang", "!" + SHA512, "sha-pw", r"locked"),
    ("star", "*", None, r"locked"),
]


def test_entries_nobody_can_check_are_locked_and_reported_with_their_line(tmp_path, server_thread, caplog):
    text = "".join(f"{user}:{secret}\n" for user, secret, _, _ in LOCKED)
    text += f"fine:{SUN_MD5}\nbangplain:!QAZ2wsx\nplain:plain-pw\ndes:{DES}\n"
    caplog.set_level(logging.WARNING, logger="mpop3.auth")
    tables, passwd = load(tmp_path, text)
    server = server_thread(tables)
    for user, secret, password, _ in LOCKED:
        assert logins(server.port, user, secret) == set(), user
        if password is not None:
            assert logins(server.port, user, password) == set(), user
    assert logins(server.port, "fine", "sun-pw") == CLEARTEXT
    assert logins(server.port, "bangplain", "!QAZ2wsx") == EVERY_WAY  # a password that starts with "!"
    assert logins(server.port, "plain", "plain-pw") == EVERY_WAY
    # reported with the line, in the log and by --check-config, on stderr
    checked = check_config(tmp_path, passwd)
    assert checked.returncode == 0, checked.stderr
    for report in (caplog.text, checked.stderr):
        for number, (user, _, _, why) in enumerate(LOCKED, 1):
            assert re.search(rf"{re.escape(str(passwd))}:{number}: .*{user}.*{why}", report), (number, report)
        for number in (len(LOCKED) + 1, len(LOCKED) + 2, len(LOCKED) + 3):
            assert f"{passwd}:{number}:" not in report, report
        # a DES hash is 13 characters a password could be made of: it is said how it is taken
        assert re.search(rf"{passwd}:{len(LOCKED) + 4}: .*DES.*\{{PLAIN\}}", report), report


# --- timing (issue 12, item 6) ---------------------------------------------------------


# No delay after a failure, so that the reply's time is the check's time
NO_FAIL_DELAY = {"login_fail_delay": "0", "login_fail_delay_max": "0"}


def median_failure_times(port, users, rounds=21):
    """The median time a wrong password takes for each user over TCP, as a
    client sees it: from sending PASS to reading its -ERR [AUTH], each on a
    new connection. Measured in rounds, the users in a new order each
    round, so that the machine's load drifts alike for all of them."""
    times = {user: [] for user in users}
    order = list(users)
    shuffle = random.Random(12).shuffle
    for _ in range(rounds):
        shuffle(order)
        for user in order:
            wire = Wire(port)
            wire.cmd(f"USER {user}")
            start = time.perf_counter()
            reply = wire.cmd("PASS wrong")
            times[user].append(time.perf_counter() - start)
            assert reply.startswith(b"-ERR [AUTH]"), (user, reply)
            wire.close()
    return {user: statistics.median(spent) for user, spent in times.items()}


def failures_cost_alike(port, users, tolerance=0.10, tries=3):
    """The median failure times of `users` (median_failure_times), checked
    to be within `tolerance` of the first user's. The machine is shared
    (other tests, other builds): a measurement that strays is taken again,
    up to `tries` times; a real difference (a hash of another cost, a
    lookup without one) shows every time."""
    for _ in range(tries):
        medians = median_failure_times(port, users)
        print("median failed login, s:", medians)
        reference = medians[users[0]]
        if all(abs(spent - reference) <= tolerance * reference for spent in medians.values()):
            return medians
    raise AssertionError(f"failed logins differ by more than {tolerance:.0%} from {users[0]}'s: {medians}")


@pytest.mark.slow
def test_a_failed_login_costs_the_same_whoever_the_user_and_whatever_the_hash(tmp_path, server_thread):
    """An unknown user, a plaintext one and users of three hash methods of
    different costs: a wrong password takes the same time for each (within
    10%), so the time does not tell who exists, nor which method a user has.
    The cheapest method comes first in the file."""
    bcrypt8 = crypt(b"bf8-pw", b"$2b$08$abcdefghijklmnopqrstuu").decode()
    tables, _ = load(tmp_path, f"sha:{SHA512}\nyes:{YESCRYPT}\nbf8:{bcrypt8}\nplain:plain-pw\n")
    server = server_thread(tables, NO_FAIL_DELAY)
    medians = failures_cost_alike(server.port, ["nobody", "sha", "yes", "bf8", "plain"])
    assert medians["nobody"] > 0.015, medians  # yescrypt and bcrypt's cost, not a lookup's
