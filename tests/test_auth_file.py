"""auth_file: the password file as an administrator writes it, checked
through the real module and, where it matters, over TCP."""

import os
import subprocess
import sys
import threading
import time

import pytest
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


def test_malformed_lines_are_reported_with_their_numbers(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(BROKEN)
    conf = tmp_path / "mpop3.conf"
    conf.write_text(f"module_dir {TREE}/modules\nauth_module auth_file\n> passwd_file {passwd}\n")
    result = subprocess.run(
        [sys.executable, "-m", "mpop3", "--check-config", "-c", str(conf)],
        capture_output=True,
        text=True,
        cwd=TREE,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for number in (2, 3, 4, 5, 6, 7):
        assert f"{passwd}:{number}:" in result.stderr, result.stderr
    assert f"{passwd}:1:" not in result.stderr and f"{passwd}:8:" not in result.stderr
    tables, _ = load(tmp_path, BROKEN)
    assert tables.auth.auth_attempt_login("alice", "a") == "alice"
    assert tables.auth.auth_attempt_login("alice", "again") is None  # the first line wins
    assert tables.auth.auth_attempt_login("erin", "e") == "erin"


def test_failed_logins_cost_the_same_for_unknown_and_plaintext_users(tmp_path):
    """A wrong password costs one hash whoever the user is: timing does not
    tell which users exist."""
    tables, _ = load(tmp_path, f"plain:pw\nslow:{SLOW_YESCRYPT}\n")

    def cost(user):
        start = time.perf_counter()
        assert tables.auth.auth_attempt_login(user, "wrong") is None
        return time.perf_counter() - start

    slow, unknown, plain = cost("slow"), cost("nobody"), cost("plain")
    assert unknown > 0.5 * slow and plain > 0.5 * slow, (slow, unknown, plain)


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
