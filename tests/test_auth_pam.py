"""auth_pam through real PAM stacks: service files the tests write into
/etc/pam.d (named uniquely, removed afterwards), pam_unix with real
accounts (right, wrong, locked, expired), pam_permit and pam_deny to show
that the stack decides. Needs root (accounts, /etc/pam.d, /etc/shadow)."""

import base64
import contextlib
import itertools
import os
import re

import pytest
from conftest import run_mpop3
from pop_server import FAST, TREE, EmptyStorage, Spawned, Wire, served_as_safe_user
from system_users import system_user
from test_auth_file import NO_FAIL_DELAY, failures_cost_alike

from mpop3 import config, loader

pytestmark = [pytest.mark.root]  # accounts, /etc/pam.d, /etc/shadow

CLEARTEXT = {"PASS", "PLAIN"}


def logins(port, user, password):
    """Which of USER/PASS and AUTH PLAIN let `user` in with `password`
    over TCP, each on a connection of its own (no APOP: no timestamp)."""
    answers = {}
    wire = Wire(port)
    wire.cmd(b"USER " + user.encode())
    answers["PASS"] = wire.cmd(b"PASS " + password.encode())
    wire = Wire(port)
    plain = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
    answers["PLAIN"] = wire.cmd(b"AUTH PLAIN " + plain)
    for way, reply in answers.items():
        assert reply.startswith((b"+OK maildrop", b"-ERR [AUTH]", b"-ERR usage: PASS")), (way, reply)
    return {way for way, reply in answers.items() if reply.startswith(b"+OK")}


UNIX = "auth required pam_unix.so nodelay\naccount required pam_unix.so\n"
_numbers = itertools.count()


@contextlib.contextmanager
def pam_service(text):
    """A PAM service file with `text`; its name."""
    name = f"mpop3-test-{os.getpid()}-{next(_numbers)}"
    path = f"/etc/pam.d/{name}"
    with open(path, "w") as f:
        f.write(text)
    try:
        yield name
    finally:
        os.unlink(path)


def conf_text(service):
    return f"module_dir {TREE}/modules\nauth_module auth_pam\n> pam_service {service}\n"


def load(service):
    tables = loader.load_modules(config.parse(conf_text(service), "test.conf"))
    storage = EmptyStorage()
    return loader.Tables(tables.auth, storage, tables.modules), storage


@pytest.fixture(scope="module")
def accounts():
    with contextlib.ExitStack() as made:
        for name, options in {
            "mpop3pamok": {},
            "mpop3pamlock": {"locked": True},
            "mpop3pamold": {"expired": True},
        }.items():
            made.enter_context(system_user(name, password=f"{name}-pw", **options))
        yield


def test_pam_unix_right_wrong_locked_expired(accounts, server_thread):
    with pam_service(UNIX) as service:
        tables, storage = load(service)
        assert tables.auth.auth_need_root() is True  # pam_unix reads /etc/shadow
        server = server_thread(tables)
        wire = Wire(server.port)
        assert not re.search(rb"<[^<>]+>", wire.greeting)  # no plaintext: no APOP
        assert tables.auth.auth_password("mpop3pamok") is None  # nor CRAM-MD5
        assert logins(server.port, "mpop3pamok", "mpop3pamok-pw") == CLEARTEXT
        assert storage.opened[-1] == "mpop3pamok"
        for user, password in [
            ("mpop3pamok", "wrong"),
            ("mpop3pamok", ""),
            ("mpop3pamlock", "mpop3pamlock-pw"),
            ("mpop3pamold", "mpop3pamold-pw"),
            ("mpop3nosuchuser", "x"),
            ("root", "x"),
        ]:
            assert logins(server.port, user, password) == set(), user
        # names PAM never hears of
        for name in ("bad\0name", "tab\tname", "x" * 300, "bad\udcffbytes", ""):
            assert tables.auth.auth_attempt_login(name, "x") is None


def test_the_stack_decides(accounts, server_thread):
    """pam_permit lets in any password (not an empty one: the core refuses
    those), pam_deny none, even the right one; neither needs root."""
    with pam_service("auth required pam_permit.so\naccount required pam_permit.so\n") as permit:
        tables, _ = load(permit)
        assert tables.auth.auth_need_root() is False
        server = server_thread(tables)
        assert logins(server.port, "mpop3pamok", "anything") == CLEARTEXT
    with pam_service("auth required pam_unix.so nodelay\naccount required pam_deny.so\n") as deny:
        tables, _ = load(deny)
        assert tables.auth.auth_attempt_login("mpop3pamok", "mpop3pamok-pw") is None  # account stack says no
    with pam_service("auth required pam_deny.so\naccount required pam_permit.so\n") as deny:
        tables, _ = load(deny)
        assert tables.auth.auth_need_root() is False
        assert tables.auth.auth_attempt_login("mpop3pamok", "mpop3pamok-pw") is None


@pytest.mark.parametrize(
    "service, error", [("mpop3-no-such-service", "no such service"), ("../shadow", "not a service")]
)
def test_a_bad_service_is_one_line_at_its_setting_line(tmp_path, service, error):
    """From --check-config and from a real start-up alike: one line, at the
    `> pam_service` line (line 3)."""
    path = tmp_path / "mpop3.conf"
    path.write_text(conf_text(service))
    for how in (["--check-config"], []):
        result = run_mpop3(*how, "-c", str(path))
        assert result.returncode == 2, (how, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(rf"{re.escape(str(path))}:3: .*{error}", lines[0]), (how, result.stderr)


def test_the_installed_example_and_the_readme(installed):
    assert (installed / "share/mpop3/pam.d/mpop3").read_text() == open(f"{TREE}/contrib/pam.d/mpop3").read()
    with open(os.path.join(TREE, "README.md")) as f:
        assert re.search(r"^\| `auth_pam` \| `pam_service` \|", f.read(), re.M)


def test_a_real_server_as_root_keeps_root_until_login(accounts, tmp_path):
    """The real command, started as root: auth_need_root() makes a process
    per session that authenticates as root (pam_unix reads /etc/shadow)
    and then serves the mailbox as safe_user."""
    spool = tmp_path / "spool"
    spool.mkdir()
    served_as_safe_user(spool)
    with pam_service(UNIX) as service:
        text = conf_text(service) + f"storage_module storage_mbox\n> storage_dir {spool}\n> mailbox_user any\n"
        text += "".join(f"{name} {value}\n" for name, value in FAST.items())
        path = tmp_path / "mpop3.conf"
        path.write_text(text)
        with Spawned(str(path)) as server:
            assert Wire(server.port).login("mpop3pamok", "mpop3pamok-pw").startswith(b"+OK maildrop has 0")
            wire = Wire(server.port)
            wire.cmd("USER mpop3pamok")
            assert wire.cmd("PASS wrong").startswith(b"-ERR [AUTH]")


@pytest.mark.slow
def test_an_unknown_user_costs_what_a_known_one_costs(accounts, server_thread):
    with pam_service(UNIX) as service:
        tables, _ = load(service)
        server = server_thread(tables, NO_FAIL_DELAY)
        medians = failures_cost_alike(server.port, ["mpop3nosuchuser", "mpop3pamok"])
        assert medians["mpop3nosuchuser"] > 0.005, medians  # a hash's cost
