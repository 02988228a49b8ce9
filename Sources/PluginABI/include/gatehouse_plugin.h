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
 *   - Swift plugins are never unloaded (the Swift runtime keeps pointers into them);
 *     the host opens them with RTLD_NODELETE. A C plugin may be unloaded after shutdown.
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
#define GATEHOUSE_ABI_MINOR 0

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
     * overridden by `plugins.<name>.config` in gatehouse.yaml. Valid until shutdown returns.
     */
    gh_bytes (*config_json)(gh_plugin *self);

    /** Answer the exchange in one go and complete it. Headers and body are copied. */
    gh_status (*respond)(gh_exchange *exchange, uint16_t status, const gh_header *headers,
                         size_t header_count, gh_bytes body);

    /** Start a streamed answer: status and headers now, body via respond_write. */
    gh_status (*respond_start)(gh_exchange *exchange, uint16_t status, const gh_header *headers,
                               size_t header_count);

    /** Append a body chunk to a started answer. The bytes are copied. */
    gh_status (*respond_write)(gh_exchange *exchange, gh_bytes chunk);

    /** End a started answer and complete the exchange. */
    gh_status (*respond_finish)(gh_exchange *exchange);
} gh_host_api;

/**
 * Called once after loading. Store `host` and `self` for later calls; put your per-instance
 * state into *state_out (it is passed back to handle and shutdown). On failure return
 * non-zero and write a one-line reason into `error` (at most `error_capacity` bytes,
 * NUL-terminated); the host then refuses this version and keeps the previous one.
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
