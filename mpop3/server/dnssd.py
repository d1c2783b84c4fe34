"""DNS-SD advertisement of the listening ports through Avahi (`dnssd yes`).

What is published (RFC 6763): `_pop3._tcp` for each `listen` port and
`_pop3s._tcp` for each `listen_tls` port, once per port whatever the
addresses, named after the host; listeners on loopback only are left out,
since no other machine could reach them.

Each service is an `avahi-publish` process (avahi-utils) that registers it
with the system's avahi-daemon over D-Bus and holds it while it runs: the
daemon withdraws what a client registered when the client goes. So ending
the publishers withdraws the services, and a server killed outright takes
them along (they get SIGTERM when their parent dies). With --no-fail they
wait for a daemon that is not running yet and register again after it
restarts.

Started as root, the publishers run as safe_user: the top process may
become safe_user itself before serving (privilege rule 3) and must still be
able to end them. The top process runs no event loop, so at start it reads
only each publisher's first line, for a bounded time, to tell a reachable
Avahi from a missing one; then it closes their stderr, and what they say
later (they ignore SIGPIPE) goes nowhere.
"""

import contextlib
import ctypes
import functools
import ipaddress
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

from . import privs

log = logging.getLogger("mpop3.server")

PUBLISHER = "avahi-publish"
ANSWER_SECONDS = 5.0  # the longest start-up waits for the publishers' first line
STOP_SECONDS = 3.0  # the longest shutdown waits for them to end before killing them
NAME_BYTES = 63  # a service instance name is one DNS label (RFC 6763 section 4.1.1)
CONNECTED = "Server version:"  # avahi-publish -v, once it has reached the daemon
WAITING = "Waiting for daemon"  # avahi-publish -v -f, while no daemon runs
PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: not in a forked child before exec


@dataclass(frozen=True)
class Service:
    kind: str  # "_pop3._tcp" or "_pop3s._tcp"
    port: int
    name: str  # the service instance name


@contextlib.contextmanager
def advertised(conf):
    """Advertise while the body runs (the server serves), withdraw after."""
    if not conf.values["dnssd"]:
        yield
        return
    publishers = publish(services(conf), publisher_identity(conf))
    try:
        yield
    finally:
        withdraw(publishers)


# --- what to publish -------------------------------------------------------------


def services(conf):
    """One Service per type and port that another machine can reach."""
    ports = {}  # kind -> ports, in the order of the configuration
    for kind, listeners in (("_pop3._tcp", conf.listen), ("_pop3s._tcp", conf.listen_tls)):
        for host, port in listeners:
            if ipaddress.ip_address(host).is_loopback:
                log.debug("DNS-SD: %s on %s port %d is loopback only: not advertised", kind, host, port)
            elif port not in ports.setdefault(kind, []):
                ports[kind].append(port)
    host = socket.gethostname().split(".")[0] or "mpop3"
    return [
        Service(kind, port, instance_name(host, port, several=len(same) > 1))
        for kind, same in ports.items()
        for port in same
    ]


def instance_name(host, port, *, several):
    """The host's name; with the port after it when a type has several
    ports, so that they do not collide (Avahi would rename them "#2")."""
    suffix = f" (port {port})" if several else ""
    room = NAME_BYTES - len(suffix.encode())
    return host.encode()[:room].decode(errors="ignore") + suffix


def publisher_identity(conf):
    """Whom the publishers run as: safe_user when we are root, else ourselves (None)."""
    if not privs.running_as_root():
        return None
    return privs.identity(conf.values["safe_user"])


# --- publishing ------------------------------------------------------------------


def publish(wanted, who):
    """Start a publisher per service; the started ones (Popen). Anything
    that keeps Avahi from advertising is one warning: the server serves on."""
    if not wanted:
        return []
    program = shutil.which(PUBLISHER)
    if program is None:
        log.warning("DNS-SD: %s is not installed (avahi-utils): the services are not advertised", PUBLISHER)
        return []
    started, problems = {}, []
    for service in wanted:
        try:
            started[start_publisher(program, service, who)] = service
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"cannot start {PUBLISHER}: {e}")
    problems += filter(None, map(judged, first_lines(list(started)).values()))
    for publisher in started:
        publisher.stderr.close()
    report(list(started.values()), problems)
    return list(started)


def start_publisher(program, service, who):
    ids = {} if who is None else {"user": who.uid, "group": who.gid, "extra_groups": []}
    return subprocess.Popen(
        [program, "--no-fail", "--verbose", "--service", "--", service.name, service.kind, str(service.port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd="/",
        start_new_session=True,  # a Ctrl-C at the terminal is the server's to handle, then ours
        preexec_fn=functools.partial(prepare_publisher, os.getpid()),
        **ids,
    )


def prepare_publisher(parent):
    """In the publisher's process, before exec."""
    # models.run() holds the server's signals (SIGTERM among them) until its
    # loop handles them; the mask survives exec, and the publisher must die of SIGTERM
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # its stderr is closed after the first line: later lines must not kill it
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # a server killed outright (SIGKILL) must not leave its services advertised
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # killed already, before prctl
        os._exit(0)


def first_lines(publishers, seconds=ANSWER_SECONDS):
    """Each publisher's first line on stderr ("" if it ended without one);
    left out: those that said nothing within `seconds`."""
    lines, heard = {}, {p: b"" for p in publishers}
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        for publisher in publishers:
            selector.register(publisher.stderr, selectors.EVENT_READ, publisher)
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                publisher = key.data
                chunk = os.read(publisher.stderr.fileno(), 4096)
                heard[publisher] += chunk
                if not chunk or b"\n" in heard[publisher]:
                    lines[publisher] = heard[publisher].split(b"\n")[0].decode(errors="replace").strip()
                    selector.unregister(publisher.stderr)
    return {p: lines.get(p) for p in publishers}


def judged(line):
    """What a publisher's first line says is wrong (None: it reached Avahi)."""
    if line is None:
        return f"no answer from {PUBLISHER} in {ANSWER_SECONDS:g} s; it goes on trying"
    if line.startswith(CONNECTED):
        return None
    if line.startswith(WAITING):
        return "avahi-daemon is not running; the services are advertised once it starts"
    return f"{PUBLISHER}: {line or 'ended without a word'}; the services are not advertised"


def report(published, problems):
    """One line in the log, whatever happened to how many publishers."""
    if problems:
        log.warning("DNS-SD: %s", "; ".join(dict.fromkeys(problems)))
    elif published:
        log.info(
            "DNS-SD: advertising %s through Avahi",
            ", ".join(f"{s.kind} port {s.port} as '{s.name}'" for s in published),
        )


# --- withdrawing ------------------------------------------------------------------


def withdraw(publishers, seconds=STOP_SECONDS):
    """End the publishers: SIGTERM, then SIGKILL for those still there
    after `seconds`. Avahi withdraws a service when its publisher goes."""
    running = [p for p in publishers if p.poll() is None]
    for publisher in running:
        signal_publisher(publisher, signal.SIGTERM)
    deadline = time.monotonic() + seconds
    for publisher in running:
        try:
            publisher.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("DNS-SD: %s (pid %d) did not end in %g s: killed", PUBLISHER, publisher.pid, seconds)
            signal_publisher(publisher, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                publisher.wait(seconds)
    if running:
        log.info("DNS-SD: advertisement withdrawn")


def signal_publisher(publisher, signum):
    try:
        publisher.send_signal(signum)
    except OSError as e:  # it runs as someone we can no longer signal
        log.warning("DNS-SD: cannot end %s (pid %d): %s", PUBLISHER, publisher.pid, e.strerror)
