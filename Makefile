# Gatehouse: `make run` builds the host and plugins, installs them into plugins.d and serves;
# `make test` builds everything and runs the unit and integration tests.
CONFIG ?= debug
SWIFT ?= swift
CC ?= cc
PYTHON ?= python3
BIN := .build/$(CONFIG)
# Release builds (make run CONFIG=release, make bench) optimize across modules, so NIO's generic
# pipeline code is specialized into its callers, and drop the dynamic exclusivity checks; debug
# builds, in which every test runs, keep those checks. docs/PERFORMANCE.md has what each saved.
RELEASE_SWIFTFLAGS := -Xswiftc -cross-module-optimization -Xswiftc -enforce-exclusivity=unchecked
SWIFTFLAGS := $(if $(filter release,$(CONFIG)),$(RELEASE_SWIFTFLAGS))
VENV := .venv
PLUGIN_CFLAGS := -shared -fPIC -O2 -Wall -Wextra -Werror -I Sources/PluginABI/include \
	-Wl,--version-script=Plugins/plugin-exports.map -Wl,-Bsymbolic

.PHONY: all deps test-deps build plugins run test unit integration venv check-exports bench clean

all: build plugins

deps:
	scripts/install-deps.sh run

test-deps:
	scripts/install-deps.sh test

build: deps
	$(SWIFT) build -c $(CONFIG) $(SWIFTFLAGS)

# Install built libraries into plugins.d: copy to a temporary name, then rename, so a
# running host watching the directory never sees a half-written file.
plugins: build
	cp $(BIN)/libEchoPlugin.so plugins.d/echo/.libecho.so.tmp && mv -f plugins.d/echo/.libecho.so.tmp plugins.d/echo/libecho.so
	$(CC) $(PLUGIN_CFLAGS) -o plugins.d/echo-c/.libecho_c.so.tmp Plugins/EchoC/echo_c.c && mv -f plugins.d/echo-c/.libecho_c.so.tmp plugins.d/echo-c/libecho_c.so
	chmod go-w plugins.d plugins.d/* plugins.d/*/*.so plugins.d/*/plugin.yaml

run: plugins
	$(BIN)/gatehouse serve

venv: $(VENV)/.installed

$(VENV)/.installed: Tests/integration/requirements.txt | test-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r Tests/integration/requirements.txt
	touch $@

# The host must export no BoringSSL symbols, or plugins' copies could bind to them (DESIGN.md).
check-exports: build
	@if nm -D --defined-only $(BIN)/gatehouse | grep -q CCryptoBoringSSL_; then \
		echo "host exports CCryptoBoringSSL_ symbols: never build it with --static-swift-stdlib"; exit 1; \
	else echo "check-exports: host exports no BoringSSL symbols"; fi

unit: build
	$(SWIFT) build -c $(CONFIG) $(SWIFTFLAGS) --build-tests
	$(SWIFT) test -c $(CONFIG) $(SWIFTFLAGS) --skip-build

integration: plugins venv
	GATEHOUSE_BUILD_DIR=$(BIN) $(VENV)/bin/pytest -q Tests/integration

test: test-deps check-exports unit integration

# Benchmark (not a test): Gatehouse vs nginx proxy_pass in front of the same upstream.
bench:
	scripts/install-deps.sh bench
	$(SWIFT) build -c release $(RELEASE_SWIFTFLAGS) --product gatehouse
	bench/run.sh

clean:
	rm -rf .build $(VENV) plugins.d/*/*.so
