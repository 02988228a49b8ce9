/*
 * A C test plugin whose behaviour is chosen at compile time, to exercise the host's checks:
 *   -DPLUGIN_NAME='"x"'   name reported by the descriptor (default "variant")
 *   -DDESCRIPTOR_MAJOR=2  descriptor claims another ABI major
 *   -DENTRY_V2            export gatehouse_plugin_entry_v2 instead of _v1
 *   -DFAIL_INIT           init fails with a reason
 *   -DSLOW_SHUTDOWN=N     shutdown sleeps N seconds (a plugin that blocks the host's exit)
 *   -DSLOW_INIT=N         init sleeps N seconds first (a plugin that holds up start-up)
 * Routes: /hello (sync answer), /stream (chunks from another thread), /double (completes twice),
 *         /config (answers with the plugin's config JSON), /never (never answers),
 *         /flood?mib=N (streams N MiB, default 256, from its own thread, until a write fails; logs
 *         how far it got), /flood-inline?mib=N (the same inside handle, on the host's thread),
 *         /flood-one?mib=N (one write of N MiB from its own thread),
 *         /handle (answers its own exchange handle, in decimal),
 *         /answer?N (misuse: answers "HIJACKED" on handle N, then reports what that returned).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gatehouse_plugin.h"

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "variant"
#endif
#ifndef DESCRIPTOR_MAJOR
#define DESCRIPTOR_MAJOR GATEHOUSE_ABI_MAJOR
#endif

static const gh_host_api *host;
static gh_plugin *self_handle;

static gh_bytes text(const char *s) {
    gh_bytes b = {(const uint8_t *)s, strlen(s)};
    return b;
}

static int is(gh_bytes b, const char *s) { return b.len == strlen(s) && memcmp(b.data, s, b.len) == 0; }

static int variant_init(const gh_host_api *api, gh_plugin *self, void **state_out, char *error, size_t cap) {
    host = api;
    self_handle = self;
    *state_out = NULL;
#ifdef SLOW_INIT
    sleep(SLOW_INIT);
#endif
#ifdef FAIL_INIT
    /* Metrics declared before failing go with the refused version. */
    gh_metric *level = api->metric_declare(self, GH_METRIC_GAUGE, text("probe_level"), text("Declared by a failing init."));
    api->metric_set(level, 7);
    snprintf(error, cap, "refusing to start: missing setting 'token'");
    return 1;
#else
    (void)error;
    (void)cap;
    return 0;
#endif
}

static void *stream_later(void *arg) {
    gh_exchange *exchange = arg;
    gh_header header = {text("content-type"), text("text/plain")};
    host->respond_start(exchange, 200, &header, 1);
    const char *chunks[] = {"alpha\n", "beta\n", "gamma\n"};
    for (int i = 0; i < 3; i++) {
        usleep(20000);
        host->respond_write(exchange, text(chunks[i]));
    }
    host->respond_finish(exchange);
    return NULL;
}

/* Streams `mib` MiB of 64 KiB chunks, stopping at the first write that fails; logs how far it got. */
struct flood_job {
    gh_exchange *exchange;
    size_t mib;
};

static void flood_now(gh_exchange *exchange, size_t mib) {
    static uint8_t chunk[64 * 1024];
    memset(chunk, 'x', sizeof chunk);
    host->respond_start(exchange, 200, NULL, 0);
    size_t written = 0;
    gh_status status = GH_OK;
    while (written < mib << 20) {
        gh_bytes bytes = {chunk, sizeof chunk};
        status = host->respond_write(exchange, bytes);
        if (status != GH_OK) break;
        written += sizeof chunk;
    }
    gh_status finished = host->respond_finish(exchange);
    char line[128];
    snprintf(line, sizeof line, "flood stopped after %zu bytes with status %d, finish %d", written, (int)status, (int)finished);
    host->log(self_handle, NULL, GH_LOG_INFO, text(line), NULL, 0);
}

static void *flood(void *arg) {
    struct flood_job *job = arg;
    flood_now(job->exchange, job->mib);
    free(job);
    return NULL;
}

/* One write of `mib` MiB from the plugin's thread, then finish; logs the write's status. */
static void *flood_one(void *arg) {
    struct flood_job *job = arg;
    size_t size = job->mib << 20;
    uint8_t *big = malloc(size);
    memset(big, 'y', size);
    host->respond_start(job->exchange, 200, NULL, 0);
    gh_bytes bytes = {big, size};
    gh_status status = host->respond_write(job->exchange, bytes);
    gh_status finished = host->respond_finish(job->exchange);
    free(big);
    char line[96];
    snprintf(line, sizeof line, "one write of %zu bytes: status %d, finish %d", size, (int)status, (int)finished);
    host->log(self_handle, NULL, GH_LOG_INFO, text(line), NULL, 0);
    free(job);
    return NULL;
}

static size_t query_mib(const gh_request *request) {
    char digits[16] = {0};
    if (request->query.len > 4 && memcmp(request->query.data, "mib=", 4) == 0) {
        memcpy(digits, request->query.data + 4, request->query.len - 4 < 15 ? request->query.len - 4 : 15);
        return (size_t)strtoul(digits, NULL, 10);
    }
    return 256;
}

static void variant_handle(void *state, const gh_request *request, gh_exchange *exchange) {
    (void)state;
    if (is(request->path, "/handle")) {
        char line[32];
        snprintf(line, sizeof line, "%llu", (unsigned long long)(uintptr_t)exchange);
        host->respond(exchange, 200, NULL, 0, text(line));
        return;
    }
    if (is(request->path, "/answer")) {
        char digits[32] = {0};
        memcpy(digits, request->query.data, request->query.len < 31 ? request->query.len : 31);
        gh_exchange *other = (gh_exchange *)(uintptr_t)strtoull(digits, NULL, 10);
        gh_status status = host->respond(other, 200, NULL, 0, text("HIJACKED"));
        char line[32];
        snprintf(line, sizeof line, "%d", (int)status);
        host->respond(exchange, 200, NULL, 0, text(line));
        return;
    }
    if (is(request->path, "/flood") || is(request->path, "/flood-one")) {
        struct flood_job *job = malloc(sizeof *job);
        job->exchange = exchange;
        job->mib = query_mib(request);
        pthread_t thread;
        pthread_create(&thread, NULL, is(request->path, "/flood") ? flood : flood_one, job);
        pthread_detach(thread);
        return;
    }
    if (is(request->path, "/flood-inline")) {  /* on the host's thread, inside handle */
        flood_now(exchange, query_mib(request));
        return;
    }
    if (is(request->path, "/stream")) {
        pthread_t thread;
        pthread_create(&thread, NULL, stream_later, exchange);
        pthread_detach(thread);
        return;
    }
    if (is(request->path, "/double")) {
        host->respond(exchange, 200, NULL, 0, text("first"));
        gh_status second = host->respond(exchange, 200, NULL, 0, text("second"));
        char line[64];
        snprintf(line, sizeof line, "second respond returned %d", (int)second);
        host->log(self_handle, NULL, GH_LOG_WARNING, text(line), NULL, 0);
        return;
    }
    if (is(request->path, "/config")) {
        host->respond(exchange, 200, NULL, 0, host->config_json(self_handle));
        return;
    }
    if (is(request->path, "/never")) {
        return; /* the host's timeout answers 504 */
    }
    /* Middleware specs the host must refuse, each with a logged reason. */
    if (is(request->path, "/bad-middleware")) {
        gh_middleware_spec neither = {.struct_size = sizeof neither, .name = "neither", .scope = GH_SCOPE_ALL};
        gh_middleware_spec tiny = {.struct_size = 8, .name = "tiny", .scope = GH_SCOPE_ALL};
        char line[64];
        snprintf(line, sizeof line, "neither %d tiny %d null %d", host->middleware_register(self_handle, &neither),
                 host->middleware_register(self_handle, &tiny), host->middleware_register(self_handle, NULL));
        host->respond(exchange, 200, NULL, 0, text(line));
        return;
    }
    /* API misuse: views with a NULL pointer and a length. Each call must be refused, not crash
       the gateway; the answer reports what the calls returned. */
    if (is(request->path, "/null-views")) {
        gh_bytes broken = {NULL, 5};
        gh_header bad_header = {broken, text("v")};
        int body = host->respond(exchange, 200, NULL, 0, broken);
        int header = host->respond(exchange, 200, &bad_header, 1, text("x"));
        int start = host->respond_start(exchange, 200, &bad_header, 1);
        host->log(self_handle, exchange, GH_LOG_INFO, broken, NULL, 0);
        host->log(self_handle, exchange, GH_LOG_INFO, text("bad field"), &bad_header, 1);
        int metric = host->metric_declare(self_handle, GH_METRIC_COUNTER, broken, text("h")) == NULL;
        char line[96];
        snprintf(line, sizeof line, "body %d header %d start %d metric-refused %d", body, header, start, metric);
        host->respond(exchange, 200, NULL, 0, text(line));
        return;
    }
    /* Answers with the status in the query (s=NNN) and a body that looks like a response. */
    if (request->path.len == 7 && memcmp(request->path.data, "/status", 7) == 0) {
        int status = 200;
        if (request->query.len > 2 && memcmp(request->query.data, "s=", 2) == 0) {
            char digits[4] = {0};  /* the view is not NUL-terminated */
            memcpy(digits, request->query.data + 2, request->query.len - 2 < 3 ? request->query.len - 2 : 3);
            status = atoi(digits);
        }
        int stream = request->query.len > 0 && memchr(request->query.data, 'w', request->query.len) != NULL;
        gh_bytes smuggled = text("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Smuggled: yes\r\n\r\nEVIL!");
        gh_header length = {text("content-length"), text("3")};
        if (stream) {
            host->respond_start(exchange, (uint16_t)status, &length, 1);
            host->respond_write(exchange, smuggled);
            host->respond_finish(exchange);
        } else {
            host->respond(exchange, (uint16_t)status, &length, 1, smuggled);
        }
        return;
    }
    gh_header field = {text("route"), request->path};
    host->log(self_handle, exchange, GH_LOG_INFO, text("hello from variant"), &field, 1);
    host->respond(exchange, 200, NULL, 0, text("hello"));
}

static void variant_shutdown(void *state) {
    (void)state;
#ifdef SLOW_SHUTDOWN
    sleep(SLOW_SHUTDOWN);
#endif
}

static const gh_plugin_descriptor descriptor = {
    .struct_size = sizeof(gh_plugin_descriptor),
    .abi_major = DESCRIPTOR_MAJOR,
    .abi_minor = GATEHOUSE_ABI_MINOR,
    .name = PLUGIN_NAME,
    .version = "1.0.0",
    .swift_toolchain = NULL,
    .init = variant_init,
    .handle = variant_handle,
    .shutdown = variant_shutdown,
};

#ifdef ENTRY_V2
__attribute__((visibility("default"))) const gh_plugin_descriptor *gatehouse_plugin_entry_v2(void) { return &descriptor; }
#else
const gh_plugin_descriptor *GATEHOUSE_PLUGIN_ENTRY(void) { return &descriptor; }
#endif
