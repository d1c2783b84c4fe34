# mpop3 -- build, install, test like a C server.
#
#   make                 build in place (creates the virtualenv .venv first)
#   make install         install under $(PREFIX) (honours DESTDIR)
#   make install-user    as root: make the account of the login processes (LOGIN_USER, default mpop3login)
#   make test            build, lint, then run the whole test suite
#   make test-quick      build, then the suite minus tests needing root, real clients or time (< 1 min)
#   make lint            ruff: lint and format check (`make format` rewrites)
#   make bench           build, then run the benchmarks
#   make run             build, then serve a demo mailbox on 127.0.0.1:1110
#   make clean           remove what the build made (keeps .venv; distclean removes it)

PYTHON ?= python3
VENV = .venv
VPY = $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=

BINDIR = $(PREFIX)/bin
LIBDIR = $(PREFIX)/lib/mpop3
PYLIBDIR = $(LIBDIR)/python
MODDIR = $(LIBDIR)/modules
SYSCONFDIR = $(PREFIX)/etc
DATADIR = $(PREFIX)/share/mpop3
UNITDIR = $(PREFIX)/lib/systemd/system

PYTEST_ARGS ?=

RUFF = $(VENV)/bin/ruff
QUICK = not root and not clients and not slow

.PHONY: all build install install-user test test-quick lint format bench run clean distclean

all: build

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

build: $(VENV)/.deps
	$(VPY) setup.py -q build_ext --inplace

# The installed tree is self-contained: its own copy of the package, uvloop,
# psycopg and its pool (auth_postgresql) and Cython (for module.mk) under
# $(PYLIBDIR), run by the interpreter that built the extensions; nothing
# points back into this build tree.
install: build
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(PYLIBDIR)/mpop3/include $(DESTDIR)$(MODDIR) \
	    $(DESTDIR)$(SYSCONFDIR) $(DESTDIR)$(DATADIR)/include
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps --upgrade \
	    --target $(DESTDIR)$(PYLIBDIR) $$($(VPY) -m pip freeze | grep -iE '^(uvloop|cython|psycopg|psycopg.pool|psycopg.binary|typing.extensions)==')
	find mpop3 -name '*.py' -o -name '*.pxd' -o -name '*.pxi' | while read f; do \
	    install -D -m 644 $$f $(DESTDIR)$(PYLIBDIR)/$$f; done
	find mpop3 -name '*.so' | while read f; do install -D -m 755 $$f $(DESTDIR)$(PYLIBDIR)/$$f; done
	install -m 644 mpop3/include/*.pxi $(DESTDIR)$(DATADIR)/include/
	printf '%s\n' '"""Written by make install: where this copy of mpop3 finds its files."""' \
	    'CONFIG_FILE = "$(SYSCONFDIR)/mpop3.conf"' 'MODULE_DIR = "$(MODDIR)"' \
	    'MODULE_MK = "$(DATADIR)/module.mk"' \
	    > $(DESTDIR)$(PYLIBDIR)/mpop3/_layout.py
	for so in modules/*.so; do \
	    install -m 755 $$so $(DESTDIR)$(MODDIR)/$$(basename $$so | cut -d. -f1).so; done
	sed -e 's|@PYTHON@|$(shell $(VPY) -c 'import sys; print(sys._base_executable)')|' \
	    -e 's|@PYLIBDIR@|$(PYLIBDIR)|' -e 's|@INCLUDEDIR@|$(DATADIR)/include|' \
	    modules/module.mk > $(DESTDIR)$(DATADIR)/module.mk
	sed -e 's|@PYTHON@|$(shell $(VPY) -c 'import sys; print(sys._base_executable)')|' \
	    -e 's|@PYLIBDIR@|$(PYLIBDIR)|' contrib/mpop3.in > $(DESTDIR)$(BINDIR)/mpop3
	chmod 755 $(DESTDIR)$(BINDIR)/mpop3
	install -d $(DESTDIR)$(UNITDIR)
	for unit in mpop3.service mpop3@.service xinetd.mpop3; do \
	    sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' contrib/$$unit.in \
	    > $(DESTDIR)$$(case $$unit in xinetd*) echo $(DATADIR);; *) echo $(UNITDIR);; esac)/$$unit; done
	install -m 644 contrib/mpop3.socket $(DESTDIR)$(UNITDIR)/
	install -d $(DESTDIR)$(DATADIR)/pam.d
	install -m 644 contrib/pam.d/mpop3 $(DESTDIR)$(DATADIR)/pam.d/mpop3
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/mpop3.conf ]; then \
	    echo "keeping the existing $(DESTDIR)$(SYSCONFDIR)/mpop3.conf"; \
	else install -m 644 mpop3.conf $(DESTDIR)$(SYSCONFDIR)/mpop3.conf; fi
	@if [ -z "$(DESTDIR)" ] && ! id -u $(LOGIN_USER) >/dev/null 2>&1; then \
	    echo "no account $(LOGIN_USER) yet: started as root, each session gets a process that is root until login;"; \
	    echo "make it with: make install-user (as root), for processes by role (README: Privileges)"; fi

# The account login processes run as (login_user): a system account with no
# home and no shell, and a group of its own; nothing else uses it. Made only
# if missing; never changed if present.
LOGIN_USER ?= mpop3login
install-user:
	@if id -u $(LOGIN_USER) >/dev/null 2>&1; then echo "$(LOGIN_USER) exists: left as it is"; \
	else useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
	    --user-group $(LOGIN_USER) && echo "made the system account $(LOGIN_USER)"; fi

test: build lint
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

test-quick: build
	$(VPY) -m pytest -q -m "$(QUICK)" $(PYTEST_ARGS) tests

lint: $(VENV)/.deps
	$(RUFF) check .
	$(RUFF) format --check .

format: $(VENV)/.deps
	$(RUFF) check --fix .
	$(RUFF) format .

bench: build bench/loadgen
	$(VPY) -m pytest -q bench

# the load generator is C so that the client is never the bottleneck;
# OpenSSL (Debian: libssl-dev) for its POP3S runs
bench/loadgen: bench/loadgen.c
	$(CC) -O2 -Wall -o $@ bench/loadgen.c -lssl -lcrypto

run: build
	$(VPY) tools/demo.py

clean:
	rm -rf build modules/*.c modules/*.so modules/*.html \
	    demo .pytest_cache .benchmarks *.egg-info
	find mpop3 \( -name '*.c' -o -name '*.so' -o -name '*.html' \) -delete
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
