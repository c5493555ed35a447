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
ifeq ($(SANITIZE),1)
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

.PHONY: all deps test test-unit test-e2e run bench soak format clean install uninstall
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

$(B)/tests/%: tests/c/%.c $(LIBA)
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
	rm -rf build build-san
