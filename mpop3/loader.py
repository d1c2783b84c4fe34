"""Load auth and storage modules and build the two function tables.

The rules, as the C program's README promised them: modules load in config
order; for each table entry the first module of that class defining it
wins; entries no module defines keep the table's default. (The C loader let
the last module win and reset the rest to NULL; we don't.) A module that
cannot be used is refused with one line naming the file and why; a module
that defines a function no table has (a misspelt storage_synch) is loaded
with a warning, since that function would never be called.
"""

import importlib.machinery
import importlib.util
import logging
import os
import re
import stat
import sys
from dataclasses import dataclass, field

from . import ABI_VERSION
from .auth_functions import AuthFunctions
from .config import resolve_module_file
from .errors import ConfigError, ModuleInitError
from .storage_functions import StorageFunctions

log = logging.getLogger("mpop3.module")

TABLES = {"auth": AuthFunctions, "storage": StorageFunctions}
# what mpop3_module.pxi writes into every module's file
BUILT_FOR = re.compile(rb"mpop3-module-built-for-python:(\d+\.\d+);")


@dataclass
class LoadedModule:
    name: str  # the file's stem, e.g. "auth_file"
    path: str
    kind: str
    module: object
    warnings: list = field(default_factory=list)  # shown at load and by --check-config


@dataclass
class Tables:
    auth: AuthFunctions
    storage: StorageFunctions
    modules: list  # LoadedModule, in load order


def load_modules(config):
    tables = {"auth": AuthFunctions(), "storage": StorageFunctions()}
    loaded = []
    for line in config.modules:
        path = resolve_module_file(line.file, config.module_dir)
        module = import_module_file(path, line.where)
        check_declarations(module, line, path)
        run_init(module, line, path)
        name = os.path.splitext(os.path.basename(path))[0].split(".")[0]
        table = tables[line.kind]
        supplied = [
            entry
            for entry in table.entry_names()
            if callable(getattr(module, entry, None)) and table.supply(entry, getattr(module, entry), name)
        ]
        log.info(
            "loaded %s module %s (ABI %d), supplying: %s",
            line.kind,
            path,
            module.MPOP3_ABI_VERSION,
            ", ".join(supplied) or "nothing new",
        )
        warnings = unknown_functions(module, line.kind)
        for warning in warnings:
            log.warning("%s: module %s: %s", line.where, path, warning)
        loaded.append(LoadedModule(name, path, line.kind, module, warnings))
    return Tables(tables["auth"], tables["storage"], loaded)


def unknown_functions(module, kind):
    """Why a function the module defines will never be called: named like a
    table entry, but no table has it, or it belongs to the other class."""
    warnings = []
    for attribute in sorted(vars(module)):
        for other_kind, table in TABLES.items():
            if not attribute.startswith(other_kind + "_") or not callable(getattr(module, attribute)):
                continue
            if other_kind != kind and attribute in table.entry_names():
                warnings.append(f"defines {attribute}, a {other_kind} function: a {kind} module's is never called")
            elif attribute not in table.entry_names():
                warnings.append(
                    f"defines {attribute}, which is not in the {other_kind} table (misspelt?): it is never called"
                )
    return warnings


def import_module_file(path, where):
    """Load a compiled extension from any path: exactly the file that was
    opened and checked. A path is only a name, and the file it names can be
    swapped (a symlink turned elsewhere) between a check by name and a load
    by name; so the file is opened once, the open descriptor is what is
    checked, and the dynamic linker loads it through /proc/self/fd/N. The
    module is named after the path's stem (PyInit_<stem>), never after N."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block
    except FileNotFoundError:
        raise ConfigError(where, f"module {path}: no such file") from None
    except OSError as e:
        raise ConfigError(where, f"module {path}: cannot open it: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(where, f"module {path}: not a regular file")
        if not os.path.exists(f"/proc/self/fd/{fd}"):
            raise ConfigError(where, f"module {path}: cannot load it: /proc is not mounted (modules load through it)")
        if os.geteuid() == 0:
            problem = unsafe_for_root(st, opened_path(fd))
            if problem:
                raise ConfigError(where, f"module {path}: refusing to load it as root: {problem}")
        stem = os.path.basename(path).split(".")[0]
        if not stem.isidentifier():
            raise ConfigError(where, f"module {path}: file name must be a valid identifier followed by .so")
    except BaseException:
        os.close(fd)
        raise
    opened = loadable_name(fd, st)
    name = f"mpop3.modules.{stem}"
    loader = importlib.machinery.ExtensionFileLoader(name, opened)
    spec = importlib.util.spec_from_file_location(name, opened, loader=loader)
    try:
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
    except ImportError as e:
        reason = str(e).splitlines()[0].replace(opened, path) if str(e) else type(e).__name__
        raise ConfigError(where, f"module {path}: {why_not_loadable(opened, reason)}") from None
    except Exception as e:  # the module's own import-time code failed
        raise ConfigError(where, f"module {path}: failed to load: {type(e).__name__}: {e}") from None
    module.__file__ = path
    return module


# The descriptors of the module files opened, by (device, inode), open for
# the life of the process. The dynamic linker answers a name it has loaded
# before with the library it loaded then, without opening anything: once
# /proc/self/fd/N has been loaded, N must go on naming that file, or a
# module opened later on a reused N would be taken for the earlier one.
_opened_files = {}


def loadable_name(fd, st):
    """The /proc/self/fd name to load the file open on `fd` by; `fd` is kept
    (or closed, if that file is kept open already)."""
    kept = _opened_files.setdefault((st.st_dev, st.st_ino), fd)
    if kept != fd:
        os.close(fd)
    return f"/proc/self/fd/{kept}"


def opened_path(fd):
    """Where the file open on `fd` is now, as the kernel tracks it."""
    return os.readlink(f"/proc/self/fd/{fd}")


def why_not_loadable(path, reason):
    """What to tell about a file that would not import. A module built for
    another Python fails with a linker's complaint about a missing symbol;
    its own record of the Python it was built for says it better."""
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    try:
        with open(path, "rb") as f:
            found = BUILT_FOR.search(f.read(64 * 1024 * 1024))
    except OSError:
        found = None
    if found is not None:
        built_for = found.group(1).decode()
        if built_for != ours:
            return (
                f"built for Python {built_for}, but this mpop3 runs Python {ours}: "
                f"rebuild it with this mpop3's module.mk (cannot load it: {reason})"
            )
        return f"cannot load it: {reason}"
    if re.search(r"undefined symbol: _?Py", reason):
        return (
            f"built for another Python than this mpop3's {ours}, it seems: rebuild it with this "
            f"mpop3's module.mk (cannot load it: {reason})"
        )
    return f"not an mpop3 module (cannot load it: {reason})"


def unsafe_for_root(st, path):
    """Why root must not load the file whose fstat is `st`, found at `path`,
    or None. Whoever can write the file, or any directory above it, could
    run code as root: they must all belong to root and be writable by
    nobody else (a sticky directory such as /tmp is fine: nobody else can
    replace root's files in it)."""
    if st.st_uid != 0:
        return f"it is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return "it is writable by group or others"
    directory = os.path.dirname(path)
    while True:
        try:
            st = os.stat(directory)
        except OSError as e:
            return f"cannot check directory {directory}: {e.strerror}"
        if st.st_uid != 0:
            return f"directory {directory} is owned by uid {st.st_uid}, not root"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"directory {directory} is writable by group or others"
        if directory == "/":
            return None
        directory = os.path.dirname(directory)


def check_declarations(module, line, path):
    kind = getattr(module, "MPOP3_MODULE_CLASS", None)
    abi = getattr(module, "MPOP3_ABI_VERSION", None)
    if kind is None or abi is None:
        raise ConfigError(line.where, f"module {path}: not an mpop3 module (no MPOP3_MODULE_CLASS/MPOP3_ABI_VERSION)")
    if kind != line.kind:
        directive = f"{kind}_module" if kind in ("auth", "storage") else "nothing"
        raise ConfigError(
            line.where, f"module {path}: is a {kind!r} module, not {line.kind!r} (load it with {directive})"
        )
    if abi != ABI_VERSION:
        raise ConfigError(
            line.where, f"module {path}: built for module ABI {abi}, this mpop3 speaks ABI {ABI_VERSION}; rebuild it"
        )
    accepted = getattr(module, "MPOP3_SETTINGS", {}) or {}
    for name in line.settings:
        if name not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(
                line.setting_lines[name], f"module {path} does not accept setting {name!r} (it accepts: {known})"
            )


def run_init(module, line, path):
    init = getattr(module, "module_init", None)
    if init is None:
        return
    try:
        init(dict(line.settings))
    except (ModuleInitError, ValueError, OSError) as e:
        raise ConfigError(setting_where(line, e), f"module {path}: init failed: {e}") from None
    except Exception as e:
        raise ConfigError(setting_where(line, e), f"module {path}: init failed: {type(e).__name__}: {e}") from None


def setting_where(line, error):
    """Where to point for a module_init error: the `> name` line of the
    setting the module blames, if it names one it was given (an attribute
    `setting` on the exception; no ABI change: a module that does not set
    it, or a loader that does not read it, keeps to the module's line)."""
    name = getattr(error, "setting", None)
    return line.setting_lines.get(name, line.where) if isinstance(name, str) else line.where


def function_map(tables):
    """Lines like a linker map: each table entry and the module supplying it."""
    out = []
    for table in (tables.auth, tables.storage):
        out.append(f"{table.CLASS} functions:")
        width = max(len(n) for n in table.entry_names())
        for entry in table.entry_names():
            out.append(f"  {entry:<{width}}  {table.supplied_by[entry]}")
    return out
