"""Fixtures for every test file: the two kinds of server (`spawn`, the
real command; `server_thread`, the Service in a thread on in-memory
tables) and the loops they run on; an installed copy of mpop3, and test
modules built out of tree with its module.mk."""

import contextlib
import os
import subprocess
import sys

import pop_server
import pytest
from pop_server import ServerThread, Spawned, make_certificate, write_site

from mpop3.server import privs

TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_MODULE_SOURCES = os.path.join(TREE, "tests", "modules")


def run_mpop3(*args, cwd=None, executable=None):
    """Run the mpop3 command; returns the CompletedProcess (text mode)."""
    command = [executable] if executable else [sys.executable, "-m", "mpop3"]
    return subprocess.run(command + list(args), capture_output=True, text=True, cwd=cwd or TREE, timeout=60)


@pytest.fixture(scope="session", autouse=True)
def python_reachable_by_safe_user():
    """A server started as root gives up root (the privilege rules), and
    then still runs Python: its files must be readable by safe_user, as a
    system Python's are. Here Python may live under /root (pyenv), which is
    0700: let others through it, without letting them list it."""
    if os.geteuid() == 0:
        privs.open_way_to_python()


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """`make install PREFIX=<tmp>`: the prefix, as a user would have it."""
    prefix = tmp_path_factory.mktemp("prefix")
    subprocess.run(
        ["make", "-s", "install", f"PREFIX={prefix}"], cwd=TREE, check=True, capture_output=True, timeout=300
    )
    return prefix


def build_module(installed, workdir, source):
    """Build `source` (a .pyx) in `workdir` with a two-line Makefile that
    includes the installed module.mk, as a module writer would."""
    name = os.path.basename(source)[:-4]
    os.makedirs(workdir, exist_ok=True)
    with open(source) as src, open(os.path.join(workdir, name + ".pyx"), "w") as dst:
        dst.write(src.read())
    with open(os.path.join(workdir, "Makefile"), "w") as mk:
        mk.write(f"MODULE = {name}\ninclude $(shell mpop3 --module-mk)\n")
    env = dict(os.environ, PATH=f"{installed}/bin:{os.environ['PATH']}")
    return subprocess.Popen(
        ["make", "-s"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="session")
def test_modules(installed, tmp_path_factory):
    """Every tests/modules/*.pyx built out of tree; name -> path of the .so."""
    root = tmp_path_factory.mktemp("modules")
    builds = {}
    for file in sorted(os.listdir(TEST_MODULE_SOURCES)):
        if file.endswith(".pyx"):
            name = file[:-4]
            builds[name] = build_module(installed, root / name, os.path.join(TEST_MODULE_SOURCES, file))
    paths = {}
    for name, proc in builds.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"building {name} failed:\n{output}"
        paths[name] = str(root / name / f"{name}.so")
    return paths


@pytest.fixture(params=sorted(pop_server.LOOPS))
def loop_kind(request, monkeypatch):
    """Run the test's ServerThreads on each event loop: uvloop, which mpop3
    uses, and asyncio's own, so nothing depends on one loop's quirks."""
    monkeypatch.setattr(pop_server, "LOOP", request.param)
    return request.param


@pytest.fixture
def spawn(tmp_path):
    """Start the real `mpop3` command: spawn(users, boxes, extra=None,
    root=tmp_path, **site) writes a site with write_site (whose keywords
    `site` holds) and starts a Spawned on it; spawn(conf=PATH) starts one
    on a configuration already written (a restart, a second server).
    Returns the started Spawned; every one is stopped when the test ends,
    and a `with` block stops it sooner."""
    with contextlib.ExitStack() as started:

        def spawn(users=None, boxes=None, extra=None, *, conf=None, root=None, **site):
            if conf is None:
                conf = write_site(root or tmp_path, users, boxes, extra, **site)
            return started.enter_context(Spawned(conf))

        yield spawn


@pytest.fixture
def server_thread():
    """Start the real Service in a thread: server_thread(tables, extra=None)
    -> a started ServerThread on those tables (pop_server.memory_tables)
    and on the loop `loop_kind` chose, stopped when the test ends."""
    with contextlib.ExitStack() as started:
        yield lambda tables, extra=None: started.enter_context(ServerThread(tables, extra))


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """(certificate, key) files: a self-signed ECDSA certificate for
    localhost and 127.0.0.1, made with the openssl command."""
    return make_certificate(tmp_path_factory.mktemp("tls"), "mpop3-test")


LOGIN_USER = "mpop3t-login"


@pytest.fixture(scope="session")
def login_user():
    """The account login processes run as in the split model (a system
    account made for the test run, removed after it)."""
    from system_users import system_user

    with system_user(LOGIN_USER, system=True) as pw:
        yield pw


@pytest.fixture(params=["per-session", "split"])
def process_model(request):
    """Settings for each root-started model that switches users after
    login: a process per session, or processes by role (login_user)."""
    if request.param == "split":
        request.getfixturevalue("login_user")
        return {"login_user": LOGIN_USER, "processes": "1"}
    return {}
