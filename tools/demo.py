"""`make run`: serve a demo mailbox on 127.0.0.1:1110 in the foreground.

Creates demo/ (git-ignored) with a password file, an mbox spool holding a
few messages and a configuration, prints how to try it, then runs mpop3
until Ctrl-C. The mailbox is rebuilt on every run, so deleting mail with a
client is harmless.
"""

import os
import sys

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(TREE, "demo")
ADDRESS = "127.0.0.1:1110"

MESSAGES = [
    (
        b"From: Postmaster <postmaster@example.org>\n"
        b"To: demo@example.org\n"
        b"Subject: Welcome to mpop3\n"
        b"Date: Thu, 19 Nov 2026 10:00:00 +0000\n"
        b"Message-ID: <welcome@example.org>\n"
        b"\n"
        b"Hello! This message was served by mpop3.\n"
        b"Try deleting it: the demo mailbox is rebuilt each time `make run` starts.\n"
    ),
    (
        b"From: Alice <alice@example.org>\n"
        b"To: demo@example.org\n"
        b"Subject: A line that starts with a dot\n"
        b"Date: Thu, 19 Nov 2026 10:05:00 +0000\n"
        b"Message-ID: <dot@example.org>\n"
        b"\n"
        b"The next line starts with a dot; POP3 sends it as '..' and clients undo that:\n"
        b".like this\n"
        b">From here on, an mbox quotes 'From ' at the start of a line.\n"
    ),
    (
        b"From: Bob <bob@example.org>\n"
        b"To: demo@example.org\n"
        b"Subject: Numbers\n"
        b"Date: Thu, 19 Nov 2026 10:10:00 +0000\n"
        b"Message-ID: <numbers@example.org>\n"
        b"\n" + b"".join(b"line %d\n" % i for i in range(1, 21))
    ),
]


def build():
    spool = os.path.join(DEMO, "spool")
    os.makedirs(spool, exist_ok=True)
    with open(os.path.join(spool, "demo"), "wb") as f:
        for message in MESSAGES:
            f.write(b"From MAILER-DAEMON Thu Nov 19 10:00:00 2026\n" + message + b"\n")
    with open(os.path.join(DEMO, "passwd"), "w") as f:
        f.write("# user:password[:mailbox] -- see the auth_file section of README.md\n")
        f.write("demo:demo\n")
    conf = os.path.join(DEMO, "mpop3.conf")
    with open(conf, "w") as f:
        f.write(
            f"# written by tools/demo.py for `make run`\n"
            f"listen {ADDRESS}\n"
            f"module_dir {TREE}/modules\n"
            f"login_fail_delay 1\n"
            f"auth_module auth_file\n> passwd_file {DEMO}/passwd\n"
            f"storage_module storage_mbox\n> storage_dir {spool}\n"
        )
    return conf


def serve_as_safe_user():
    """Started as root, mpop3 serves the demo mailbox (a virtual user) as
    safe_user, nobody: give it the spool, and a way to it and to Python."""
    import pwd

    from mpop3.server import privs

    nobody = pwd.getpwnam("nobody")
    spool = os.path.join(DEMO, "spool")
    for path in (spool, os.path.join(spool, "demo")):
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    path = DEMO
    while path != "/":
        os.chmod(path, os.stat(path).st_mode | 0o001)
        path = os.path.dirname(path)
    privs.open_way_to_python()


def main():
    sys.path.insert(0, TREE)
    conf = build()
    if os.geteuid() == 0:
        serve_as_safe_user()
    print(f"mpop3 demo: user 'demo', password 'demo', {len(MESSAGES)} messages, on {ADDRESS}")
    print("try, in another terminal:")
    print(f"    curl pop3://demo:demo@{ADDRESS}/1")
    print(f"    curl pop3://demo:demo@{ADDRESS}/        (the message list)")
    print("Ctrl-C stops the server.", flush=True)
    from mpop3 import cli

    return cli.main(["-c", conf])


if __name__ == "__main__":
    sys.exit(main())
