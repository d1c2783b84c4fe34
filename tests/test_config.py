"""mpop3.conf parsing and the administrator's mistakes: each is one line
`CONFIG:LINE: what is wrong`, a non-zero exit, never a traceback."""

import glob
import os
import re

import pytest
from conftest import TREE, run_mpop3

from mpop3 import config, loader
from mpop3.errors import ConfigError


def write_conf(tmp_path, text):
    path = tmp_path / "mpop3.conf"
    path.write_text(text)
    return str(path)


def assert_one_line_error(result, where, pattern):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(where + ": "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


# (config text, line of the error, what the message must say)
BAD_CONFIGS = [
    ("storage_dir /var/mail\n", 1, r"unknown directive 'storage_dir'"),
    ("# comment\n\nfrobnicate yes\n", 3, r"unknown directive 'frobnicate'"),
    ("listen 127.0.0.1:99999\n", 1, r"bad value for listen: port 99999 is out of range"),
    ("listen mail.example.com:110\n", 1, r"bad value for listen: .*numeric address"),
    ("listen 127.0.0.1:http\n", 1, r"bad value for listen"),
    ("log journald\n", 1, r"bad value for log: 'journald' is not one of: stderr, syslog"),
    ("log\n", 1, r"log needs a value"),
    ("log stderr\nlog syslog\n", 2, r"log is given twice"),
    ("> passwd_file /etc/passwd\n", 1, r"must follow its auth_module or storage_module line"),
    ("auth_module auth_file\nlog stderr\n> passwd_file x\n", 3, r"must follow its auth_module"),
    ("auth_module auth_file\n> passwd_file a\n> passwd_file b\n", 3, r"given twice"),
    ("auth_module auth_file\n> colour blue\n", 2, r"does not accept setting 'colour' \(it accepts: passwd_file\)"),
    ("auth_module\n", 1, r"auth_module needs a module name or path"),
    ("auth_module no_such_module\n", 1, r"module .*no_such_module\.so: no such file"),
    ("storage_module auth_file\n", 1, r"is a 'auth' module, not 'storage' \(load it with auth_module\)"),
    ("auth_module storage_mbox\n", 1, r"is a 'storage' module, not 'auth' \(load it with storage_module\)"),
]


@pytest.mark.parametrize("text, line, pattern", BAD_CONFIGS)
def test_bad_config_is_one_line_with_its_location(tmp_path, text, line, pattern):
    path = write_conf(tmp_path, text)
    assert_one_line_error(run_mpop3("--check-config", "-c", path), f"{path}:{line}", pattern)


def test_bad_config_stops_the_server_too(tmp_path):
    path = write_conf(tmp_path, "frobnicate yes\n")
    assert_one_line_error(run_mpop3("-c", path), f"{path}:1", "unknown directive")


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.conf")
    assert_one_line_error(run_mpop3("--check-config", "-c", path), path, "cannot read the configuration: No such file")


def test_bad_listen_option():
    result = run_mpop3("--check-config", "-l", "localhost:110")
    assert_one_line_error(result, "-l", "numeric address")


def test_directives_and_comments():
    conf = config.parse(
        "# a comment\n"
        "listen 127.0.0.1:1110   # trailing comment\n"
        "listen [::1]:1110\n"
        "auth_module auth_file\n"
        "> passwd_file /etc/pass#word\n"
        "\n"
        "storage_module /opt/x/storage_mbox.so\n"
        "> storage_dir /var/spool/mail\n",
        "test.conf",
    )
    assert conf.listen == [("127.0.0.1", 1110), ("::1", 1110)]
    assert conf.log == "stderr"  # the default
    assert [(m.kind, m.file, m.where) for m in conf.modules] == [
        ("auth", "auth_file", "test.conf:4"),
        ("storage", "/opt/x/storage_mbox.so", "test.conf:7"),
    ]
    # a '#' inside a word is data, not a comment
    assert conf.modules[0].settings == {"passwd_file": "/etc/pass#word"}
    assert conf.modules[1].settings == {"storage_dir": "/var/spool/mail"}


def test_defaults_apply_when_absent():
    conf = config.parse("", "empty.conf")
    for name, directive in config.DIRECTIVES.items():
        assert getattr(conf, name) == directive.default
    assert conf.modules == []


def test_config_error_carries_location():
    with pytest.raises(ConfigError) as e:
        config.parse("listen 1.2.3.4:0\n", "x.conf")
    assert str(e.value) == "x.conf:1: bad value for listen: '0' is not a positive whole number"


def test_every_directive_is_documented():
    """README.md and the shipped mpop3.conf describe every directive."""
    with open(os.path.join(TREE, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(TREE, "mpop3.conf")) as f:
        shipped = f.read()
    names = list(config.DIRECTIVES) + list(config.MODULE_DIRECTIVES)
    for name in names:
        assert re.search(rf"^\| `{name}\b", readme, re.M), f"README.md lacks a row for {name}"
        assert re.search(rf"^#?\s*{name}\b", shipped, re.M), f"mpop3.conf does not document {name}"


def test_every_module_setting_is_documented():
    """README.md has a row for each setting each shipped module accepts."""
    with open(os.path.join(TREE, "README.md")) as f:
        readme = f.read()
    shipped = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(TREE, "modules", "*.pyx")))
    assert {"auth_file", "auth_getpw", "auth_pam", "auth_postgresql", "storage_maildir", "storage_mbox"} <= set(shipped)
    for name in shipped:
        module = loader.import_module_file(
            config.resolve_module_file(name, config.DIRECTIVES["module_dir"].default), "t"
        )
        for setting in module.MPOP3_SETTINGS:
            assert re.search(rf"^\| `{name}` \| `{setting}` \|", readme, re.M), f"README.md lacks {name} {setting}"


def test_shipped_config_shows_the_function_map():
    result = run_mpop3("--check-config", "-c", os.path.join(TREE, "mpop3.conf"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "configuration OK" in out
    assert re.search(r"^  auth_password\s+auth_file$", out, re.M)
    assert re.search(r"^  auth_login\s+auth_file$", out, re.M)
    assert re.search(r"^  auth_need_root\s+default$", out, re.M)
    assert re.search(r"^  storage_lock_mailbox\s+storage_mbox$", out, re.M)
    assert re.search(r"^  auth\s+auth_file\s+\S+auth_file\S*\.so$", out, re.M)


def test_version_and_help():
    from mpop3 import __version__

    assert run_mpop3("--version").stdout.strip() == f"mpop3 {__version__}"
    usage = run_mpop3("--help").stdout
    for option in ("-c CONFIG", "-s", "-l ADDR:PORT", "-d", "--check-config", "--version", "--help"):
        assert option in usage
