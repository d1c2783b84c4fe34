"""auth_getpw against real system accounts made with useradd + chpasswd."""

import base64
import json

import pytest
from pop_server import MemoryStorage, Wire
from system_users import run, run_with_case_folding_account, system_user

from mpop3 import config, loader
from mpop3.passwords import crypt, gensalt

pytestmark = pytest.mark.root  # system accounts made with useradd, read from shadow

PASSWORD = "c0rrect-h0rse"


@pytest.fixture(scope="module")
def auth():
    return loader.load_modules(config.parse("auth_module auth_getpw\n", "t.conf")).auth


@pytest.mark.parametrize("method", ["YESCRYPT", "SHA512"])
def test_right_password_logs_in_wrong_one_fails(auth, method):
    with system_user("mpop3t-ok", PASSWORD, hash_method=method):
        assert auth.auth_attempt_login("mpop3t-ok", PASSWORD) == "mpop3t-ok"
        assert auth.auth_attempt_login("mpop3t-ok", PASSWORD + "x") is None
        assert auth.auth_attempt_login("mpop3t-ok", "") is None


def test_locked_account_fails(auth):
    with system_user("mpop3t-lock", PASSWORD, locked=True):
        assert auth.auth_attempt_login("mpop3t-lock", PASSWORD) is None


def test_expired_account_fails(auth):
    with system_user("mpop3t-exp", PASSWORD, expired=True):
        assert auth.auth_attempt_login("mpop3t-exp", PASSWORD) is None


def test_account_without_password_fails(auth):
    with system_user("mpop3t-nopw"):
        assert auth.auth_attempt_login("mpop3t-nopw", "") is None
        assert auth.auth_attempt_login("mpop3t-nopw", "!") is None


def test_uid_below_the_minimum_fails(auth):
    with system_user("mpop3t-sys", PASSWORD, system=True) as pw:
        assert pw.pw_uid < 1000
        assert auth.auth_attempt_login("mpop3t-sys", PASSWORD) is None
        lenient = loader.load_modules(config.parse("auth_module auth_getpw\n> min_uid 100\n", "t.conf")).auth
        assert lenient.auth_attempt_login("mpop3t-sys", PASSWORD) == "mpop3t-sys"
    # module state is per process: restore the default for the other tests
    loader.load_modules(config.parse("auth_module auth_getpw\n", "t.conf"))


def test_root_cannot_log_in(auth):
    assert auth.auth_attempt_login("root", "") is None


def test_no_apop_and_root_needed(auth):
    assert auth.auth_timestamp() is None
    assert auth.auth_password("root") is None
    assert auth.auth_need_root() is True


def test_bad_min_uid_is_a_config_error(tmp_path):
    from conftest import run_mpop3
    from test_config import assert_one_line_error, write_conf

    path = write_conf(tmp_path, "auth_module auth_getpw\n> min_uid lots\n")
    assert_one_line_error(
        run_mpop3("--check-config", "-c", path),
        f"{path}:1",
        r"auth_getpw\S*: init failed: min_uid 'lots' is not a whole number",
    )


# --- timing (issue 12, item 6) ---------------------------------------------------------


@pytest.mark.slow
def test_a_failed_login_costs_the_same_for_unknown_users_and_every_hash_method(auth, server_thread):
    """Accounts hashed with yescrypt (the system's preferred method) and
    with SHA-512 (an older account, or ENCRYPT_METHOD SHA512), made after
    the module started: over TCP, a wrong password takes the same time
    (within 10%) for either and for a name nobody has."""
    from test_auth_file import NO_FAIL_DELAY, failures_cost_alike

    server = server_thread(loader.Tables(auth, MemoryStorage({}), []), NO_FAIL_DELAY)
    with system_user("mpop3t-yes", PASSWORD, hash_method="YESCRYPT"):
        with system_user("mpop3t-sha", PASSWORD, hash_method="SHA512"):
            medians = failures_cost_alike(server.port, ["mpop3t-nobody-here", "mpop3t-yes", "mpop3t-sha"])
    assert medians["mpop3t-nobody-here"] > 0.005, medians  # yescrypt's cost, not a lookup's


def test_an_empty_password_never_logs_in(auth, server_thread):
    """An account whose hash is a hash of the empty password: AUTH PLAIN
    with an empty password (PASS cannot send one) is refused."""
    server = server_thread(loader.Tables(auth, MemoryStorage({"mpop3t-blank": []}), []))
    with system_user("mpop3t-blank", PASSWORD):
        run("usermod", "-p", crypt(b"", gensalt()).decode(), "mpop3t-blank")
        wire = Wire(server.port)
        reply = wire.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0mpop3t-blank\0"))
        assert reply.startswith(b"-ERR [AUTH]"), reply
        assert auth.auth_attempt_login("mpop3t-blank", "") is None


# --- names (issue 12, item 7) -----------------------------------------------------------

FOLDED = "mpop3t-fold"
# Names that must never reach a name service, and some odd ones that may
NEVER_ASKED = [
    "",
    ".",
    "..",
    FOLDED + "\x01",
    FOLDED + "\n",
    FOLDED + "\x7f",
    FOLDED + "\x85",  # NEL, a C1 control character
    "mpop3t/fold",
    "../" + FOLDED,
    FOLDED + "\udcff",  # the byte 0xff, which is no UTF-8
    "m" * 256,
]
ASKED = [FOLDED.upper(), "Mpop3t-Fold", "someone@example.org", "DOMAIN\\someone", "ÉLODIE", "m" * 255]

FOLDING_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from mpop3 import config, loader
from pop_server import MemoryStorage, ServerThread, Wire
auth = loader.load_modules(config.parse("auth_module auth_getpw\\n", "t.conf")).auth
out = {"returned": {name: auth.auth_attempt_login(name, PASSWORD) for name in [FOLDED, *ASKED[:2]]}}
out["refused"] = [auth.auth_attempt_login(name, PASSWORD) for name in NEVER_ASKED]
out["others"] = [auth.auth_attempt_login(name, PASSWORD) for name in ASKED[2:]]
with ServerThread(loader.Tables(auth, MemoryStorage({FOLDED: []}), [])) as server:
    first = Wire(server.port)
    out["first"] = first.login(FOLDED.upper(), PASSWORD).decode()
    second = Wire(server.port)
    second.cmd("USER " + FOLDED)
    out["second"] = second.cmd("PASS " + PASSWORD).decode()
print(json.dumps(out))
"""


def test_a_name_service_that_folds_case_gives_one_name_for_every_capitalisation(tmp_path):
    """ALICE and alice are one account to sssd or LDAP: the login answers
    with the account's own name, so that both share one mailbox, its
    [IN-USE] lock and LOGIN-DELAY. And names that no account can have never
    reach the name service."""
    from mpop3.passwords import crypt, gensalt

    script = "\n".join(
        [f"{name} = {value!r}" for name, value in [("PASSWORD", PASSWORD), ("FOLDED", FOLDED)]]
        + [f"ASKED = {ASKED!r}", f"NEVER_ASKED = {NEVER_ASKED!r}", FOLDING_SCRIPT]
    )
    hashed = crypt(PASSWORD.encode(), gensalt()).decode()
    result, asked = run_with_case_folding_account(tmp_path, FOLDED, hashed, script)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["returned"] == {name: FOLDED for name in [FOLDED, *ASKED[:2]]}
    assert out["first"].startswith("+OK maildrop")
    assert out["second"].startswith("-ERR [IN-USE]"), out["second"]
    assert out["refused"] == [None] * len(NEVER_ASKED)
    assert out["others"] == [None] * len(ASKED[2:])
    wanted = {name.encode("utf-8", "surrogateescape") for name in ASKED}
    assert wanted <= set(asked), asked
    never = {name.encode("utf-8", "surrogateescape") for name in NEVER_ASKED}
    assert not never & set(asked), sorted(never & set(asked))
