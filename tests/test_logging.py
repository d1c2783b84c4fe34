"""Logging goes to stderr by default, or to syslog with `log syslog`."""

import socket
import subprocess
import sys

from conftest import TREE, run_mpop3
from pop_server import served_as_safe_user
from test_config import assert_one_line_error, write_conf


def serve_one_stdin_session(conf_path, commands):
    return subprocess.run(
        [sys.executable, "-m", "mpop3", "-s", "-c", conf_path],
        input=commands,
        capture_output=True,
        timeout=60,
        cwd=TREE,
    )


def base_config(tmp_path):
    (tmp_path / "passwd").write_text("alice:secret\n")
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "alice").write_bytes(b"From a@b Thu Jan  1 00:00:00 2026\nSubject: hi\n\nbody\n")
    served_as_safe_user(tmp_path / "spool")
    return (
        f"auth_module auth_file\n> passwd_file {tmp_path}/passwd\n"
        f"storage_module storage_mbox\n> storage_dir {tmp_path}/spool\n"
    )


def test_syslog_receives_the_session_lines(tmp_path):
    address = str(tmp_path / "log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(address)
    syslog.settimeout(10)
    conf = write_conf(
        tmp_path, base_config(tmp_path) + f"log syslog\nsyslog_facility local3\nsyslog_socket {address}\n"
    )
    result = serve_one_stdin_session(conf, b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    assert result.stdout.startswith(b"+OK"), result
    assert result.stderr == b""  # nothing on stderr: it all went to syslog
    lines = []
    while not any(b"logged out" in line for line in lines):
        lines.append(syslog.recv(4096))
    login = next(line for line in lines if b"alice logged in" in line)
    # <PRI> = facility local3 (19) * 8 + severity info (6)
    assert login.startswith(b"<158>mpop3["), login
    assert b"1 message" in login


def test_stderr_by_default(tmp_path):
    conf = write_conf(tmp_path, base_config(tmp_path))
    result = serve_one_stdin_session(conf, b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    assert b"INFO: " in result.stderr and b"alice logged in" in result.stderr


def test_unreachable_syslog_is_a_start_up_error(tmp_path):
    conf = write_conf(tmp_path, f"log syslog\nsyslog_socket {tmp_path}/nothing-here\n")
    assert_one_line_error(run_mpop3("-s", "-c", conf), conf, r"cannot reach syslog at .*nothing-here")
