"""`make install` lays out a self-contained tree under PREFIX (and DESTDIR),
and never overwrites an administrator's mpop3.conf."""

import os
import subprocess

import pytest
from conftest import TREE, run_mpop3

pytestmark = pytest.mark.slow  # make install


def test_installed_layout_and_version(installed):
    from mpop3 import __version__

    for path in (
        "bin/mpop3",
        "etc/mpop3.conf",
        "lib/mpop3/modules/auth_file.so",
        "lib/mpop3/modules/storage_mbox.so",
        "share/mpop3/module.mk",
        "share/mpop3/include/mpop3_module.pxi",
        "lib/systemd/system/mpop3.service",
        "lib/systemd/system/mpop3.socket",
        "lib/systemd/system/mpop3@.service",
        "share/mpop3/xinetd.mpop3",
    ):
        assert os.path.exists(installed / path), path
    result = run_mpop3("--version", executable=f"{installed}/bin/mpop3")
    assert result.stdout.strip() == f"mpop3 {__version__}"
    assert (
        run_mpop3("--module-mk", executable=f"{installed}/bin/mpop3").stdout.strip()
        == f"{installed}/share/mpop3/module.mk"
    )


def test_installed_copy_uses_its_own_config_and_modules(installed):
    result = run_mpop3("--check-config", executable=f"{installed}/bin/mpop3", cwd="/")
    assert result.returncode == 0, result.stderr
    assert f"{installed}/etc/mpop3.conf: configuration OK" in result.stdout
    assert f"{installed}/lib/mpop3/modules/auth_file.so" in result.stdout
    assert TREE not in result.stdout  # nothing points back into the build tree


def test_install_keeps_an_existing_config(installed):
    conf = installed / "etc" / "mpop3.conf"
    conf.write_text("# the administrator's own\nauth_module auth_file\n")
    subprocess.run(
        ["make", "-s", "install", f"PREFIX={installed}"], cwd=TREE, check=True, capture_output=True, timeout=300
    )
    assert conf.read_text() == "# the administrator's own\nauth_module auth_file\n"


def test_destdir_stages_without_baking_it_in(tmp_path):
    stage = tmp_path / "stage"
    subprocess.run(
        ["make", "-s", "install", f"DESTDIR={stage}", "PREFIX=/opt/mpop3"],
        cwd=TREE,
        check=True,
        capture_output=True,
        timeout=300,
    )
    launcher = (stage / "opt/mpop3/bin/mpop3").read_text()
    assert '"/opt/mpop3/lib/mpop3/python"' in launcher
    assert str(stage) not in launcher
    layout = (stage / "opt/mpop3/lib/mpop3/python/mpop3/_layout.py").read_text()
    assert 'CONFIG_FILE = "/opt/mpop3/etc/mpop3.conf"' in layout
    assert str(stage) not in (stage / "opt/mpop3/share/mpop3/module.mk").read_text()
    unit = (stage / "opt/mpop3/lib/systemd/system/mpop3@.service").read_text()
    assert "ExecStart=/opt/mpop3/bin/mpop3 -s -c /opt/mpop3/etc/mpop3.conf" in unit
    assert "server_args = -s -c /opt/mpop3/etc/mpop3.conf" in (stage / "opt/mpop3/share/mpop3/xinetd.mpop3").read_text()


@pytest.mark.root
def test_install_user_makes_the_login_account_once(tmp_path):
    """A system account with no shell and a group of its own; a second run
    leaves it alone."""
    import pwd

    name = "mpop3t-inst"
    subprocess.run(["userdel", "-f", name], capture_output=True)
    try:
        make = ["make", "-s", "install-user", f"LOGIN_USER={name}"]
        first = subprocess.run(make, cwd=TREE, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0 and f"made the system account {name}" in first.stdout, first
        account = pwd.getpwnam(name)
        assert account.pw_uid < 1000 and account.pw_shell == "/usr/sbin/nologin"
        assert not os.path.exists(account.pw_dir)
        again = subprocess.run(make, cwd=TREE, capture_output=True, text=True, timeout=60)
        assert f"{name} exists: left as it is" in again.stdout
        assert pwd.getpwnam(name) == account
    finally:
        subprocess.run(["userdel", "-f", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)
