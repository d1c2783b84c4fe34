"""A real Dovecot 2.3 POP3 server (Debian: dovecot-pop3d) and dovecot-lda
(dovecot-core) on Maildirs, for tests/test_storage_maildir.py and
bench/bench_maildir.py: the UIDLs Dovecot answers, its STAT time, and
delivery by its LDA.

Dovecot runs in the foreground (-F) from a private configuration in a
directory of the caller's, on a loopback port; users and passwords from a
passwd-file, every user's Maildir at MAILDIRS/USER/Maildir, opened as the
Maildirs' owner (`owner`: a pwd entry; nobody when run as root).
"""

import os
import pwd
import socket
import subprocess
import time

from pop_server import free_port

LDA = "/usr/lib/dovecot/dovecot-lda"

CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = mpop3-maildir-{port}
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = {internal}
default_login_user = {login}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={maildirs}/%u
}}
mail_location = maildir:{maildirs}/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
service pop3-login {{
  inet_listener pop3 {{
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
{chroot}}}
service anvil {{
{chroot}}}
"""


def write_conf(root, maildirs, owner, port=0):
    """The configuration file (also what dovecot-lda reads), its path."""
    os.makedirs(root, exist_ok=True)
    if os.geteuid() == 0:
        internal, login, chroot = "dovecot", "dovenull", ""
    else:  # Dovecot as an ordinary user: its own user everywhere, no chroot
        internal = login = pwd.getpwuid(os.geteuid()).pw_name
        chroot = "  chroot =\n"
    conf = os.path.join(root, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(
            CONF.format(
                root=root,
                maildirs=maildirs,
                port=port,
                uid=owner.pw_uid,
                gid=owner.pw_gid,
                internal=internal,
                login=login,
                chroot=chroot,
            )
        )
    return conf


class Dovecot:
    """`with Dovecot(root, maildirs, users, owner) as d:` a running server on d.port."""

    def __init__(self, root, maildirs, users, owner):
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.root, 0o755)
        with open(os.path.join(self.root, "passwd"), "w") as f:
            f.writelines(f"{u}:{{PLAIN}}pw::::::\n" for u in users)
        self.port = free_port()
        self.conf = write_conf(self.root, str(maildirs), owner, self.port)
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(["dovecot", "-F", "-c", self.conf], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read()[-2000:]
                    raise RuntimeError(f"dovecot did not start: {err!r} {self.log()}") from None
                time.sleep(0.05)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self):
        try:
            with open(os.path.join(self.root, "dovecot.log")) as f:
                return f.read()[-3000:]
        except FileNotFoundError:
            return ""


def deliver(conf, maildir, message, preexec_fn=None):
    """dovecot-lda delivering `message` into `maildir` as the calling (or
    preexec_fn's) user, with no -d (no userdb lookup, no running server)."""
    subprocess.run(
        [LDA, "-c", conf, "-o", f"mail_location=maildir:{maildir}", "-f", "sender@example.org"],
        input=message,
        check=True,
        preexec_fn=preexec_fn,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(maildir)},
        timeout=30,
    )
