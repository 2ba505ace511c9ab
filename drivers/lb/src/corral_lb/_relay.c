/* corral_lb._relay: the L4 proxy's byte relay, in C, on a thread of its own.
 *
 * Contract
 *   Relay(idle_timeout=0)
 *                      starts one relay thread with its own epoll set. With idle_timeout > 0
 *                      (seconds), a pair with no bytes either way for that long is closed
 *                      (reported, failed), checked every min(1 s, idle_timeout / 4).
 *   add(a, b, tag)     takes ownership of two connected, non-blocking stream sockets (file
 *                      descriptors) and copies bytes both ways until both directions have
 *                      ended, or one side fails. An end of stream is passed on as
 *                      shutdown(SHUT_WR), so half-closed connections keep working. A peer that
 *                      reads slowly stops reading from the other side (at most one turn's
 *                      reads, 1 MiB, are held per direction), so nothing buffers without bound.
 *   fileno()           an eventfd, readable while finished pairs wait to be collected.
 *   collect()          the finished pairs, each reported once:
 *                      [(tag, bytes a->b, bytes b->a, failed, ended_at)], ended_at on
 *                      CLOCK_MONOTONIC (Python's time.monotonic()).
 *   cut(tag)           closes that pair now (it is reported, failed).
 *   close()            stops the thread and closes every pair still open (not reported).
 *
 * Why C: the relay is the proxy's hot path. In Python every chunk costs an interpreter
 * round trip per event; here a request costs the same system calls HAProxy makes (one read and
 * one write per direction, epoll_wait amortised over the batch). Sockets are registered
 * edge-triggered once and never modified, and the relay thread touches no Python object, so it
 * never takes the GIL. Each turn first reads every ready socket (into one arena), then writes,
 * so that a peer gets the work of a turn in one burst. Accepting, choosing a backend, connecting, retries, on-demand starts and
 * metrics stay in Python (corral_lb.proxy_l4).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE (64 * 1024)      /* the largest single read */
#define ARENA_SIZE (1024 * 1024)  /* bytes read in one turn, before they are written */
#define MIN_READ (16 * 1024)      /* less room left in the arena: the rest waits a turn */
#define MAX_JOBS 4096             /* chunks read in one turn */
#define MAX_EVENTS 256
#define READS_PER_TURN 16 /* then other pairs get their turn (the pair is queued) */

typedef struct pair pair_t;

typedef struct {
    pair_t *pair;
    int d;
    size_t off, len;
} job_t;

typedef struct {
    pair_t *pair;
    int fd;
} side_t;

struct pair {
    side_t side[2];
    /* Direction d carries bytes read from side[d] to side[1 - d]. */
    char *pend[2]; /* bytes of direction d not yet written (NULL: none) */
    size_t pend_off[2], pend_len[2];
    unsigned char readable[2], rdhup[2], writable[2], eof[2], shut[2];
    unsigned char dead, failed, queued, touched;
    unsigned long long bytes[2];
    long long tag;
    double last; /* when bytes last came from either side (for the idle timeout) */
    double ended_at;
    pair_t *prev, *next; /* live pairs (relay thread only) */
    pair_t *link;        /* ready queue, graveyard, then done list */
    pair_t *tlink;       /* pairs touched this turn */
};

typedef enum { CMD_ADD, CMD_CUT, CMD_STOP } cmd_kind;

typedef struct cmd {
    cmd_kind kind;
    pair_t *pair;
    long long tag;
    struct cmd *next;
} cmd_t;

typedef struct {
    PyObject_HEAD
    int epfd;
    int wake_fd;
    int done_fd;
    int started;
    int closed;
    pthread_t thread;
    pthread_mutex_t lock; /* guards cmds and done */
    cmd_t *cmds, *cmds_tail;
    cmd_t *stop_cmd; /* allocated up front: close() cannot fail for want of memory */
    pair_t *done;
    /* relay thread only: */
    pair_t *live;
    pair_t *ready;
    pair_t *graveyard;
    pair_t *touched;
    char *arena;
    size_t arena_used;
    job_t *jobs;
    size_t njobs;
    double idle_timeout; /* seconds; 0: none */
    double now;          /* taken once per turn */
    double last_sweep;
} RelayObject;

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

static void drain_fd(int fd)
{
    uint64_t v;
    ssize_t r;
    do {
        r = read(fd, &v, sizeof v);
    } while (r < 0 && errno == EINTR);
}

/* ---- the relay thread ---------------------------------------------------------------- */

static void finish(RelayObject *r, pair_t *p, int failed)
{
    if (p->dead)
        return;
    p->dead = 1;
    p->failed = (unsigned char)failed;
    p->ended_at = monotonic_now();
    for (int i = 0; i < 2; i++) {
        /* Leave the epoll set explicitly: close() alone does not when a forked child still
         * shares the socket for a moment, and a later event would point at a freed pair. */
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, p->side[i].fd, NULL);
        close(p->side[i].fd);
        p->side[i].fd = -1;
        free(p->pend[i]);
        p->pend[i] = NULL;
    }
    if (p->prev)
        p->prev->next = p->next;
    else
        r->live = p->next;
    if (p->next)
        p->next->prev = p->prev;
    p->prev = p->next = NULL;
    if (!p->queued) { /* a queued pair joins the graveyard when the queue is walked */
        p->link = r->graveyard;
        r->graveyard = p;
    }
}

/* Write the pending bytes of direction d. Returns 1 when none are left, 0 otherwise. */
static int flush_pending(RelayObject *r, pair_t *p, int d)
{
    int out = 1 - d;
    while (p->pend_len[d]) {
        ssize_t w = send(p->side[out].fd, p->pend[d] + p->pend_off[d], p->pend_len[d],
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                p->writable[out] = 0;
                return 0;
            }
            finish(r, p, 1);
            return 0;
        }
        p->pend_off[d] += (size_t)w;
        p->pend_len[d] -= (size_t)w;
        p->last = r->now; /* a slow reader taking what was kept is not idle */
    }
    free(p->pend[d]);
    p->pend[d] = NULL;
    p->pend_off[d] = 0;
    return 1;
}

/* Keep bytes of direction d that the other side cannot take yet (after any already kept). */
static int keep_pending(RelayObject *r, pair_t *p, int d, const char *data, size_t len)
{
    size_t have = p->pend_len[d];
    char *buf = malloc(have + len);
    if (buf == NULL) {
        finish(r, p, 1);
        return 0;
    }
    if (have)
        memcpy(buf, p->pend[d] + p->pend_off[d], have);
    memcpy(buf + have, data, len);
    free(p->pend[d]);
    p->pend[d] = buf;
    p->pend_off[d] = 0;
    p->pend_len[d] = have + len;
    return 1;
}

static void queue_ready(RelayObject *r, pair_t *p)
{
    if (!p->queued) {
        p->queued = 1;
        p->link = r->ready;
        r->ready = p;
    }
}

static void touch(RelayObject *r, pair_t *p)
{
    if (!p->touched) {
        p->touched = 1;
        p->tlink = r->touched;
        r->touched = p;
    }
}

/* Read phase of direction d: flush what was kept, then read into the arena (the bytes are
 * written in the write phase, after every ready socket of this turn was read). */
static void read_direction(RelayObject *r, pair_t *p, int d)
{
    int out = 1 - d;
    if (p->pend[d]) {
        if (!p->writable[out] || !flush_pending(r, p, d))
            return;
    }
    int reads = 0;
    while (p->readable[d] && !p->eof[d]) {
        size_t room = ARENA_SIZE - r->arena_used;
        if (reads++ == READS_PER_TURN || room < MIN_READ || r->njobs == MAX_JOBS) {
            queue_ready(r, p); /* go on next turn, after the writes */
            return;
        }
        if (room > BUF_SIZE)
            room = BUF_SIZE;
        ssize_t n = recv(p->side[d].fd, r->arena + r->arena_used, room, MSG_DONTWAIT);
        if (n > 0) {
            p->bytes[d] += (unsigned long long)n;
            p->last = r->now;
            /* Edge-triggered: a short read drained the socket, and new data raises a new
             * event. Unless the peer's FIN already arrived (EPOLLRDHUP): read on to see it. */
            if ((size_t)n < room && !p->rdhup[d])
                p->readable[d] = 0;
            job_t *j = &r->jobs[r->njobs++];
            j->pair = p;
            j->d = d;
            j->off = r->arena_used;
            j->len = (size_t)n;
            r->arena_used += (size_t)n;
            continue;
        }
        if (n == 0) {
            p->eof[d] = 1;
            p->readable[d] = 0;
            return;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            p->readable[d] = 0;
            return;
        }
        finish(r, p, 1);
        return;
    }
}

static void read_pair(RelayObject *r, pair_t *p)
{
    touch(r, p);
    for (int d = 0; d < 2 && !p->dead; d++)
        read_direction(r, p, d);
}

/* Write phase: every chunk read this turn, in order; what a full socket does not take is kept
 * (and that direction reads no more until it is written). */
static void write_jobs(RelayObject *r)
{
    for (size_t i = 0; i < r->njobs; i++) {
        job_t *j = &r->jobs[i];
        pair_t *p = j->pair;
        if (p->dead)
            continue;
        int out = 1 - j->d;
        const char *data = r->arena + j->off;
        size_t len = j->len;
        if (!p->pend[j->d] && p->writable[out]) {
            ssize_t w;
            do {
                w = send(p->side[out].fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
            } while (w < 0 && errno == EINTR);
            if (w < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK) {
                    finish(r, p, 1);
                    continue;
                }
                w = 0;
            }
            data += w;
            len -= (size_t)w;
            if (len == 0)
                continue;
            p->writable[out] = 0;
        }
        keep_pending(r, p, j->d, data, len);
    }
    r->njobs = 0;
    r->arena_used = 0;
}

/* Settle phase: pass each finished direction on (shutdown once its bytes are written), and
 * end the pair when both are. */
static void settle(RelayObject *r)
{
    pair_t *p = r->touched;
    r->touched = NULL;
    while (p) {
        pair_t *next = p->tlink;
        p->touched = 0;
        p->tlink = NULL;
        if (!p->dead) {
            for (int d = 0; d < 2; d++) {
                int out = 1 - d;
                if (p->eof[d] && !p->pend[d] && !p->shut[out]) {
                    shutdown(p->side[out].fd, SHUT_WR);
                    p->shut[out] = 1;
                }
            }
            if (p->shut[0] && p->shut[1])
                finish(r, p, 0);
        }
        p = next;
    }
}

static void start_pair(RelayObject *r, pair_t *p)
{
    p->last = monotonic_now();
    p->next = r->live;
    if (r->live)
        r->live->prev = p;
    r->live = p;
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev;
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.ptr = &p->side[i];
        if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, p->side[i].fd, &ev) < 0) {
            finish(r, p, 1);
            return;
        }
    }
}

static void cut_tag(RelayObject *r, long long tag)
{
    for (pair_t *p = r->live; p; p = p->next) {
        if (p->tag == tag) {
            finish(r, p, 1);
            return;
        }
    }
}

/* Run queued commands. Returns 1 when asked to stop. */
static int run_commands(RelayObject *r)
{
    drain_fd(r->wake_fd);
    pthread_mutex_lock(&r->lock);
    cmd_t *c = r->cmds;
    r->cmds = r->cmds_tail = NULL;
    pthread_mutex_unlock(&r->lock);
    int stop = 0;
    while (c) {
        cmd_t *next = c->next;
        if (c->kind == CMD_ADD)
            start_pair(r, c->pair);
        else if (c->kind == CMD_CUT)
            cut_tag(r, c->tag);
        else
            stop = 1;
        free(c);
        c = next;
    }
    return stop;
}

static void hand_over_finished(RelayObject *r)
{
    if (!r->graveyard)
        return;
    pair_t *last = r->graveyard;
    while (last->link)
        last = last->link;
    pthread_mutex_lock(&r->lock);
    last->link = r->done;
    r->done = r->graveyard;
    pthread_mutex_unlock(&r->lock);
    r->graveyard = NULL;
    signal_fd(r->done_fd);
}

static double sweep_interval(const RelayObject *r)
{
    double every = r->idle_timeout / 4;
    return every > 1.0 ? 1.0 : every < 0.01 ? 0.01 : every;
}

/* Close the pairs that have been idle longer than idle_timeout. */
static void sweep_idle(RelayObject *r)
{
    r->last_sweep = r->now;
    for (pair_t *p = r->live, *next; p; p = next) {
        next = p->next;
        if (r->now - p->last > r->idle_timeout)
            finish(r, p, 1);
    }
}

static void *relay_main(void *arg)
{
    RelayObject *r = (RelayObject *)arg;
    struct epoll_event events[MAX_EVENTS];
    int wait_ms = r->idle_timeout > 0 ? (int)(sweep_interval(r) * 1000) : -1;
    r->last_sweep = monotonic_now();
    for (;;) {
        int n = epoll_wait(r->epfd, events, MAX_EVENTS, r->ready ? 0 : wait_ms);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        r->now = monotonic_now();
        int stop = 0;
        for (int i = 0; i < n; i++) {
            side_t *s = (side_t *)events[i].data.ptr;
            if (s == NULL) {
                stop |= run_commands(r);
                continue;
            }
            pair_t *p = s->pair;
            if (p->dead)
                continue; /* finished earlier in this batch */
            int idx = s == &p->side[1];
            uint32_t e = events[i].events;
            if (e & EPOLLERR) {
                finish(r, p, 1);
                continue;
            }
            if (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP))
                p->readable[idx] = 1;
            if (e & (EPOLLRDHUP | EPOLLHUP))
                p->rdhup[idx] = 1;
            if (e & (EPOLLOUT | EPOLLHUP))
                p->writable[idx] = 1;
            read_pair(r, p);
        }
        /* Pairs that used up their turn go on where they stopped. */
        pair_t *q = r->ready;
        r->ready = NULL;
        while (q) {
            pair_t *next = q->link;
            q->queued = 0;
            if (q->dead) {
                q->link = r->graveyard;
                r->graveyard = q;
            } else {
                read_pair(r, q); /* if it finishes now, finish() puts it in the graveyard */
            }
            q = next;
        }
        write_jobs(r);
        settle(r);
        if (r->idle_timeout > 0 && r->now - r->last_sweep >= sweep_interval(r))
            sweep_idle(r);
        hand_over_finished(r);
        if (stop)
            break;
    }
    return NULL;
}

/* ---- the Python type ----------------------------------------------------------------- */

static void enqueue(RelayObject *r, cmd_t *c)
{
    c->next = NULL;
    pthread_mutex_lock(&r->lock);
    if (r->cmds_tail)
        r->cmds_tail->next = c;
    else
        r->cmds = c;
    r->cmds_tail = c;
    pthread_mutex_unlock(&r->lock);
    signal_fd(r->wake_fd);
}

static int push_command(RelayObject *r, cmd_kind kind, pair_t *p, long long tag)
{
    cmd_t *c = malloc(sizeof *c);
    if (c == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->kind = kind;
    c->pair = p;
    c->tag = tag;
    enqueue(r, c);
    return 0;
}

static int check_open(RelayObject *r)
{
    if (!r->started || r->closed) {
        PyErr_SetString(PyExc_ValueError, "relay is closed");
        return -1;
    }
    return 0;
}

static int Relay_init(RelayObject *r, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"idle_timeout", NULL};
    double idle_timeout = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|d:Relay", kwlist, &idle_timeout))
        return -1;
    if (!(idle_timeout >= 0)) {
        PyErr_SetString(PyExc_ValueError, "idle_timeout must be >= 0 seconds");
        return -1;
    }
    if (r->started) {
        PyErr_SetString(PyExc_RuntimeError, "relay already started");
        return -1;
    }
    r->epfd = r->wake_fd = r->done_fd = -1;
    r->arena = malloc(ARENA_SIZE);
    r->jobs = malloc(MAX_JOBS * sizeof(job_t));
    r->stop_cmd = calloc(1, sizeof(cmd_t));
    if (r->arena == NULL || r->jobs == NULL || r->stop_cmd == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    r->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    r->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (r->epfd < 0 || r->wake_fd < 0 || r->done_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (pthread_mutex_init(&r->lock, NULL) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_mutex_init failed");
        return -1;
    }
    r->idle_timeout = idle_timeout;
    int err = pthread_create(&r->thread, NULL, relay_main, r);
    if (err != 0) {
        pthread_mutex_destroy(&r->lock);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->started = 1;
    return 0;
}

static PyObject *Relay_add(RelayObject *r, PyObject *args)
{
    int a, b;
    long long tag;
    if (!PyArg_ParseTuple(args, "iiL:add", &a, &b, &tag))
        return NULL;
    if (check_open(r) < 0)
        return NULL;
    if (a < 0 || b < 0 || a == b) {
        PyErr_SetString(PyExc_ValueError, "add() needs two distinct file descriptors");
        return NULL;
    }
    pair_t *p = calloc(1, sizeof *p);
    if (p == NULL)
        return PyErr_NoMemory();
    p->side[0].pair = p->side[1].pair = p;
    p->side[0].fd = a;
    p->side[1].fd = b;
    p->tag = tag;
    if (push_command(r, CMD_ADD, p, tag) < 0) {
        free(p);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Relay_cut(RelayObject *r, PyObject *args)
{
    long long tag;
    if (!PyArg_ParseTuple(args, "L:cut", &tag))
        return NULL;
    if (check_open(r) < 0 || push_command(r, CMD_CUT, NULL, tag) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Relay_collect(RelayObject *r, PyObject *Py_UNUSED(ignored))
{
    if (!r->started || r->closed)
        return PyList_New(0);
    drain_fd(r->done_fd); /* before taking the list: a later hand-over signals again */
    pthread_mutex_lock(&r->lock);
    pair_t *p = r->done;
    r->done = NULL;
    pthread_mutex_unlock(&r->lock);
    PyObject *out = PyList_New(0);
    while (p) {
        pair_t *next = p->link;
        if (out != NULL) {
            PyObject *t = Py_BuildValue("(LKKOd)", p->tag, p->bytes[0], p->bytes[1],
                                        p->failed ? Py_True : Py_False, p->ended_at);
            if (t == NULL || PyList_Append(out, t) < 0)
                Py_CLEAR(out);
            Py_XDECREF(t);
        }
        free(p);
        p = next;
    }
    return out;
}

static PyObject *Relay_fileno(RelayObject *r, PyObject *Py_UNUSED(ignored))
{
    if (check_open(r) < 0)
        return NULL;
    return PyLong_FromLong(r->done_fd);
}

static void free_pairs(pair_t *p, int by_link)
{
    while (p) {
        pair_t *next = by_link ? p->link : p->next;
        for (int i = 0; i < 2; i++) {
            if (p->side[i].fd >= 0)
                close(p->side[i].fd);
            free(p->pend[i]);
        }
        free(p);
        p = next;
    }
}

static void relay_shutdown(RelayObject *r)
{
    if (!r->started || r->closed)
        return;
    r->closed = 1;
    cmd_t *c = r->stop_cmd;
    r->stop_cmd = NULL;
    c->kind = CMD_STOP;
    enqueue(r, c); /* run_commands frees it */
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    /* The thread is gone: everything left is ours. */
    /* The ready queue holds live pairs (freed below) and dead ones that are in no other list. */
    for (pair_t *q = r->ready, *next; q; q = next) {
        next = q->link;
        if (q->dead)
            free(q);
    }
    r->ready = NULL;
    free_pairs(r->live, 0);
    r->live = NULL;
    free_pairs(r->graveyard, 1);
    r->graveyard = NULL;
    free_pairs(r->done, 1);
    r->done = NULL;
    cmd_t *cmd = r->cmds;
    while (cmd) {
        cmd_t *next = cmd->next;
        if (cmd->kind == CMD_ADD)
            free_pairs(cmd->pair, 0);
        free(cmd);
        cmd = next;
    }
    r->cmds = r->cmds_tail = NULL;
    pthread_mutex_destroy(&r->lock);
}

static PyObject *Relay_close(RelayObject *r, PyObject *Py_UNUSED(ignored))
{
    relay_shutdown(r);
    Py_RETURN_NONE;
}

static void Relay_dealloc(RelayObject *r)
{
    relay_shutdown(r);
    if (r->epfd >= 0)
        close(r->epfd);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    if (r->done_fd >= 0)
        close(r->done_fd);
    free(r->arena);
    free(r->jobs);
    free(r->stop_cmd);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    RelayObject *r = (RelayObject *)type->tp_alloc(type, 0);
    if (r != NULL)
        r->epfd = r->wake_fd = r->done_fd = -1;
    return (PyObject *)r;
}

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS,
     "add(a, b, tag): relay between two connected non-blocking sockets (fds now owned)."},
    {"cut", (PyCFunction)Relay_cut, METH_VARARGS, "cut(tag): close that pair now."},
    {"collect", (PyCFunction)Relay_collect, METH_NOARGS,
     "collect() -> [(tag, bytes_a_to_b, bytes_b_to_a, failed, ended_at)]"},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS,
     "fileno(): an eventfd readable while finished pairs wait for collect()."},
    {"close", (PyCFunction)Relay_close, METH_NOARGS,
     "close(): stop the thread and close every open pair (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "corral_lb._relay.Relay",
    .tp_basicsize = sizeof(RelayObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A byte relay between socket pairs, on its own thread (see the module doc).",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "corral_lb._relay",
    .m_doc = "The L4 proxy's byte relay, in C, on a thread of its own.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__relay(void)
{
    if (PyType_Ready(&RelayType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relay_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "BUFFER_SIZE", BUF_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
