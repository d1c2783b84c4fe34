"""Processes by role where every session is another user (uid): no mail
process is shared or reused. Logins at 32 clients of 32 accounts with
`mail_process_idle 0`, PSS per connection before login, and PSS per idle
session with a uid each, next to a process per session in the same run.
Needs root (accounts, user switches); the site lives in a directory every
account can reach (pytest's own are 0700)."""

import contextlib
import grp
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from test_load import LOADGEN, pss_kib, start_mpop3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from system_users import system_user  # noqa: E402

ACCOUNTS = 32
BEFORE_LOGIN = 1000
SPOOL = b"From a@example.org Thu Nov 19 10:00:00 2026\nSubject: x\n\nhello\n"


@pytest.fixture(scope="module")
def servers():
    if os.geteuid() != 0:
        yield None  # accounts and user switches need root
        return
    root = pathlib.Path(tempfile.mkdtemp(prefix="mpop3-bench-uids-"))
    os.chmod(root, 0o755)
    spool = root / "spool"
    spool.mkdir()
    with contextlib.ExitStack() as stack:
        login = stack.enter_context(system_user("mpop3bu-login", system=True))
        lines = []
        for i in range(ACCOUNTS):
            account = stack.enter_context(system_user(f"mpop3bu{i}"))
            path = spool / account.pw_name
            path.write_bytes(SPOOL)
            os.chown(path, account.pw_uid, account.pw_gid)
            lines.append(f"{account.pw_name}:pw\n")
        (root / "passwd").write_text("".join(lines))
        os.chown(spool, 0, grp.getgrnam("mail").gr_gid)  # as Debian's /var/mail
        os.chmod(spool, 0o2775)
        common = (
            f"auth_module auth_file\n> passwd_file {root}/passwd\nstorage_module storage_mbox\n> storage_dir {spool}\n"
        )
        started = {
            "split": start_mpop3(root, common + f"login_user {login.pw_name}\nmail_process_idle 0\n"),
            "per-session": start_mpop3(root, common + "login_user none\n"),
        }
        time.sleep(1.0)  # login processes locked in
        yield started
        for proc, _ in started.values():
            proc.terminate()
            proc.wait(30)
    shutil.rmtree(root, ignore_errors=True)


def logins_per_second(port):
    result = subprocess.run(
        [LOADGEN, "login", str(port), str(ACCOUNTS), "4", "mpop3bu%d", "pw"], capture_output=True, text=True, timeout=60
    )
    figures = dict((k, float(v)) for k, v in (item.split("=") for item in result.stdout.split()))
    assert figures["errors"] == 0, result.stderr[-500:]
    return figures["sessions"] / figures["seconds"]


def idle_pss_per_session(proc, port):
    before = pss_kib(proc.pid)
    hold = subprocess.Popen(
        [LOADGEN, "idle", str(port), str(ACCOUNTS), "0", "mpop3bu%d", "pw"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = hold.stdout.readline()
    assert "errors=0" in ready, ready
    time.sleep(1.0)
    after = pss_kib(proc.pid)
    hold.stdin.close()
    hold.wait(30)
    return (after - before) / ACCOUNTS


def test_every_session_another_uid(servers, report):
    if servers is None:
        report("processes by role, a uid each", "NOT root: not measured")
        return
    split_proc, split_port = servers["split"]
    per_proc, per_port = servers["per-session"]
    split_rate, per_rate = logins_per_second(split_port), logins_per_second(per_port)
    report(
        "logins/s, 32 clients of 32 uids, no mail process reused",
        f"processes by role {split_rate:.0f}, a process per session {per_rate:.0f}, ratio {split_rate / per_rate:.2f}"
        " (target >= 2)",
    )
    before = pss_kib(split_proc.pid)
    waiting = [socket.create_connection(("127.0.0.1", split_port)) for _ in range(BEFORE_LOGIN)]
    for sock in waiting:
        sock.recv(512)  # greeted: the session is set up
    time.sleep(1.0)
    per_connection = (pss_kib(split_proc.pid) - before) / BEFORE_LOGIN
    for sock in waiting:
        sock.close()
    report("PSS per connection before login, processes by role", f"{per_connection:.1f} KiB (target <= 30)")
    time.sleep(1.0)
    split_pss, per_pss = idle_pss_per_session(split_proc, split_port), idle_pss_per_session(per_proc, per_port)
    report(
        "PSS per idle session, a uid each",
        f"processes by role {split_pss:.0f} KiB, a process per session {per_pss:.0f} KiB (target <= 1,536)",
    )
