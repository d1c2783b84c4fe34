"""The spawner's loop in C (mpop3/server/_forks.pyx), driven as the
spawner drives it, in a process of its own: a request becomes a child
with the request's bytes and descriptors, the master hears "started" and,
once the child is reaped, "ended" with its status; a request too long is
refused without a fork; a signal other than SIGCHLD comes back to Python;
once not taking, the loop ends when the last child has."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from pop_server import TREE

from mpop3.server import records

DRIVER = textwrap.dedent(
    """
    import os, signal, socket, sys
    from mpop3.server import _forks, supervisor
    requests = socket.socket(fileno=int(sys.argv[1]))
    wake = supervisor.wake_on_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, supervisor.HANDLED)
    taking = True
    while True:
        outcome = _forks.serve(requests.fileno(), wake[0], taking, list(supervisor.HANDLED), signal.SIGCHLD)
        if outcome[0] == "child":  # says what it got on the descriptor it was given, then exits 7
            _, data, fds = outcome
            os.write(fds[0], b"%d fds, %s" % (len(fds), data))
            os._exit(7)
        print(outcome[0], sorted(outcome[1]) if outcome[0] == "signals" else "", _forks.running(), flush=True)
        if outcome[0] != "signals":
            break
        taking = False
    """
)


def start_driver():
    ours, theirs = records.pair()
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        text=True,
        cwd=TREE,
    )
    theirs.close()
    ours.settimeout(10)
    return driver, ours


def answer(sock):
    record, fds = records.receive(sock)
    assert fds == []
    return record


def test_a_request_becomes_a_child_that_gets_its_bytes_and_descriptors_and_its_end_is_told():
    driver, master = start_driver()
    try:
        seen, given = socket.socketpair()
        spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(2)]
        records.send(master, {"who": "anyone"}, [given.fileno(), *spare])
        given.close()
        started = answer(master)
        assert set(started) == {"started"} and started["started"] > 0
        seen.settimeout(10)
        assert seen.recv(100) == b'3 fds, {"who":"anyone"}'
        assert answer(master) == {"ended": started["started"], "status": 7 << 8}
        for fd in spare:
            os.close(fd)

        master.send(b"x" * (records.LONGEST + 1))
        assert answer(master) == {"failed": "request too long"}

        os.kill(driver.pid, signal.SIGTERM)  # back to Python: it stops taking, and ends with no child left
        assert driver.stdout.readline().split() == ["signals", f"[{int(signal.SIGTERM)}]", "0"]
        assert driver.stdout.readline().split() == ["idle", "0"]
        assert driver.wait(10) == 0
    finally:
        driver.kill()
        driver.wait()


def test_with_the_master_gone_the_loop_ends():
    driver, master = start_driver()
    master.close()
    try:
        assert driver.stdout.readline().split() == ["closed", "0"]
        assert driver.wait(10) == 0
    finally:
        driver.kill()
        driver.wait()


@pytest.mark.root  # a user to drop to
def test_a_failed_fork_is_told_and_nothing_runs():
    """The answer the master gets when the system refuses the fork (here
    RLIMIT_NPROC of an unprivileged user already at its limit)."""
    ours, theirs = records.pair()
    limited = (
        "import os, resource, pwd; nobody = pwd.getpwnam('nobody');"
        "os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid);"
        "resource.setrlimit(resource.RLIMIT_NPROC, (0, 0));" + DRIVER
    )
    command = [sys.executable, "-c", limited, str(theirs.fileno())]
    driver = subprocess.Popen(command, pass_fds=[theirs.fileno()], cwd=TREE)
    theirs.close()
    ours.settimeout(10)
    try:
        seen, given = socket.socketpair()
        records.send(ours, {"who": "anyone"}, [given.fileno()])
        failed = answer(ours)
        assert set(failed) == {"failed"} and "temporarily unavailable" in failed["failed"], failed
        seen.settimeout(0.5)
        given.close()
        assert seen.recv(100) == b""  # no child wrote to it; our copy is the last one closed
    finally:
        driver.kill()
        driver.wait()
