/*
 * gatehouse_plugin.h — the whole Gatehouse plugin ABI: one C header, no dependencies.
 *
 * A plugin is a shared library exporting exactly one symbol, GATEHOUSE_PLUGIN_ENTRY
 * (`gatehouse_plugin_entry_v1`), which returns a pointer to a static plugin descriptor.
 * The major ABI version is part of the symbol name: a library built for another major
 * simply has no symbol the host looks for. Minor versions grow structs compatibly: every
 * struct starts with `struct_size`, and a field may only be read if it lies within the
 * size the other side reported (GH_HAS_FIELD).
 *
 * Ownership
 *   - Everything the host passes in (gh_bytes, gh_header arrays, gh_request) is BORROWED:
 *     valid only until the function it was passed to returns. Copy what you keep.
 *   - Everything the plugin passes to the host (response bodies, headers, log text) is
 *     COPIED by the host before the host function returns; the plugin may free it then.
 *   - The descriptor returned by the entry function and the strings it points to must stay
 *     valid for as long as the library is loaded (use static storage).
 *
 * Threading
 *   - `handle` may be called concurrently from several threads, for different requests.
 *   - A request is answered by completing its gh_exchange exactly once: either
 *     `respond` (whole body at once) or `respond_start` + any number of `respond_write` +
 *     `respond_finish`. Completion may happen inside `handle` or later, from any thread.
 *     After completion the exchange pointer is invalid and must not be used.
 *   - Host functions are thread-safe and never call back into the plugin synchronously.
 *   - `init` and `shutdown` are called once each, never concurrently with each other;
 *     `shutdown` is called only after every exchange of this plugin has completed.
 *
 * Lifetime
 *   - Libraries are never unloaded: the host opens every library with RTLD_NODELETE (a Swift
 *     library must never be unmapped; the Swift runtime keeps pointers into it).
 *
 * Versions
 *   1.0  log, config, responding (streamed or whole)
 *   1.1  LLM calls, middleware, custom metrics (fields appended to gh_host_api)
 *   1.2  respond_abort: end a streamed answer as failed; a failed LLM call's error body
 *
 * See docs/PLUGINS.md for the guide and examples.
 */
#ifndef GATEHOUSE_PLUGIN_H
#define GATEHOUSE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** ABI major version: part of the entry symbol's name; bumped only for incompatible changes. */
#define GATEHOUSE_ABI_MAJOR 1
/** ABI minor version: bumped when fields are appended to a struct. */
#define GATEHOUSE_ABI_MINOR 2

/** The one symbol a plugin exports. Its type is gh_plugin_entry_fn. */
#define GATEHOUSE_PLUGIN_ENTRY gatehouse_plugin_entry_v1
#define GATEHOUSE_PLUGIN_ENTRY_NAME "gatehouse_plugin_entry_v1"

/** True when a struct whose first field `struct_size` says `size` bytes contains `field`. */
#define GH_HAS_FIELD(ptr, type, field) \
    ((ptr)->struct_size >= offsetof(type, field) + sizeof(((type *)0)->field))

/** Result codes of host functions and of init. 0 is success. */
typedef enum gh_status {
    GH_OK = 0,
    GH_ERR_INVALID_ARGUMENT = 1, /* a NULL or malformed argument */
    GH_ERR_STATE = 2,            /* e.g. writing to an exchange that is already complete */
    GH_ERR_UNSUPPORTED = 3,      /* the host does not offer this service */
    GH_ERR_INTERNAL = 4          /* anything else; the host logs the reason */
} gh_status;

/** Log levels for gh_host_api.log, in increasing severity. */
typedef enum gh_log_level {
    GH_LOG_TRACE = 0,
    GH_LOG_DEBUG = 1,
    GH_LOG_INFO = 2,
    GH_LOG_WARNING = 3,
    GH_LOG_ERROR = 4
} gh_log_level;

/** A view of bytes that someone else owns. Not NUL-terminated. `data` may be NULL if `len` is 0. */
typedef struct gh_bytes {
    const uint8_t *data;
    size_t len;
} gh_bytes;

/** One header (or one structured log field): name and value as byte views. */
typedef struct gh_header {
    gh_bytes name;
    gh_bytes value;
} gh_header;

/** Opaque: the host's handle for one loaded plugin instance. Passed to every host call. */
typedef struct gh_plugin gh_plugin;

/** Opaque: one in-flight request/response exchange. Valid until the plugin completes it. */
typedef struct gh_exchange gh_exchange;

/**
 * An HTTP request routed to a plugin. Borrowed: valid only during `handle`.
 * `path` is the part after `/v1/plugins/<name>`, always starting with '/', without the query.
 */
typedef struct gh_request {
    uint32_t struct_size;
    gh_bytes method;     /* "GET", "POST", ... */
    gh_bytes path;       /* e.g. "/echo" */
    gh_bytes query;      /* without the leading '?'; empty if none */
    const gh_header *headers;
    size_t header_count; /* header names are lower-case */
    gh_bytes body;       /* the whole request body (the host enforces its size limit) */
    gh_bytes request_id; /* the gateway's request id (X-Request-ID) */
} gh_request;

/* ------------------------------------------------------------------------------------------
 * ABI 1.1 types: LLM calls, middleware, metrics
 * ------------------------------------------------------------------------------------------ */

/**
 * Completion of an LLM call. Fires exactly once per accepted call, on any thread (possibly
 * before llm_chat returns). On success `status` is GH_OK, `http_status` 200 and `response_json`
 * an OpenAI `chat.completion` object (for a streamed call: assembled from the chunks, with the
 * whole content, finish_reason and usage). On failure `error` is a one-line reason and
 * `http_status` the status the gateway would have answered a client with (400, 502, 504, ...);
 * for a plugin built against ABI 1.2 or later (its descriptor's abi_minor), on a 1.2 host,
 * `response_json` is then that answer's OpenAI-style error body,
 * {"error":{"message","type","code","param","request_id"}}; otherwise it is empty.
 * Both views are borrowed for the duration of the callback.
 */
typedef void (*gh_llm_done_fn)(void *context, gh_status status, uint16_t http_status, gh_bytes response_json,
                               gh_bytes error);

/**
 * One streamed chunk: an OpenAI `chat.completion.chunk` object and, for convenience, the text
 * it adds (empty for chunks without content). Borrowed. Called in order, never concurrently for
 * one call, and always before the call's gh_llm_done_fn.
 */
typedef void (*gh_llm_chunk_fn)(void *context, gh_bytes chunk_json, gh_bytes delta_text);

/** Which requests a middleware sees. */
typedef enum gh_middleware_scope {
    GH_SCOPE_ALL = 0,        /* every route, including /v1/chat/completions (health checks excepted) */
    GH_SCOPE_OWN_ROUTES = 1, /* only /v1/plugins/<this plugin>/... */
    GH_SCOPE_PREFIX = 2      /* paths starting with gh_middleware_spec.path_prefix */
} gh_middleware_scope;

/** Opaque: one middleware invocation. Valid only during the middleware function. */
typedef struct gh_mw_call gh_mw_call;

/**
 * A request (request phase) or a response (response phase) as a middleware sees it.
 * Borrowed: valid only during the middleware function.
 */
typedef struct gh_mw_message {
    uint32_t struct_size;
    gh_bytes method;          /* of the request, in both phases */
    gh_bytes path;            /* full request path, e.g. "/v1/chat/completions" */
    gh_bytes query;
    const gh_header *headers; /* request headers (request phase) or response headers (response phase) */
    size_t header_count;      /* header names are lower-case */
    gh_bytes body;            /* request body, or response body (empty when body_is_stream) */
    gh_bytes request_id;
    uint16_t status;          /* response phase: the status code; 0 in the request phase */
    uint8_t body_is_stream;   /* response phase: the body is streamed; it cannot be read or replaced */
} gh_mw_message;

/**
 * A middleware function. It runs inline on the request path: it must not block. It changes the
 * request or response only through the gh_host_api mw_* functions on `call`.
 */
typedef void (*gh_middleware_fn)(void *context, const gh_mw_message *message, gh_mw_call *call);

/** What middleware_register installs. Copied by the host (strings too). */
typedef struct gh_middleware_spec {
    uint32_t struct_size;
    const char *name;             /* for the host's log lines, e.g. "require-header" */
    int32_t priority;             /* lower runs first on requests; response functions run in reverse */
    gh_middleware_scope scope;
    const char *path_prefix;      /* GH_SCOPE_PREFIX only, e.g. "/v1/chat/" */
    gh_middleware_fn on_request;  /* may be NULL */
    gh_middleware_fn on_response; /* may be NULL */
    void *context;                /* passed back to both functions */
} gh_middleware_spec;

/** Kinds of custom metric a plugin may declare. */
typedef enum gh_metric_kind {
    GH_METRIC_COUNTER = 0, /* only goes up: metric_add with values >= 0 */
    GH_METRIC_GAUGE = 1    /* goes up and down: metric_add and metric_set */
} gh_metric_kind;

/** Opaque: a declared custom metric. Valid until the plugin's shutdown returns. */
typedef struct gh_metric gh_metric;

/**
 * Services the host offers to a plugin. Passed to `init`; the pointer stays valid until
 * after `shutdown` returns. Later minor versions append fields: check GH_HAS_FIELD first.
 */
typedef struct gh_host_api {
    uint32_t struct_size;
    uint32_t abi_major;
    uint32_t abi_minor;

    /**
     * Write a log line tagged with the plugin's name. `exchange` may be NULL; when it is
     * not, the line also carries that request's id. `fields` are structured key/values.
     */
    void (*log)(gh_plugin *self, gh_exchange *exchange, gh_log_level level, gh_bytes message,
                const gh_header *fields, size_t field_count);

    /**
     * The plugin's effective configuration as a JSON object (UTF-8): manifest defaults,
     * overridden by `plugins.<name>.config` in gatehouse.yaml, overridden by environment
     * variables GATEHOUSE_PLUGIN_<NAME>_<KEY>. Valid until shutdown returns.
     */
    gh_bytes (*config_json)(gh_plugin *self);

    /** Answer the exchange in one go and complete it. Headers and body are copied. */
    gh_status (*respond)(gh_exchange *exchange, uint16_t status, const gh_header *headers,
                         size_t header_count, gh_bytes body);

    /** Start a streamed answer: status and headers now, body via respond_write. */
    gh_status (*respond_start)(gh_exchange *exchange, uint16_t status, const gh_header *headers,
                               size_t header_count);

    /**
     * Append a body chunk to a started answer. The bytes are copied. Called on a thread the
     * plugin made, it waits while more than 16 MiB wait for the client (back-pressure); on a host
     * thread, or once the client has taken nothing for the plugin's timeout, the client is cut
     * off instead. GH_ERR_STATE when the client is gone or cut off: stop writing and finish.
     */
    gh_status (*respond_write)(gh_exchange *exchange, gh_bytes chunk);

    /** End a started answer and complete the exchange. */
    gh_status (*respond_finish)(gh_exchange *exchange);

    /* ---- ABI 1.1 (check GH_HAS_FIELD(host, gh_host_api, llm_chat) before use) ---- */

    /**
     * Ask the LLM, through the same pipeline as /v1/chat/completions (backend, cache, timeouts,
     * metrics attributed to this plugin). `request_json` is an OpenAI chat-completion request
     * (copied). `exchange` may be NULL; when given, the call carries that request's id upstream.
     * With `on_chunk` NULL the call is not streamed (and may be answered from the cache);
     * otherwise chunks arrive through `on_chunk`. Returns GH_OK when the call was accepted, and
     * then `on_done` fires exactly once (invalid JSON is reported there, with http_status 400);
     * returns GH_ERR_INVALID_ARGUMENT (and never calls back) when `self` or `on_done` is NULL or
     * `request_json` has NULL data with a non-zero length. A pending call keeps the plugin version alive: its shutdown
     * waits for `on_done`.
     */
    gh_status (*llm_chat)(gh_plugin *self, gh_exchange *exchange, gh_bytes request_json, gh_llm_chunk_fn on_chunk,
                          gh_llm_done_fn on_done, void *context);

    /**
     * Install a middleware (the spec is copied). Middleware are removed with the plugin version
     * that registered them. Call during init or later.
     */
    gh_status (*middleware_register)(gh_plugin *self, const gh_middleware_spec *spec);

    /** Middleware: set header `name` to `value`, replacing any existing values. */
    gh_status (*mw_set_header)(gh_mw_call *call, gh_bytes name, gh_bytes value);
    /** Middleware: remove every value of header `name`. */
    gh_status (*mw_remove_header)(gh_mw_call *call, gh_bytes name);
    /** Middleware: replace the body (GH_ERR_STATE for a streamed response body). Any
     *  content-length header is dropped; the server frames the new body. */
    gh_status (*mw_set_body)(gh_mw_call *call, gh_bytes body);
    /** Response phase: replace the status code (200-599; a 204 or 304 drops the body). */
    gh_status (*mw_set_status)(gh_mw_call *call, uint16_t status);
    /**
     * Request phase: answer now (e.g. 401, 403, 429); the route and later middleware are
     * skipped. Headers and body are copied.
     */
    gh_status (*mw_respond)(gh_mw_call *call, uint16_t status, const gh_header *headers, size_t header_count,
                            gh_bytes body);

    /**
     * Declare a custom metric, exported on /metrics as gatehouse_plugin_custom_<name> with a
     * label plugin="<plugin name>". `name` must match [a-z_][a-z0-9_]*; counters should end in
     * "_total". Declaring the same name and kind twice returns the same metric (a counter's
     * "x" and "x_total" are one). NULL (the host logs why) on an invalid name, one that breaks
     * Prometheus' naming conventions as `promtool check metrics` checks them (a gauge named
     * "..._total", "..._count", "..._sum" or "..._bucket"; a metric type, an abbreviated unit such as
     * "ms", or a non-base unit such as "milliseconds" as a word of the name), or a name this
     * plugin declared with the other kind. Plugins sharing a name share its help text: the
     * first declaration's.
     */
    gh_metric *(*metric_declare)(gh_plugin *self, gh_metric_kind kind, gh_bytes name, gh_bytes help);
    /** Add `value` to a counter (value >= 0) or gauge. */
    gh_status (*metric_add)(gh_metric *metric, double value);
    /** Set a gauge to `value` (GH_ERR_STATE for counters and for a non-finite value). */
    gh_status (*metric_set)(gh_metric *metric, double value);

    /* ---- ABI 1.2 (check GH_HAS_FIELD(host, gh_host_api, respond_abort) before use) ---- */

    /**
     * End a started answer as failed, and complete the exchange: the connection is closed
     * without the body's proper end, so the client can tell the answer is cut short, where
     * respond_finish would present what was sent as whole (send an event-stream client its
     * error event first). `reason` (copied) is logged. GH_ERR_STATE before respond_start
     * (answer with an error status through respond instead) or once the exchange is complete.
     */
    gh_status (*respond_abort)(gh_exchange *exchange, gh_bytes reason);
} gh_host_api;

/**
 * Called once after loading. Store `host` and `self` for later calls; put your per-instance
 * state into *state_out (it is passed back to handle and shutdown). On failure return
 * non-zero and write a one-line reason into `error` (at most `error_capacity` bytes,
 * NUL-terminated); the host then refuses this version (state "failed", with that reason), and
 * any middleware it registered is removed.
 */
typedef int (*gh_init_fn)(const gh_host_api *host, gh_plugin *self, void **state_out,
                          char *error, size_t error_capacity);

/** Handle one request; complete `exchange` exactly once (now or later, any thread). */
typedef void (*gh_handle_fn)(void *state, const gh_request *request, gh_exchange *exchange);

/** Release the instance. Called once, after every exchange has completed. */
typedef void (*gh_shutdown_fn)(void *state);

/** What a plugin is. Returned by the entry function; must have static storage. */
typedef struct gh_plugin_descriptor {
    uint32_t struct_size;
    uint32_t abi_major;      /* GATEHOUSE_ABI_MAJOR the plugin was built against */
    uint32_t abi_minor;      /* GATEHOUSE_ABI_MINOR the plugin was built against */
    const char *name;        /* must equal the manifest's name */
    const char *version;     /* must equal the manifest's version */
    /**
     * For Swift plugins: the Swift toolchain the library was compiled with, e.g.
     * "swift-6.3.1". Swift has no stable ABI on Linux, so the host refuses a mismatch.
     * NULL for plugins written in C.
     */
    const char *swift_toolchain;
    gh_init_fn init;
    gh_handle_fn handle;
    gh_shutdown_fn shutdown;
} gh_plugin_descriptor;

/** The type of the exported entry symbol. */
typedef const gh_plugin_descriptor *(*gh_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* GATEHOUSE_PLUGIN_H */
