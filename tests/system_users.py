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


# A name service that folds case, as sssd (case_sensitive = false) and LDAP
# (caseIgnoreMatch) do: an NSS module (passwd and shadow) with one account
# that any capitalisation of its name finds, under its canonical name; it
# writes every name it is asked for (its kind, a space, the name in hex) to
# the file `lookups`, one a line.
FOLDING_NSS = r"""
#include <nss.h>
#include <pwd.h>
#include <shadow.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static void record(const char *kind, const char *name)
{
    FILE *f = fopen("%(lookups)s", "a");
    if (f == NULL)
        return;
    fprintf(f, "%%s ", kind);
    for (const unsigned char *p = (const unsigned char *)name; *p; p++)
        fprintf(f, "%%02x", *p);
    fputc('\n', f);
    fclose(f);
}

enum nss_status _nss_mpop3fold_getpwnam_r(const char *name, struct passwd *pw, char *buf, size_t len, int *err)
{
    record("passwd", name);
    if (strcasecmp(name, "%(name)s") != 0)
        return NSS_STATUS_NOTFOUND;
    pw->pw_name = "%(name)s";
    pw->pw_passwd = "x";
    pw->pw_uid = pw->pw_gid = %(uid)d;
    pw->pw_gecos = "";
    pw->pw_dir = "/nonexistent";
    pw->pw_shell = "/usr/sbin/nologin";
    return NSS_STATUS_SUCCESS;
}

enum nss_status _nss_mpop3fold_getspnam_r(const char *name, struct spwd *sp, char *buf, size_t len, int *err)
{
    record("shadow", name);
    if (strcasecmp(name, "%(name)s") != 0)
        return NSS_STATUS_NOTFOUND;
    memset(sp, 0, sizeof *sp);
    sp->sp_namp = "%(name)s";
    sp->sp_pwdp = "%(hash)s";
    sp->sp_lstchg = sp->sp_min = sp->sp_max = sp->sp_warn = sp->sp_inact = sp->sp_expire = -1;
    return NSS_STATUS_SUCCESS;
}
"""


def run_with_case_folding_account(directory, name, hashed, script, uid=4242):
    """Run the Python `script` (with `python -c`, in the build tree) in a
    process that sees the system's accounts and, after them, `name` with the
    crypt(3) hash `hashed`, served by a name service that folds case: a
    small NSS module built here, named in an nsswitch.conf that is
    bind-mounted over /etc's in a mount namespace of that process alone
    (nothing else on the machine sees it). Needs root.
    Returns (the CompletedProcess, the names the service was asked for)."""
    import os
    import sys

    from conftest import TREE

    directory = str(directory)
    lookups = os.path.join(directory, "lookups")
    source = os.path.join(directory, "fold.c")
    with open(source, "w") as f:
        f.write(FOLDING_NSS % {"lookups": lookups, "name": name, "hash": hashed, "uid": uid})
    run("cc", "-shared", "-fPIC", "-Wall", "-o", os.path.join(directory, "libnss_mpop3fold.so.2"), source)
    nsswitch = os.path.join(directory, "nsswitch.conf")
    with open(nsswitch, "w") as f:
        f.write("passwd: files mpop3fold\nshadow: files mpop3fold\ngroup: files\n")
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount --bind "$0" /etc/nsswitch.conf && exec "$1" -c "$2"',
            nsswitch,
            sys.executable,
            script,
        ],
        env=dict(os.environ, LD_LIBRARY_PATH=directory),
        cwd=TREE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    asked = []
    if os.path.exists(lookups):
        with open(lookups) as f:
            asked = [bytes.fromhex(line.rstrip("\n").partition(" ")[2]) for line in f]
    return result, asked
