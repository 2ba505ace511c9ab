/*
 * hello-c: a CDP/1 reference driver in C (libzmq + jansson), for `corral.conformance`.
 *
 * It serves capability "cron" with three operations: state.sync (it holds no state, so there is
 * nothing to re-apply or collect), query.cron.hello, and manifest.check for the manifest section
 * it owns, declared in HELLO `sections`:
 *
 *     [hello]
 *     greeting = "hi"      # a non-empty string of at most 200 bytes; default "hello"
 *
 * It shows what every driver must do:
 * HELLO with the one-time CORRAL_DRIVER_TOKEN, heartbeat at the interval WELCOME names, treat
 * three silent intervals as a lost kernel and HELLO again on a fresh socket, answer undeclared
 * operations with ERROR 404 and bad arguments with ERROR 422, drop any malformed message
 * without dying, exit on BYE, say BYE and exit on SIGTERM.
 *
 * Build: make (needs libzmq3-dev, libjansson-dev, pkg-config, a C compiler).
 * Run under a kernel: host.toml [drivers.hello] exec = ["/path/hello-driver"], capability = "cron"
 * Check it:           python -m corral.conformance -- ./hello-driver
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define SIGNATURE "CDP1"
#define MAX_BODY (1 << 20) /* a larger body is refused (413) before it is parsed */
#define DRIVER_NAME "hello-c"
#define DRIVER_VERSION "0.1.0"
#define CAPABILITY "cron"
#define QUERY_HELLO "query.cron.hello"
#define SECTION "hello" /* the manifest section this driver owns */
#define DEFAULT_GREETING "hello"
#define WELCOME_TIMEOUT_MS 2000

enum { CODE_BAD_FRAME = 400, CODE_UNKNOWN_OPERATION = 404, CODE_TOO_LARGE = 413,
       CODE_INVALID = 422, CODE_UNAVAILABLE = 503, CODE_TIMEOUT = 504 };
enum served { KERNEL_LOST, STOP };

static volatile sig_atomic_t stopping = 0;
static void on_stop(int sig) { (void)sig; stopping = 1; }

static const char *const COMMANDS[] = {"HELLO", "WELCOME", "REQUEST", "REPLY", "ERROR",
                                       "EVENT", "HEARTBEAT", "BYE", NULL};

static double monotonic_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double wall_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Send [CDP1, command, compact JSON body]; takes ownership of body. -1 if it could not. */
static int send_body(void *sock, const char *command, json_t *body) {
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (text == NULL)
        return -1;
    int rc = -1;
    if (zmq_send(sock, SIGNATURE, 4, ZMQ_SNDMORE) == 4 &&
        zmq_send(sock, command, strlen(command), ZMQ_SNDMORE) >= 0 &&
        zmq_send(sock, text, strlen(text), 0) >= 0)
        rc = 0;
    free(text);
    return rc;
}

static void send_error(void *sock, json_int_t id, int code, const char *reason) {
    json_t *body = json_pack("{s:o, s:i, s:s, s:b, s:{}}", "id",
                             id < 0 ? json_null() : json_integer(id), "code", code,
                             "reason", reason, "retry", 0, "details");
    send_body(sock, "ERROR", body);
}

/* One received message: the first three frames are kept, the count is exact. */
typedef struct {
    int count;
    zmq_msg_t frames[3];
} message_t;

static int recv_message(void *sock, message_t *m) {
    m->count = 0;
    int more = 1;
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, 0) < 0) {
            zmq_msg_close(&part);
            for (int i = 0; i < m->count && i < 3; i++)
                zmq_msg_close(&m->frames[i]);
            return -1;
        }
        more = zmq_msg_more(&part);
        if (m->count < 3)
            m->frames[m->count] = part; /* moved: closed by message_close */
        else
            zmq_msg_close(&part);
        m->count++;
    }
    return 0;
}

static void message_close(message_t *m) {
    for (int i = 0; i < m->count && i < 3; i++)
        zmq_msg_close(&m->frames[i]);
}

/*
 * Strict decoding, cheapest check first (as corral.protocol.decode): frame count, signature,
 * command, size, UTF-8 JSON object (jansson rejects invalid UTF-8, duplicate keys with the
 * flag, NaN, nesting deeper than 2048 and integers that do not fit 64 bits). 0, or a code.
 */
static int decode(message_t *m, char command[16], json_t **body, const char **why) {
    *body = NULL;
    if (m->count != 3) { *why = "expected 3 frames"; return CODE_BAD_FRAME; }
    if (zmq_msg_size(&m->frames[0]) != 4 || memcmp(zmq_msg_data(&m->frames[0]), SIGNATURE, 4)) {
        *why = "bad signature"; return CODE_BAD_FRAME;
    }
    size_t len = zmq_msg_size(&m->frames[1]);
    if (len == 0 || len > 15) { *why = "unknown command"; return CODE_BAD_FRAME; }
    memcpy(command, zmq_msg_data(&m->frames[1]), len);
    command[len] = '\0';
    int known = 0;
    for (int i = 0; COMMANDS[i] != NULL; i++)
        known |= strcmp(command, COMMANDS[i]) == 0;
    if (!known) { *why = "unknown command"; return CODE_BAD_FRAME; }
    if (zmq_msg_size(&m->frames[2]) > MAX_BODY) { *why = "body too large"; return CODE_TOO_LARGE; }
    json_error_t err;
    json_t *data = json_loadb(zmq_msg_data(&m->frames[2]), zmq_msg_size(&m->frames[2]),
                              JSON_REJECT_DUPLICATES, &err);
    if (data == NULL) { *why = "body is not UTF-8 JSON"; return CODE_INVALID; }
    if (!json_is_object(data)) {
        json_decref(data);
        *why = "body must be a JSON object";
        return CODE_INVALID;
    }
    *body = data;
    return 0;
}

/* Whether every key of ``obj`` is one of ``allowed`` (bodies refuse unknown fields). */
static int only_keys(json_t *obj, const char *const *allowed) {
    const char *key;
    json_t *value;
    json_object_foreach(obj, key, value) {
        int ok = 0;
        for (int i = 0; allowed[i] != NULL; i++)
            ok |= strcmp(key, allowed[i]) == 0;
        if (!ok)
            return 0;
    }
    return 1;
}

/* A REQUEST body as CDP/1 defines it: {id >= 0, op, args?: object, deadline_ms?: int > 0}. */
static int valid_request(json_t *body, json_int_t *id, const char **op, json_t **args) {
    static const char *const keys[] = {"id", "op", "args", "deadline_ms", NULL};
    json_t *jid = json_object_get(body, "id"), *jop = json_object_get(body, "op");
    json_t *deadline = json_object_get(body, "deadline_ms");
    *args = json_object_get(body, "args");
    if (!only_keys(body, keys) || !json_is_integer(jid) || json_integer_value(jid) < 0 ||
        !json_is_string(jop) || json_string_length(jop) < 1 || json_string_length(jop) > 128)
        return 0;
    if (*args != NULL && !json_is_object(*args))
        return 0;
    if (deadline != NULL && !json_is_null(deadline) &&
        !(json_is_integer(deadline) && json_integer_value(deadline) > 0))
        return 0;
    *id = json_integer_value(jid);
    *op = json_string_value(jop);
    return 1;
}

/* Append {path: [section, field?], message} to problems. */
static void problem(json_t *problems, const char *section, const char *field, const char *message) {
    json_t *path = json_pack("[s]", section);
    if (field != NULL)
        json_array_append_new(path, json_string(field));
    json_array_append_new(problems, json_pack("{s:o, s:s}", "path", path, "message", message));
}

/* manifest.check: validate [hello] (the one section this driver owns); answer ManifestChecked:
   the section normalized (the default greeting filled in) or its problems, located by path. */
static void check_manifest(void *sock, json_int_t id, json_t *args) {
    json_t *sections = args ? json_object_get(args, "sections") : NULL;
    json_t *app = args ? json_object_get(args, "app") : NULL;
    json_t *directory = args ? json_object_get(args, "directory") : NULL;
    if (!json_is_object(sections) || !json_is_string(app) || !json_is_string(directory)) {
        send_error(sock, id, CODE_INVALID,
                   "manifest.check: args must be {app: str, directory: str, sections: {...}}");
        return;
    }
    json_t *normalized = json_object(), *problems = json_array();
    const char *name;
    json_t *value;
    json_object_foreach(sections, name, value) {
        char message[300];
        if (strcmp(name, SECTION) != 0) {
            snprintf(message, sizeof message,
                     "section [%.100s] is not one this driver owns (" SECTION ")", name);
            problem(problems, name, NULL, message);
            continue;
        }
        if (!json_is_object(value)) {
            problem(problems, SECTION, NULL, "expected a table");
            continue;
        }
        int bad = 0;
        const char *key;
        json_t *field;
        json_object_foreach(value, key, field) {
            if (strcmp(key, "greeting") != 0) {
                problem(problems, SECTION, key, "unknown key (expected one of: greeting)");
                bad = 1;
            }
        }
        json_t *greeting = json_object_get(value, "greeting");
        if (greeting != NULL && (!json_is_string(greeting) || json_string_length(greeting) == 0
                                 || json_string_length(greeting) > 200)) {
            problem(problems, SECTION, "greeting",
                    "expected a non-empty string of at most 200 bytes");
            bad = 1;
        }
        if (!bad)
            json_object_set_new(normalized, SECTION, json_pack(
                "{s:s}", "greeting", greeting ? json_string_value(greeting) : DEFAULT_GREETING));
    }
    send_body(sock, "REPLY",
              json_pack("{s:I, s:{s:o, s:[], s:[], s:[], s:o}}", "id", id, "result", "sections",
                        normalized, "claims", "on_demand", "ports", "problems", problems));
}

static void serve_request(void *sock, json_int_t id, const char *op, json_t *args) {
    if (strcmp(op, "manifest.check") == 0) {
        check_manifest(sock, id, args);
    } else if (strcmp(op, "state.sync") == 0) {
        /* {apps: [AppSpec], instances: [InstanceRecord]}: this driver keeps nothing per app,
           so it only checks the shape; a stateful driver validates each item. */
        static const char *const keys[] = {"apps", "instances", NULL};
        json_t *apps = args ? json_object_get(args, "apps") : NULL;
        json_t *instances = args ? json_object_get(args, "instances") : NULL;
        if (!json_is_array(apps) || !json_is_array(instances) || !only_keys(args, keys)) {
            send_error(sock, id, CODE_INVALID,
                       "state.sync: args must be {apps: [...], instances: [...]}");
            return;
        }
        send_body(sock, "REPLY",
                  json_pack("{s:I, s:{s:I, s:I}}", "id", id, "result", "apps",
                            (json_int_t)json_array_size(apps), "instances",
                            (json_int_t)json_array_size(instances)));
    } else if (strcmp(op, QUERY_HELLO) == 0) {
        json_t *who = args ? json_object_get(args, "name") : NULL;
        char greeting[160];
        snprintf(greeting, sizeof greeting, "hello, %s, from C",
                 json_is_string(who) ? json_string_value(who) : "world");
        send_body(sock, "REPLY",
                  json_pack("{s:I, s:{s:s, s:s}}", "id", id, "result", "greeting", greeting,
                            "driver", DRIVER_NAME));
    } else {
        char reason[200];
        snprintf(reason, sizeof reason, "operation '%.128s' is not served by " DRIVER_NAME, op);
        send_error(sock, id, CODE_UNKNOWN_OPERATION, reason);
    }
}

/* Connect a fresh DEALER, HELLO, wait for WELCOME. NULL: retry later (exits if refused). */
static void *connect_kernel(void *ctx, const char *endpoint, const char *token, int *hb_ms) {
    void *sock = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0, one = 1, send_ms = WELCOME_TIMEOUT_MS;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sock, ZMQ_IMMEDIATE, &one, sizeof one);
    zmq_setsockopt(sock, ZMQ_SNDTIMEO, &send_ms, sizeof send_ms);
    if (zmq_connect(sock, endpoint) != 0) {
        fprintf(stderr, DRIVER_NAME ": cannot connect to %s: %s\n", endpoint, zmq_strerror(errno));
        zmq_close(sock);
        return NULL;
    }
    json_t *hello = json_pack("{s:s, s:s, s:s, s:[s], s:s, s:[s,s,s], s:[s], s:o}", "role",
                              "driver", "name", DRIVER_NAME, "version", DRIVER_VERSION,
                              "protocols", "CDP/1", "capability", CAPABILITY, "ops",
                              QUERY_HELLO, "state.sync", "manifest.check", "sections", SECTION,
                              "token", token ? json_string(token) : json_null());
    if (send_body(sock, "HELLO", hello) != 0) {
        zmq_close(sock);
        return NULL;
    }
    double deadline = monotonic_s() + WELCOME_TIMEOUT_MS / 1000.0;
    while (!stopping) {
        long left = (long)((deadline - monotonic_s()) * 1000);
        zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
        if (left <= 0 || zmq_poll(&item, 1, left) == 0)
            break;
        if (!(item.revents & ZMQ_POLLIN))
            continue; /* EINTR */
        message_t m;
        char command[16];
        json_t *body;
        const char *why;
        if (recv_message(sock, &m) != 0)
            break;
        int code = decode(&m, command, &body, &why);
        message_close(&m);
        if (code != 0)
            continue;
        if (strcmp(command, "WELCOME") == 0) {
            json_t *hb = json_object_get(body, "heartbeat_ms");
            int ok = json_is_integer(hb) && json_integer_value(hb) > 0 &&
                     json_integer_value(hb) < 3600 * 1000;
            if (ok)
                *hb_ms = (int)json_integer_value(hb);
            json_decref(body);
            if (ok)
                return sock;
            break;
        }
        if (strcmp(command, "ERROR") == 0) {
            json_t *jc = json_object_get(body, "code"), *jr = json_object_get(body, "reason");
            json_int_t ecode = json_is_integer(jc) ? json_integer_value(jc) : 0;
            fprintf(stderr, DRIVER_NAME ": kernel refused HELLO: %lld %s\n", (long long)ecode,
                    json_is_string(jr) ? json_string_value(jr) : "");
            json_decref(body);
            if (ecode != CODE_UNAVAILABLE && ecode != CODE_TIMEOUT)
                exit(3); /* refused for good: the supervisor sees the exit and decides */
            break;
        }
        json_decref(body); /* anything else before WELCOME is ignored */
    }
    zmq_close(sock);
    return NULL;
}

/* Serve one welcomed connection until BYE or SIGTERM (STOP) or three silent intervals. */
static enum served serve(void *sock, int hb_ms) {
    double hb = hb_ms / 1000.0, now = monotonic_s();
    double last_heard = now, next_beat = now + hb;
    int send_ms = hb_ms;
    zmq_setsockopt(sock, ZMQ_SNDTIMEO, &send_ms, sizeof send_ms);
    while (!stopping) {
        long wait = (long)((next_beat - now) * 1000);
        zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
        int rc = zmq_poll(&item, 1, wait > 0 ? wait : 0);
        if (rc < 0 && errno != EINTR)
            return KERNEL_LOST;
        now = monotonic_s();
        if (rc > 0 && (item.revents & ZMQ_POLLIN)) {
            message_t m;
            if (recv_message(sock, &m) != 0)
                return KERNEL_LOST;
            last_heard = now; /* any message, even a malformed one, proves the kernel lives */
            char command[16];
            json_t *body;
            const char *why = "";
            int code = decode(&m, command, &body, &why);
            message_close(&m);
            if (code != 0) {
                fprintf(stderr, DRIVER_NAME ": dropped a bad message (%d %s)\n", code, why);
            } else if (strcmp(command, "REQUEST") == 0) {
                json_int_t id;
                const char *op;
                json_t *args;
                if (valid_request(body, &id, &op, &args))
                    serve_request(sock, id, op, args);
                else
                    fprintf(stderr, DRIVER_NAME ": dropped an invalid REQUEST body\n");
            } else if (strcmp(command, "BYE") == 0) {
                json_decref(body);
                return STOP;
            } /* HEARTBEAT: liveness only. HELLO, WELCOME, REPLY, ERROR, EVENT: ignored. */
            json_decref(body);
        }
        if (now >= next_beat) {
            send_body(sock, "HEARTBEAT", json_pack("{s:f}", "time", wall_s()));
            next_beat = (next_beat + hb > now) ? next_beat + hb : now + hb;
        }
        if (now - last_heard > 3 * hb) {
            fprintf(stderr, DRIVER_NAME ": kernel silent for 3 intervals; reconnecting\n");
            return KERNEL_LOST;
        }
    }
    send_body(sock, "BYE", json_pack("{s:s}", "reason", "driver stopping"));
    return STOP;
}

int main(void) {
    const char *endpoint = getenv("CORRAL_BUS");
    const char *token = getenv("CORRAL_DRIVER_TOKEN");
    if (endpoint == NULL || *endpoint == '\0') {
        fprintf(stderr, DRIVER_NAME ": CORRAL_BUS is not set (the kernel starts drivers)\n");
        return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop; /* no SA_RESTART: zmq_poll returns EINTR at once */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    void *ctx = zmq_ctx_new();
    while (!stopping) {
        int hb_ms = 1000;
        void *sock = connect_kernel(ctx, endpoint, token, &hb_ms);
        if (sock == NULL) {
            struct timespec pause = {0, 500 * 1000 * 1000};
            nanosleep(&pause, NULL);
            continue;
        }
        enum served how = serve(sock, hb_ms);
        zmq_close(sock);
        if (how == STOP)
            break;
    }
    zmq_ctx_term(ctx);
    return 0;
}
