"""Logging goes to stderr by default, or to syslog with `log syslog`."""

import socket
import subprocess
import sys

from conftest import TREE, run_mpop3
from mbox_helpers import mbox
from pop_server import write_site
from test_config import assert_one_line_error, write_conf


def serve_one_stdin_session(conf_path, commands):
    return subprocess.run(
        [sys.executable, "-m", "mpop3", "-s", "-c", conf_path],
        input=commands,
        capture_output=True,
        timeout=60,
        cwd=TREE,
    )


def alice_site(tmp_path, extra=None):
    """alice (password secret) with one message."""
    return write_site(tmp_path, {"alice": "secret"}, {"alice": mbox(b"Subject: hi\n\nbody\n")}, extra)


def test_syslog_receives_the_session_lines(tmp_path):
    address = str(tmp_path / "log")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(address)
    syslog.settimeout(10)
    conf = alice_site(tmp_path, {"log": "syslog", "syslog_facility": "local3", "syslog_socket": address})
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
    conf = alice_site(tmp_path)
    result = serve_one_stdin_session(conf, b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    assert b"INFO: " in result.stderr and b"alice logged in" in result.stderr


def test_unreachable_syslog_is_a_start_up_error(tmp_path):
    conf = write_conf(tmp_path, f"log syslog\nsyslog_socket {tmp_path}/nothing-here\n")
    assert_one_line_error(run_mpop3("-s", "-c", conf), conf, r"cannot reach syslog at .*nothing-here")
