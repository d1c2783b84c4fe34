"""Real POP3 clients against the real `mpop3` command (auth_file +
storage_mbox), fetching a tricky mailbox and comparing bytes: Python's
poplib, curl, fetchmail, getmail6 and mpop. Clients that track UIDs are run
twice: the second run must download nothing new. Each runs with HOME in a
temporary directory."""

import glob
import os
import poplib
import subprocess

import pytest
from mbox_helpers import mbox
from pop_server import Wire

pytestmark = pytest.mark.clients  # fetchmail, getmail, mpop, curl

# The tricky mailbox: each message as written to the spool (without its
# From_ line); what a client must get is exactly this, line ends aside.
MESSAGES = [
    # dot lines that must be stuffed and unstuffed, an mbox-quoted >From,
    # 8-bit text, a tab, a line that is just "."
    b"From: Alice <alice@example.org>\nTo: bob@example.org\nSubject: dots\n"
    b"Message-ID: <m1@example.org>\n\n.starts with a dot\n..two dots\n.\n>From the quoted line\n"
    b"caf\xc3\xa9 \xe2\x82\xac\ttab\n",
    # CRLF line ends in the spool
    b"From: Carol <carol@example.org>\r\nSubject: crlf\r\nMessage-ID: <m2@example.org>\r\n\r\n"
    b"written with CRLF\r\nsecond line\r\n",
    # headers only, no body at all
    b"From: Dave <dave@example.org>\nSubject: headers only\nMessage-ID: <m3@example.org>\n",
    # a long line and a large body (streamed in chunks)
    b"From: Erin <erin@example.org>\nSubject: big\nMessage-ID: <m4@example.org>\n\n"
    + b"L" * 1500
    + b"\n"
    + b"".join(b"line %06d of a large message\n" % i for i in range(8000)),
    # an identical duplicate of message 3: UIDs must still differ (getmail aborts otherwise)
    b"From: Dave <dave@example.org>\nSubject: headers only\nMessage-ID: <m3@example.org>\n",
    # the last message in the file has no final newline
    b"From: Frank <frank@example.org>\nSubject: last\nMessage-ID: <m6@example.org>\n\nno final newline",
]


def as_lf(message):
    text = message.replace(b"\r\n", b"\n")
    return text if text.endswith(b"\n") else text + b"\n"


def as_crlf(message):
    return as_lf(message).replace(b"\n", b"\r\n")


EXPECTED = sorted(as_lf(m) for m in MESSAGES)


def with_header_end(message):
    """fetchmail and getmail write the blank line that ends the header even
    for a message that has no body (and so no blank line)."""
    return message if b"\n\n" in message else message + b"\n"


EXPECTED_HEADER_END = sorted(with_header_end(m) for m in EXPECTED)


# the spool: the last message stays without its final newline
SPOOL = mbox(*MESSAGES, sender="sender@example.org", finish_last=False)


def client_site(spawn, extra=None):
    """The real mpop3 serving SPOOL to bob (password pw), and a HOME for
    the clients (server.home) next to its files (server.root)."""
    server = spawn({"bob": "pw"}, {"bob": SPOOL}, extra)
    server.home = server.root / "home"
    server.home.mkdir()
    return server


@pytest.fixture
def site(spawn, process_model):
    return client_site(spawn, process_model)


def run(server, command, ok=(0,)):
    env = dict(os.environ, HOME=str(server.home), LC_ALL="C")
    result = subprocess.run(command, capture_output=True, env=env, timeout=60, cwd=server.home)
    assert result.returncode in ok, (command, result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    return result


def messages_left(server):
    w = Wire(server.port)
    w.login("bob", "pw")
    count = int(w.cmd("STAT").split()[1])
    w.cmd("QUIT")
    return count


def strip_header(message, name):
    """Drop one header a client adds on delivery (e.g. getmail's Return-Path)."""
    lines = message.split(b"\n")
    out, skipping = [], False
    for i, line in enumerate(lines):
        if b"\n".join(lines[:i]).find(b"\n\n") < 0 and line.lower().startswith(name.lower() + b":"):
            skipping = True
            continue
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        out.append(line)
    return b"\n".join(out)


def read_dir(path, pattern="*"):
    found = []
    for file in sorted(glob.glob(os.path.join(path, pattern))):
        with open(file, "rb") as f:
            found.append(f.read())
    return found


# --- poplib -----------------------------------------------------------------------


def test_poplib(site):
    p = poplib.POP3("127.0.0.1", site.port, timeout=10)
    assert p.user("bob").startswith(b"+OK")
    assert p.pass_("pw").startswith(b"+OK maildrop has 6 messages")
    listing = p.list()[1]
    uids = [line.split()[1] for line in p.uidl()[1]]
    assert len(set(uids)) == 6  # the identical duplicate has its own UID
    got = []
    for i, entry in enumerate(listing, 1):
        _, lines, _ = p.retr(i)
        message = b"\r\n".join(lines) + b"\r\n"
        assert len(message) == int(entry.split()[1])  # exact LIST sizes (fetchmail checks them)
        got.append(message)
    assert got == [as_crlf(m) for m in MESSAGES]
    assert p.top(1, 0)[1] == as_lf(MESSAGES[0]).split(b"\n\n")[0].split(b"\n") + [b""]
    assert p.quit().startswith(b"+OK")


# --- curl ---------------------------------------------------------------------------


def test_curl(site):
    base = f"pop3://bob:pw@127.0.0.1:{site.port}/"
    listing = run(site, ["curl", "-s", base]).stdout
    assert listing.count(b"\r\n") == 6
    for i, m in enumerate(MESSAGES, 1):
        assert run(site, ["curl", "-s", f"{base}{i}"]).stdout == as_crlf(m), i
    run(site, ["curl", "-s", "-I", "-X", "DELE 1", base])  # -I: no listing follows; QUIT commits
    assert messages_left(site) == 5


# --- fetchmail ------------------------------------------------------------------------


def fetchmail(site, keep):
    out = site.root / "fetched"
    out.mkdir(exist_ok=True)
    rc = site.home / ".fetchmailrc"
    rc.write_text(
        "set no syslog\nset invisible\n"
        f"poll 127.0.0.1 with proto POP3 service {site.port} uidl auth password\n"
        f'  user "bob" there with password "pw" is "root" here {"keep" if keep else "nokeep"} sslproto ""\n'
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n"
    )
    rc.chmod(0o600)
    # exit code 1: "no mail" (the second run)
    return run(
        site, ["fetchmail", "-f", str(rc), "--idfile", str(site.home / ".fetchids"), "--nosyslog", "-v"], ok=(0, 1)
    ), out


def test_fetchmail_keep_uidl_then_nothing_new(site):
    result, out = fetchmail(site, keep=True)
    assert result.returncode == 0, result.stderr
    assert sorted(read_dir(out)) == EXPECTED_HEADER_END
    assert b"POP3> TOP 1 99999999" in result.stdout  # its way of not marking mail seen
    second, out = fetchmail(site, keep=True)
    assert second.returncode == 1, second.stderr  # 1: no new mail
    assert len(read_dir(out)) == 6
    assert messages_left(site) == 6


def test_fetchmail_without_keep_deletes(site):
    result, out = fetchmail(site, keep=False)
    assert result.returncode == 0, result.stderr
    assert sorted(read_dir(out)) == EXPECTED_HEADER_END
    assert messages_left(site) == 0


# --- getmail6 ---------------------------------------------------------------------------


def getmail(site, delete):
    out = site.root / "getmail-out"
    out.mkdir(exist_ok=True)
    rc = site.home / "getmailrc"
    # an external MDA, one file per message: getmail's Maildir delivery
    # refuses to run as root, which the CI may be
    rc.write_text(
        "[retriever]\ntype = SimplePOP3Retriever\nserver = 127.0.0.1\n"
        f"port = {site.port}\nusername = bob\npassword = pw\n"
        "[destination]\ntype = MDA_external\npath = /bin/sh\n"
        f'arguments = ("-c", "cat > {out}/msg.$$")\nallow_root_commands = true\nunixfrom = false\n'
        f"[options]\ndelete = {'true' if delete else 'false'}\nread_all = false\n"
        "received = false\ndelivered_to = false\nverbose = 1\n"
    )
    getmaildir = site.home / ".getmail"
    getmaildir.mkdir(exist_ok=True)
    result = run(site, ["getmail", f"--getmaildir={getmaildir}", f"--rcfile={rc}"])
    got = [strip_header(m, b"Return-Path") for m in read_dir(out)]
    return result, sorted(got)


def test_getmail_keep_then_nothing_new(site):
    result, got = getmail(site, delete=False)
    assert got == EXPECTED_HEADER_END, result.stdout
    again, got = getmail(site, delete=False)
    assert b"0 messages (0 bytes) retrieved, 6 skipped" in again.stdout, again.stdout
    assert len(got) == 6
    assert messages_left(site) == 6


def test_getmail_delete(site):
    result, got = getmail(site, delete=True)
    assert got == EXPECTED_HEADER_END, result.stdout
    assert messages_left(site) == 0


# --- mpop -----------------------------------------------------------------------------------


def mpop(site, keep):
    maildir = site.root / "mpop-maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    rc = site.home / ".mpoprc"
    rc.write_text(
        f"account default\nhost 127.0.0.1\nport {site.port}\nuser bob\npassword pw\n"
        "tls off\nauth user\nreceived_header off\n"
        f"keep {'on' if keep else 'off'}\nuidls_file {site.home}/.mpop_uidls\n"
        f"delivery maildir {maildir}\n"
    )
    rc.chmod(0o600)
    result = run(site, ["mpop", "-C", str(rc), "-a"])
    return result, sorted(read_dir(maildir / "new"))


def test_mpop_keep_then_nothing_new(site):
    result, got = mpop(site, keep=True)
    assert got == EXPECTED, result.stdout
    again, got = mpop(site, keep=True)
    assert len(got) == 6  # nothing new delivered
    assert b"new: no messages" in again.stdout and b"retrieving" not in again.stdout, again.stdout
    assert messages_left(site) == 6


def test_mpop_delete(site):
    result, got = mpop(site, keep=False)
    assert got == EXPECTED, result.stdout
    assert messages_left(site) == 0
