"""The privilege rules: which switch happens when, and that a switch is
complete and irreversible (checked in /proc/PID/status of a real process)."""

import grp
import json
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from mpop3.server import privs
from mpop3.storage_functions import WU_ANY, WU_DEFAULT, WU_MAILBOX


@pytest.mark.parametrize(
    "need_user, need_root, stdin_mode, when, to_mailbox",
    [
        (WU_MAILBOX, False, False, privs.AFTER_AUTH, True),  # rule 1, wuMailbox
        (WU_DEFAULT, True, True, privs.AFTER_AUTH, False),  # rule 1, wuDefault
        (WU_ANY, True, False, privs.AFTER_AUTH, False),  # rule 2
        (WU_ANY, False, False, privs.AFTER_BIND, False),  # rule 3
        (WU_ANY, False, True, privs.AT_ONCE, False),  # rule 4
    ],
)
def test_the_four_rules(need_user, need_root, stdin_mode, when, to_mailbox):
    p = privs.plan(need_user, need_root, stdin_mode)
    assert (p.when, p.to_mailbox_user) == (when, to_mailbox)
    assert p.process_per_session == (when == privs.AFTER_AUTH)


def test_safe_user_checks():
    assert privs.check_safe_user("nobody") is None
    assert "must not be root" in privs.check_safe_user("root")
    assert "does not exist" in privs.check_safe_user("no-such-user-here")


SWITCH_AND_REPORT = textwrap.dedent("""
    import json, os, sys
    from mpop3.server import privs
    privs.switch_to(privs.identity(sys.argv[1], sys.argv[2]))
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    print(json.dumps({k: status[k].split() for k in ("Uid", "Gid", "Groups")} | {"regained": regained}))
""")


def run_as_switched(script, *args):
    """What `script` prints (JSON), run in a Python of its own (a switch
    cannot be undone)."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, timeout=30)
    return json.loads(out.stdout)


@pytest.mark.root
def test_switch_sets_uid_gid_groups_for_good():
    nobody = pwd.getpwnam("nobody")
    mail = grp.getgrnam("mail").gr_gid
    report = run_as_switched(SWITCH_AND_REPORT, "nobody", "mail")
    assert report["Uid"] == [str(nobody.pw_uid)] * 4  # real, effective, saved, filesystem
    gid = str(nobody.pw_gid)
    assert report["Gid"] == [gid, gid, str(mail), gid]  # mail_group: the saved gid only
    assert report["Groups"] == []
    assert report["regained"] is False


HELD_FOR = textwrap.dedent("""
    import json, os, sys
    from mpop3 import mail_group
    from mpop3.server import privs
    directory, spool = sys.argv[3], sys.argv[4]
    privs.switch_to(privs.identity(sys.argv[1], sys.argv[2]))

    def attempt(what, *args):
        try:
            what(*args)
            return True
        except PermissionError:
            return False

    def create(name):
        os.close(os.open(os.path.join(directory, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    report = {"create": attempt(create, "a.lock"), "read": attempt(open, spool)}
    with mail_group.held_for(directory):
        report |= {"create held": attempt(create, "b.lock"), "egid held": os.getegid()}
    report |= {"egid after": os.getegid(), "read after": attempt(open, spool)}
    print(json.dumps(report))
""")


@pytest.fixture
def tmp_path_open_to_all():
    """A directory every user can reach (pytest's own are under a 0700 one)."""
    path = tempfile.mkdtemp(prefix="mpop3-privs-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


@pytest.mark.root
def test_the_mail_group_is_taken_only_while_state_files_are_made(tmp_path_open_to_all):
    """Debian's /var/mail: root:mail 2775, spools 0660 user:mail. A process
    that gave up root creates files there only inside held_for(), and reads
    another user's spool never."""
    mail = grp.getgrnam("mail").gr_gid
    nobody = pwd.getpwnam("nobody")
    directory = tmp_path_open_to_all / "mail"
    directory.mkdir()
    os.chown(directory, 0, mail)
    os.chmod(directory, 0o2775)
    spool = directory / "someone"
    spool.write_text("From x\n\nmail\n")
    os.chown(spool, 0, mail)
    os.chmod(spool, 0o660)
    report = run_as_switched(HELD_FOR, "nobody", "mail", str(directory), str(spool))
    assert report == {
        "create": False,
        "read": False,
        "create held": True,
        "egid held": mail,
        "egid after": nobody.pw_gid,
        "read after": False,
    }


@pytest.mark.root
def test_switch_to_root_is_refused():
    with pytest.raises(privs.PrivilegeError):
        privs.switch_to(privs.Identity("root", 0, 0))
