"""What every process model must do alike (mpop3/server/models.py): the
real `mpop3` command, started as root where CI runs it, in each model.

- shared: one process, many sessions (`mailbox_user any`, processes 1);
- prefork: several such processes (`processes 2`);
- per session: a process per session (storage_mbox's default, as root);
- stdin: `mpop3 -s`, a process per session started by someone else.

LOGIN-DELAY holds whichever process serves the next login, and a SIGHUP
applies a new log_level (stdin mode reads the file anew for each session).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from mbox_helpers import mbox
from pop_server import ANY_USER, TREE, Wire, wait_for, write_site

from mpop3.protocol import replies

pytestmark = [pytest.mark.root, pytest.mark.slow]  # a process per session needs root; servers in subprocesses

MODELS = {
    "shared": {"processes": "1"},
    "prefork": {"processes": "2"},
    "per-session": {},
}


USERS = {"bob": "pw", "alice": "pw"}
BOXES = {"bob": mbox(b"Subject: 1\n\none\n"), "alice": mbox(b"Subject: a\n\nalice\n")}


def site(model, **extra):
    """The settings of write_site and spawn for a model, plus `extra` directives."""
    settings = {"extra": {**MODELS.get(model, {}), **extra}}
    if model in ("shared", "prefork"):  # spools opened by the server's own user: no process per session
        settings["mbox_options"] = ANY_USER
    return settings


def login_reply(port, user):
    w = Wire(port)
    w.cmd(f"USER {user}")
    reply = w.cmd("PASS pw")
    w.cmd("QUIT")
    return reply, greeting_pid(w)


def greeting_pid(w):
    return int(w.greeting.split(b"<")[1].split(b".")[0])


@pytest.mark.parametrize("model", sorted(MODELS))
def test_login_delay_holds_in_every_model(spawn, model):
    server = spawn(USERS, BOXES, **site(model, login_delay="60"))
    first, _ = login_reply(server.port, "bob")
    assert first.startswith(b"+OK maildrop")
    servers = set()
    for _ in range(30):  # enough for the kernel to use every server process
        reply, pid = login_reply(server.port, "bob")
        assert reply == replies.ERR_LOGIN_DELAY.wire[:-2], reply
        servers.add(pid)
        if model != "prefork" or len(servers) > 1:
            break
    assert model != "prefork" or len(servers) == 2, servers
    assert login_reply(server.port, "alice")[0].startswith(b"+OK maildrop")  # another mailbox


def guess_and_hang_up(port, user):
    w = Wire(port)
    w.cmd(f"USER {user}")
    w.send(b"PASS wrong\r\n")
    time.sleep(0.1)  # checked (no delay yet) before the connection goes
    w.close()


def timed_login(port, user):
    w = Wire(port)
    w.cmd(f"USER {user}")
    start = time.monotonic()
    reply = w.cmd("PASS pw")
    took = time.monotonic() - start
    w.cmd("QUIT")
    return reply, took


@pytest.mark.parametrize("model", sorted(MODELS))
def test_after_a_failure_the_right_password_waits_the_delay_in_every_model(spawn, model):
    """Whichever process serves the next attempt: the failure's delay holds
    for that user from that address, and only for that user."""
    server = spawn(USERS, BOXES, **site(model, login_fail_delay="1", login_fail_delay_max="1"))
    guess_and_hang_up(server.port, "bob")
    reply, took = timed_login(server.port, "alice")
    assert reply.startswith(b"+OK maildrop") and took < 0.5, took
    reply, took = timed_login(server.port, "bob")
    assert reply.startswith(b"+OK maildrop") and took >= 0.7, took


def test_login_delay_holds_in_stdin_mode(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)  # writable by safe_user, whom root becomes at once in stdin mode
    conf = write_site(tmp_path, USERS, BOXES, **site("stdin", login_delay="60", state_dir=str(state)))

    def session():
        return subprocess.run(
            [sys.executable, "-m", "mpop3", "-c", conf, "-s"],
            input=b"USER bob\nPASS pw\nQUIT\n",
            capture_output=True,
            cwd=TREE,
            timeout=30,
        )

    assert b"+OK maildrop" in session().stdout
    assert replies.ERR_LOGIN_DELAY.wire in session().stdout
    assert len(os.listdir(state)) == 1 and "bob" not in os.listdir(state)[0]  # a hash, not the name
    missing = write_site(tmp_path, USERS, BOXES, **site("stdin", login_delay="60", state_dir=str(tmp_path / "nowhere")))
    result = subprocess.run(
        [sys.executable, "-m", "mpop3", "-c", missing, "-s"], input=b"QUIT\n", capture_output=True, cwd=TREE, timeout=30
    )
    assert result.returncode == 1 and b"login_delay needs state_dir" in result.stderr


@pytest.mark.parametrize("model", sorted(MODELS))
def test_sighup_applies_log_level_in_every_model(spawn, model):
    server = spawn(USERS, BOXES, **site(model, log_level="warning"))
    assert login_reply(server.port, "bob")[0].startswith(b"+OK")
    with open(server.conf_path) as f:
        text = f.read().replace("log_level warning", "log_level info\nimplementation reloaded")
    with open(server.conf_path, "w") as f:
        f.write(text)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: all(implementation(server.port) for _ in range(6)))  # every process has reloaded
    assert login_reply(server.port, "alice")[0].startswith(b"+OK")
    server.stop()
    log = server.proc.stderr.read().decode()
    assert "alice logged in" in log and "bob logged in" not in log, log


def implementation(port):
    w = Wire(port)
    w.cmd("CAPA")
    return b"IMPLEMENTATION reloaded" in w.multi()
