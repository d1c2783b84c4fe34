"""auth_getpw against real system accounts made with useradd + chpasswd."""

import statistics
import time

import pytest
from system_users import system_user

from mpop3 import config, loader

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


def test_unknown_user_costs_what_a_wrong_password_costs(auth):
    """No user enumeration by timing: a miss runs crypt(3) like a hit."""

    def median_time(user):
        times = []
        for _ in range(7):
            start = time.perf_counter()
            assert auth.auth_attempt_login(user, "wrong") is None
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with system_user("mpop3t-time", PASSWORD, hash_method="YESCRYPT"):
        known = median_time("mpop3t-time")
        unknown = median_time("mpop3t-nobody-here")
    # yescrypt costs milliseconds; a lookup alone costs microseconds
    assert known > 0.002
    assert 0.5 < unknown / known < 2.0, (known, unknown)


def test_bad_min_uid_is_a_config_error(tmp_path):
    from conftest import run_mpop3
    from test_config import assert_one_line_error, write_conf

    path = write_conf(tmp_path, "auth_module auth_getpw\n> min_uid lots\n")
    assert_one_line_error(
        run_mpop3("--check-config", "-c", path),
        f"{path}:1",
        r"auth_getpw\S*: init failed: min_uid 'lots' is not a whole number",
    )
