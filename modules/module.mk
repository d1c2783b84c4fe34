# module.mk -- build an mpop3 module outside the mpop3 tree.
#
# Installed by `make install`; `mpop3 --module-mk` prints where. A module's
# whole Makefile:
#
#     MODULE = foo
#     include $(shell mpop3 --module-mk)
#
# `make` turns foo.pyx into foo.so, which `auth_module /path/to/foo.so` (or
# storage_module) loads. foo.pyx starts with `include "mpop3_module.pxi"`
# (it records the module ABI it was built for) and sets MPOP3_MODULE_CLASS.
# Extra libraries: LDLIBS = -lcrypt. Extra Cython flags: CYTHONFLAGS.

MPOP3_PYTHON = @PYTHON@
MPOP3_PYLIB = @PYLIBDIR@
MPOP3_INCLUDE = @INCLUDEDIR@

SRC ?= $(MODULE).pyx
CFLAGS ?= -O2
PY_INCLUDE := $(shell $(MPOP3_PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')

all: $(MODULE).so

$(MODULE).c: $(SRC)
	PYTHONPATH=$(MPOP3_PYLIB) $(MPOP3_PYTHON) -m cython -3 -I $(MPOP3_INCLUDE) $(CYTHONFLAGS) -o $@ $<

$(MODULE).so: $(MODULE).c
	$(CC) -shared -fPIC $(CFLAGS) -Wno-unused-function -I$(PY_INCLUDE) -o $@ $< $(LDLIBS)

clean:
	rm -f $(MODULE).c $(MODULE).so

.PHONY: all clean
