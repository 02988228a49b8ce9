/*
 * services-c: a C test plugin exercising every ABI 1.1 host service.
 * Routes under /v1/plugins/services-c:
 *   POST /ask         LLM call, not streamed; answers with the gateway's chat.completion JSON
 *   POST /ask-stream  LLM call, streamed; answers with the text chunks as they arrive
 *   GET  /rewrite     answers "original"; its response middleware rewrites that answer
 *   GET  /config      the effective config JSON
 *   GET  /ping        counts pings in a custom counter, logs with structured fields
 * -DFAIL_AFTER_MIDDLEWARE: init registers its middleware, then fails (the host must drop it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gatehouse_plugin.h"

static const gh_host_api *host;
static gh_plugin *self_handle;
static gh_metric *pings;

static gh_bytes text(const char *s) {
    gh_bytes b = {(const uint8_t *)s, strlen(s)};
    return b;
}

static int is(gh_bytes b, const char *s) { return b.len == strlen(s) && memcmp(b.data, s, b.len) == 0; }

/* A call kept past its function's return (API misuse, tried by /stale-call). */
static gh_mw_call *kept_call;

/* Rewrites the answer of /rewrite: new status, a header, and the old body wrapped. */
static void rewrite_response(void *context, const gh_mw_message *message, gh_mw_call *call) {
    (void)context;
    kept_call = call;
    char body[256];
    int n = snprintf(body, sizeof body, "rewritten(%d):%.*s", (int)message->status, (int)message->body.len,
                     (const char *)message->body.data);
    gh_bytes replaced = {(const uint8_t *)body, (size_t)n};
    host->mw_set_body(call, replaced);
    host->mw_set_status(call, 201);
    host->mw_set_header(call, text("x-rewritten-by"), text("services-c"));
    /* Framing is the server's: dropped, or the client would read 3 of the body's bytes. */
    host->mw_set_header(call, text("content-length"), text("3"));
    /* No exchange in a middleware call; and a field that would mislabel the line. */
    gh_header fields[1] = {{text("plugin"), text("impostor")}};
    host->log(self_handle, NULL, GH_LOG_INFO, text("rewriting"), fields, 1);
}

/* Looks at the answers of /v1/models and changes nothing: their framing must stay as it was.
   Reports whether it was shown a content-length header (framing is hidden from middleware). */
static void observe_response(void *context, const gh_mw_message *message, gh_mw_call *call) {
    (void)context;
    (void)call;
    int saw_length = 0;
    for (size_t i = 0; i < message->header_count; i++) {
        if (is(message->headers[i].name, "content-length")) saw_length = 1;
    }
    host->log(self_handle, NULL, GH_LOG_INFO, saw_length ? text("observed, with content-length") : text("observed"), NULL, 0);
}

static int services_init(const gh_host_api *api, gh_plugin *self, void **state_out, char *error, size_t cap) {
    host = api;
    self_handle = self;
    *state_out = NULL;
    if (!GH_HAS_FIELD(api, gh_host_api, metric_set)) {
        snprintf(error, cap, "host ABI %u.%u lacks the 1.1 services", api->abi_major, api->abi_minor);
        return 1;
    }
    gh_middleware_spec spec = {
        .struct_size = sizeof spec,
        .name = "rewrite",
        .priority = 5,
        .scope = GH_SCOPE_PREFIX,
        .path_prefix = "/v1/plugins/services-c/rewrite",
        .on_request = NULL,
        .on_response = rewrite_response,
        .context = NULL,
    };
    if (host->middleware_register(self, &spec) != GH_OK) {
        snprintf(error, cap, "middleware refused");
        return 1;
    }
    gh_middleware_spec observe = spec;
    observe.name = "observe";
    observe.path_prefix = "/v1/models";
    observe.on_response = observe_response;
    if (host->middleware_register(self, &observe) != GH_OK) {
        snprintf(error, cap, "middleware refused");
        return 1;
    }
    pings = host->metric_declare(self, GH_METRIC_COUNTER, text("pings"), text("Pings answered by services-c."));  /* exported with _total */
    /* The same exported counter under its full name: the same metric, not a second handle on one series. */
    if (pings && host->metric_declare(self, GH_METRIC_COUNTER, text("pings_total"), text("")) != pings) {
        snprintf(error, cap, "pings_total is not the same metric as pings");
        return 1;
    }
    /* Names promtool would fail /metrics for are refused (NULL, and a line naming why); a
       name that keeps the conventions is not. */
    static const struct { gh_metric_kind kind; const char *name; } refused[] = {
        {GH_METRIC_GAUGE, "queue_count"}, {GH_METRIC_GAUGE, "lag_sum"}, {GH_METRIC_GAUGE, "queue_gauge"},
        {GH_METRIC_COUNTER, "jobs_counter"}, {GH_METRIC_GAUGE, "latency_ms"}, {GH_METRIC_COUNTER, "wait_milliseconds"},
        {GH_METRIC_GAUGE, "depth_total"}, {GH_METRIC_GAUGE, "Bad-Name"}, {GH_METRIC_GAUGE, "wait_histogram"},
        {(gh_metric_kind)7, "odd_kind"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        if (host->metric_declare(self, refused[i].kind, text(refused[i].name), text("h")) != NULL) {
            snprintf(error, cap, "metric %s was not refused", refused[i].name);
            return 1;
        }
    }
    gh_metric *depth = host->metric_declare(self, GH_METRIC_GAUGE, text("queue_depth"), text("Jobs waiting, as services-c counts them."));
    if (!depth || host->metric_set(depth, 1.0 / 0.0) != GH_ERR_STATE || host->metric_set(pings, 1) != GH_ERR_STATE ||
        host->metric_set(depth, 3) != GH_OK) {
        snprintf(error, cap, "gauge queue_depth was refused");
        return 1;
    }
#ifdef FAIL_AFTER_MIDDLEWARE
    snprintf(error, cap, "failing after registering middleware");
    return 1;
#endif
    return pings ? 0 : 1;
}

static void answer_json(gh_exchange *exchange, uint16_t status, gh_bytes body) {
    gh_header header = {text("content-type"), text("application/json")};
    host->respond(exchange, status, &header, 1, body);
}

static void on_done_whole(void *context, gh_status status, uint16_t http_status, gh_bytes json, gh_bytes error) {
    gh_exchange *exchange = context;
    if (status == GH_OK) {
        answer_json(exchange, 200, json);
    } else if (json.len > 0) {
        answer_json(exchange, http_status, json); /* ABI 1.2: the error as a client would get it */
    } else {
        gh_header header = {text("content-type"), text("text/plain")};
        host->respond(exchange, http_status, &header, 1, error);
    }
}

static void on_chunk(void *context, gh_bytes chunk_json, gh_bytes delta) {
    (void)chunk_json;
    if (delta.len > 0) host->respond_write((gh_exchange *)context, delta);
}

static void on_done_stream(void *context, gh_status status, uint16_t http_status, gh_bytes json, gh_bytes error) {
    (void)json;
    (void)http_status;
    gh_exchange *exchange = context;
    if (status != GH_OK) {
        host->respond_write(exchange, error);
        /* ABI 1.2: end the answer as failed, so the client can tell it is cut short. */
        if (GH_HAS_FIELD(host, gh_host_api, respond_abort)) {
            host->respond_abort(exchange, error);
            return;
        }
    }
    host->respond_finish(exchange);
}

/* Builds {"model":..., "messages":[{"role":"user","content":"<body>"}]}; the body is escaped. */
static char *chat_request(const char *model, gh_bytes question) {
    size_t cap = question.len * 6 + strlen(model) + 128;
    char *out = malloc(cap), *p = out;
    p += sprintf(p, "{\"model\":\"%s\",\"messages\":[{\"role\":\"user\",\"content\":\"", model);
    for (size_t i = 0; i < question.len; i++) {
        unsigned char c = question.data[i];
        if (c == '"' || c == '\\') p += sprintf(p, "\\%c", c);
        else if (c < 0x20) p += sprintf(p, "\\u%04x", c);
        else *p++ = (char)c;
    }
    sprintf(p, "\"}]}");
    return out;
}

static void services_handle(void *state, const gh_request *request, gh_exchange *exchange) {
    (void)state;
    if (is(request->path, "/ask") || is(request->path, "/ask-stream")) {
        int streamed = is(request->path, "/ask-stream");
        /* ?crash, ?missing: the stand-in upstream's models that fail midway, or do not exist. */
        char *json = chat_request(is(request->query, "crash") ? "crash" : is(request->query, "missing") ? "missing" : "llama3.2:1b", request->body);
        if (streamed) {
            gh_header header = {text("content-type"), text("text/plain")};
            host->respond_start(exchange, 200, &header, 1);
        }
        host->llm_chat(self_handle, exchange, text(json), streamed ? on_chunk : NULL,
                       streamed ? on_done_stream : on_done_whole, exchange);
        free(json);
        return;
    }
    if (is(request->path, "/abort-early")) {
        char line[48];
        snprintf(line, sizeof line, "abort before start returned %d", (int)host->respond_abort(exchange, text("too early")));
        host->respond(exchange, 200, NULL, 0, text(line));
        return;
    }
    if (is(request->path, "/stale-call")) {
        int returned = kept_call ? (int)host->mw_set_header(kept_call, text("x-late"), text("1")) : -1;
        char line[48];
        snprintf(line, sizeof line, "stale call returned %d", returned);
        host->respond(exchange, 200, NULL, 0, text(line));
        return;
    }
    if (is(request->path, "/rewrite")) {
        host->respond(exchange, 200, NULL, 0, text("original"));
        return;
    }
    if (is(request->path, "/config")) {
        answer_json(exchange, 200, host->config_json(self_handle));
        return;
    }
    if (is(request->path, "/ping")) {
        host->metric_add(pings, 1);
        gh_header fields[2] = {{text("kind"), text("ping")}, {text("language"), text("c")}};
        host->log(self_handle, exchange, GH_LOG_INFO, text("pinged"), fields, 2);
        host->respond(exchange, 200, NULL, 0, text("pong"));
        return;
    }
    host->respond(exchange, 404, NULL, 0, text("no such route"));
}

static void services_shutdown(void *state) { (void)state; }

static const gh_plugin_descriptor descriptor = {
    .struct_size = sizeof(gh_plugin_descriptor),
    .abi_major = GATEHOUSE_ABI_MAJOR,
#ifdef DESCRIPTOR_MINOR /* built as if against an older minor (what it is promised then) */
    .abi_minor = DESCRIPTOR_MINOR,
#else
    .abi_minor = GATEHOUSE_ABI_MINOR,
#endif
    .name = "services-c",
    .version = "1.0.0",
    .swift_toolchain = NULL,
    .init = services_init,
    .handle = services_handle,
    .shutdown = services_shutdown,
};

const gh_plugin_descriptor *GATEHOUSE_PLUGIN_ENTRY(void) { return &descriptor; }
