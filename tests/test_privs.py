"""The privilege rules: which switch happens when, and that a switch is
complete and irreversible (checked in /proc/PID/status of a real process)."""

import grp
import json
import pwd
import subprocess
import sys
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


@pytest.mark.root
def test_switch_sets_uid_gid_groups_for_good():
    nobody = pwd.getpwnam("nobody")
    mail = grp.getgrnam("mail").gr_gid
    out = subprocess.run(
        [sys.executable, "-c", SWITCH_AND_REPORT, "nobody", "mail"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    report = json.loads(out)
    assert report["Uid"] == [str(nobody.pw_uid)] * 4  # real, effective, saved, filesystem
    assert report["Gid"] == [str(nobody.pw_gid)] * 4
    assert report["Groups"] == [str(mail)]  # only mail_group is kept
    assert report["regained"] is False


@pytest.mark.root
def test_switch_to_root_is_refused():
    with pytest.raises(privs.PrivilegeError):
        privs.switch_to(privs.Identity("root", 0, 0, ()))
