"""mpop3.conf: one directive per line, module settings as `> name value`.

Every core directive, its default and how its value is read live in
DIRECTIVES below; README.md and the shipped mpop3.conf document each one.
Errors are ConfigError("FILE:LINE", what is wrong), one line, no traceback.
"""

import dataclasses
import ipaddress
import logging
import os
from dataclasses import dataclass, field

from . import paths
from .errors import ConfigError

log = logging.getLogger("mpop3.server")

# --- value readers: each takes the text after the directive name ---------


def listen_address(text):
    """`ADDR:PORT`, `[V6ADDR]:PORT` or `PORT` (all IPv4 addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not ADDR:PORT with a numeric address") from None
    return host, port_number(port)


def port_number(text):
    number = positive_int(text)
    if number > 65535:
        raise ValueError(f"port {text} is out of range 1-65535")
    return number


def positive_int(text):
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"{text!r} is not a positive whole number")
    return int(text)


def whole_number(text):
    """0 or more: for limits where 0 has a meaning (usually: off)."""
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def seconds(text):
    """A duration in seconds, decimals allowed (0.05), never negative."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a number of seconds")
    return value


def line_length(text):
    number = positive_int(text)
    if number < 16:
        raise ValueError(f"{text} is too short for a POP3 command line (at least 16)")
    return number


def expire_policy(text):
    """RFC 2449 EXPIRE: `never` or a number of days."""
    if text.lower() == "never":
        return "NEVER"
    return whole_number(text)


def prefix_length(text):
    """An IPv6 prefix length, 1-128."""
    number = positive_int(text)
    if number > 128:
        raise ValueError(f"{text} is not an IPv6 prefix length (1-128)")
    return number


def process_count(text):
    """A number of processes, or `auto`: one per CPU."""
    if text == "auto":
        return os.cpu_count() or 1
    return positive_int(text)


def text_value(text):
    return text


def login_account(text):
    """login_user: an account name, or `none`. Whether it exists is judged
    at start-up (models.py): a configuration naming it is valid on a
    machine that has not made it yet."""
    if text == "none":
        return None
    if not text or any(c in text for c in ":/\0\n") or text[0] == "-":
        raise ValueError(f"{text!r} is not an account name")
    return text


def unprivileged_user(text):
    """A system user that exists and is not root (safe_user, mail_owner)."""
    from .server.privs import check_safe_user

    problem = check_safe_user(text)
    if problem:
        raise ValueError(problem.replace("safe_user ", "user "))
    return text


def group_name(text):
    import grp

    try:
        grp.getgrnam(text)
    except KeyError:
        raise ValueError(f"group {text!r} does not exist") from None
    return text


def one_of(*choices):
    def read(text):
        if text not in choices:
            raise ValueError(f"{text!r} is not one of: {', '.join(choices)}")
        return text

    return read


def path(text):
    return text


def optional_path(text):
    """A path, or `none`: off."""
    return None if text == "none" else text


def proxy_networks(text):
    from .server.proxy_protocol import read_networks

    return read_networks(text)


def yes_no(text):
    if text not in ("yes", "no"):
        raise ValueError(f"{text!r} is not yes or no")
    return text == "yes"


@dataclass(frozen=True)
class Directive:
    name: str
    read: object  # text -> value; raises ValueError with a readable message
    default: object
    repeatable: bool = False
    reloadable: bool = False  # a SIGHUP applies a new value; others need a restart


DIRECTIVES = {
    d.name: d
    for d in [
        Directive("listen", listen_address, [("0.0.0.0", 110)], repeatable=True),
        Directive("module_dir", path, paths.MODULE_DIR),
        Directive("log", one_of("stderr", "syslog"), "stderr"),
        Directive(
            "syslog_facility", one_of("mail", "daemon", "auth", "user", *(f"local{i}" for i in range(8))), "mail"
        ),
        Directive("syslog_socket", path, "/dev/log"),
        Directive("log_level", one_of("debug", "info", "warning", "error"), "info", reloadable=True),
        # protocol limits and timing (the sessions, mpop3/protocol/core.py)
        Directive("max_line_length", line_length, 512, reloadable=True),
        Directive("max_bad_commands", positive_int, 20, reloadable=True),
        Directive("max_login_failures", positive_int, 3, reloadable=True),
        Directive("login_fail_delay", seconds, 2.0, reloadable=True),
        Directive("login_fail_delay_max", seconds, 15.0, reloadable=True),
        Directive("idle_timeout", seconds, 600.0, reloadable=True),
        Directive("login_timeout", seconds, 60.0, reloadable=True),
        Directive("tls_handshake_timeout", seconds, 10.0, reloadable=True),
        Directive("max_sessions", positive_int, 1000, reloadable=True),
        Directive("max_sessions_per_ip", positive_int, 32, reloadable=True),
        Directive("max_login_attempts_per_ip", positive_int, 3, reloadable=True),
        Directive("ipv6_prefix", prefix_length, 64),
        Directive("shutdown_grace", seconds, 10.0, reloadable=True),
        Directive("worker_threads", positive_int, 8),
        Directive("login_queue", positive_int, 64),
        Directive("processes", process_count, process_count("auto")),
        Directive("login_delay", whole_number, 0, reloadable=True),
        Directive("state_dir", path, "/var/lib/mpop3"),
        Directive("expire", expire_policy, None, reloadable=True),
        Directive("implementation", text_value, None, reloadable=True),
        # TLS and the cleartext policy (mpop3/server/tls.py); a SIGHUP
        # re-reads the certificate and key into the running context (tls.reload)
        Directive("listen_tls", listen_address, [], repeatable=True),
        Directive("tls_cert", path, None, reloadable=True),
        Directive("tls_key", path, None, reloadable=True),
        Directive("tls_min_version", one_of("1.2", "1.3"), "1.2", reloadable=True),
        Directive("tls_ciphers", text_value, None, reloadable=True),
        Directive("plaintext_auth", one_of("no", "yes", "loopback"), "loopback", reloadable=True),
        # behind a load balancer: the PROXY protocol (mpop3/server/proxied.py)
        Directive("listen_proxy", listen_address, [], repeatable=True),
        Directive("listen_tls_proxy", listen_address, [], repeatable=True),
        Directive("proxy_trusted_networks", proxy_networks, (), reloadable=True),
        Directive("proxy_timeout", seconds, 3.0, reloadable=True),
        # privileges (mpop3/server/privs.py): who mpop3 becomes when started as root
        Directive("safe_user", unprivileged_user, "nobody"),
        Directive("mail_group", group_name, "mail"),
        Directive("mail_owner", unprivileged_user, None),
        Directive("login_user", login_account, "mpop3login"),
        Directive("mail_process_idle", seconds, 30.0, reloadable=True),
        # running it (docs/operations.md): metrics, who/kick, DNS-SD
        Directive("metrics_listen", listen_address, None),
        Directive("control_socket", optional_path, "/run/mpop3/control"),
        Directive("control_group", group_name, None),
        Directive("dnssd", yes_no, False),
    ]
}
RELOADABLE = tuple(name for name, d in DIRECTIVES.items() if d.reloadable)
# changed in the file, these are only noted at a reload: they need a restart
RESTART_NEEDED = (
    "listen_tls",
    "listen_proxy",
    "listen_tls_proxy",
    "worker_threads",
    "processes",
    "login_queue",
    "ipv6_prefix",
    "login_user",
    "metrics_listen",
    "control_socket",
    "control_group",
    "dnssd",
)

MODULE_DIRECTIVES = {"auth_module": "auth", "storage_module": "storage"}


@dataclass
class ModuleLine:
    """One auth_module/storage_module line and the `> ` settings after it."""

    kind: str  # "auth" or "storage"
    file: str  # as written: a bare name (looked up in module_dir) or a path
    where: str  # "FILE:LINE" of the module line
    settings: dict = field(default_factory=dict)  # name -> value
    setting_lines: dict = field(default_factory=dict)  # name -> "FILE:LINE"


@dataclass
class Config:
    path: str
    values: dict  # directive name -> value (a list for repeatable ones)
    modules: list  # ModuleLine, in file order
    # the SSLContext built from tls_* (mpop3/tls.py), once, before any fork
    tls_context: object = None
    # the listen lines of the file itself (-l may replace conf.listen); a
    # reload compares with them
    file_listen: list = None

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def listen_addresses(conf):
    """Every address to listen on: plain, TLS, and behind a proxy."""
    values = conf.values
    return conf.listen + values["listen_tls"] + values["listen_proxy"] + values["listen_tls_proxy"]


def load(path):
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, f"cannot read the configuration: {e.strerror}") from None
    return parse(text, path)


def strip_comment(line):
    """Drop a `#` comment: at the start of the line or after whitespace."""
    for i, ch in enumerate(line):
        if ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def parse(text, path="mpop3.conf"):
    values = {}
    modules = []
    settings_target = None  # the module line that `> ` lines attach to now
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        line = strip_comment(raw).strip()
        if not line:
            continue
        if line.startswith(">"):
            module_setting(settings_target, line[1:].strip(), where)
            continue
        name, _, value = line.partition(" ")
        name, value = name.strip(), value.strip()
        settings_target = None
        if name in MODULE_DIRECTIVES:
            if not value:
                raise ConfigError(where, f"{name} needs a module name or path")
            settings_target = ModuleLine(MODULE_DIRECTIVES[name], value, where)
            modules.append(settings_target)
            continue
        directive = DIRECTIVES.get(name)
        if directive is None:
            raise ConfigError(where, f"unknown directive {name!r}")
        if not value:
            raise ConfigError(where, f"{name} needs a value")
        try:
            parsed = directive.read(value)
        except ValueError as e:
            raise ConfigError(where, f"bad value for {name}: {e}") from None
        if directive.repeatable:
            values.setdefault(name, []).append(parsed)
        elif name in values:
            raise ConfigError(where, f"{name} is given twice")
        else:
            values[name] = parsed
    for name, directive in DIRECTIVES.items():
        values.setdefault(name, directive.default)
    return Config(path=path, values=values, modules=modules, file_listen=values["listen"])


def module_setting(module, text, where):
    if module is None:
        raise ConfigError(where, "a '> ' module setting must follow its auth_module or storage_module line")
    name, _, value = text.partition(" ")
    if not name:
        raise ConfigError(where, "a '> ' line needs a setting name")
    if name in module.settings:
        raise ConfigError(where, f"setting {name!r} is given twice for module {module.file}")
    module.settings[name] = value.strip()
    module.setting_lines[name] = where


def resolve_module_file(file, module_dir):
    """A bare name is looked up in module_dir; anything with a / is a path."""
    if "/" in file:
        return os.path.abspath(file)
    from importlib.machinery import EXTENSION_SUFFIXES

    for suffix in [".so", *EXTENSION_SUFFIXES]:
        candidate = os.path.join(module_dir, file + suffix)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(module_dir, file + ".so")


def reload(running):
    """SIGHUP, in every process model: the running configuration with the
    reloadable values of the file as it is now. Changes that need a restart
    are logged and not applied. None if the file cannot be used (logged;
    the running configuration stays)."""
    try:
        new = load(running.path)
    except Exception as e:  # ConfigError, or anything a broken file causes
        log.error("reload failed, keeping the running configuration: %s", e)
        return None
    if new.values["listen"] != running.file_listen:
        log.warning("reload: listen addresses changed; that needs a restart")
    if [(m.kind, m.file, m.settings) for m in new.modules] != [(m.kind, m.file, m.settings) for m in running.modules]:
        log.warning("reload: module lines changed; that needs a restart")
    for name in RESTART_NEEDED:
        if new.values[name] != running.values[name]:
            log.warning("reload: %s changed; that needs a restart", name)
    merged = dataclasses.replace(running, values=dict(running.values))
    for name in RELOADABLE:
        merged.values[name] = new.values[name]
    return merged
