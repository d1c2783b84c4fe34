"""The module loader: config order, first module wins per function,
defaults for the rest, settings handed over, and every refusal as one line.
Test modules are built out of tree with the installed module.mk."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import TREE, run_mpop3
from test_config import assert_one_line_error, write_conf

from mpop3 import config, loader

pytestmark = pytest.mark.slow  # modules built with make, the mpop3 command


def refused(tmp_path, text, pattern, line=1):
    """`mpop3 --check-config` on a configuration of `text` stops with one
    line naming line `line` and matching `pattern`."""
    path = write_conf(tmp_path, text)
    assert_one_line_error(run_mpop3("--check-config", "-c", path), f"{path}:{line}", pattern)


def load(text):
    return loader.load_modules(config.parse(text, "test.conf"))


def test_first_module_defining_a_function_wins(test_modules):
    tables = load(
        f"auth_module {test_modules['first_auth']}\n> greeting hello\nauth_module {test_modules['second_auth']}\n"
    )
    auth = tables.auth
    # both define auth_password: the first one's is used (the C loader used the last)
    assert auth.auth_password("u") == "first:hello"
    assert auth.supplied_by["auth_password"] == "first_auth"
    # only the second defines auth_need_root: it supplies it
    assert auth.auth_need_root() is True
    assert auth.supplied_by["auth_need_root"] == "second_auth"
    # nobody defines auth_attempt_login: the default, which reaches the
    # modules' auth_password and auth_login through the table
    assert auth.supplied_by["auth_attempt_login"] == "default"
    assert auth.auth_attempt_login("u", "first:hello") == "first-mailbox"
    assert auth.auth_attempt_login("u", "second") is None
    assert auth.auth_default_login_delay() == 0
    assert [m.name for m in tables.modules] == ["first_auth", "second_auth"]


def test_order_in_the_config_decides(test_modules):
    tables = load(f"auth_module {test_modules['second_auth']}\nauth_module {test_modules['first_auth']}\n")
    assert tables.auth.auth_password("u") == "second"
    assert tables.auth.auth_login("u") == "first-mailbox"


def test_defaults_without_modules():
    tables = load("")
    assert tables.auth.auth_password("anyone") is None
    assert tables.auth.auth_attempt_login("anyone", "") is None
    assert re.fullmatch(r"<\d+\.\d+\.\d+@\S+>", tables.auth.auth_timestamp())
    assert tables.auth.auth_timestamp() != tables.auth.auth_timestamp()
    storage = tables.storage
    handle = storage.storage_lock_mailbox("box")
    assert storage.storage_message_count(handle) == 0
    assert list(storage.storage_dump_message(handle, 0)) == [b".\r\n"]
    assert all(v == "default" for v in storage.supplied_by.values())


def test_out_of_tree_module_overrides_one_function_before_auth_file(installed, test_modules, tmp_path):
    """A module built with only the installed module.mk, loaded before
    auth_file, supplies its one function; the rest come from auth_file or
    the defaults."""
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:wonderland:alicebox\n")
    conf = write_conf(
        tmp_path, f"auth_module {test_modules['override_delay']}\nauth_module auth_file\n> passwd_file {passwd}\n"
    )
    result = run_mpop3("--check-config", "-c", conf, executable=f"{installed}/bin/mpop3")
    assert result.returncode == 0, result.stderr
    table = dict(re.findall(r"^  (auth_\w+)\s+(\S+)$", result.stdout, re.M))
    assert table == {
        "auth_attempt_login": "auth_file",
        "auth_timestamp": "default",
        "auth_password": "auth_file",
        "auth_login": "auth_file",
        "auth_login_delay_needed": "override_delay",
        "auth_default_login_delay": "default",
        "auth_need_root": "default",
    }
    # and in use: the override answers, auth_file still checks passwords
    tables = load(f"auth_module {test_modules['override_delay']}\nauth_module auth_file\n> passwd_file {passwd}\n")
    assert tables.auth.auth_login_delay_needed("alice") == 42
    assert tables.auth.auth_attempt_login("alice", "wonderland") == "alicebox"
    assert tables.auth.auth_attempt_login("alice", "wrong") is None


def test_module_mk_makefile_is_two_lines(test_modules):
    makefile = os.path.join(os.path.dirname(test_modules["override_delay"]), "Makefile")
    with open(makefile) as f:
        assert len(f.read().splitlines()) <= 4


def test_abi_mismatch_is_refused(tmp_path, test_modules):
    refused(
        tmp_path,
        f"# x\nauth_module {test_modules['wrong_abi']}\n",
        r"wrong_abi\.so: built for module ABI 99, this mpop3 speaks ABI 1; rebuild it",
        line=2,
    )


def test_failing_init_is_refused(tmp_path, test_modules):
    refused(
        tmp_path,
        f"storage_module {test_modules['failing_init']}\n",
        r"failing_init\.so: init failed: setting 'needed' is required",
    )
    # with the setting it loads
    path = write_conf(tmp_path, f"storage_module {test_modules['failing_init']}\n> needed yes\n")
    assert run_mpop3("--check-config", "-c", path).returncode == 0


def test_extension_without_declarations_is_not_a_module(tmp_path, test_modules):
    refused(
        tmp_path,
        f"auth_module {test_modules['not_a_module']}\n",
        r"not_a_module\.so: not an mpop3 module \(no MPOP3_MODULE_CLASS",
    )


def test_garbage_file_is_not_a_module(tmp_path):
    garbage = tmp_path / "garbage.so"
    garbage.write_text("this is not a shared object\n")
    refused(tmp_path, f"auth_module {garbage}\n", r"garbage\.so: not an mpop3 module \(cannot load it")


def test_module_of_the_wrong_class_by_path(tmp_path, test_modules):
    refused(tmp_path, f"auth_module {test_modules['failing_init']}\n> needed 1\n", r"is a 'storage' module, not 'auth'")


def test_module_dir_is_where_bare_names_are_found(tmp_path, test_modules):
    moddir = os.path.dirname(test_modules["second_auth"])
    tables = load(f"module_dir {moddir}\nauth_module second_auth\n")
    assert tables.auth.auth_need_root() is True
    refused(
        tmp_path,
        f"module_dir {tmp_path}\nauth_module auth_file\n",
        rf"module {tmp_path}/auth_file\.so: no such file",
        line=2,
    )


def test_root_loads_modules_only_from_root_owned_unwritable_places(tmp_path, test_modules):
    """Run as root (as CI is): a module anyone else could have written is refused."""
    assert os.geteuid() == 0, "this test checks what root refuses"
    loose = tmp_path / "loose"
    loose.mkdir()
    module = loose / "second_auth.so"
    shutil.copy(test_modules["second_auth"], module)
    conf = write_conf(tmp_path, f"auth_module {module}\n")
    assert run_mpop3("--check-config", "-c", conf).returncode == 0
    module.chmod(0o666)
    assert_one_line_error(
        run_mpop3("--check-config", "-c", conf),
        f"{conf}:1",
        r"refusing to load it as root: it is writable by group or others",
    )
    module.chmod(0o755)
    loose.chmod(0o777)
    assert_one_line_error(
        run_mpop3("--check-config", "-c", conf), f"{conf}:1", rf"directory {loose} is writable by group or others"
    )
    loose.chmod(0o755)
    os.chown(loose, 65534, 65534)
    assert_one_line_error(
        run_mpop3("--check-config", "-c", conf), f"{conf}:1", rf"directory {loose} is owned by uid 65534, not root"
    )


def test_root_loads_the_very_file_it_checked(tmp_path, test_modules, monkeypatch):
    """The configured name is a symlink to a safe module; right after root's
    check (a hook here, so the race is won every time) it is swapped for a
    symlink to a file anyone can write. What is loaded is what was checked."""
    assert os.geteuid() == 0, "root checks the module's file"
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(test_modules["second_auth"], good / "second_auth.so")
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    planted = loose / "second_auth.so"
    planted.write_text("not the file root checked\n")
    planted.chmod(0o666)
    link = tmp_path / "second_auth.so"
    link.symlink_to(good / "second_auth.so")
    check, swapped = loader.unsafe_for_root, []

    def check_then_swap(*args):
        problem = check(*args)
        (tmp_path / "swap").symlink_to(planted)
        os.replace(tmp_path / "swap", link)
        swapped.append(problem)
        return problem

    monkeypatch.setattr(loader, "unsafe_for_root", check_then_swap)
    tables = load(f"auth_module {link}\n")
    assert swapped == [None]  # checked, found safe, then swapped
    assert tables.auth.auth_need_root() is True  # second_auth's, from the file checked
    assert tables.modules[0].path == str(link)


def test_a_module_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    """A FIFO where a module should be: opening it to load it would wait
    for a writer forever."""
    os.mkfifo(tmp_path / "fifo_auth.so")
    (tmp_path / "dir_auth.so").mkdir()
    for name in ("fifo_auth", "dir_auth"):
        path = write_conf(tmp_path, f"auth_module {tmp_path}/{name}.so\n")
        result = subprocess.run(
            [sys.executable, "-m", "mpop3", "--check-config", "-c", path],
            capture_output=True,
            text=True,
            cwd=TREE,
            timeout=20,
        )
        assert_one_line_error(result, f"{path}:1", rf"{name}\.so: not a regular file")


def test_modules_loaded_one_after_another_are_each_themselves(test_modules):
    """Each load opens its file anew; whatever the loader does with
    descriptors, a later module is never taken for an earlier one."""
    for _ in range(2):
        for name, need_root in (("first_auth", False), ("second_auth", True)):
            tables = load(f"auth_module {test_modules[name]}\n")
            assert tables.modules[0].name == name
            assert tables.auth.auth_need_root() is need_root


def test_functions_no_table_has_are_named_at_load_and_by_check_config(tmp_path, test_modules, caplog):
    text = f"storage_module {test_modules['misspelt_storage']}\n"
    tables = load(text)
    assert tables.storage.supplied_by["storage_message_count"] == "misspelt_storage"
    assert "storage_synk, which is not in the storage table (misspelt?)" in caplog.text
    assert "auth_password, a auth function: a storage module's is never called" in caplog.text
    result = run_mpop3("--check-config", "-c", write_conf(tmp_path, text))
    assert result.returncode == 0, result.stderr
    assert "warning: defines storage_synk, which is not in the storage table" in result.stdout
    assert "warning: defines auth_password, a auth function" in result.stdout


# What a module built for another Python looks like to this one: the record
# mpop3_module.pxi leaves in every module, and a C API function this Python
# lacks, so that importing it fails in the dynamic linker.
OTHER_PYTHON_MODULE = """
%s
extern void PyUnicode_OnlyInAnotherPython(void);
void *PyInit_other_python(void) { PyUnicode_OnlyInAnotherPython(); return 0; }
"""


def build_c_module(tmp_path, record):
    source = tmp_path / "other_python.c"
    source.write_text(OTHER_PYTHON_MODULE % record)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "other_python.so"), str(source)], check=True)
    return tmp_path / "other_python.so"


def test_a_module_built_for_another_python_is_reported_as_such(tmp_path):
    record = '__attribute__((used)) static const char r[] = "mpop3-module-built-for-python:3.99;";'
    module = build_c_module(tmp_path, record)
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    refused(
        tmp_path,
        f"auth_module {module}\n",
        rf"other_python\.so: built for Python 3\.99, but this mpop3 runs Python {ours}: "
        r"rebuild it with this mpop3's module\.mk \(cannot load it: .*undefined symbol",
    )


def test_a_module_without_the_record_that_misses_python_symbols_is_probably_for_another_python(tmp_path):
    module = build_c_module(tmp_path, "")
    refused(
        tmp_path,
        f"auth_module {module}\n",
        r"other_python\.so: built for another Python than this mpop3's 3\.\d+, it seems",
    )


def test_modules_record_the_python_they_were_built_for(test_modules):
    ours = b"mpop3-module-built-for-python:%d.%d;" % sys.version_info[:2]
    built = [path for name, path in test_modules.items() if name not in ("not_a_module", "wrong_abi")]  # no .pxi
    for path in built + glob.glob(os.path.join(TREE, "modules", "*.so")):
        with open(path, "rb") as f:
            assert ours in f.read(), path
