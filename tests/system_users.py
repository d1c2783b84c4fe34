"""Create and remove system accounts for tests (CI runs as root)."""

import contextlib
import pwd
import subprocess


def run(*command, stdin=None):
    subprocess.run(command, input=stdin, check=True, capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def system_user(name, password=None, system=False, hash_method="YESCRYPT", locked=False, expired=False):
    """A throw-away account: `system` ones get a uid below 1000."""
    with contextlib.suppress(subprocess.CalledProcessError):
        run("userdel", "-f", name)
    run("useradd", "-M", "-s", "/usr/sbin/nologin", *(["-r"] if system else []), name)
    try:
        if password is not None:
            run("chpasswd", "-c", hash_method, stdin=f"{name}:{password}\n")
        if locked:
            run("usermod", "-L", name)
        if expired:
            run("chage", "-E", "1", name)  # expired on 1970-01-02
        yield pwd.getpwnam(name)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            run("userdel", "-f", name)
