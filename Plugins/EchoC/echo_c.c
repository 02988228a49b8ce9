/*
 * echo-c: the C reference plugin — POST /v1/plugins/echo-c/echo returns the body unchanged.
 * Proves the ABI is language-neutral. Build:
 *   cc -shared -fPIC -O2 -I Sources/PluginABI/include \
 *      -Wl,--version-script=Plugins/plugin-exports.map -o libecho_c.so Plugins/EchoC/echo_c.c
 */
#include <string.h>

#include "gatehouse_plugin.h"

#define ECHO_C_VERSION "1.0.0"

static const gh_host_api *host;
static gh_plugin *self_handle;

static gh_bytes text(const char *s) {
    gh_bytes b = {(const uint8_t *)s, strlen(s)};
    return b;
}

static int bytes_equal(gh_bytes b, const char *s) {
    size_t n = strlen(s);
    return b.len == n && memcmp(b.data, s, n) == 0;
}

static int echo_init(const gh_host_api *api, gh_plugin *self, void **state_out, char *error, size_t error_capacity) {
    (void)error;
    (void)error_capacity;
    host = api;
    self_handle = self;
    *state_out = NULL;
    host->log(self_handle, NULL, GH_LOG_INFO, text("echo-c ready"), NULL, 0);
    return 0;
}

static void respond_error(gh_exchange *exchange, uint16_t status, const char *json) {
    gh_header content_type = {text("content-type"), text("application/json")};
    host->respond(exchange, status, &content_type, 1, text(json));
}

static void echo_handle(void *state, const gh_request *request, gh_exchange *exchange) {
    (void)state;
    if (!bytes_equal(request->path, "/echo")) {
        respond_error(exchange, 404, "{\"error\":{\"message\":\"echo-c has no such route; try POST /echo\",\"type\":\"not_found\"}}");
        return;
    }
    if (!bytes_equal(request->method, "POST")) {
        respond_error(exchange, 405, "{\"error\":{\"message\":\"use POST for /echo\",\"type\":\"method_not_allowed\"}}");
        return;
    }
    gh_header headers[2];
    size_t count = 0;
    headers[count].name = text("content-type");
    headers[count].value = text("application/octet-stream");
    for (size_t i = 0; i < request->header_count; i++) {
        if (bytes_equal(request->headers[i].name, "content-type")) {
            headers[count].value = request->headers[i].value; /* borrowed; respond copies it */
        }
    }
    count++;
    headers[count].name = text("x-echo-plugin-version");
    headers[count].value = text(ECHO_C_VERSION);
    count++;
    host->log(self_handle, exchange, GH_LOG_DEBUG, text("echoing"), NULL, 0);
    host->respond(exchange, 200, headers, count, request->body);
}

static void echo_shutdown(void *state) { (void)state; }

static const gh_plugin_descriptor descriptor = {
    .struct_size = sizeof(gh_plugin_descriptor),
    .abi_major = GATEHOUSE_ABI_MAJOR,
    .abi_minor = GATEHOUSE_ABI_MINOR,
    .name = "echo-c",
    .version = ECHO_C_VERSION,
    .swift_toolchain = NULL,
    .init = echo_init,
    .handle = echo_handle,
    .shutdown = echo_shutdown,
};

const gh_plugin_descriptor *GATEHOUSE_PLUGIN_ENTRY(void) { return &descriptor; }
