"""The `mpop3` command: arguments, configuration, modules, then serve."""

import argparse
import sys

from . import __version__, config, loader, log, paths
from .errors import ConfigError
from .server import tls

USAGE = """mpop3 [-c CONFIG] [-s] [-l ADDR:PORT]... [-d] [--check-config] [--version] [--help]
       mpop3 [-c CONFIG] who
       mpop3 [-c CONFIG] kick USER|ADDRESS"""
EPILOG = """commands, to the running server through its control_socket (root or control_group):
  who                 list the sessions open now: user, client address, TLS, since, state, process
  kick USER|ADDRESS   end every session of that user, or from that address, committing nothing"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="mpop3",
        usage=USAGE,
        description="mpop3, a modular POP3 server. Runs in the foreground.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        default=paths.CONFIG_FILE,
        metavar="CONFIG",
        help=f"configuration file (default: {paths.CONFIG_FILE})",
    )
    p.add_argument(
        "-s", "--stdin", action="store_true", help="serve one session on stdin/stdout (inetd, systemd Accept=yes)"
    )
    p.add_argument(
        "-l",
        "--listen",
        action="append",
        metavar="ADDR:PORT",
        help="listen here instead of the configured addresses (repeatable)",
    )
    p.add_argument("-d", "--debug", action="store_true", help="log at debug level")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, show which module supplies each function, exit",
    )
    p.add_argument(
        "--module-mk",
        action="store_true",
        help="print the path of module.mk, the Makefile fragment for building modules",
    )
    p.add_argument("--version", action="version", version=f"mpop3 {__version__}")
    p.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.command and not (args.command == ["who"] or (len(args.command) == 2 and args.command[0] == "kick")):
        p.error("unknown command: " + " ".join(args.command) + " (who, kick USER|ADDRESS)")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.module_mk:
        print(paths.MODULE_MK)
        return 0
    if args.command:
        return control(args)
    try:
        conf = config.load(args.config)
        if args.listen:
            conf.values["listen"] = [read_listen_option(text) for text in args.listen]
        # modules log while they initialise; --check-config shows it on stderr
        log.setup(conf, debug=args.debug, force_stderr=args.check_config)
        tables = loader.load_modules(conf)
        conf.tls_context = tls_context(conf)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.check_config:
        print_check(conf, tables)
        return 0
    from .server import models

    return models.run(conf, tables, stdin_mode=args.stdin, debug=args.debug)


def control(args):
    """`who` or `kick`: ask the running server; its answer on stdout."""
    from .server.operations import ask

    try:
        conf = config.load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    path = conf.values["control_socket"]
    if path is None:
        print(f"mpop3: {conf.path} says control_socket none: no running server to ask", file=sys.stderr)
        return 2
    try:
        answer = ask(path, " ".join(args.command))
    except OSError as e:
        print(f"mpop3: cannot reach the running server at {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    sys.stdout.write(answer)
    return 1 if answer.startswith("-ERR") else 0


def tls_context(conf):
    """The TLS context, built here so that a bad certificate or key is a
    start-up error, and once for all server processes."""
    try:
        return tls.context_from_config(conf)
    except tls.TLSSetupError as e:
        raise ConfigError(conf.path, str(e)) from None


def read_listen_option(text):
    try:
        return config.listen_address(text)
    except ValueError as e:
        raise ConfigError("-l", str(e)) from None


def print_check(conf, tables):
    print(f"{conf.path}: configuration OK")
    print("modules:")
    for m in tables.modules:
        print(f"  {m.kind:<7}  {m.name}  {m.path}")
        for warning in m.warnings:
            print(f"           warning: {warning}")
    if not tables.modules:
        print("  (none)")
    for line in loader.function_map(tables):
        print(line)
