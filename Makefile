# coord — build, test and run.  `make run` and `make test` are the two
# commands of the README; both install missing Debian packages first.
#
#   make            build libcoord, coordfs, examples and test programs
#   make test       run every test (C unit tests, then pytest end-to-end)
#   make test SANITIZE=1   the same, built with ASan + UBSan
#   make run        local etcd + coordfs mounted at ./mnt
#   make bench      benchmarks side by side with peers
#   make format     clang-format every C file

SANITIZE ?=
PREFIX ?= /usr/local
DESTDIR ?=

CC ?= cc
ifeq ($(FUZZ),1)
  # libFuzzer build (make fuzz): clang, coverage on libcoord, ASan + UBSan
  B := build-fuzz
  CC := clang
  SANFLAGS := -fsanitize=fuzzer-no-link,address,undefined -fno-omit-frame-pointer
else ifeq ($(SANITIZE),1)
  B := build-san
  SANFLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
  B := build
  SANFLAGS :=
endif

PKGS := grpc libprotobuf-c jansson fuse3
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS_CORE = $(shell pkg-config --libs grpc libprotobuf-c jansson 2>/dev/null)
PKG_LIBS_FUSE = $(shell pkg-config --libs fuse3 2>/dev/null)

CFLAGS ?= -O2 -g
CFLAGS += -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -fPIC -pthread $(SANFLAGS)
CPPFLAGS += -Ilibcoord/include -Ilibcoord/src -I$(B)/gen $(PKG_CFLAGS) -D_GNU_SOURCE
LDFLAGS += -pthread $(SANFLAGS)

SOVERSION := 0
LIBVERSION := 0.1.0

PROTOS := $(wildcard proto/*.proto) $(wildcard proto/*/*.proto) $(wildcard proto/*/*/*.proto)
PROTO_C := $(patsubst proto/%.proto,$(B)/gen/%.pb-c.c,$(PROTOS))
PROTO_H := $(PROTO_C:.c=.h)
PROTO_O := $(PROTO_C:.c=.o)

LIB_SRC := $(wildcard libcoord/src/*.c)
LIB_O := $(patsubst %.c,$(B)/%.o,$(LIB_SRC))
LIB := $(B)/libcoord.so
LIBA := $(B)/libcoord.a

FS_SRC := $(wildcard coordfs/*.c)
# Objects apart from the binary: $(B)/coordfs is the program, not a directory.
FS_O := $(patsubst coordfs/%.c,$(B)/obj/coordfs/%.o,$(FS_SRC))
FS := $(B)/coordfs

TOOL_SRC := $(wildcard libcoord/tools/*.c)
TOOL_BIN := $(patsubst libcoord/tools/%.c,$(B)/%,$(TOOL_SRC))

EX_SRC := $(wildcard libcoord/examples/*.c)
EX_BIN := $(patsubst libcoord/examples/%.c,$(B)/examples/%,$(EX_SRC))

TPROG_SRC := $(wildcard tests/c/*.c)
TPROG_BIN := $(patsubst tests/c/%.c,$(B)/tests/%,$(TPROG_SRC))
UNIT_SRC := $(wildcard tests/unit/test_*.c)
UNIT_BIN := $(patsubst tests/unit/%.c,$(B)/unit/%,$(UNIT_SRC))

.PHONY: all deps test test-unit test-e2e test-valgrind fuzz run bench soak format clean install uninstall deb
all: $(LIB) $(LIBA) $(FS) $(TOOL_BIN) $(EX_BIN) $(TPROG_BIN) $(UNIT_BIN)

deps:
	@scripts/install-deps

# Generated sources are never intermediate (make would delete the headers).
.SECONDARY: $(PROTO_C) $(PROTO_H)

$(B)/gen/%.pb-c.c $(B)/gen/%.pb-c.h: proto/%.proto
	@mkdir -p $(dir $@)
	protoc-c --c_out=$(B)/gen -Iproto $<

$(B)/gen/%.pb-c.o: $(B)/gen/%.pb-c.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -Wno-error -c $< -o $@

$(B)/%.o: %.c $(PROTO_H) libcoord/include/coord.h libcoord/src/internal.h
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(LIB): $(LIB_O) $(PROTO_O)
	$(CC) -shared -Wl,-soname,libcoord.so.$(SOVERSION) -o $@ $^ $(LDFLAGS) $(PKG_LIBS_CORE)

$(LIBA): $(LIB_O) $(PROTO_O)
	rm -f $@; ar rcs $@ $^

$(B)/obj/coordfs/%.o: coordfs/%.c $(wildcard coordfs/*.h) $(PROTO_H) libcoord/include/coord.h libcoord/src/internal.h
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(FS): $(FS_O) $(LIBA)
	@if [ -d $@ ]; then rm -rf $@; fi
	$(CC) -o $@ $(FS_O) $(LIBA) $(LDFLAGS) $(PKG_LIBS_FUSE) $(PKG_LIBS_CORE)

$(TOOL_BIN): $(B)/%: libcoord/tools/%.c $(LIBA)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(LIBA) $(LDFLAGS) $(PKG_LIBS_CORE)

$(B)/examples/%: libcoord/examples/%.c $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(LIBA) $(LDFLAGS) $(PKG_LIBS_CORE)

$(B)/tests/%: tests/c/%.c $(wildcard tests/c/*.h) $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(LIBA) $(LDFLAGS) $(PKG_LIBS_CORE)

$(B)/unit/%: tests/unit/%.c $(LIBA) tests/unit/unit.h
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -Itests/unit -o $@ $< $(LIBA) $(LDFLAGS) $(PKG_LIBS_CORE)

$(B)/bench/coord_bench: tests/bench/coord_bench.c $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(LIBA) $(LDFLAGS) $(PKG_LIBS_CORE)

# The whole suite: C unit tests, then the end-to-end tests (pytest).
test: deps
	$(MAKE) all
	$(MAKE) test-unit test-e2e

test-unit: $(UNIT_BIN)
	@scripts/run-unit $(UNIT_BIN)

test-e2e:
	COORD_BUILD=$(CURDIR)/$(B) SANITIZE=$(SANITIZE) /usr/bin/python3 -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

# Fuzzing: one libFuzzer target per parser of outside data
# (tests/fuzz/fuzz_*.c), each run for FUZZ_SECONDS from its seed corpus.
FUZZ_SECONDS ?= 20
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)
FUZZ_BIN := $(patsubst tests/fuzz/%.c,build-fuzz/fuzz/%,$(FUZZ_SRC))
fuzz: deps
	$(MAKE) FUZZ=1 $(FUZZ_BIN)
	@scripts/run-fuzz $(FUZZ_SECONDS) $(FUZZ_BIN)

build-fuzz/fuzz/%: tests/fuzz/%.c $(LIBA)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -fsanitize=fuzzer -o $@ $< $(LIBA) $(LDFLAGS) $(PKG_LIBS_CORE)
# fuzz_coordfs_cache.c compiles coordfs's pure cache.c in (#include)
build-fuzz/fuzz/fuzz_coordfs_opts: coordfs/opts.c coordfs/coordfs.h
build-fuzz/fuzz/fuzz_coordfs_cache: coordfs/cache.c coordfs/coordfs.h

# The C unit tests and the C test programs under valgrind memcheck
# (plain build only: valgrind and the sanitizers do not mix).
VG := valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite -q
test-valgrind: deps
	$(MAKE) all
	@for t in $(UNIT_BIN); do $(VG) $$t >/dev/null || { echo "valgrind: $$t failed"; exit 1; }; done
	@echo "valgrind: unit tests clean"
	COORD_BUILD=$(CURDIR)/$(B) COORD_VALGRIND=1 /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/test_valgrind.py

# The long forms of the reliability tests: lock chaos 5 min, load 60 s (scripts/soak).
soak: deps
	$(MAKE) all
	@COORD_BUILD=$(CURDIR)/$(B) SANITIZE=$(SANITIZE) scripts/soak

run: deps
	$(MAKE) all
	@scripts/run

# A benchmark never fails the build: what does not build is reported as skipped.
bench: deps
	-$(MAKE) -k all $(B)/bench/coord_bench
	@COORD_BUILD=$(abspath $(B)) scripts/bench

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf build build-san build-fuzz

# coordfs logs every etcd call at debug level (coordfs/log.c): its references
# to these libcoord calls (and libcoord's own, across its objects) are linked
# to log.c's __wrap_<call>, which calls __real_<call>.
comma := ,
FS_WRAP := coord_new coord_close coord_status coord_kv_get coord_kv_put coord_kv_delete coord_kv_txn \
  coord_lease_grant coord_lease_revoke coord_lease_ttl coord_lease_keepalive coord_watch_create \
  coord_watch_next coord_lock_try_acquire coord_lock_acquire_async coord_lock_cancel coord_lock_unlock \
  coord_lock_set_note
$(FS): LDFLAGS += $(patsubst %,-Wl$(comma)--wrap=%,$(FS_WRAP))

# ---- install / uninstall / deb (issue 9) ------------------------------------
# make install [PREFIX=/usr/local] [DESTDIR=staging] [LIBDIR=...]: libcoord.so
# (soname libcoord.so.$(SOVERSION), file libcoord.so.$(LIBVERSION)), libcoord.a,
# coord.h, libcoord.pc, coordfs + the mount helper mount.fuse.coordfs, the
# coord-register / coord-env / coord-config-watch / coord-xds / coord-lock tools, man pages,
# the systemd unit template (coord.mount goes with the examples in DOCDIR).
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
MANDIR ?= $(PREFIX)/share/man
DOCDIR ?= $(PREFIX)/share/doc/coord
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
MOUNT_FUSE ?= /sbin/mount.fuse3
# paths in the .pc relative to ${prefix} when they are under it
pc_rel = $(patsubst $(PREFIX)/%,$${prefix}/%,$(1))
INSTALL_SCRIPTS := examples/coord-register examples/coord-env examples/coord-config-watch

install: $(LIB) $(LIBA) $(FS) $(TOOL_BIN)
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(INCLUDEDIR) \
	  $(DESTDIR)$(BINDIR) $(DESTDIR)$(SBINDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man3 \
	  $(DESTDIR)$(MANDIR)/man8 \
	  $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(DOCDIR)/examples
	install -m 0755 $(LIB) $(DESTDIR)$(LIBDIR)/libcoord.so.$(LIBVERSION)
	ln -sf libcoord.so.$(LIBVERSION) $(DESTDIR)$(LIBDIR)/libcoord.so.$(SOVERSION)
	ln -sf libcoord.so.$(SOVERSION) $(DESTDIR)$(LIBDIR)/libcoord.so
	install -m 0644 $(LIBA) $(DESTDIR)$(LIBDIR)/libcoord.a
	install -m 0644 libcoord/include/coord.h $(DESTDIR)$(INCLUDEDIR)/coord.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(call pc_rel,$(LIBDIR))|' \
	  -e 's|@INCLUDEDIR@|$(call pc_rel,$(INCLUDEDIR))|' -e 's|@VERSION@|$(LIBVERSION)|' \
	  packaging/libcoord.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/libcoord.pc
	install -m 0755 $(FS) $(DESTDIR)$(SBINDIR)/coordfs
	ln -sf $(MOUNT_FUSE) $(DESTDIR)$(SBINDIR)/mount.fuse.coordfs
	install -m 0755 $(TOOL_BIN) $(INSTALL_SCRIPTS) $(DESTDIR)$(BINDIR)/
	install -m 0644 docs/man/coord-lock.1 $(DESTDIR)$(MANDIR)/man1/coord-lock.1
	install -m 0644 docs/man/libcoord.3 $(DESTDIR)$(MANDIR)/man3/libcoord.3
	install -m 0644 docs/man/coordfs.8 $(DESTDIR)$(MANDIR)/man8/coordfs.8
	sed -e 's|@SBINDIR@|$(SBINDIR)|g' packaging/systemd/coordfs@.service > $(DESTDIR)$(SYSTEMDUNITDIR)/coordfs@.service
	install -m 0644 examples/* packaging/systemd/coord.mount $(DESTDIR)$(DOCDIR)/examples/
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then ldconfig; fi

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libcoord.so.$(LIBVERSION) $(DESTDIR)$(LIBDIR)/libcoord.so.$(SOVERSION) \
	  $(DESTDIR)$(LIBDIR)/libcoord.so $(DESTDIR)$(LIBDIR)/libcoord.a $(DESTDIR)$(PKGCONFIGDIR)/libcoord.pc \
	  $(DESTDIR)$(INCLUDEDIR)/coord.h $(DESTDIR)$(SBINDIR)/coordfs $(DESTDIR)$(SBINDIR)/mount.fuse.coordfs \
	  $(patsubst %,$(DESTDIR)$(BINDIR)/%,$(notdir $(TOOL_BIN) $(INSTALL_SCRIPTS))) \
	  $(DESTDIR)$(MANDIR)/man1/coord-lock.1 $(DESTDIR)$(MANDIR)/man3/libcoord.3 $(DESTDIR)$(MANDIR)/man8/coordfs.8 \
	  $(DESTDIR)$(SYSTEMDUNITDIR)/coordfs@.service
	rm -rf $(DESTDIR)$(DOCDIR)
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then ldconfig; fi

# make deb [DEBDIR=build/deb]: the Debian packages (libcoord0, libcoord-dev,
# coordfs), built by dpkg-buildpackage in a copy of the tracked sources so
# that its clean step never touches this tree.  The .debs land in DEBDIR.
DEBDIR ?= build/deb
deb:
	rm -rf $(DEBDIR)/src && mkdir -p $(DEBDIR)/src
	git ls-files -co --exclude-standard -- Makefile libcoord coordfs proto scripts docs examples packaging debian | \
	  tar -cf - -T - | tar -xf - -C $(DEBDIR)/src
	cd $(DEBDIR)/src && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -us -uc -b
	@ls -1 $(DEBDIR)/*.deb
