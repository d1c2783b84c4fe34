"""TLS (issue 6): STLS (RFC 2595), implicit TLS (RFC 8314), the cleartext
policy and SASL AUTH (RFC 5034), through real clients over real sockets.

The certificate is made at test time with the openssl command; clients
trust it as their CA file. Every real client fetches the tricky mailbox of
test_clients.py and must get it byte for byte.
"""

import base64
import hashlib
import hmac
import json
import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap

import pytest
from pop_server import (
    TREE,
    MemoryStorage,
    ServerThread,
    Wire,
    free_port,
    make_certificate,
    memory_tables,
    wait_for,
    write_site,
)
from test_clients import EXPECTED, EXPECTED_HEADER_END, MESSAGES, SPOOL, as_crlf, client_site, read_dir, run

from mpop3 import config, loader
from mpop3.auth_functions import AuthFunctions
from mpop3.protocol import replies


def client_context(cert):
    return ssl.create_default_context(cafile=cert)


def tls_settings(certificate, port, **more):
    cert, key = certificate
    return {"tls_cert": cert, "tls_key": key, "listen_tls": f"127.0.0.1:{port}", **more}


@pytest.fixture
def site(spawn, certificate, process_model):
    """The real mpop3 with the tricky mailbox, STLS on its plain port and
    implicit TLS on `tls_port`, in each model that switches after login."""
    tls_port = free_port()
    server = client_site(spawn, tls_settings(certificate, tls_port, **process_model))
    server.tls_port, server.cert = tls_port, certificate[0]
    return server


def fetch_all(p):
    assert p.user("bob").startswith(b"+OK")
    assert p.pass_("pw").startswith(b"+OK maildrop has 6 messages")
    got = []
    for i, entry in enumerate(p.list()[1], 1):
        lines = p.retr(i)[1]
        message = b"\r\n".join(lines) + b"\r\n"
        assert len(message) == int(entry.split()[1])
        got.append(message)
    assert p.quit().startswith(b"+OK")
    return got


# --- poplib -------------------------------------------------------------------------------


def test_poplib_stls(site):
    p = poplib.POP3("127.0.0.1", site.port, timeout=10)
    assert "STLS" in p.capa()
    assert p.stls(client_context(site.cert)).startswith(b"+OK")
    capa = p.capa()
    assert "STLS" not in capa and "USER" in capa  # RFC 2595: what applies now
    assert fetch_all(p) == [as_crlf(m) for m in MESSAGES]


def test_poplib_pop3_ssl(site):
    p = poplib.POP3_SSL("127.0.0.1", site.tls_port, timeout=10, context=client_context(site.cert))
    assert p.getwelcome().startswith(b"+OK mpop3 ready")
    assert "STLS" not in p.capa()
    assert p.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert fetch_all(p) == [as_crlf(m) for m in MESSAGES]


# --- curl -----------------------------------------------------------------------------------


@pytest.mark.clients
@pytest.mark.parametrize("url", ["pop3s://bob:pw@127.0.0.1:{tls_port}/", "pop3://bob:pw@127.0.0.1:{port}/"])
def test_curl(site, url):
    base = url.format(tls_port=site.tls_port, port=site.port)
    common = ["curl", "-s", "--cacert", site.cert, "--ssl-reqd"]
    assert run(site, common + [base]).stdout.count(b"\r\n") == 6
    for i, m in enumerate(MESSAGES, 1):
        assert run(site, common + [f"{base}{i}"]).stdout == as_crlf(m), i


# --- fetchmail ------------------------------------------------------------------------------


@pytest.mark.clients
@pytest.mark.parametrize("tls", ["ssl", "sslproto tls1.2+"])
def test_fetchmail(site, tls):
    out = site.root / "fetched"
    out.mkdir()
    port = site.tls_port if tls == "ssl" else site.port
    rc = site.home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\nset invisible\n"
        f"poll 127.0.0.1 with proto POP3 service {port} uidl auth password\n"
        f'  user "bob" there with password "pw" is "root" here keep {tls}\n'
        f"  sslcertck sslcertfile {site.cert} sslcommonname localhost\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    result = run(site, ["fetchmail", "-f", str(rc), "--idfile", str(site.home / ".fetchids"), "--nosyslog", "-v"])
    assert sorted(read_dir(out)) == EXPECTED_HEADER_END
    if tls != "ssl":
        assert b"POP3> STLS" in result.stdout


# --- getmail6 ---------------------------------------------------------------------------------


@pytest.mark.clients
def test_getmail_ssl(site):
    out = site.root / "getmail-out"
    out.mkdir()
    rc = site.home / "getmailrc"
    rc.write_text(
        "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
        f"port = {site.tls_port}\nusername = bob\npassword = pw\nca_certs = {site.cert}\n"
        "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "cat > {out}/msg.$$")\nallow_root_commands = true\nunixfrom = false\n'
        "[options]\ndelete = false\nread_all = false\nreceived = false\ndelivered_to = false\n"
    )
    getmaildir = site.home / ".getmail"
    getmaildir.mkdir()
    run(site, ["getmail", f"--getmaildir={getmaildir}", f"--rcfile={rc}"])
    got = sorted(re.sub(rb"\AReturn-Path: [^\n]*\n", b"", m) for m in read_dir(out))
    assert got == EXPECTED_HEADER_END


# --- mpop -----------------------------------------------------------------------------------------


@pytest.mark.clients
@pytest.mark.parametrize("starttls", ["on", "off"])
def test_mpop(site, starttls):
    maildir = site.root / "mpop-maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    port = site.port if starttls == "on" else site.tls_port
    rc = site.home / ".mpoprc"
    rc.write_text(
        f"account default\nhost 127.0.0.1\nport {port}\nuser bob\npassword pw\n"
        f"tls on\ntls_starttls {starttls}\ntls_trust_file {site.cert}\nauth plain\n"
        f"received_header off\nkeep on\nuidls_file {site.home}/.mpop_uidls\n"
        f"delivery maildir {maildir}\n"
    )
    rc.chmod(0o600)
    run(site, ["mpop", "-C", str(rc), "-a"])
    assert sorted(read_dir(maildir / "new")) == EXPECTED


# --- STLS done right ---------------------------------------------------------------------------


def bob_tables():
    """bob (password secret) with one message."""
    return memory_tables({"bob": "secret"}, {"bob": [b"Subject: hi\n\nbody\n"]})


@pytest.fixture
def tls_server(server_thread, certificate):
    server = server_thread(bob_tables(), tls_settings(certificate, free_port()))
    server.cert = certificate[0]
    server.tls_port = server.conf.listen_tls[0][1]
    return server


def read_for(sock, seconds):
    """Everything that arrives within `seconds` (the socket stays open)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


class TLSWire(Wire):
    """Wire over a socket that has gone TLS."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""


def start_tls(sock, cert):
    return TLSWire(client_context(cert).wrap_socket(sock, server_hostname="localhost"))


def test_stls_injection_pipelined_commands_are_dropped(tls_server):
    """CVE-2011-0411: `STLS\\r\\nCAPA\\r\\n` in one write. Before the
    handshake only +OK arrives; after it, the CAPA was never executed (and
    a half line sent in clear does not join the first line sent in TLS)."""
    w = Wire(tls_server.port)
    w.send(b"STLS\r\nCAPA\r\nUSER evil")
    assert read_for(w.sock, 0.5) == replies.OK_STLS.wire
    t = start_tls(w.sock, tls_server.cert)
    assert read_for(t.sock, 0.3) == b""  # no reply to the injected CAPA
    t.send(b"\r\nPASS secret\r\n")  # "USER evil" + this line would be a login
    assert t.line() == replies.ERR_UNKNOWN.wire[:-2]  # the empty line
    assert t.line() == replies.ERR_PASS_FIRST.wire[:-2]
    assert read_for(t.sock, 0.2) == b""


def test_stls_twice_or_after_login_is_refused_and_capa_follows(tls_server):
    w = Wire(tls_server.port)
    assert w.cmd("CAPA") == replies.OK_CAPA[:-2]
    assert b"STLS" in w.multi()
    assert w.cmd("STLS") == replies.OK_STLS.wire[:-2]
    t = start_tls(w.sock, tls_server.cert)
    assert t.cmd("STLS") == replies.ERR_TLS_ACTIVE.wire[:-2]
    assert t.cmd("CAPA") == replies.OK_CAPA[:-2]
    assert b"STLS" not in t.multi()
    t.login("bob", "secret")
    assert t.cmd("STLS") == replies.ERR_NOT_NOW.wire[:-2]
    assert t.cmd("QUIT").startswith(b"+OK")

    plain = Wire(tls_server.port)  # no STLS after login on a plain connection either
    plain.login("bob", "secret")
    assert plain.cmd("STLS") == replies.ERR_NOT_NOW.wire[:-2]


def test_no_stls_without_a_certificate():
    tables = memory_tables({"bob": "secret"}, {"bob": []})
    with ServerThread(tables) as server:
        w = Wire(server.port)
        w.cmd("CAPA")
        assert b"STLS" not in w.multi()
        assert w.cmd("STLS") == replies.ERR_NO_TLS.wire[:-2]


def test_a_failed_handshake_ends_only_that_session(tls_server):
    w = Wire(tls_server.port)
    w.cmd("STLS")
    w.send(b"this is no TLS ClientHello\r\n" * 20)
    assert w.closed()
    bad = socket.create_connection(("127.0.0.1", tls_server.tls_port))
    bad.sendall(b"USER bob\r\n")  # plaintext on the TLS port
    assert read_for(bad, 2) == b""
    t = start_tls(socket.create_connection(("127.0.0.1", tls_server.tls_port)), tls_server.cert)
    assert t.line().startswith(b"+OK mpop3 ready")
    t.login("bob", "secret")
    assert tls_server.call(lambda: len(tls_server.server.connections)) == 1


def test_tls_min_version_1_3_refuses_1_2(certificate):
    tables = memory_tables({"bob": "secret"}, {"bob": []})
    with ServerThread(tables, tls_settings(certificate, free_port(), tls_min_version="1.3")) as server:
        old = client_context(certificate[0])
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            poplib.POP3_SSL("127.0.0.1", server.conf.listen_tls[0][1], context=old, timeout=5)
        p = poplib.POP3_SSL("127.0.0.1", server.conf.listen_tls[0][1], context=client_context(certificate[0]))
        assert p.sock.version() == "TLSv1.3"


# --- the cleartext policy -------------------------------------------------------------------------


def test_plaintext_auth_no_refuses_cleartext_until_tls(certificate):
    with ServerThread(bob_tables(), tls_settings(certificate, free_port(), plaintext_auth="no")) as server:
        w = Wire(server.port)
        w.cmd("CAPA")
        capa = w.multi()
        assert b"USER" not in capa and b"STLS" in capa and b"SASL CRAM-MD5" in capa
        assert w.cmd("USER bob") == replies.ERR_CLEARTEXT.wire[:-2]
        assert w.cmd("PASS secret") == replies.ERR_CLEARTEXT.wire[:-2]
        assert w.cmd("AUTH PLAIN " + b64(b"\0bob\0secret")) == replies.ERR_CLEARTEXT.wire[:-2]
        assert w.cmd("AUTH LOGIN") == replies.ERR_CLEARTEXT.wire[:-2]
        assert b"use STLS" in replies.ERR_CLEARTEXT.wire
        # APOP sends a digest: still allowed
        stamp = re.search(rb"<[^>]+>", w.greeting).group(0)
        digest = hashlib.md5(stamp + b"secret").hexdigest()
        assert w.cmd(f"APOP bob {digest}").startswith(b"+OK maildrop")
        w.cmd("QUIT")

        w = Wire(server.port)
        w.cmd("STLS")
        t = start_tls(w.sock, certificate[0])
        t.cmd("CAPA")
        capa = t.multi()
        assert b"USER" in capa and b"SASL PLAIN LOGIN CRAM-MD5" in capa
        t.login("bob", "secret")


NETNS_CLIENT = textwrap.dedent("""
    import json, poplib, ssl, sys
    host, port, tls_port, cert = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    out = {}
    p = poplib.POP3(host, port, timeout=10)
    out["capa"] = sorted(p.capa())
    try:
        p.user("bob")
    except poplib.error_proto as e:
        out["user"] = e.args[0].decode()
    p.stls(ssl.create_default_context(cafile=cert))
    out["capa_tls"] = sorted(p.capa())
    p.user("bob")
    out["pass_tls"] = p.pass_("pw").decode()
    out["retr_tls"] = b"\\r\\n".join(p.retr(1)[1]).decode()
    p.quit()
    p = poplib.POP3_SSL(host, tls_port, timeout=10, context=ssl.create_default_context(cafile=cert))
    p.user("bob")
    out["pass_pop3s"] = p.pass_("pw").decode()
    p.quit()
    print(json.dumps(out))
""")


@pytest.fixture
def namespaces():
    """Two network namespaces joined by a veth pair, 10.231.0.1 (server)
    and 10.231.0.2 (client): a peer that is not loopback, on this machine
    only. Removed afterwards."""
    tag = f"mp{os.getpid() % 100000}"
    server_ns, client_ns = f"{tag}s", f"{tag}c"

    def ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True)

    for ns in (server_ns, client_ns):  # left over by a run that was killed
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    try:
        ip("netns", "add", server_ns)
        ip("netns", "add", client_ns)
        ip("link", "add", f"{tag}a", "netns", server_ns, "type", "veth", "peer", "name", f"{tag}b", "netns", client_ns)
        for ns, dev, addr in ((server_ns, f"{tag}a", "10.231.0.1/24"), (client_ns, f"{tag}b", "10.231.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield server_ns, client_ns
    finally:
        for ns in (server_ns, client_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.root
def test_cleartext_refused_from_a_non_loopback_address_but_allowed_over_tls(tmp_path, certificate, namespaces):
    server_ns, client_ns = namespaces
    port, tls_port = free_port(), free_port()
    conf = write_site(
        tmp_path,
        {"bob": "pw"},
        {"bob": SPOOL},
        {**tls_settings(certificate, tls_port), "listen_tls": f"10.231.0.1:{tls_port}", "listen": f"10.231.0.1:{port}"},
    )
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-m", "mpop3", "-c", conf], cwd=TREE, stderr=subprocess.PIPE
    )
    try:
        client = [sys.executable, "-c", NETNS_CLIENT, "10.231.0.1", str(port), str(tls_port), certificate[0]]

        def answered():
            """the client in the other namespace to be served (or the server to end)"""
            result = subprocess.run(
                ["ip", "netns", "exec", client_ns, *client], capture_output=True, cwd=TREE, timeout=30
            )
            if result.returncode == 0 or server.poll() is not None:
                return result
            return None  # not listening yet

        result = wait_for(answered, seconds=15, interval=0.2)
        assert result.returncode == 0, result.stderr.decode()
        out = json.loads(result.stdout)
    finally:
        server.terminate()
        log = server.communicate(timeout=20)[1].decode()
    assert "USER" not in out["capa"] and "STLS" in out["capa"]
    assert out["user"].startswith("-ERR [AUTH] cleartext logins are refused here: use STLS")
    assert "USER" in out["capa_tls"] and "STLS" not in out["capa_tls"]
    assert out["pass_tls"].startswith("+OK maildrop has 6 messages")
    assert out["retr_tls"].encode() + b"\r\n" == as_crlf(MESSAGES[0])
    assert out["pass_pop3s"].startswith("+OK maildrop has 6 messages")
    assert re.search(r"10\.231\.0\.2: TLS TLSv1\.[23] \S+", log), log  # the TLS facts, at info level


# --- SASL AUTH with poplib's raw commands -----------------------------------------------------------


def b64(data):
    return base64.b64encode(data).decode()


@pytest.fixture
def sasl_server(server_thread):
    return server_thread(bob_tables())


def pop(server):
    return poplib.POP3("127.0.0.1", server.port, timeout=10)


def test_capa_lists_the_sasl_mechanisms(sasl_server):
    assert pop(sasl_server).capa()["SASL"] == ["PLAIN", "LOGIN", "CRAM-MD5"]


def test_cram_md5_only_with_plaintext_passwords():
    class HashesOnly(AuthFunctions):  # like crypt(3) hashes: no auth_password to give
        def auth_attempt_login(self, user, password):
            return user if (user, password) == ("bob", "secret") else None

    with ServerThread(loader.Tables(HashesOnly(), MemoryStorage({"bob": []}), [])) as server:
        p = pop(server)
        assert p.capa()["SASL"] == ["PLAIN", "LOGIN"]
        with pytest.raises(poplib.error_proto, match="unsupported SASL mechanism"):
            p._shortcmd("AUTH CRAM-MD5")
        assert p._shortcmd("AUTH PLAIN " + b64(b"\0bob\0secret")).startswith(b"+OK maildrop")


def test_auth_plain_with_initial_response(sasl_server):
    p = pop(sasl_server)
    assert p._shortcmd("AUTH PLAIN " + b64(b"\0bob\0secret")).startswith(b"+OK maildrop has 1 message")
    assert p.retr(1)[1] == [b"Subject: hi", b"", b"body"]


def test_auth_plain_without_initial_response(sasl_server):
    p = pop(sasl_server)
    p._putcmd("AUTH PLAIN")
    assert p._getline()[0] == b"+ "
    assert p._shortcmd(b64(b"bob\0bob\0secret")).startswith(b"+OK maildrop")


def test_auth_login(sasl_server):
    p = pop(sasl_server)
    p._putcmd("auth login")
    assert p._getline()[0] == b"+ " + base64.b64encode(b"Username:")
    p._putcmd(b64(b"bob"))
    assert p._getline()[0] == b"+ " + base64.b64encode(b"Password:")
    assert p._shortcmd(b64(b"secret")).startswith(b"+OK maildrop")


def test_auth_cram_md5(sasl_server):
    p = pop(sasl_server)
    p._putcmd("AUTH CRAM-MD5")
    line = p._getline()[0]
    assert line.startswith(b"+ ")
    challenge = base64.b64decode(line[2:])
    assert re.fullmatch(rb"<[^<>@]+@[^<>]+>", challenge)
    digest = hmac.new(b"secret", challenge, "md5").hexdigest()
    assert p._shortcmd(b64(b"bob " + digest.encode())).startswith(b"+OK maildrop")


def test_auth_bad_base64_and_cancel_leave_the_session_usable(sasl_server):
    p = pop(sasl_server)
    with pytest.raises(poplib.error_proto, match="malformed base64"):
        p._shortcmd("AUTH PLAIN not*base64")
    p._putcmd("AUTH LOGIN")
    p._getline()
    with pytest.raises(poplib.error_proto, match="malformed base64"):
        p._shortcmd("%%%")
    p._putcmd("AUTH LOGIN")
    p._getline()
    with pytest.raises(poplib.error_proto, match="cancelled"):
        p._shortcmd("*")
    with pytest.raises(poplib.error_proto, match="unsupported SASL mechanism"):
        p._shortcmd("AUTH GSSAPI")
    assert p._shortcmd("AUTH PLAIN " + b64(b"\0bob\0secret")).startswith(b"+OK maildrop")


def test_auth_failures_count_towards_the_limit(sasl_server):
    p = pop(sasl_server)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] authentication failed"):
        p._shortcmd("AUTH PLAIN " + b64(b"\0bob\0wrong"))
    p._putcmd("AUTH CRAM-MD5")
    p._getline()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] authentication failed"):
        p._shortcmd(b64(b"bob " + b"0" * 32))
    with pytest.raises(poplib.error_proto, match="too many failed logins"):  # USER/PASS counts the same
        p.user("bob")
        p.pass_("wrong again")
    assert p.file.read() == b""  # closed


# --- start-up errors and SIGHUP ----------------------------------------------------------------------


def start_with(tmp_path, extra):
    conf = write_site(tmp_path, {"bob": "pw"}, {"bob": b""}, extra)
    return subprocess.run(
        [sys.executable, "-m", "mpop3", "-c", conf, "-l", f"127.0.0.1:{free_port()}"],
        cwd=TREE,
        capture_output=True,
        timeout=30,
    )


def test_missing_certificate_is_a_one_line_start_up_error(tmp_path, certificate):
    result = start_with(tmp_path, {"tls_cert": str(tmp_path / "nope.pem"), "tls_key": certificate[1]})
    assert result.returncode == 2
    errors = [line for line in result.stderr.decode().splitlines() if "INFO" not in line]
    assert errors == [f"{tmp_path}/mpop3.conf: tls_cert {tmp_path}/nope.pem: No such file or directory"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tls_cert": "{dir}"}, "tls_cert {dir}: Is a directory"),  # root reads anything else
        ({"listen_tls": "127.0.0.1:9995"}, "listen_tls needs tls_cert (and tls_key)"),
        ({"tls_key": "{key}"}, "tls_key is set but tls_cert is not"),
        (
            {"tls_cert": "{cert}", "tls_key": "{key}", "tls_ciphers": "NO-SUCH-CIPHER"},
            "tls_ciphers 'NO-SUCH-CIPHER': no cipher matches",
        ),
    ],
)
def test_tls_configuration_mistakes_are_one_line_start_up_errors(tmp_path, certificate, settings, message):
    names = {"dir": str(tmp_path), "cert": certificate[0], "key": certificate[1]}
    result = start_with(tmp_path, {k: v.format(**names) for k, v in settings.items()})
    assert result.returncode == 2
    assert result.stderr.decode().splitlines()[-1] == f"{tmp_path}/mpop3.conf: {message.format(**names)}"


def test_unusable_key_is_a_one_line_start_up_error(tmp_path, certificate):
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a key\n")
    result = start_with(tmp_path, {"tls_cert": certificate[0], "tls_key": str(bad)})
    assert result.returncode == 2
    errors = [line for line in result.stderr.decode().splitlines() if "INFO" not in line]
    assert len(errors) == 1 and f"tls_key {bad}" in errors[0], errors


def test_sighup_reloads_the_certificate_without_dropping_sessions(tmp_path, certificate):
    cert_a = certificate
    cert_b = make_certificate(tmp_path, "second")
    live_cert, live_key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    for src, dst in zip(cert_a, (live_cert, live_key), strict=True):
        dst.write_bytes(open(src, "rb").read())
    tls_port = free_port()
    path = tmp_path / "mpop3.conf"
    path.write_text(
        f"listen 127.0.0.1:{free_port()}\nlisten_tls 127.0.0.1:{tls_port}\ntls_cert {live_cert}\ntls_key {live_key}\n"
    )
    server = ServerThread(bob_tables())
    server.conf = config.load(str(path))
    with server:
        trust_both = client_context(cert_a[0])
        trust_both.load_verify_locations(cert_b[0])
        old = poplib.POP3_SSL("127.0.0.1", tls_port, context=trust_both)
        assert old.sock.getpeercert()["subject"] == ((("commonName", "mpop3-test"),),)
        old.user("bob")
        old.pass_("secret")
        for src, dst in zip(cert_b, (live_cert, live_key), strict=True):
            dst.write_bytes(open(src, "rb").read())
        server.call(server.server.reload)
        new = poplib.POP3_SSL("127.0.0.1", tls_port, context=trust_both)
        assert new.sock.getpeercert()["subject"] == ((("commonName", "second"),),)
        w = Wire(server.port)  # STLS gets the new one too
        w.cmd("STLS")
        t = trust_both.wrap_socket(w.sock, server_hostname="localhost")
        assert t.getpeercert()["subject"] == ((("commonName", "second"),),)
        assert old.retr(1)[1] == [b"Subject: hi", b"", b"body"]  # the old session goes on
        live_key.write_text("broken\n")  # a bad new key: keep the running certificate
        server.call(server.server.reload)
        again = poplib.POP3_SSL("127.0.0.1", tls_port, context=trust_both)
        assert again.sock.getpeercert()["subject"] == ((("commonName", "second"),),)
        assert old.quit().startswith(b"+OK")


def test_sighup_reloads_the_certificate_of_the_mpop3_command(tmp_path, spawn, certificate):
    """The same through the real command, whatever its process model (as
    root: a process per session, forked by a listener that holds the context)."""
    cert_b = make_certificate(tmp_path, "second")
    live = tmp_path / "live.pem"
    live.write_bytes(open(certificate[1], "rb").read() + open(certificate[0], "rb").read())
    tls_port = free_port()
    server = spawn({"bob": "pw"}, {"bob": SPOOL}, {"tls_cert": str(live), "listen_tls": f"127.0.0.1:{tls_port}"})
    trust_both = client_context(certificate[0])
    trust_both.load_verify_locations(cert_b[0])

    def subject():
        p = poplib.POP3_SSL("127.0.0.1", tls_port, context=trust_both, timeout=10)
        name = p.sock.getpeercert()["subject"][0][0][1]
        p.quit()
        return name

    old = poplib.POP3_SSL("127.0.0.1", tls_port, context=trust_both, timeout=10)
    old.user("bob")
    old.pass_("pw")
    assert subject() == "mpop3-test"
    live.write_bytes(open(cert_b[1], "rb").read() + open(cert_b[0], "rb").read())
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: subject() == "second", interval=0.1)
    assert b"\r\n".join(old.retr(1)[1]) + b"\r\n" == as_crlf(MESSAGES[0])  # not dropped
    assert old.quit().startswith(b"+OK")


@pytest.mark.clients
def test_stdin_mode_on_a_listen_tls_port_is_implicit_tls(tmp_path, certificate):
    """inetd or systemd Accept=yes on port 995: `mpop3 -s` gets the TCP
    socket, sees that its port is a listen_tls address, and does TLS first."""
    port = free_port()
    conf = write_site(tmp_path, {"bob": "pw"}, {"bob": SPOOL}, tls_settings(certificate, port))
    command = f"{sys.executable} -m mpop3 -c {conf} -s"
    socat = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"EXEC:{command},nofork"],
        cwd=TREE,
        stderr=subprocess.DEVNULL,
    )
    try:

        def connected():
            """socat to listen and the session it starts to do TLS"""
            try:
                return poplib.POP3_SSL("127.0.0.1", port, timeout=20, context=client_context(certificate[0]))
            except (OSError, EOFError):
                return None

        p = wait_for(connected, interval=0.1)
        assert fetch_all(p) == [as_crlf(m) for m in MESSAGES]
    finally:
        socat.terminate()
        socat.wait(10)
