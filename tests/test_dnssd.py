"""DNS-SD (issue 16): `dnssd yes` advertises `_pop3._tcp` and `_pop3s._tcp`
for the listening ports through a real avahi-daemon, as `avahi-browse`
sees them, and withdraws them at shutdown; without Avahi the server serves
on, with one warning.

Avahi runs where it disturbs nothing: in a network namespace of its own
(with a veth pair for an interface: it ignores loopback), on a D-Bus
daemon of its own, whose socket is an abstract one (those belong to the
network namespace, and safe_user, whom the publishers run as, can reach
it), and with a /run of its own for its pid file (a mount namespace), so
that an Avahi the machine itself runs is left alone.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from pop_server import ANY_USER, TREE, Spawned, Wire, free_port, wait_for, write_site

from mpop3.server.dnssd import STOP_SECONDS

SPOOL = b"From a@b Mon Jan  1 00:00:00 2024\nSubject: hi\n\nhello\n"
ADDRESS = "10.232.0.1"
HOST = socket.gethostname().split(".")[0]  # the service name mpop3 gives

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:abstract={name}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

AVAHI_CONF = """[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces={interface}
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
"""


# a server of the test's leaves the machine's control socket alone
QUIET = {"control_socket": "none"}
# process models: (settings, storage_mbox options); the top process of the
# first two serves as safe_user after bind, the per-session one stays root
MODELS = {
    "shared": ({"processes": "1"}, ANY_USER),
    "prefork": ({"processes": "2"}, ANY_USER),
    "per-session": ({}, None),
}


class Namespace:
    """A network namespace with a veth pair up in it (ADDRESS on one end),
    and the daemons started in it, ended when it is removed."""

    def __init__(self, tag, root):
        self.name, self.interface, self.root = f"{tag}n", f"{tag}a", root
        self.bus = f"unix:abstract=/mpop3-test/{tag}"
        self.daemons = []

    def create(self):
        ip = ["ip", "-n", self.name]
        for command in (
            ["ip", "netns", "add", self.name],
            [*ip, "link", "set", "lo", "up"],
            [*ip, "link", "add", self.interface, "type", "veth", "peer", "name", self.interface[:-1] + "b"],
            [*ip, "addr", "add", f"{ADDRESS}/24", "dev", self.interface],
            [*ip, "link", "set", self.interface, "up"],
            [*ip, "link", "set", self.interface[:-1] + "b", "up"],
        ):
            subprocess.run(command, check=True, capture_output=True)

    def remove(self):
        for daemon in self.daemons:
            end(daemon)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def run(self, *command, **options):
        """Start `command` in the namespace, with its D-Bus as the system bus."""
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus)
        return subprocess.Popen(["ip", "netns", "exec", self.name, *command], env=env, cwd=TREE, **options)

    def start_bus(self):
        conf = self.root / "bus.conf"
        conf.write_text(BUS_CONF.format(name=self.bus.split("=", 1)[1]))
        bus = self.run("dbus-daemon", "--nofork", f"--config-file={conf}", "--print-address", stdout=subprocess.PIPE)
        self.daemons.append(bus)
        assert bus.stdout.readline().startswith(b"unix:abstract="), "dbus-daemon did not start"

    def start_avahi(self):
        """avahi-daemon, once it has its host name (until then it publishes nothing)."""
        conf, run, out = self.root / "avahi.conf", self.root / "run", self.root / "avahi.log"
        conf.write_text(AVAHI_CONF.format(interface=self.interface))
        run.mkdir(exist_ok=True)
        # /run of its own: its pid file there says whether "a daemon already runs"
        daemon = f'mount --bind "{run}" /run && exec avahi-daemon -f "{conf}" --no-drop-root --no-chroot --no-rlimits'
        with open(out, "wb") as log:
            avahi = self.run("unshare", "--mount", "sh", "-c", daemon, stdout=log, stderr=subprocess.STDOUT)
        self.daemons.append(avahi)

        def started():
            """avahi-daemon to say "Server startup complete" """
            assert avahi.poll() is None, out.read_text()
            return "Server startup complete" in out.read_text()

        wait_for(started, seconds=10, interval=0.05)

    def browse(self, *kinds):
        """What `avahi-browse -rtp KIND` lists now, for each of `kinds` (at
        once: each takes a second): service name -> port."""
        browsers = [self.run("avahi-browse", "-rtp", k, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in kinds]
        return tuple(listed(browser) for browser in browsers)


def listed(browser):
    out, err = browser.communicate(timeout=30)
    assert browser.returncode == 0, err.decode()
    names, ports = set(), {}
    for line in out.decode().splitlines():
        fields = line.split(";")
        if fields[0] == "+":
            names.add(fields[3])
        elif fields[0] == "-":  # withdrawn, and still in the cache a moment
            names.discard(fields[3])
        elif fields[0] == "=":
            ports[fields[3]] = int(fields[8])
    return {name: ports.get(name) for name in names}


def end(process):
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def namespace(tmp_path):
    """A Namespace, removed with its daemons when the test ends."""
    space = Namespace(f"md{os.getpid() % 100000}", tmp_path)
    space.remove()  # left over by a run that was killed
    try:
        space.create()
        yield space
    finally:
        space.remove()


def site(root, port, tls_port, certificate, model):
    """A configuration listening on ADDRESS (plain and TLS) and on loopback
    (which is not advertised), with dnssd on, for a process model (MODELS)."""
    cert, key = certificate
    settings, mbox_options = MODELS[model]
    settings = {**settings, "dnssd": "yes", "listen": f"{ADDRESS}:{port}", "listen_tls": f"{ADDRESS}:{tls_port}"}
    settings.update(tls_cert=cert, tls_key=key, **QUIET)
    conf = write_site(root, {"bob": "pw"}, {"bob": SPOOL}, settings, mbox_options=mbox_options)
    with open(conf, "a") as f:
        f.write(f"listen 127.0.0.1:{free_port()}\n")
    return conf


def start_server(namespace, conf):
    """The mpop3 command in the namespace; its log goes to server.log (a path)."""
    log = os.path.join(os.path.dirname(conf), "server.log")
    with open(log, "wb") as out:
        server = namespace.run(sys.executable, "-m", "mpop3", "-c", conf, stdout=subprocess.DEVNULL, stderr=out)
    server.log = log
    return server


def log_of(server):
    with open(server.log, errors="replace") as f:
        return f.read()


def stopped(server):
    """SIGTERM the server; its log once it has ended."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(20)
    finally:
        end(server)
    return log_of(server)


def dnssd_warnings(log):
    return [line for line in log.splitlines() if "WARNING: DNS-SD" in line]


@pytest.mark.root
@pytest.mark.parametrize("model", sorted(MODELS))
def test_advertised_while_serving_and_withdrawn_at_shutdown(tmp_path, namespace, certificate, model):
    namespace.start_bus()
    namespace.start_avahi()
    port, tls_port = free_port(), free_port()
    conf = site(tmp_path, port, tls_port, certificate, model)
    server = start_server(namespace, conf)
    try:

        def advertised():
            """avahi-browse to list both services on their ports"""
            assert server.poll() is None, log_of(server)
            return namespace.browse("_pop3._tcp", "_pop3s._tcp") == ({HOST: port}, {HOST: tls_port})

        wait_for(advertised, seconds=15, interval=0.1)
    finally:
        log = stopped(server)
    assert server.returncode == 0, log
    # withdrawn at once: a goodbye keeps it in the cache for a second only
    wait_for(lambda: namespace.browse("_pop3._tcp", "_pop3s._tcp") == ({}, {}), seconds=5, interval=0)
    assert f"DNS-SD: advertising _pop3._tcp port {port} as '{HOST}', _pop3s._tcp port {tls_port} as '{HOST}'" in log
    assert "DNS-SD: advertisement withdrawn" in log
    assert not dnssd_warnings(log), log


@pytest.mark.root
def test_avahi_started_after_the_server_advertises_it_then(tmp_path, namespace, certificate):
    """No avahi-daemon on the bus yet: a warning, and the publishers wait for it."""
    namespace.start_bus()
    port, tls_port = free_port(), free_port()
    conf = site(tmp_path, port, tls_port, certificate, "shared")
    server = start_server(namespace, conf)
    try:
        wait_for(lambda: "DNS-SD" in log_of(server), seconds=10, what="the server to say something of DNS-SD")
        namespace.start_avahi()

        def advertised():
            """avahi-browse to list the service, now that Avahi runs"""
            return namespace.browse("_pop3._tcp") == ({HOST: port},)

        wait_for(advertised, seconds=15, interval=0.1)
    finally:
        log = stopped(server)
    wait_for(lambda: namespace.browse("_pop3._tcp") == ({},), seconds=5, interval=0)
    warnings = dnssd_warnings(log)
    assert len(warnings) == 1 and "avahi-daemon is not running" in warnings[0], log


@pytest.mark.root
def test_a_server_killed_outright_takes_its_advertisement_along(tmp_path, namespace, certificate):
    """SIGKILL runs no shutdown: the publishers end with their parent.
    (A process per session: with no session, the top process has no other
    children that would outlive it.)"""
    namespace.start_bus()
    namespace.start_avahi()
    port, tls_port = free_port(), free_port()
    server = start_server(namespace, site(tmp_path, port, tls_port, certificate, "per-session"))
    try:
        wait_for(lambda: namespace.browse("_pop3._tcp") == ({HOST: port},), seconds=15, interval=0.1)
    finally:
        server.kill()
        end(server)
    wait_for(lambda: namespace.browse("_pop3._tcp", "_pop3s._tcp") == ({}, {}), seconds=5, interval=0)


# --- without Avahi ----------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["D-Bus", "avahi-publish"])
def test_without_avahi_the_server_serves_with_one_warning(tmp_path, monkeypatch, certificate, missing):
    if missing == "D-Bus":
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no-bus")
    else:
        monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    cert, key = certificate
    tls = {"dnssd": "yes", "listen_tls": f"0.0.0.0:{free_port()}", "tls_cert": cert, "tls_key": key, **QUIET}
    conf = write_site(tmp_path, {"bob": "pw"}, {"bob": SPOOL}, tls, mbox_options=ANY_USER)
    # Spawned listens on loopback only, which is not advertised: a wildcard port too
    with Spawned(conf, args=("-l", f"0.0.0.0:{free_port()}")) as server:
        client = Wire(server.port)
        client.login("bob", "pw")
        assert client.cmd("QUIT").startswith(b"+OK")
        client.close()
    assert server.proc.returncode == 0
    log = server.log()
    warnings = dnssd_warnings(log)  # one for both services
    assert len(warnings) == 1, log
    assert ("Daemon not running" if missing == "D-Bus" else "avahi-publish is not installed") in warnings[0]


STUCK_PUBLISHER = """#!/bin/sh
# reaches "Avahi" at once, then will not end
trap '' TERM
echo "Server version: avahi 0.8; Host name: test.local" >&2
while :; do /bin/sleep 1; done
"""


@pytest.mark.slow  # waits out STOP_SECONDS
def test_a_publisher_that_will_not_end_is_killed_at_shutdown(tmp_path, monkeypatch):
    programs = tmp_path / "programs"
    programs.mkdir()
    (programs / "avahi-publish").write_text(STUCK_PUBLISHER)
    (programs / "avahi-publish").chmod(0o755)
    programs.chmod(0o755)
    monkeypatch.setenv("PATH", str(programs))
    conf = write_site(tmp_path, {"bob": "pw"}, {"bob": SPOOL}, {"dnssd": "yes", **QUIET}, mbox_options=ANY_USER)
    # listening means started: the publishers have answered (or not) by then
    with Spawned(conf, args=("-l", f"0.0.0.0:{free_port()}")) as server:
        ended = time.monotonic()
        server.stop()
        ended = time.monotonic() - ended
    log = server.log()
    assert server.proc.returncode == 0, log
    assert STOP_SECONDS <= ended < STOP_SECONDS + 5, log  # SIGTERM ignored: SIGKILL after STOP_SECONDS
    assert "DNS-SD: advertising _pop3._tcp port" in log
    warnings = dnssd_warnings(log)
    assert len(warnings) == 1 and f"did not end in {STOP_SECONDS:g} s: killed" in warnings[0], log
