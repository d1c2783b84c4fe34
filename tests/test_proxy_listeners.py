"""PROXY protocol listeners (issue 15): real HAProxy in front of the real
server. The client's address from the header is what logs, per-address
limits and the cleartext policy see; TLS done by HAProxy counts only when
its header says so; a listener refuses whoever is not a trusted proxy and
whatever is not a well-formed header, without a greeting. The header's
parser itself is tested byte by byte in test_proxy_protocol.py."""

import os
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest
from conftest import LOGIN_USER, run_mpop3
from mbox_helpers import mbox
from pop_server import free_port, wait_for, write_site

pytestmark = [pytest.mark.root, pytest.mark.slow]  # network namespaces; servers in subprocesses

SPOOL = mbox(b"Subject: one\n\nfirst\n", b"Subject: two\n\nsecond\n")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source, source_port, destination="127.0.0.1", destination_port=110, command=0x21, tlvs=b""):
    addresses = (
        socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!HH", source_port, destination_port)
    )
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([command, 0x11]) + struct.pack("!H", len(body)) + body


def start_server(spawn, model="shared", **extra):
    """The real server, plaintext_auth yes unless `extra` says otherwise:
    one process (`mailbox_user any`), `prefork` (2), or `split` (processes
    by role: spools opened as their users)."""
    settings = {"plaintext_auth": "yes", "processes": "2" if model == "prefork" else "1", **extra}
    options = {} if model == "split" else {"mbox_options": {"mailbox_user": "any"}}
    if model == "split":
        settings["login_user"] = LOGIN_USER
    return spawn({"bob": "pw", "alice": "pw"}, {"bob": SPOOL, "alice": SPOOL}, settings, **options)


def raw(port, source="127.0.0.1"):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def closed_without_a_word(sock):
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


# --- the listener, byte by byte -------------------------------------------------------------


@pytest.mark.parametrize("model", ["shared", "prefork", "split"])
def test_a_header_and_a_command_in_one_segment(spawn, request, model):
    if model == "split":
        request.getfixturevalue("login_user")
    port = free_port()
    server = start_server(spawn, model, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1/32")
    sock = raw(port)
    sock.sendall(v2_header("192.0.2.7", 40000) + b"USER bob\r\nPASS pw\r\n")
    data = b""
    while data.count(b"\r\n") < 3:
        data += sock.recv(4096)
    greeting, user, password = data.split(b"\r\n")[:3]
    assert greeting.startswith(b"+OK") and user.startswith(b"+OK") and password.startswith(b"+OK maildrop")
    sock.sendall(b"QUIT\r\n")
    sock.close()
    server.stop()
    log = server.log()
    assert "192.0.2.7: bob logged in" in log and "127.0.0.1: bob" not in log


def test_a_version_1_header_split_across_packets(spawn):
    port = free_port()
    start_server(spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.0/8")
    sock = raw(port)
    header = b"PROXY TCP4 198.51.100.9 127.0.0.1 50000 110\r\n"
    for i in range(0, len(header), 7):
        sock.sendall(header[i : i + 7])
        time.sleep(0.02)
    assert sock.recv(100).startswith(b"+OK")


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 198.51.100.9 127.0.0.1 50000 110\n",  # LF without CR
        b"PROXY TCP4 198.51.100.9  127.0.0.1 50000 110\r\n",  # two spaces
        b"PROXY TCP4 " + b"1" * 100 + b"\r\n",  # over 107 bytes
        b"proxy TCP4 198.51.100.9 127.0.0.1 50000 110\r\n",
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x23\x11\x00\x0c" + bytes(12),  # command 3
        V2_SIGNATURE + b"\x21\x31\x00\x0c" + bytes(12),  # AF_UNIX
        V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # too short for the addresses
        v2_header("192.0.2.7", 1, tlvs=b"\x20\x00\x09\x01"),  # a truncated TLV
        b"USER bob\r\n",  # no header at all
    ],
)
def test_a_malformed_header_is_closed_without_a_greeting(spawn, header):
    port = free_port()
    start_server(spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1/32")
    sock = raw(port)
    sock.sendall(header)
    assert closed_without_a_word(sock)


def test_an_untrusted_source_and_a_stalled_header_are_closed(spawn):
    port = free_port()
    server = start_server(
        spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="10.0.0.0/8", proxy_timeout="0.5"
    )
    sock = raw(port)
    sock.sendall(v2_header("192.0.2.7", 40000))
    assert closed_without_a_word(sock)  # 127.0.0.1 is no proxy of ours
    server.stop()
    assert "not a trusted proxy" in server.log()

    port = free_port()
    start_server(spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1", proxy_timeout="0.5")
    sock = raw(port)
    sock.sendall(b"PROXY TCP4 198.51.")
    start = time.monotonic()
    assert closed_without_a_word(sock)
    assert 0.4 < time.monotonic() - start < 3


def test_with_no_trusted_networks_a_proxy_listener_refuses_everyone(spawn):
    port = free_port()
    start_server(spawn, listen_proxy=f"127.0.0.1:{port}")
    sock = raw(port)
    sock.sendall(v2_header("192.0.2.7", 40000))
    assert closed_without_a_word(sock)


def test_a_local_command_is_served_with_the_real_address(spawn):
    port = free_port()
    server = start_server(spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1")
    sock = raw(port)
    sock.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00")  # LOCAL: a health check
    assert sock.recv(100).startswith(b"+OK")
    sock.sendall(b"QUIT\r\n")
    sock.close()
    server.stop()
    assert "127.0.0.1: disconnected before login (quit)" in server.log()


def test_per_address_limits_go_by_the_header(spawn):
    port = free_port()
    start_server(spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1", max_sessions_per_ip="1")
    first = raw(port)
    first.sendall(v2_header("192.0.2.7", 1))
    assert first.recv(100).startswith(b"+OK")
    second = raw(port)
    second.sendall(v2_header("192.0.2.7", 2))
    assert second.recv(100).startswith(b"-ERR [SYS/TEMP] too many sessions from your address")
    other = raw(port)
    other.sendall(v2_header("192.0.2.8", 3))
    assert other.recv(100).startswith(b"+OK")  # another client behind the same proxy


def test_a_process_per_session_refuses_proxy_listeners(tmp_path):
    """Its listener, root, would read the header: processes by role instead."""
    conf = write_site(tmp_path, {"bob": "pw"}, {"bob": SPOOL}, {"listen_proxy": f"127.0.0.1:{free_port()}"})
    result = run_mpop3("-c", conf)
    assert result.returncode == 1
    assert "listen_proxy and listen_tls_proxy need processes by role (login_user)" in result.stderr


def test_accepted_connections_have_keepalive(spawn):
    """A balancer's machine that vanishes without a FIN: its sessions end
    (and free their mailboxes) after the keepalive probes, not idle_timeout."""
    port = free_port()
    start_server(spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1")
    sock = raw(port)
    sock.sendall(v2_header("192.0.2.7", 40000))
    assert sock.recv(100).startswith(b"+OK")
    server_side = subprocess.run(
        ["ss", "-tnoH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, timeout=10
    ).stdout
    assert "timer:(keepalive," in server_side, server_side


# --- through a real HAProxy ---------------------------------------------------------------------


class HAProxy:
    """haproxy -db (in the foreground) on a configuration of `frontends`:
    [(bind line, server line)], mode tcp."""

    def __init__(self, tmp_path, frontends, namespace=None):
        lines = ["global", "  maxconn 256", "defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 30s"]
        lines += ["  timeout server 30s"]
        for i, (bind, server) in enumerate(frontends):
            lines += [
                f"frontend f{i}",
                f"  bind {bind}",
                f"  default_backend b{i}",
                f"backend b{i}",
                f"  server s {server}",
            ]
        conf = tmp_path / "haproxy.cfg"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            ["haproxy", "-db", "-f", str(conf)], stderr=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def haproxy(tmp_path):
    started = []

    def start(frontends):
        proxy = HAProxy(tmp_path, frontends)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def client_namespace():
    """A network namespace joined to this one by a veth pair: 10.234.0.1
    here, 10.234.0.2 there (a client that is not loopback). Removed after."""
    tag = f"mx{os.getpid() % 100000}"
    here, there, ns = f"{tag}a", f"{tag}b", f"{tag}n"

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", here], capture_output=True)
    try:
        ip("netns", "add", ns)
        ip("link", "add", here, "type", "veth", "peer", "name", there, "netns", ns)
        ip("addr", "add", "10.234.0.1/24", "dev", here)
        ip("link", "set", here, "up")
        ip("-n", ns, "addr", "add", "10.234.0.2/24", "dev", there)
        ip("-n", ns, "link", "set", there, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


NETNS_CLIENT = """
import json, poplib, ssl, sys
host, port, tls_port, cafile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {}
p = poplib.POP3(host, port, timeout=10)
out["capa"] = sorted(p.capa())
try:
    out["user"] = p.user("bob").decode()
except poplib.error_proto as e:
    out["user"] = e.args[0].decode()
p.quit()
context = ssl.create_default_context(cafile=cafile)
context.check_hostname = False  # the test certificate names 127.0.0.1, not 10.234.0.1
p = poplib.POP3_SSL(host, tls_port, timeout=10, context=context)
out["user_tls"] = p.user("bob").decode()
out["pass_tls"] = p.pass_("pw").decode()
p.quit()
print(json.dumps(out))
"""


def test_behind_haproxy_cleartext_from_afar_is_refused_and_tls_at_haproxy_counts(
    spawn, haproxy, client_namespace, certificate, tmp_path
):
    """The client is 10.234.0.2 (another namespace); HAProxy on 10.234.0.1
    passes its plain port on (send-proxy-v2) and terminates TLS on the
    other (send-proxy-v2-ssl); mpop3 listens on loopback, where HAProxy
    is. With plaintext_auth loopback, the proxy's loopback address must not
    let the cleartext client log in; the one that used TLS may."""
    import json

    cert, key = certificate
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(open(cert, "rb").read() + open(key, "rb").read())
    port = free_port()
    server = start_server(
        spawn, listen_proxy=f"127.0.0.1:{port}", proxy_trusted_networks="127.0.0.1", plaintext_auth="loopback"
    )
    plain, tls_port = free_port(), free_port()
    haproxy(
        [
            (f"10.234.0.1:{plain}", f"127.0.0.1:{port} send-proxy-v2"),
            (f"10.234.0.1:{tls_port} ssl crt {pem}", f"127.0.0.1:{port} send-proxy-v2-ssl"),
        ]
    )
    client = [sys.executable, "-c", NETNS_CLIENT, "10.234.0.1", str(plain), str(tls_port), cert]

    tries = []

    def answered():
        """the client in the other namespace to be served"""
        result = subprocess.run(["ip", "netns", "exec", client_namespace, *client], capture_output=True, timeout=30)
        tries.append(result)
        return result if result.returncode == 0 else None

    try:
        result = wait_for(answered, seconds=15, interval=0.2)
    except AssertionError:
        raise AssertionError(tries[-1].stderr.decode()[-2000:] + server.log()) from None
    out = json.loads(result.stdout)
    assert "USER" not in out["capa"]
    assert out["user"].startswith("-ERR [AUTH] cleartext logins are refused here")
    assert out["user_tls"].startswith("+OK") and out["pass_tls"].startswith("+OK maildrop has 2 messages")
    server.stop()
    assert "10.234.0.2: bob logged in" in server.log()


def test_implicit_tls_behind_haproxy_in_tcp_mode(spawn, haproxy, certificate):
    """listen_tls_proxy: the header, then mpop3's own TLS handshake."""
    cert, key = certificate
    port, front = free_port(), free_port()
    server = start_server(
        spawn,
        listen_tls_proxy=f"127.0.0.1:{port}",
        proxy_trusted_networks="127.0.0.1",
        plaintext_auth="no",
        tls_cert=cert,
        tls_key=key,
    )
    haproxy([(f"127.0.0.2:{front}", f"127.0.0.1:{port} send-proxy")])
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False

    def connected():
        """HAProxy to listen"""
        try:
            return socket.create_connection(("127.0.0.2", front), timeout=10, source_address=("127.0.0.3", 0))
        except OSError:
            return None

    with context.wrap_socket(wait_for(connected, seconds=10, interval=0.1)) as tls_socket:
        lines = tls_socket.makefile("rwb")
        assert lines.readline().startswith(b"+OK")
        for command, reply in ((b"USER bob", b"+OK"), (b"PASS pw", b"+OK maildrop"), (b"QUIT", b"+OK")):
            lines.write(command + b"\r\n")
            lines.flush()
            assert lines.readline().startswith(reply)
    server.stop()
    assert "127.0.0.3: bob logged in" in server.log()  # the client's address, not HAProxy's
