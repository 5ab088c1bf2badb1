/*
 * confedge.turn._native: the native TURN data plane (Linux; a CPython extension in C).
 *
 * Why: relaying media is what a TURN server exists for, and in Python every relayed packet costs
 * an event-loop callback plus one syscall each way (docs/BENCHMARKS.md). Here N relay threads,
 * each with the GIL released, its own epoll set, and recvmmsg/sendmmsg batches, forward
 * ChannelData and Send/Data indications for bindings the Python control plane (turn/core.py)
 * has installed. Everything else a client sends (STUN requests, Send indications this file does
 * not judge) goes up to Python through one FIFO queue that wakes the event loop via an eventfd.
 *
 * Threads and ownership
 * ---------------------
 * Worker k owns listener socket L_k (the TURN port, SO_REUSEPORT: the kernel hashes a client's
 * 4-tuple to one socket, so a client always lands on the same worker) and the relay sockets of
 * the allocations made by clients that land on L_k. So both directions of an allocation run on
 * one thread: client -> peer (recv on L_k, send on the relay socket) and peer -> client (recv on
 * the relay socket, send on L_k).
 *
 * The control socket (steering): one more SO_REUSEPORT socket, C, joins the group after the
 * workers' and a classic BPF program (SO_ATTACH_REUSEPORT_CBPF, built by steer()) picks the
 * socket for each datagram: ChannelData and Send indications go to L_(source port % N), every
 * other datagram (STUN requests) to C, which the Python thread reads itself (receive()). A
 * request then wakes one thread, the one that answers it, instead of a relay thread that
 * queues it and wakes Python through the eventfd. Python computes the same port % N to know
 * which worker the client's allocation must live on.
 *
 * Folding (turn.dataplane_fold_pps): at moderate total rates worker 0's thread serves every
 * worker's epoll set (one round per worker, under that worker's lock, with its buffers) and the
 * other threads sleep; see fold_main for why and park for the rule that keeps it safe.
 *
 * Tables (client address -> allocation, per-allocation permissions and channels) are changed by
 * the Python thread under the worker's mutex; the worker holds that mutex while it processes
 * the events of one epoll_wait (never while it sleeps), and yields to a waiting control-plane
 * writer between rounds. A removed allocation's socket is closed by Python under the mutex
 * (the worker skips events of dead allocations); its memory is freed by the worker at the end
 * of its next round, when no event that could point to it is pending.
 *
 * Counters are written by one thread each (the worker for relayed traffic, Python for Send
 * indications it forwards itself) and read with relaxed atomic loads: reading them never stops
 * the data plane.
 *
 * Batching (the part that pays): packets are received in batches of BATCH per recvmmsg into
 * slots with HEADROOM bytes in front, so the ChannelData header (RFC 8656 §12.4) or the Data
 * indication header (§10.3) is written in place in front of the payload (no copy); client ->
 * peer ChannelData is sent from inside the received datagram (offset 4). Outgoing packets are
 * queued and flushed with sendmmsg per socket; consecutive packets of a flush to the same
 * destination and of the same size become one UDP GSO message (UDP_SEGMENT).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <linux/filter.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef SO_MEMINFO
#define SO_MEMINFO 55
#endif
#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif
#define MEMINFO_VARS 9  /* SK_MEMINFO_VARS */
#define MEMINFO_DROPS 8 /* SK_MEMINFO_DROPS: datagrams the kernel dropped (receive buffer full) */

#define BATCH 64            /* datagrams per recvmmsg */
#define SLOTS 512           /* receive slots per worker; outputs point into them until flushed */
#define HEADROOM 64         /* room for a Data indication header in front of a payload */
#define SMALL 2048          /* a slot's contiguous part: every media packet fits */
#define SLOT_SMALL (HEADROOM + SMALL + 64) /* + room for a Data indication's padding */
#define BIG (65536 - SMALL) /* the rest of a large datagram (to 65507 bytes), second buffer */
#define GHASH 1024          /* flush grouping table (power of two, > SLOTS) */
#define MAX_ROUNDS 7        /* recvmmsg rounds per socket per epoll round (fairness; 7 x BATCH fit SLOTS) */
#define GSO_MAX_SEGS 64     /* UDP_MAX_SEGMENTS on older kernels */
#define GSO_MAX_BYTES 64000 /* below the 65507 limit of one UDP datagram */
#define CTL_BATCH 32        /* datagrams per recvmmsg on the control socket */
#define CTL_ROUNDS 4        /* recvmmsg calls per receive(): a burst, without starving the loop */
#define CTL_SLOT 65536      /* a control slot holds any UDP datagram (pages touched on use) */
#define GSO_MAX_SEG 1400    /* segments must fit the path MTU; larger packets go one by one */
#define SEND_FAST_MAX_ATTRS 16

#define COOKIE 0x2112A442u
#define KIND_LISTENER 1
#define KIND_WAKE 2
#define KIND_ALLOC 3
#define KIND_MUX 4
/* turn.relay_multiplex: why an allocation claims a peer transport address on a shared relay
 * socket (turn/multiplex.py has the rules; this file mirrors them) */
#define CLAIM_CHANNEL 1
#define CLAIM_SEND 2
#define MUX_MAX_CLAIMS 1024 /* per allocation (turn/multiplex.py MAX_CLAIMS) */

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
/* Single-writer counter: a plain add published with a relaxed store (no lock prefix). */
#define BUMP(x, v) __atomic_store_n(&(x), (x) + (v), __ATOMIC_RELAXED)

/* A token bucket (bandwidth caps; bandwidth.py has the why). Tokens are bytes scaled by
 * BW_SCALE so that frequent small refills lose no fraction of a byte. The per-allocation bucket
 * is written only by its relay thread; the per-user and total ones are shared by every thread:
 * all fields are accessed with atomics, refills are claimed by a CAS on last_ns, and a packet
 * that races another may push tokens slightly below zero (bounded by one packet per thread). */
#define BW_SCALE 1024
#define USER_SLOTS 65536 /* per-user bucket pairs, indexed by a slot the control plane assigns */
#define BW_TO_PEER 0
#define BW_TO_CLIENT 1
typedef struct {
    int64_t tokens; /* bytes x BW_SCALE */
    uint64_t last_ns;
    uint64_t rate;  /* bytes/s; 0 = unlimited */
    int64_t burst;  /* bytes x BW_SCALE */
} bucket_t;

static PyObject *PeerTaken; /* add_channel: the peer is claimed by another allocation */

typedef union {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
} sockaddr_u;

/* A transport address as a fixed-size, zero-padded key (memcmp-able). */
typedef struct {
    uint8_t fam; /* 4 or 6 */
    uint8_t pad;
    uint16_t port; /* host order */
    uint8_t ip[16];
} addr_t;

typedef struct {
    uint16_t number;
    addr_t peer;
    sockaddr_u peer_sa;
    socklen_t peer_salen;
} chan_t;

typedef struct {
    uint8_t fam;
    uint8_t fast_send; /* Send indications to this IP may be forwarded here (policy said so) */
    uint8_t ip[16];
} perm_t;

struct alloc;

/* A node of a shared relay socket's tables (turn.relay_multiplex). In `claims` the key is a peer
 * transport address and `al` its owner; in `perms` the key is a peer IP (port 0), `count` the
 * allocations holding a permission for it and `x` the XOR of their pointers, which is the one
 * holder itself when count == 1 (so "exactly one allocation may receive from this IP" is one
 * lookup, whatever the order of adds and removals). */
typedef struct mnode {
    addr_t key;
    struct alloc *al;
    uintptr_t x;
    uint32_t count;
    uint8_t how;          /* claims: CLAIM_* bits */
    struct mnode *next;   /* hash chain */
    struct mnode *anext;  /* claims: the owner's own list (release in O(own claims)) */
} mnode_t;

typedef struct {
    mnode_t **tab;
    size_t cap, count;
} mtab_t;

/* One shared relay socket: polled by one worker, like an allocation's own socket, and used by
 * the allocations of that worker that were placed on it. Tables changed under the worker's
 * lock (by Python) or by the worker itself (Send claims), like an allocation's tables. */
typedef struct mux {
    int kind; /* KIND_MUX: first member, epoll data.ptr points here */
    int fd;
    int family;
    int worker;
    int nallocs;
    mtab_t claims, perms;
} mux_t;

typedef struct alloc {
    int kind; /* KIND_ALLOC: first member, epoll data.ptr points here */
    int fd;   /* its own relay socket, or its shared socket's (mux != NULL; not its to close) */
    int family;
    int worker;
    long long id;
    int dead;
    addr_t client;
    sockaddr_u client_sa;
    socklen_t client_salen;
    chan_t *chans; /* bound channels whose peer IP has a permission: the only ones relayed */
    int nchans, capchans;
    /* bound channels whose permission lapsed (RFC 8656 §9, §12: nothing relayed either way);
     * back in chans when the permission is installed again. Kept apart so that the per-packet
     * lookups in chans need no permission check. */
    chan_t *held;
    int nheld, capheld;
    perm_t *perms;
    int nperms, capperms;
    /* written by the worker */
    uint64_t pkts_to_peer, bytes_to_peer, pkts_to_client, bytes_to_client, dropped;
    uint64_t kernel_drops; /* of the relay socket when it was closed (see kernel_drops()) */
    uint64_t dropped_bw; /* over a bandwidth cap, either direction */
    /* turn.bandwidth_per_allocation (or the degrade policy's share), one bucket per direction
     * (BW_TO_PEER, BW_TO_CLIENT), as coturn's max-bps counts each direction separately */
    bucket_t bw[2];
    bucket_t *ubw; /* the username's two buckets (engine->ubw + 2 * slot) or NULL */
    /* written by the Python thread (Send indications forwarded by the core) */
    uint64_t py_pkts_to_peer, py_bytes_to_peer;
    mux_t *mux;       /* turn.relay_multiplex: the shared socket it relays on, or NULL */
    mnode_t *claims;  /* its claims on that socket */
    int nclaims;
    struct alloc *hnext;  /* worker's client table chain */
    struct alloc *idnext; /* engine's id table chain */
    struct alloc *gnext;  /* graveyard */
} alloc_t;

/* One datagram to send: base[0..n) then, for a datagram larger than a slot's small part,
 * base2[0..n2). */
typedef struct {
    int fd;
    uint8_t *base;
    uint32_t n;
    uint32_t n2;
    uint8_t *base2;
    socklen_t salen;
    sockaddr_u dest;
} out_t;

struct engine;

typedef struct {
    uint64_t rx_client, rx_peer, tx_client, tx_peer, upcalls;
    uint64_t recv_calls, send_calls, gso_msgs, gso_segments;
    uint64_t drop_unknown_channel, drop_short, drop_truncated, drop_send, drop_queue;
    uint64_t drop_no_allocation, drop_too_big;
    uint64_t drop_mux_unknown, drop_mux_ambiguous, drop_mux_conflict;
} wstats_t;

typedef struct worker {
    struct engine *eng;
    int index;
    int lfd, epfd, wakefd;
    int ltag, wtag; /* epoll data.ptr targets for the listener and the wake eventfd */
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    int writers; /* control-plane threads waiting for the lock */
    int stop;
    int gso;     /* UDP GSO usable (turned off at the first failure) */
    int nap_us;  /* coalescing pause after a round that moved only a few packets (0 = off) */
    uint64_t win_start_ns, win_pkts; /* packet-rate estimate over ~1 ms windows */
    uint64_t pkts_per_ms;            /* published (relaxed) for the folding decision */
    int in_fold;   /* this worker's epoll set is in the engine's fold set (under fold_lock) */
    int no_fold;   /* adding it to the fold set failed once: it never parks */
    uint64_t now_ns; /* monotonic time of this epoll round (bandwidth buckets) */
    alloc_t **htab;
    size_t hcap, hcount;
    alloc_t *graveyard;
    uint8_t *small; /* SLOTS x SLOT_SMALL: touched by every datagram */
    uint8_t *big;   /* SLOTS x BIG: touched only by datagrams larger than SMALL */
    int used;       /* slots taken since the last flush */
    struct mmsghdr rmsg[BATCH];
    struct iovec riov[2 * BATCH];
    sockaddr_u raddr[BATCH];
    out_t out[SLOTS];
    int nout;
    /* flush: packets grouped by (socket, destination), each group in arrival order */
    int ghash[GHASH];
    int gfirst[SLOTS], glast[SLOTS], onext[SLOTS], order[SLOTS];
    int fslot[GHASH], ffd[SLOTS], fhead[SLOTS], ftail[SLOTS], gnextf[SLOTS]; /* flows by socket */
    struct mmsghdr smsg[SLOTS];
    struct iovec siov[2 * SLOTS];
    char sctl[SLOTS][CMSG_SPACE(sizeof(uint16_t))];
    int ssegs[SLOTS];
    int sfirst[SLOTS]; /* index into order[] of a message's first packet */
    uint8_t rnd[4096];
    size_t rnd_left;
    wstats_t st;
} worker_t;

typedef struct up {
    struct up *next;
    int worker;
    addr_t src;
    uint32_t len;
    uint8_t data[];
} up_t;

typedef struct engine {
    PyObject_HEAD
    int nworkers;
    worker_t **workers;
    int started, closed;
    int efd; /* eventfd the Python loop watches */
    pthread_mutex_t qlock;
    up_t *qhead, *qtail;
    size_t qcount, qlimit;
    int notified;
    alloc_t **idtab;
    size_t idcap, idcount;
    int own_lfds; /* the listener sockets are ours to close (set once the engine is built) */
    int cfd;      /* the control socket (steer()), -1 without; the Python thread reads it */
    uint8_t *cbuf; /* CTL_BATCH x CTL_SLOT receive slots for it (mmap, MAP_NORESERVE) */
    uint64_t ctl_rx, ctl_recv_calls, ctl_truncated;
    uint64_t ctl_send_calls; /* send_many's sendmmsg calls (the Python thread's only) */
    uint64_t py_send_errors;
    /* counters of ended allocations (5: bandwidth drops) */
    uint64_t ended[6];
    int bw_on;      /* any bandwidth cap ever set: the one test the hot path pays otherwise */
    bucket_t total[2]; /* turn.bandwidth_total, per direction */
    bucket_t *ubw;     /* USER_SLOTS x 2 per-user buckets (pages touched only when used) */
    mux_t **muxes;     /* turn.relay_multiplex: shared relay sockets, by index */
    int nmux, capmux;
    uint64_t py_mux_conflict; /* Send indications from the core refused by another's claim */
    /* Folding (see fold_main): below fold_ppms packets per ms in total, worker 0's thread serves
     * every worker's epoll set through fold_epfd and the other threads park. */
    uint64_t fold_ppms;         /* 0 = never fold */
    int fold_epfd;
    pthread_mutex_t fold_lock;
    pthread_cond_t fold_cond;
    int folded;                 /* written by worker 0's thread under fold_lock, read anywhere */
    uint64_t folds, unfolds;    /* transitions (worker 0's thread writes, stats() reads) */
} engine_t;

/* ---------------------------------------------------------------------------------------------
 * addresses
 */

static int addr_from_sa(addr_t *a, const sockaddr_u *sa)
{
    memset(a, 0, sizeof *a);
    if (sa->sa.sa_family == AF_INET) {
        a->fam = 4;
        a->port = ntohs(sa->v4.sin_port);
        memcpy(a->ip, &sa->v4.sin_addr, 4);
        return 0;
    }
    if (sa->sa.sa_family == AF_INET6) {
        a->fam = 6;
        a->port = ntohs(sa->v6.sin6_port);
        memcpy(a->ip, &sa->v6.sin6_addr, 16);
        return 0;
    }
    return -1;
}

static socklen_t sa_from_addr(sockaddr_u *sa, const addr_t *a)
{
    memset(sa, 0, sizeof *sa);
    if (a->fam == 4) {
        sa->v4.sin_family = AF_INET;
        sa->v4.sin_port = htons(a->port);
        memcpy(&sa->v4.sin_addr, a->ip, 4);
        return sizeof sa->v4;
    }
    sa->v6.sin6_family = AF_INET6;
    sa->v6.sin6_port = htons(a->port);
    memcpy(&sa->v6.sin6_addr, a->ip, 16);
    return sizeof sa->v6;
}

/* Parse "1.2.3.4" / "2001:db8::1" into fam+ip; port separately. */
static int parse_ip(const char *s, uint8_t *fam, uint8_t ip[16])
{
    memset(ip, 0, 16);
    if (strchr(s, ':') != NULL) {
        if (inet_pton(AF_INET6, s, ip) != 1)
            return -1;
        *fam = 6;
        return 0;
    }
    if (inet_pton(AF_INET, s, ip) != 1)
        return -1;
    *fam = 4;
    return 0;
}

static int addr_from_py(PyObject *tuple, addr_t *a)
{
    const char *host;
    int port;
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) < 2) {
        PyErr_SetString(PyExc_TypeError, "address must be a (host, port) tuple");
        return -1;
    }
    host = PyUnicode_AsUTF8(PyTuple_GET_ITEM(tuple, 0));
    if (host == NULL)
        return -1;
    port = (int)PyLong_AsLong(PyTuple_GET_ITEM(tuple, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    memset(a, 0, sizeof *a);
    if (port < 0 || port > 65535 || parse_ip(host, &a->fam, a->ip) != 0) {
        PyErr_Format(PyExc_ValueError, "not an IP address and port: %R", tuple);
        return -1;
    }
    a->port = (uint16_t)port;
    return 0;
}

static PyObject *addr_to_py(const addr_t *a)
{
    char buf[INET6_ADDRSTRLEN];
    inet_ntop(a->fam == 4 ? AF_INET : AF_INET6, a->ip, buf, sizeof buf);
    if (a->fam == 4)
        return Py_BuildValue("(si)", buf, (int)a->port);
    /* the shape asyncio gives for IPv6 datagrams: (host, port, flowinfo, scope_id) */
    return Py_BuildValue("(siii)", buf, (int)a->port, 0, 0);
}

static inline uint32_t addr_hash(const addr_t *a)
{
    uint32_t h = 2166136261u;
    const uint8_t *p = (const uint8_t *)a;
    for (size_t i = 0; i < sizeof *a; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

/* ---------------------------------------------------------------------------------------------
 * tables (worker: client -> allocation; engine: id -> allocation)
 */

/* Both tables chain allocations through a link field of their own (hnext / idnext); one
 * resize routine serves both. */
typedef size_t (*bucket_fn)(const alloc_t *x, size_t cap);

static inline alloc_t **link_of(alloc_t *x, size_t link)
{
    return (alloc_t **)((char *)x + link);
}

static int table_grow(alloc_t ***tab, size_t *cap, size_t count, size_t link, bucket_fn bucket)
{
    if (count + 1 <= *cap / 2)
        return 0;
    size_t ncap = *cap ? *cap * 2 : 64;
    alloc_t **nt = calloc(ncap, sizeof *nt);
    if (nt == NULL)
        return -1;
    for (size_t i = 0; i < *cap; i++) {
        alloc_t *x = (*tab)[i];
        while (x != NULL) {
            alloc_t *nx = *link_of(x, link);
            size_t b = bucket(x, ncap);
            *link_of(x, link) = nt[b];
            nt[b] = x;
            x = nx;
        }
    }
    free(*tab);
    *tab = nt;
    *cap = ncap;
    return 0;
}

static void table_unlink(alloc_t **head, alloc_t *al, size_t link, size_t *count)
{
    for (alloc_t **pp = head; *pp != NULL; pp = link_of(*pp, link)) {
        if (*pp == al) {
            *pp = *link_of(al, link);
            (*count)--;
            return;
        }
    }
}

static size_t client_bucket(const alloc_t *x, size_t cap)
{
    return addr_hash(&x->client) & (cap - 1);
}

static alloc_t *client_find(worker_t *w, const addr_t *a)
{
    if (w->hcap == 0)
        return NULL;
    alloc_t *x = w->htab[addr_hash(a) & (w->hcap - 1)];
    while (x != NULL && memcmp(&x->client, a, sizeof *a) != 0)
        x = x->hnext;
    return x;
}

static int client_insert(worker_t *w, alloc_t *al)
{
    if (table_grow(&w->htab, &w->hcap, w->hcount, offsetof(alloc_t, hnext), client_bucket) != 0)
        return -1;
    size_t b = client_bucket(al, w->hcap);
    al->hnext = w->htab[b];
    w->htab[b] = al;
    w->hcount++;
    return 0;
}

static void client_remove(worker_t *w, alloc_t *al)
{
    if (w->hcap != 0)
        table_unlink(&w->htab[client_bucket(al, w->hcap)], al, offsetof(alloc_t, hnext),
                     &w->hcount);
}

static inline size_t id_bucket(long long id, size_t cap)
{
    return (size_t)(((uint64_t)id * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static size_t id_bucket_of(const alloc_t *x, size_t cap)
{
    return id_bucket(x->id, cap);
}

static alloc_t *id_find(engine_t *e, long long id)
{
    if (e->idcap == 0)
        return NULL;
    alloc_t *x = e->idtab[id_bucket(id, e->idcap)];
    while (x != NULL && x->id != id)
        x = x->idnext;
    return x;
}

static int id_insert(engine_t *e, alloc_t *al)
{
    if (table_grow(&e->idtab, &e->idcap, e->idcount, offsetof(alloc_t, idnext), id_bucket_of) != 0)
        return -1;
    size_t b = id_bucket(al->id, e->idcap);
    al->idnext = e->idtab[b];
    e->idtab[b] = al;
    e->idcount++;
    return 0;
}

static void id_remove(engine_t *e, alloc_t *al)
{
    table_unlink(&e->idtab[id_bucket(al->id, e->idcap)], al, offsetof(alloc_t, idnext),
                 &e->idcount);
}

/* Room for one more element in a (perms or chans) array: doubles it when full. */
static int grow_array(void **arr, int *cap, int n, size_t elem)
{
    if (n < *cap)
        return 0;
    int ncap = *cap ? *cap * 2 : 4;
    void *na = realloc(*arr, (size_t)ncap * elem);
    if (na == NULL)
        return -1;
    *arr = na;
    *cap = ncap;
    return 0;
}

/* Overwrite *found with val, or append val when found is NULL; -1 when out of memory. */
static int put_elem(void **arr, int *n, int *cap, size_t elem, void *found, const void *val)
{
    if (found == NULL) {
        if (grow_array(arr, cap, *n, elem) != 0)
            return -1;
        found = (char *)*arr + (size_t)(*n)++ * elem;
    }
    memcpy(found, val, elem);
    return 0;
}

static inline chan_t *chan_by_number(alloc_t *al, uint16_t number)
{
    for (int i = 0; i < al->nchans; i++)
        if (al->chans[i].number == number)
            return &al->chans[i];
    return NULL;
}

static inline chan_t *chan_by_peer(alloc_t *al, const addr_t *peer)
{
    for (int i = 0; i < al->nchans; i++)
        if (memcmp(&al->chans[i].peer, peer, sizeof *peer) == 0)
            return &al->chans[i];
    return NULL;
}

static inline chan_t *held_by_number(alloc_t *al, uint16_t number)
{
    for (int i = 0; i < al->nheld; i++)
        if (al->held[i].number == number)
            return &al->held[i];
    return NULL;
}

/* Move every channel bound to peer IP (fam, ip) from one array to the other (chans -> held when
 * its permission lapses, held -> chans when it is installed again); -1 when out of memory (the
 * channels moved so far stay moved). Called with the worker's lock held. */
static int chans_move(chan_t **from, int *nfrom, chan_t **to, int *nto, int *capto, uint8_t fam,
                      const uint8_t *ip)
{
    size_t n = fam == 4 ? 4 : 16;
    for (int i = 0; i < *nfrom;) {
        chan_t *c = &(*from)[i];
        if (c->peer.fam != fam || memcmp(c->peer.ip, ip, n) != 0) {
            i++;
            continue;
        }
        if (put_elem((void **)to, nto, capto, sizeof *c, NULL, c) != 0)
            return -1;
        (*from)[i] = (*from)[--*nfrom];
    }
    return 0;
}

static inline perm_t *perm_find(alloc_t *al, uint8_t fam, const uint8_t *ip)
{
    size_t n = fam == 4 ? 4 : 16;
    for (int i = 0; i < al->nperms; i++)
        if (al->perms[i].fam == fam && memcmp(al->perms[i].ip, ip, n) == 0)
            return &al->perms[i];
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * shared relay sockets (turn.relay_multiplex): which allocation a peer's datagram is for
 */

static mnode_t *mtab_find(const mtab_t *t, const addr_t *key)
{
    if (t->cap == 0)
        return NULL;
    mnode_t *x = t->tab[addr_hash(key) & (t->cap - 1)];
    while (x != NULL && memcmp(&x->key, key, sizeof *key) != 0)
        x = x->next;
    return x;
}

static int mtab_insert(mtab_t *t, mnode_t *node)
{
    if (t->count + 1 > t->cap / 2) {
        size_t ncap = t->cap ? t->cap * 2 : 16;
        mnode_t **nt = calloc(ncap, sizeof *nt);
        if (nt == NULL)
            return -1;
        for (size_t i = 0; i < t->cap; i++) {
            mnode_t *x = t->tab[i];
            while (x != NULL) {
                mnode_t *nx = x->next;
                size_t b = addr_hash(&x->key) & (ncap - 1);
                x->next = nt[b];
                nt[b] = x;
                x = nx;
            }
        }
        free(t->tab);
        t->tab = nt;
        t->cap = ncap;
    }
    size_t b = addr_hash(&node->key) & (t->cap - 1);
    node->next = t->tab[b];
    t->tab[b] = node;
    t->count++;
    return 0;
}

static void mtab_unlink(mtab_t *t, mnode_t *node)
{
    for (mnode_t **pp = &t->tab[addr_hash(&node->key) & (t->cap - 1)]; *pp != NULL;
         pp = &(*pp)->next) {
        if (*pp == node) {
            *pp = node->next;
            t->count--;
            return;
        }
    }
}

static void mtab_free(mtab_t *t)
{
    for (size_t i = 0; i < t->cap; i++) {
        mnode_t *x = t->tab[i];
        while (x != NULL) {
            mnode_t *nx = x->next;
            free(x);
            x = nx;
        }
    }
    free(t->tab);
    t->tab = NULL;
    t->cap = t->count = 0;
}

/* Claim peer for al on its shared socket: 0 = claimed (or already its own), 1 = another
 * allocation holds it, 2 = al holds MUX_MAX_CLAIMS already, -1 = out of memory (nothing changed
 * unless 0). */
static int mux_claim(alloc_t *al, const addr_t *peer, uint8_t how)
{
    mux_t *m = al->mux;
    mnode_t *c = mtab_find(&m->claims, peer);
    if (c != NULL) {
        if (c->al != al)
            return 1;
        c->how |= how;
        return 0;
    }
    if (al->nclaims >= MUX_MAX_CLAIMS)
        return 2;
    c = calloc(1, sizeof *c);
    if (c == NULL)
        return -1;
    c->key = *peer;
    c->al = al;
    c->how = how;
    if (mtab_insert(&m->claims, c) != 0) {
        free(c);
        return -1;
    }
    c->anext = al->claims;
    al->claims = c;
    al->nclaims++;
    return 0;
}

static void mux_unclaim(alloc_t *al, mnode_t *c)
{
    mtab_unlink(&al->mux->claims, c);
    for (mnode_t **pp = &al->claims; *pp != NULL; pp = &(*pp)->anext) {
        if (*pp == c) {
            *pp = c->anext;
            break;
        }
    }
    al->nclaims--;
    free(c);
}

/* Drop `how` from al's claim of peer; the claim ends with its last reason. */
static void mux_release(alloc_t *al, const addr_t *peer, uint8_t how)
{
    mnode_t *c = mtab_find(&al->mux->claims, peer);
    if (c == NULL || c->al != al)
        return;
    c->how &= (uint8_t)~how;
    if (c->how == 0)
        mux_unclaim(al, c);
}

static addr_t ip_key(uint8_t fam, const uint8_t *ip)
{
    addr_t k;
    memset(&k, 0, sizeof k);
    k.fam = fam;
    memcpy(k.ip, ip, fam == 4 ? 4 : 16);
    return k;
}

/* al got a permission for ip (a new one: callers add each IP once). */
static int mux_perm_add(alloc_t *al, uint8_t fam, const uint8_t *ip)
{
    addr_t k = ip_key(fam, ip);
    mnode_t *p = mtab_find(&al->mux->perms, &k);
    if (p == NULL) {
        p = calloc(1, sizeof *p);
        if (p == NULL)
            return -1;
        p->key = k;
        if (mtab_insert(&al->mux->perms, p) != 0) {
            free(p);
            return -1;
        }
    }
    p->count++;
    p->x ^= (uintptr_t)al;
    return 0;
}

/* al's permission for ip lapsed (RFC 8656 §9): its Send claims for that IP go with it. */
static void mux_perm_del(alloc_t *al, uint8_t fam, const uint8_t *ip)
{
    addr_t k = ip_key(fam, ip);
    mnode_t *p = mtab_find(&al->mux->perms, &k);
    if (p != NULL) {
        p->x ^= (uintptr_t)al;
        if (--p->count == 0) {
            mtab_unlink(&al->mux->perms, p);
            free(p);
        }
    }
    size_t n = fam == 4 ? 4 : 16;
    mnode_t *c = al->claims;
    while (c != NULL) {
        mnode_t *nx = c->anext;
        if (c->key.fam == fam && memcmp(c->key.ip, ip, n) == 0 && (c->how & CLAIM_SEND)) {
            c->how &= (uint8_t)~CLAIM_SEND;
            if (c->how == 0)
                mux_unclaim(al, c);
        }
        c = nx;
    }
}

/* The allocation leaves its shared socket: every claim and permission of it goes. */
static void mux_leave(alloc_t *al)
{
    while (al->claims != NULL)
        mux_unclaim(al, al->claims);
    for (int i = 0; i < al->nperms; i++)
        mux_perm_del(al, al->perms[i].fam, al->perms[i].ip);
    al->mux->nallocs--;
}

/* ---------------------------------------------------------------------------------------------
 * the up-queue: packets for the Python control plane, in arrival order
 */

static void bucket_set(bucket_t *b, uint64_t rate, uint64_t now_ns)
{
    /* burst: 100 ms of the rate, at least 64 KiB (bandwidth.py BURST_SECONDS, MIN_BURST) */
    int64_t burst = (int64_t)(rate / 10 > 65536 ? rate / 10 : 65536) * BW_SCALE;
    __atomic_store_n(&b->burst, burst, __ATOMIC_RELAXED);
    __atomic_store_n(&b->last_ns, now_ns, __ATOMIC_RELAXED);
    int64_t t = __atomic_load_n(&b->tokens, __ATOMIC_RELAXED);
    if (t > burst || __atomic_load_n(&b->rate, __ATOMIC_RELAXED) == 0)
        __atomic_store_n(&b->tokens, burst, __ATOMIC_RELAXED);
    __atomic_store_n(&b->rate, rate, __ATOMIC_RELEASE);
}

/* `shared`: the bucket is used by several relay threads (per-user, total) and is updated with
 * atomic read-modify-writes; an allocation's own bucket has one writer, its relay thread, and is
 * updated with plain loads and relaxed stores like the counters (no lock prefix: this is the
 * per-packet path). The callers pass a constant, so each use compiles to one variant. */
static inline void bucket_refill(bucket_t *b, uint64_t rate, uint64_t now, int shared)
{
    uint64_t last = __atomic_load_n(&b->last_ns, __ATOMIC_RELAXED);
    if (now <= last)
        return; /* refilled in this round already */
    if (!shared)
        __atomic_store_n(&b->last_ns, now, __ATOMIC_RELAXED);
    else if (!__atomic_compare_exchange_n(&b->last_ns, &last, now, 0, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED))
        return; /* another thread refilled for this interval */
    int64_t burst = __atomic_load_n(&b->burst, __ATOMIC_RELAXED);
    unsigned __int128 add = (unsigned __int128)(now - last) * rate * BW_SCALE / 1000000000u;
    int64_t a = add > (unsigned __int128)burst ? burst : (int64_t)add;
    if (!shared) {
        int64_t t = __atomic_load_n(&b->tokens, __ATOMIC_RELAXED) + a;
        __atomic_store_n(&b->tokens, t > burst ? burst : t, __ATOMIC_RELAXED);
        return;
    }
    int64_t t = __atomic_add_fetch(&b->tokens, a, __ATOMIC_RELAXED);
    if (t > burst)
        __atomic_fetch_sub(&b->tokens, t - burst, __ATOMIC_RELAXED);
}

/* Does bucket b (NULL or unlimited: yes) have n bytes? Refills it first. */
static inline int bucket_has(bucket_t *b, uint64_t now, int64_t n, int shared)
{
    if (b == NULL)
        return 1;
    uint64_t rate = __atomic_load_n(&b->rate, __ATOMIC_ACQUIRE);
    if (rate == 0)
        return 1;
    bucket_refill(b, rate, now, shared);
    return __atomic_load_n(&b->tokens, __ATOMIC_RELAXED) >= n;
}

static inline void bucket_spend(bucket_t *b, int64_t n, int shared)
{
    if (b == NULL || __atomic_load_n(&b->rate, __ATOMIC_RELAXED) == 0)
        return;
    if (shared)
        __atomic_fetch_sub(&b->tokens, n, __ATOMIC_RELAXED);
    else
        __atomic_store_n(&b->tokens, __atomic_load_n(&b->tokens, __ATOMIC_RELAXED) - n,
                         __ATOMIC_RELAXED);
}

/* Bandwidth caps for one relayed packet of len bytes on allocation al: 1 = send; 0 = over a cap
 * (counted as a drop on the allocation). Allocation, user and total buckets must all have the
 * tokens; a refused packet takes none. */
static inline int bw_admit(worker_t *w, alloc_t *al, uint32_t len, int dir)
{
    if (!__atomic_load_n(&w->eng->bw_on, __ATOMIC_RELAXED))
        return 1;
    int64_t n = (int64_t)len * BW_SCALE;
    uint64_t now = w->now_ns;
    bucket_t *mine = &al->bw[dir], *tot = &w->eng->total[dir];
    bucket_t *user = al->ubw != NULL ? al->ubw + dir : NULL;
    if (bucket_has(mine, now, n, 0) && bucket_has(user, now, n, 1) &&
        bucket_has(tot, now, n, 1)) {
        bucket_spend(mine, n, 0);
        bucket_spend(user, n, 1);
        bucket_spend(tot, n, 1);
        return 1;
    }
    BUMP(al->dropped_bw, 1);
    return 0;
}

static inline uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* vDSO: no syscall */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void upcall(worker_t *w, const addr_t *src, const uint8_t *data, uint32_t n1,
                   const uint8_t *data2, uint32_t n2)
{
    uint32_t len = n1 + n2;
    engine_t *e = w->eng;
    int notify = 0;
    pthread_mutex_lock(&e->qlock);
    if (e->qcount >= e->qlimit) {
        pthread_mutex_unlock(&e->qlock);
        BUMP(w->st.drop_queue, 1); /* the control plane is behind: drop, counted */
        return;
    }
    up_t *u = malloc(sizeof *u + len);
    if (u == NULL) {
        pthread_mutex_unlock(&e->qlock);
        BUMP(w->st.drop_queue, 1);
        return;
    }
    u->next = NULL;
    u->worker = w->index;
    u->src = *src;
    u->len = len;
    memcpy(u->data, data, n1);
    if (n2 > 0)
        memcpy(u->data + n1, data2, n2);
    if (e->qtail != NULL)
        e->qtail->next = u;
    else
        e->qhead = u;
    e->qtail = u;
    e->qcount++;
    if (!e->notified) {
        e->notified = 1;
        notify = 1;
    }
    pthread_mutex_unlock(&e->qlock);
    BUMP(w->st.upcalls, 1);
    if (notify) {
        uint64_t one = 1;
        ssize_t r = write(e->efd, &one, sizeof one);
        (void)r;
    }
}

/* ---------------------------------------------------------------------------------------------
 * sending
 */

static inline uint8_t *slot_data(worker_t *w, int slot)
{
    return w->small + (size_t)slot * SLOT_SMALL + HEADROOM;
}

static inline uint8_t *slot_big(worker_t *w, int slot)
{
    return w->big + (size_t)slot * BIG;
}

static inline void queue_out(worker_t *w, int fd, uint8_t *base, uint32_t n, uint8_t *base2,
                             uint32_t n2, const sockaddr_u *dest, socklen_t salen)
{
    out_t *o = &w->out[w->nout++];
    if (fd == w->lfd)
        BUMP(w->st.tx_client, 1);
    else
        BUMP(w->st.tx_peer, 1);
    o->fd = fd;
    o->base = base;
    o->n = n;
    o->base2 = base2;
    o->n2 = n2;
    o->salen = salen;
    memcpy(&o->dest, dest, salen);
}

static inline int out_iov(const out_t *o, struct iovec *iov)
{
    iov[0].iov_base = o->base;
    iov[0].iov_len = o->n;
    if (o->n2 == 0)
        return 1;
    iov[1].iov_base = o->base2;
    iov[1].iov_len = o->n2;
    return 2;
}

static void send_plain(worker_t *w, int fd, out_t *o)
{
    struct msghdr mh;
    struct iovec iov[2];
    memset(&mh, 0, sizeof mh);
    mh.msg_name = &o->dest;
    mh.msg_namelen = o->salen;
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)out_iov(o, iov);
    if (sendmsg(fd, &mh, MSG_DONTWAIT) < 0)
        BUMP(w->st.drop_send, 1);
}

/* Send smsg[0..m) on fd; a failed message is dropped and counted, the rest still go. */
static void send_batch(worker_t *w, int fd, int m)
{
    int k = 0;
    while (k < m) {
        int r = sendmmsg(fd, &w->smsg[k], (unsigned)(m - k), MSG_DONTWAIT);
        BUMP(w->st.send_calls, 1);
        if (r > 0) {
            k += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && w->ssegs[k] > 1 && (errno == EIO || errno == EINVAL || errno == ENOPROTOOPT ||
                                          errno == EOPNOTSUPP || errno == EMSGSIZE)) {
            /* The device cannot segment: stop using GSO, send these one by one. */
            w->gso = 0;
            for (int s = 0; s < w->ssegs[k]; s++)
                send_plain(w, fd, &w->out[w->order[w->sfirst[k] + s]]);
            k++;
            continue;
        }
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) {
            /* socket buffer full: the rest of this burst is dropped (counted) */
            for (; k < m; k++)
                BUMP(w->st.drop_send, (uint64_t)w->ssegs[k]);
            return;
        }
        BUMP(w->st.drop_send, (uint64_t)w->ssegs[k]);
        k++;
    }
}

static inline int same_flow(const out_t *a, const out_t *b)
{
    return a->fd == b->fd && a->salen == b->salen && memcmp(&a->dest, &b->dest, a->salen) == 0;
}

static inline unsigned flow_hash(const out_t *o)
{
    uint32_t tail; /* last 4 address bytes (IPv4: the address; IPv6: its low 32 bits) */
    memcpy(&tail, (const char *)&o->dest + (o->salen == sizeof(struct sockaddr_in) ? 4 : 20), 4);
    uint32_t h = (uint32_t)o->fd * 2654435761u ^ tail * 2246822519u ^ o->dest.v4.sin_port;
    return (h ^ (h >> 15)) & (GHASH - 1);
}

/* order[]: the queued packets grouped by flow (socket and destination), each flow's packets in
 * arrival order; flows on the client listener first, so its flows form one run for sendmmsg. */
static int group_flows(worker_t *w)
{
    int ng = 0;
    memset(w->ghash, 0xff, sizeof w->ghash);
    for (int i = 0; i < w->nout; i++) {
        unsigned h = flow_hash(&w->out[i]);
        int g;
        while ((g = w->ghash[h]) >= 0 && !same_flow(&w->out[w->gfirst[g]], &w->out[i]))
            h = (h + 1) & (GHASH - 1);
        if (g < 0) {
            g = ng++;
            w->ghash[h] = g;
            w->gfirst[g] = i;
        } else {
            w->onext[w->glast[g]] = i;
        }
        w->glast[g] = i;
        w->onext[i] = -1;
    }
    /* the flows of each socket together (a shared relay socket carries many allocations'
     * flows: one run, one sendmmsg), sockets in order of first use, the listener's first */
    int nf = 0;
    memset(w->fslot, 0xff, sizeof w->fslot);
    for (int g = 0; g < ng; g++) {
        int fd = w->out[w->gfirst[g]].fd;
        unsigned h = ((unsigned)fd * 2654435761u >> 7) & (GHASH - 1);
        int f;
        while ((f = w->fslot[h]) >= 0 && w->ffd[f] != fd)
            h = (h + 1) & (GHASH - 1);
        if (f < 0) {
            f = nf++;
            w->fslot[h] = f;
            w->ffd[f] = fd;
            w->fhead[f] = g;
        } else {
            w->gnextf[w->ftail[f]] = g;
        }
        w->ftail[f] = g;
        w->gnextf[g] = -1;
    }
    int n = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int f = 0; f < nf; f++)
            if ((w->ffd[f] == w->lfd) == (pass == 0))
                for (int g = w->fhead[f]; g >= 0; g = w->gnextf[g])
                    for (int i = w->gfirst[g]; i >= 0; i = w->onext[i])
                        w->order[n++] = i;
    return n;
}

/* Flush queued packets: one sendmmsg per run of the same socket; runs of the same destination
 * and size inside it become one GSO message each. */
static void flush(worker_t *w)
{
    int n = group_flows(w);
    int i = 0;
    while (i < n) {
        int fd = w->out[w->order[i]].fd;
        int m = 0, iv = 0;
        while (i < n && w->out[w->order[i]].fd == fd) {
            out_t *o = &w->out[w->order[i]];
            int segs = 1;
            uint32_t total = o->n;
            if (w->gso && o->n2 == 0 && o->n <= GSO_MAX_SEG && o->n > 0) {
                while (i + segs < n && segs < GSO_MAX_SEGS) {
                    out_t *nx = &w->out[w->order[i + segs]];
                    if (nx->n2 != 0 || nx->n > o->n || nx->n == 0 ||
                        total + nx->n > GSO_MAX_BYTES || !same_flow(nx, o))
                        break;
                    total += nx->n;
                    segs++;
                    if (nx->n < o->n)
                        break; /* a shorter segment can only be the last */
                }
            }
            struct msghdr *mh = &w->smsg[m].msg_hdr;
            memset(mh, 0, sizeof *mh);
            mh->msg_name = &o->dest;
            mh->msg_namelen = o->salen;
            mh->msg_iov = &w->siov[iv];
            if (segs == 1) {
                mh->msg_iovlen = (size_t)out_iov(o, &w->siov[iv]);
            } else {
                mh->msg_iovlen = (size_t)segs;
                for (int s = 0; s < segs; s++) {
                    w->siov[iv + s].iov_base = w->out[w->order[i + s]].base;
                    w->siov[iv + s].iov_len = w->out[w->order[i + s]].n;
                }
                mh->msg_control = w->sctl[m];
                mh->msg_controllen = CMSG_SPACE(sizeof(uint16_t));
                struct cmsghdr *cm = CMSG_FIRSTHDR(mh);
                cm->cmsg_level = SOL_UDP;
                cm->cmsg_type = UDP_SEGMENT;
                cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
                uint16_t gso = (uint16_t)o->n;
                memcpy(CMSG_DATA(cm), &gso, sizeof gso);
                BUMP(w->st.gso_msgs, 1);
                BUMP(w->st.gso_segments, (uint64_t)segs);
            }
            iv += (int)mh->msg_iovlen;
            w->ssegs[m] = segs;
            w->sfirst[m] = i;
            m++;
            i += segs;
        }
        send_batch(w, fd, m);
    }
    w->nout = 0;
    w->used = 0;
}

/* ---------------------------------------------------------------------------------------------
 * receiving
 */

static int recv_batch(worker_t *w, int fd, int *first)
{
    if (w->used + BATCH > SLOTS)
        flush(w);
    int base = w->used;
    for (int i = 0; i < BATCH; i++) {
        struct msghdr *mh = &w->rmsg[i].msg_hdr;
        w->riov[2 * i].iov_base = slot_data(w, base + i);
        w->riov[2 * i].iov_len = SMALL;
        w->riov[2 * i + 1].iov_base = slot_big(w, base + i);
        w->riov[2 * i + 1].iov_len = BIG;
        mh->msg_name = &w->raddr[i];
        mh->msg_namelen = sizeof w->raddr[i];
        mh->msg_iov = &w->riov[2 * i];
        mh->msg_iovlen = 2;
        mh->msg_control = NULL;
        mh->msg_controllen = 0;
        mh->msg_flags = 0;
    }
    int n;
    do {
        n = recvmmsg(fd, w->rmsg, BATCH, MSG_DONTWAIT, NULL);
    } while (n < 0 && errno == EINTR);
    BUMP(w->st.recv_calls, 1);
    if (n <= 0)
        return 0;
    w->used += n;
    *first = base;
    return n;
}

/* Datagrams the kernel dropped on a socket because its receive buffer was full (SO_MEMINFO:
 * read on demand, so counting costs nothing per packet). */
static uint64_t kernel_drops(int fd)
{
    uint32_t mem[MEMINFO_VARS];
    socklen_t len = sizeof mem;
    if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_MEMINFO, mem, &len) != 0 ||
        len < sizeof mem)
        return 0;
    return mem[MEMINFO_DROPS];
}

/* RFC 8656 §10.2: a Send indication the data plane may forward itself -- exactly
 * XOR-PEER-ADDRESS and DATA plus comprehension-optional attributes, no FINGERPRINT (those, and
 * anything else, go to the control plane, which decides).  Returns 1 and fills peer/data when
 * it qualifies. */
static int parse_send(const uint8_t *p, uint32_t len, addr_t *peer, const uint8_t **data,
                      uint32_t *dlen)
{
    if (len < 20 || p[0] != 0x00 || p[1] != 0x16)
        return 0;
    uint32_t mlen = (uint32_t)p[2] << 8 | p[3];
    uint32_t cookie = (uint32_t)p[4] << 24 | (uint32_t)p[5] << 16 | (uint32_t)p[6] << 8 | p[7];
    if (cookie != COOKIE || mlen + 20 != len || (mlen & 3) != 0)
        return 0;
    int have_peer = 0, have_data = 0, count = 0;
    uint32_t off = 20;
    while (off < len) {
        if (off + 4 > len || ++count > SEND_FAST_MAX_ATTRS)
            return 0;
        uint16_t type = (uint16_t)(p[off] << 8 | p[off + 1]);
        uint32_t alen = (uint32_t)p[off + 2] << 8 | p[off + 3];
        const uint8_t *v = p + off + 4;
        if (off + 4 + alen > len)
            return 0;
        if (type == 0x0012) {
            if (!have_peer) {
                memset(peer, 0, sizeof *peer);
                if (alen == 8 && v[1] == 1) {
                    peer->fam = 4;
                    for (int i = 0; i < 4; i++)
                        peer->ip[i] = v[4 + i] ^ p[4 + i];
                } else if (alen == 20 && v[1] == 2) {
                    peer->fam = 6;
                    for (int i = 0; i < 16; i++)
                        peer->ip[i] = v[4 + i] ^ p[4 + i]; /* cookie then transaction ID */
                } else {
                    return 0;
                }
                peer->port = (uint16_t)((v[2] << 8 | v[3]) ^ (COOKIE >> 16));
                have_peer = 1;
            }
        } else if (type == 0x0013) {
            if (!have_data) {
                *data = v;
                *dlen = alen;
                have_data = 1;
            }
        } else if (type < 0x8000 || type == 0x8028) {
            return 0;
        }
        off += 4 + ((alen + 3) & ~3u);
    }
    return have_peer && have_data && off == len;
}

static void on_client_packets(worker_t *w, int first, int n)
{
    for (int i = 0; i < n; i++) {
        struct msghdr *mh = &w->rmsg[i].msg_hdr;
        uint32_t len = w->rmsg[i].msg_len;
        uint8_t *p = slot_data(w, first + i);
        uint8_t *p2 = slot_big(w, first + i); /* bytes beyond SMALL, if any */
        uint32_t len2 = len > SMALL ? len - SMALL : 0;
        addr_t src;
        BUMP(w->st.rx_client, 1);
        if ((mh->msg_flags & MSG_TRUNC) || addr_from_sa(&src, &w->raddr[i]) != 0) {
            BUMP(w->st.drop_truncated, 1);
            continue;
        }
        if (len >= 4 && p[0] >= 0x40 && p[0] <= 0x7F) {
            /* RFC 8656 §12: ChannelData -- never reaches the control plane */
            alloc_t *al = client_find(w, &src);
            chan_t *ch = al != NULL ? chan_by_number(al, (uint16_t)(p[0] << 8 | p[1])) : NULL;
            if (ch == NULL) {
                BUMP(w->st.drop_unknown_channel, 1); /* §12.6: no such channel: discard */
                continue;
            }
            uint32_t dlen = (uint32_t)p[2] << 8 | p[3];
            if (dlen + 4 > len) {
                BUMP(w->st.drop_short, 1); /* §12.4: shorter than its length field */
                continue;
            }
            if (!bw_admit(w, al, dlen, BW_TO_PEER))
                continue;
            /* anything after the length (padding, junk) is not relayed */
            uint32_t n1 = dlen <= SMALL - 4 ? dlen : SMALL - 4;
            queue_out(w, al->fd, p + 4, n1, p2, dlen - n1, &ch->peer_sa, ch->peer_salen);
            BUMP(al->pkts_to_peer, 1);
            BUMP(al->bytes_to_peer, dlen);
            continue;
        }
        addr_t peer;
        const uint8_t *data = NULL;
        uint32_t dlen = 0;
        if (len2 == 0 && parse_send(p, len, &peer, &data, &dlen)) {
            alloc_t *al = client_find(w, &src);
            if (al == NULL) {
                BUMP(w->st.drop_no_allocation, 1); /* §10.2: no allocation: discard */
                continue;
            }
            perm_t *pm = perm_find(al, peer.fam, peer.ip);
            if (pm != NULL && pm->fast_send) {
                if (al->mux != NULL && mux_claim(al, &peer, CLAIM_SEND) != 0) {
                    /* another allocation's peer on this shared socket (or no memory to note
                     * the claim): dropped, as Send indications are (§10.2) */
                    BUMP(w->st.drop_mux_conflict, 1);
                    continue;
                }
                if (!bw_admit(w, al, dlen, BW_TO_PEER))
                    continue;
                sockaddr_u sa;
                socklen_t salen = sa_from_addr(&sa, &peer);
                queue_out(w, al->fd, (uint8_t *)data, dlen, NULL, 0, &sa, salen);
                BUMP(al->pkts_to_peer, 1);
                BUMP(al->bytes_to_peer, dlen);
                continue;
            }
            /* no permission, or a peer the policy judges per port: the core decides */
        }
        upcall(w, &src, p, len - len2, p2, len2);
    }
}

static uint8_t *random12(worker_t *w)
{
    if (w->rnd_left < 12) {
        ssize_t r = getrandom(w->rnd, sizeof w->rnd, 0);
        if (r < (ssize_t)sizeof w->rnd) {
            /* cannot happen for 4096 bytes from an initialised pool; keep going regardless */
            for (size_t i = 0; i < sizeof w->rnd; i++)
                w->rnd[i] = (uint8_t)(w->rnd[i] * 33 + i);
        }
        w->rnd_left = sizeof w->rnd;
    }
    w->rnd_left -= 12;
    return w->rnd + w->rnd_left;
}

/* Received datagram i of a relay socket: its source in *src (0), or -1 when truncated or of an
 * unknown family (counted). */
static int peer_source(worker_t *w, int i, addr_t *src)
{
    BUMP(w->st.rx_peer, 1);
    if ((w->rmsg[i].msg_hdr.msg_flags & MSG_TRUNC) || addr_from_sa(src, &w->raddr[i]) != 0) {
        BUMP(w->st.drop_truncated, 1);
        return -1;
    }
    return 0;
}

/* The allocation a datagram from src on shared socket m is for (turn/multiplex.py): the one
 * that claimed src, else the only one with a permission for its IP; else none (counted). */
static inline alloc_t *mux_route(worker_t *w, mux_t *m, const addr_t *src)
{
    mnode_t *c = mtab_find(&m->claims, src);
    if (c != NULL)
        return c->al;
    addr_t k = ip_key(src->fam, src->ip);
    mnode_t *p = mtab_find(&m->perms, &k);
    if (p == NULL) {
        BUMP(w->st.drop_mux_unknown, 1); /* §9: nobody has a permission for this peer */
        return NULL;
    }
    if (p->count != 1) {
        BUMP(w->st.drop_mux_ambiguous, 1);
        return NULL;
    }
    return (alloc_t *)p->x;
}

/* One datagram from peer src (slot `slot`, received as message i) for allocation al. */
static void peer_packet(worker_t *w, alloc_t *al, int i, int slot, const addr_t *src0)
{
    {
        uint32_t len = w->rmsg[i].msg_len;
        uint8_t *p = slot_data(w, slot);
        uint8_t *p2 = slot_big(w, slot);
        uint32_t len2 = len > SMALL ? len - SMALL : 0, len1 = len - len2;
        addr_t src = *src0;
        chan_t *ch = chan_by_peer(al, &src);
        if (ch == NULL && perm_find(al, src.fam, src.ip) == NULL) {
            BUMP(al->dropped, 1); /* §9: no permission for this peer */
            return;
        }
        if (!bw_admit(w, al, len, BW_TO_CLIENT))
            return;
        if (ch != NULL) {
            /* RFC 8656 §12.4: ChannelData, header written in place in front of the payload;
             * no padding over UDP */
            if (len > 0xFFFF - 4) {
                BUMP(w->st.drop_too_big, 1);
                return;
            }
            p[-4] = (uint8_t)(ch->number >> 8);
            p[-3] = (uint8_t)ch->number;
            p[-2] = (uint8_t)(len >> 8);
            p[-1] = (uint8_t)len;
            queue_out(w, w->lfd, p - 4, len1 + 4, p2, len2, &al->client_sa, al->client_salen);
        } else {
            /* §10.3: Data indication (a permission exists: checked above) = header, XOR-PEER-ADDRESS, DATA (padded) */
            uint32_t xlen = src.fam == 4 ? 12 : 24;
            uint32_t pad = (4 - (len & 3)) & 3;
            uint32_t hlen = 20 + xlen + 4;
            uint32_t mlen = xlen + 4 + len + pad;
            if (20 + mlen > 65507) {
                BUMP(w->st.drop_too_big, 1);
                return;
            }
            uint8_t *h = p - hlen;
            const uint8_t *tid = random12(w);
            h[0] = 0x00;
            h[1] = 0x17;
            h[2] = (uint8_t)(mlen >> 8);
            h[3] = (uint8_t)mlen;
            h[4] = 0x21;
            h[5] = 0x12;
            h[6] = 0xA4;
            h[7] = 0x42;
            memcpy(h + 8, tid, 12);
            uint8_t *x = h + 20;
            x[0] = 0x00;
            x[1] = 0x12;
            x[2] = 0;
            x[3] = (uint8_t)(xlen - 4);
            x[4] = 0;
            x[5] = src.fam == 4 ? 1 : 2;
            uint16_t xport = src.port ^ (uint16_t)(COOKIE >> 16);
            x[6] = (uint8_t)(xport >> 8);
            x[7] = (uint8_t)xport;
            for (uint32_t k = 0; k < (src.fam == 4 ? 4u : 16u); k++)
                x[8 + k] = src.ip[k] ^ h[4 + k]; /* cookie, then the transaction ID (v6) */
            uint8_t *d = x + xlen;
            d[0] = 0x00;
            d[1] = 0x13;
            d[2] = (uint8_t)(len >> 8);
            d[3] = (uint8_t)len;
            if (len2 == 0) {
                memset(p + len, 0, pad); /* slot slack */
                queue_out(w, w->lfd, h, hlen + len + pad, NULL, 0, &al->client_sa,
                          al->client_salen);
            } else {
                memset(p2 + len2, 0, pad); /* BIG leaves room: len2 <= 65507 - SMALL */
                queue_out(w, w->lfd, h, hlen + len1, p2, len2 + pad, &al->client_sa,
                          al->client_salen);
            }
        }
        BUMP(al->pkts_to_client, 1);
        BUMP(al->bytes_to_client, len);
    }
}

static void on_peer_packets(worker_t *w, alloc_t *al, int first, int n)
{
    for (int i = 0; i < n; i++) {
        addr_t src;
        if (peer_source(w, i, &src) == 0)
            peer_packet(w, al, i, first + i, &src);
    }
}

/* A shared relay socket's datagrams: many allocations' peers in one recvmmsg batch, and their
 * packets to clients leave in one sendmmsg on the listener. */
static void on_mux_packets(worker_t *w, mux_t *m, int first, int n)
{
    for (int i = 0; i < n; i++) {
        addr_t src;
        alloc_t *al;
        if (peer_source(w, i, &src) == 0 && (al = mux_route(w, m, &src)) != NULL)
            peer_packet(w, al, i, first + i, &src);
    }
}

static void free_alloc(alloc_t *al)
{
    free(al->chans);
    free(al->held);
    free(al->perms);
    free(al);
}

/* One round of worker w: the n events an epoll_wait returned from w's epoll set, processed under
 * w's lock, then the flush and the graveyard. Runs on w's own thread, or on worker 0's while
 * folded (never on two threads at once: see fold_main). Returns the media packets moved. */
static uint64_t run_round(worker_t *w, struct epoll_event *ev, int n)
{
    /* let a waiting control-plane change in first (bounded) */
    for (int spin = 0; spin < 200 && __atomic_load_n(&w->writers, __ATOMIC_ACQUIRE); spin++)
        sched_yield();
    pthread_mutex_lock(&w->lock);
    if (__atomic_load_n(&w->eng->bw_on, __ATOMIC_RELAXED))
        w->now_ns = mono_ns();
    /* media moved (STUN requests, sent up to the control plane, do not count: a burst of
     * Allocates is answered as fast as it comes, never paused for) */
    uint64_t before = w->st.rx_client + w->st.rx_peer - w->st.upcalls;
    for (int i = 0; i < n; i++) {
        int kind = *(int *)ev[i].data.ptr;
        if (kind == KIND_WAKE) {
            uint64_t v;
            ssize_t r = read(w->wakefd, &v, sizeof v);
            (void)r;
        } else if (kind == KIND_LISTENER) {
            for (int round = 0; round < MAX_ROUNDS; round++) {
                int first, got = recv_batch(w, w->lfd, &first);
                on_client_packets(w, first, got);
                if (got < BATCH)
                    break;
            }
        } else if (kind == KIND_MUX) {
            mux_t *m = (mux_t *)ev[i].data.ptr;
            for (int round = 0; round < MAX_ROUNDS; round++) {
                int first, got = recv_batch(w, m->fd, &first);
                on_mux_packets(w, m, first, got);
                if (got < BATCH)
                    break;
            }
        } else {
            alloc_t *al = (alloc_t *)ev[i].data.ptr;
            for (int round = 0; round < MAX_ROUNDS && !al->dead; round++) {
                int first, got = recv_batch(w, al->fd, &first);
                on_peer_packets(w, al, first, got);
                if (got < BATCH)
                    break;
            }
        }
    }
    flush(w);
    while (w->graveyard != NULL) {
        alloc_t *g = w->graveyard;
        w->graveyard = g->gnext;
        free_alloc(g);
    }
    pthread_mutex_unlock(&w->lock);
    return w->st.rx_client + w->st.rx_peer - w->st.upcalls - before;
}

/* Packet-rate estimate over windows of at least 1 ms, kept by whichever thread runs w's rounds;
 * published with a relaxed store for worker 0's folding decision. */
static void rate_update(worker_t *w, uint64_t moved, uint64_t ns)
{
    w->win_pkts += moved;
    if (ns - w->win_start_ns >= 1000000u) {
        uint64_t r = w->win_pkts * 1000000u / (ns - w->win_start_ns);
        /* a window that spans an idle gap says little: no packets for > 10 ms is rate 0 */
        __atomic_store_n(&w->pkts_per_ms, ns - w->win_start_ns > 10000000u ? 0 : r,
                         __ATOMIC_RELAXED);
        __atomic_store_n(&w->win_start_ns, ns, __ATOMIC_RELAXED);
        w->win_pkts = 0;
    }
}

/* Steady traffic of tens of thousands of packets a second wakes a thread for one or two packets
 * at a time; a short pause lets the next ones queue up, so one wake-up and one syscall each way
 * serve several (interrupt coalescing; adds at most nap_us of latency). Traffic too slow to
 * bring two packets within the pause gains nothing from it (one timer wake-up instead of one
 * epoll wake-up): no pause. */
static int maybe_nap(int nap_us, uint64_t moved, uint64_t pkts_per_ms)
{
    if (nap_us > 0 && moved > 0 && moved < BATCH / 4 && pkts_per_ms * (uint64_t)nap_us >= 2000u) {
        struct timespec ts = {0, (long)nap_us * 1000L};
        nanosleep(&ts, NULL);
        return 1;
    }
    return 0;
}

/* While folded: take w's ready events without blocking and run its round (0 when none). */
static uint64_t poll_round(worker_t *w, struct epoll_event *ev)
{
    int n = epoll_wait(w->epfd, ev, 64, 0);
    return n > 0 ? run_round(w, ev, n) : 0;
}

/* A worker other than 0 while the engine is folded: its epoll set joins the fold set (worker 0's
 * thread serves it from then on) and the thread sleeps until the engine unfolds or stops. The
 * invariant that makes this safe: a worker's epoll set is in the fold set only while its own
 * thread is inside this function, so its events are never taken by two threads (a stale event
 * could otherwise name an allocation the other thread has already freed). Only worker 0's
 * thread removes a set from the fold set, under fold_lock, before it sets `folded` to 0. */
static void park(worker_t *w)
{
    engine_t *e = w->eng;
    pthread_mutex_lock(&e->fold_lock);
    while (e->folded && !__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
        if (!w->in_fold) {
            struct epoll_event fe = {.events = EPOLLIN, .data.ptr = w};
            if (epoll_ctl(e->fold_epfd, EPOLL_CTL_ADD, w->epfd, &fe) != 0) {
                w->no_fold = 1; /* cannot be served from there: keep running on its own */
                break;
            }
            __atomic_store_n(&w->in_fold, 1, __ATOMIC_RELEASE);
        }
        pthread_cond_wait(&e->fold_cond, &e->fold_lock);
    }
    pthread_mutex_unlock(&e->fold_lock);
}

/* Block in epoll_wait on epfd for thread `w`: the number of events, WAIT_AGAIN (a signal:
 * wait again) or WAIT_EXIT (stopping, or epoll failed: the thread ends). */
#define WAIT_AGAIN (-1)
#define WAIT_EXIT (-2)
static int wait_events(worker_t *w, int epfd, struct epoll_event *ev)
{
    int n = epoll_wait(epfd, ev, 64, -1);
    if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE))
        return WAIT_EXIT;
    if (n < 0)
        return errno == EINTR ? WAIT_AGAIN : WAIT_EXIT;
    return n;
}

static void *worker_main(void *arg)
{
    worker_t *w = arg;
    engine_t *e = w->eng;
    struct epoll_event ev[64];
    for (;;) {
        /* Checked before every wait, not only after it: engine_stop() sets `stop` and then
         * writes the wake eventfd, but a round that was already reading the eventfd for another
         * wake-up (a control-plane change) consumes that write too, and a wait after it would
         * block for good (seen as a hang in Engine.close under load). */
        if (__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE))
            break;
        if (!w->no_fold && __atomic_load_n(&e->folded, __ATOMIC_ACQUIRE)) {
            park(w);
            continue;
        }
        int n = wait_events(w, w->epfd, ev);
        if (n == WAIT_EXIT)
            break;
        if (n == WAIT_AGAIN)
            continue;
        uint64_t moved = run_round(w, ev, n);
        if (moved > 0 && (w->nap_us > 0 || e->fold_ppms > 0)) {
            rate_update(w, moved, mono_ns());
            maybe_nap(w->nap_us, moved, w->pkts_per_ms);
        }
    }
    return NULL;
}

/* Worker 0's thread when the engine may fold (turn.dataplane_fold_pps, more than one worker).
 *
 * Why fold: one thread per core is what a flood needs, but at moderate rates each thread wakes
 * for its own share of the packets, so every wake-up, epoll_wait, recvmmsg, sendmmsg and
 * coalescing pause serves half (a quarter...) as many packets as one thread's would, and the CPU
 * per packet rises (docs/BENCHMARKS.md: 0.57x coturn's at 100,000 pkt/s with two threads, 0.44-
 * 0.51x with one). So while the total rate stays below fold_ppms, this thread serves every
 * worker's epoll set through one epoll set of epoll sets (fold_epfd) and the others park;
 * above twice that it hands them back. Nothing else changes: the sockets stay in their
 * worker's epoll set, each round still runs under that worker's lock with that worker's
 * buffers, so the control plane cannot tell. */
static void *fold_main(void *arg)
{
    worker_t *w0 = arg;
    engine_t *e = w0->eng;
    struct epoll_event ev[64], fev[64];
    int low = 0; /* consecutive rate windows below the fold threshold */
    uint64_t last_win = 0;
    int napped = 0; /* the last round ended in a coalescing pause */
    for (;;) {
        if (__atomic_load_n(&w0->stop, __ATOMIC_ACQUIRE))
            break;
        uint64_t moved = 0;
        int folded = e->folded; /* only this thread writes it */
        if (!folded) {
            int n = wait_events(w0, w0->epfd, ev);
            if (n == WAIT_EXIT)
                break;
            if (n == WAIT_AGAIN)
                continue;
            moved = run_round(w0, ev, n);
        } else if (napped) {
            /* After a pause packets are waiting almost surely: ask each set directly rather
             * than the set of sets first (one system call less per wake-up). A set whose
             * thread is still on its way to park (in_fold 0) is left to the fold set. Only
             * this thread clears in_fold, so a set read as in is really in. */
            for (int k = 0; k < e->nworkers; k++) {
                worker_t *w = e->workers[k];
                if (k != 0 && !__atomic_load_n(&w->in_fold, __ATOMIC_ACQUIRE))
                    continue;
                moved += poll_round(w, ev);
            }
        } else {
            int nf = wait_events(w0, e->fold_epfd, fev);
            if (nf == WAIT_EXIT)
                break;
            if (nf == WAIT_AGAIN)
                continue;
            for (int j = 0; j < nf; j++)
                moved += poll_round((worker_t *)fev[j].data.ptr, ev);
        }
        napped = 0;
        if (moved == 0)
            continue;
        uint64_t ns = mono_ns();
        /* folded, this thread moves every packet: one estimate (kept in w0) is the total */
        rate_update(w0, moved, ns);
        uint64_t total = w0->pkts_per_ms;
        if (!folded)
            for (int k = 1; k < e->nworkers; k++) {
                worker_t *w = e->workers[k];
                /* a thread whose media stopped keeps its last estimate: not counted after 10 ms */
                if ((int64_t)(ns - LOAD(w->win_start_ns)) < 10000000)
                    total += LOAD(w->pkts_per_ms);
            }
        if (w0->win_start_ns != last_win) { /* a new window: judge the rate */
            last_win = w0->win_start_ns;
            low = total < e->fold_ppms ? low + 1 : 0;
            if (!folded && low >= 10) {
                /* fold: worker 0's own set first, then wake the others so that they park */
                pthread_mutex_lock(&e->fold_lock);
                struct epoll_event fe = {.events = EPOLLIN, .data.ptr = w0};
                if (epoll_ctl(e->fold_epfd, EPOLL_CTL_ADD, w0->epfd, &fe) == 0) {
                    __atomic_store_n(&e->folded, 1, __ATOMIC_RELEASE);
                    __atomic_store_n(&e->folds, e->folds + 1, __ATOMIC_RELAXED);
                }
                pthread_mutex_unlock(&e->fold_lock);
                for (int k = 1; k < e->nworkers; k++) {
                    uint64_t one = 1;
                    ssize_t r = write(e->workers[k]->wakefd, &one, sizeof one);
                    (void)r;
                }
            } else if (folded && total > 2 * e->fold_ppms) {
                /* unfold: take every parked set out before the threads may wait on them */
                pthread_mutex_lock(&e->fold_lock);
                for (int k = 0; k < e->nworkers; k++) {
                    worker_t *w = e->workers[k];
                    if (k == 0 || w->in_fold) {
                        epoll_ctl(e->fold_epfd, EPOLL_CTL_DEL, w->epfd, NULL);
                        __atomic_store_n(&w->in_fold, 0, __ATOMIC_RELEASE);
                    }
                }
                __atomic_store_n(&e->folded, 0, __ATOMIC_RELEASE);
                __atomic_store_n(&e->unfolds, e->unfolds + 1, __ATOMIC_RELAXED);
                pthread_cond_broadcast(&e->fold_cond);
                pthread_mutex_unlock(&e->fold_lock);
                low = 0;
            }
        }
        napped = maybe_nap(w0->nap_us, moved, folded ? total : w0->pkts_per_ms) && folded;
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------------
 * the Python object
 */

static void wlock(worker_t *w)
{
    __atomic_add_fetch(&w->writers, 1, __ATOMIC_ACQ_REL);
    if (pthread_mutex_trylock(&w->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&w->lock);
        Py_END_ALLOW_THREADS
    }
    __atomic_sub_fetch(&w->writers, 1, __ATOMIC_ACQ_REL);
}

static void wunlock(worker_t *w)
{
    pthread_mutex_unlock(&w->lock);
}

static void set_bufs(int fd, int size)
{
    /* sized for bursts; SO_*BUFFORCE works with CAP_NET_ADMIN, else the kernel caps at
     * net.core.rmem_max / wmem_max */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

static void engine_stop(engine_t *e)
{
    if (e->workers == NULL)
        return;
    for (int k = 0; k < e->nworkers; k++) {
        worker_t *w = e->workers[k];
        if (w == NULL || !w->started)
            continue;
        __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
        uint64_t one = 1;
        ssize_t r = write(w->wakefd, &one, sizeof one);
        (void)r;
    }
    /* parked threads (folding) sleep on the condition, not on their epoll set */
    pthread_mutex_lock(&e->fold_lock);
    pthread_cond_broadcast(&e->fold_cond);
    pthread_mutex_unlock(&e->fold_lock);
    Py_BEGIN_ALLOW_THREADS
    for (int k = 0; k < e->nworkers; k++) {
        worker_t *w = e->workers[k];
        if (w != NULL && w->started) {
            pthread_join(w->thread, NULL);
            w->started = 0;
        }
    }
    Py_END_ALLOW_THREADS
}

static void engine_free_all(engine_t *e)
{
    engine_stop(e);
    for (size_t i = 0; i < e->idcap; i++) {
        alloc_t *x = e->idtab[i];
        while (x != NULL) {
            alloc_t *nx = x->idnext;
            if (x->fd >= 0 && x->mux == NULL)
                close(x->fd);
            free_alloc(x);
            x = nx;
        }
    }
    free(e->idtab);
    e->idtab = NULL;
    for (int i = 0; i < e->nmux; i++) {
        mux_t *m = e->muxes[i];
        if (m->fd >= 0)
            close(m->fd);
        mtab_free(&m->claims); /* the nodes of every allocation's claims */
        mtab_free(&m->perms);
        free(m);
    }
    free(e->muxes);
    e->muxes = NULL;
    e->nmux = e->capmux = 0;
    free(e->ubw);
    e->ubw = NULL;
    e->idtab = NULL;
    e->idcap = e->idcount = 0;
    if (e->workers != NULL) {
        for (int k = 0; k < e->nworkers; k++) {
            worker_t *w = e->workers[k];
            if (w == NULL)
                continue;
            while (w->graveyard != NULL) {
                alloc_t *g = w->graveyard;
                w->graveyard = g->gnext;
                free_alloc(g);
            }
            if (w->lfd >= 0 && e->own_lfds)
                close(w->lfd);
            if (w->epfd >= 0)
                close(w->epfd);
            if (w->wakefd >= 0)
                close(w->wakefd);
            if (w->small != NULL)
                munmap(w->small, (size_t)SLOTS * SLOT_SMALL);
            if (w->big != NULL)
                munmap(w->big, (size_t)SLOTS * BIG);
            free(w->htab);
            pthread_mutex_destroy(&w->lock);
            free(w);
        }
        free(e->workers);
        e->workers = NULL;
    }
    up_t *u = e->qhead;
    while (u != NULL) {
        up_t *nx = u->next;
        free(u);
        u = nx;
    }
    e->qhead = e->qtail = NULL;
    e->qcount = 0;
    if (e->efd >= 0) {
        close(e->efd);
        e->efd = -1;
    }
    if (e->cfd >= 0) {
        close(e->cfd);
        e->cfd = -1;
    }
    if (e->cbuf != NULL) {
        munmap(e->cbuf, (size_t)CTL_BATCH * CTL_SLOT);
        e->cbuf = NULL;
    }
    if (e->fold_epfd >= 0) {
        close(e->fold_epfd);
        e->fold_epfd = -1;
    }
    e->closed = 1;
}

static void Engine_dealloc(engine_t *e)
{
    engine_free_all(e);
    pthread_mutex_destroy(&e->qlock);
    pthread_mutex_destroy(&e->fold_lock);
    pthread_cond_destroy(&e->fold_cond);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"listener_fds", "queue_limit", "buffer_bytes", "gso", "coalesce_us",
                             "fold_pps", "control_fd", NULL};
    PyObject *fds;
    Py_ssize_t qlimit = 4096;
    int bufbytes = 4 * 1024 * 1024, gso = 1, coalesce_us = 0, cfd = -1;
    long long fold_pps = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|nipiLi", kwlist, &fds, &qlimit, &bufbytes, &gso,
                                     &coalesce_us, &fold_pps, &cfd))
        return NULL;
    if (coalesce_us < 0 || coalesce_us > 1000) {
        PyErr_SetString(PyExc_ValueError, "coalesce_us must be 0-1000");
        return NULL;
    }
    if (fold_pps < 0 || fold_pps > 100000000LL) {
        PyErr_SetString(PyExc_ValueError, "fold_pps must be 0-100000000");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(fds, "listener_fds must be a sequence of file descriptors");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 1024 || qlimit < 1) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "need 1-1024 listener sockets and queue_limit >= 1");
        return NULL;
    }
    engine_t *e = (engine_t *)type->tp_alloc(type, 0);
    if (e == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    e->cfd = -1; /* set once the engine is built, with the listeners (owned from then on) */
    pthread_mutex_init(&e->qlock, NULL);
    pthread_mutex_init(&e->fold_lock, NULL);
    pthread_cond_init(&e->fold_cond, NULL);
    /* packets per ms, at least 1 when folding is on at all */
    e->fold_ppms = fold_pps > 0 ? (uint64_t)(fold_pps + 999) / 1000 : 0;
    e->fold_epfd = epoll_create1(EPOLL_CLOEXEC);
    e->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->qlimit = (size_t)qlimit;
    e->nworkers = (int)n;
    e->workers = calloc((size_t)n, sizeof *e->workers);
    e->ubw = calloc(2 * USER_SLOTS, sizeof *e->ubw);
    if (e->efd < 0 || e->fold_epfd < 0 || e->workers == NULL || e->ubw == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        int fd = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, k));
        if (fd == -1 && PyErr_Occurred())
            goto fail;
        worker_t *w = calloc(1, sizeof *w);
        if (w == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        e->workers[k] = w;
        w->eng = e;
        w->index = (int)k;
        w->lfd = -1;
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->ltag = KIND_LISTENER;
        w->wtag = KIND_WAKE;
        w->gso = gso;
        w->nap_us = coalesce_us;
        pthread_mutex_init(&w->lock, NULL);
        /* MAP_NORESERVE: only the pages datagrams land in become resident */
        w->small = mmap(NULL, (size_t)SLOTS * SLOT_SMALL, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        w->big = mmap(NULL, (size_t)SLOTS * BIG, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (w->small == MAP_FAILED || w->big == MAP_FAILED) {
            if (w->small == MAP_FAILED)
                w->small = NULL;
            if (w->big == MAP_FAILED)
                w->big = NULL;
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        if (w->epfd < 0 || w->wakefd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        w->lfd = fd; /* owned (closed by close()) once the whole engine is built */
        set_bufs(fd, bufbytes);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->ltag};
        struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &w->wtag};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) != 0 ||
            epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakefd, &wev) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
    }
    Py_DECREF(seq);
    if (cfd >= 0) {
        e->cbuf = mmap(NULL, (size_t)CTL_BATCH * CTL_SLOT, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (e->cbuf == MAP_FAILED) {
            e->cbuf = NULL;
            PyErr_SetFromErrno(PyExc_OSError);
            Py_DECREF(e);
            return NULL;
        }
        set_bufs(cfd, bufbytes);
        e->cfd = cfd;
    }
    e->own_lfds = 1;
    return (PyObject *)e;
fail:
    Py_DECREF(seq);
    Py_DECREF(e);
    return NULL;
}

static PyObject *Engine_start(engine_t *e, PyObject *unused)
{
    if (e->closed) {
        PyErr_SetString(PyExc_RuntimeError, "engine closed");
        return NULL;
    }
    if (e->started)
        Py_RETURN_NONE;
    /* relay threads take no signals: they stay with the event loop's thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = 0;
    for (int k = 0; k < e->nworkers; k++) {
        worker_t *w = e->workers[k];
        /* worker 0's thread decides folding (and serves everyone while folded) */
        int fold = k == 0 && e->nworkers > 1 && e->fold_ppms > 0;
        err = pthread_create(&w->thread, NULL, fold ? fold_main : worker_main, w);
        if (err != 0)
            break;
        w->started = 1;
        /* A name an operator sees in `top -H`, `ps -L` and perf: which threads relay media
         * (15 characters at most; a failure only leaves the inherited name). */
        char name[16];
        snprintf(name, sizeof name, k < 10 ? "confedge-relay%d" : "confedge-rel%d", k);
        pthread_setname_np(w->thread, name);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        engine_stop(e);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->started = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_close(engine_t *e, PyObject *unused)
{
    if (!e->closed)
        engine_free_all(e);
    Py_RETURN_NONE;
}

static PyObject *Engine_fileno(engine_t *e, PyObject *unused)
{
    return PyLong_FromLong(e->efd);
}

static int check_open(engine_t *e)
{
    if (e->closed) {
        PyErr_SetString(PyExc_RuntimeError, "engine closed");
        return -1;
    }
    return 0;
}

static PyObject *Engine_drain(engine_t *e, PyObject *unused)
{
    if (check_open(e) < 0)
        return NULL;
    uint64_t v;
    ssize_t r = read(e->efd, &v, sizeof v);
    (void)r;
    pthread_mutex_lock(&e->qlock);
    up_t *u = e->qhead;
    e->qhead = e->qtail = NULL;
    e->qcount = 0;
    e->notified = 0;
    pthread_mutex_unlock(&e->qlock);
    PyObject *list = PyList_New(0);
    while (u != NULL) {
        up_t *nx = u->next;
        if (list != NULL) {
            PyObject *item = Py_BuildValue("(y#Ni)", (const char *)u->data, (Py_ssize_t)u->len,
                                           addr_to_py(&u->src), u->worker);
            if (item == NULL || PyList_Append(list, item) != 0)
                Py_CLEAR(list);
            Py_XDECREF(item);
        }
        free(u);
        u = nx;
    }
    return list;
}

static PyObject *Engine_control_fileno(engine_t *e, PyObject *unused)
{
    return PyLong_FromLong(e->cfd);
}

/* The worker a client lands on for its ChannelData and Send indications: what steer()'s
 * program computes from the UDP source port (so the client's allocation is made there). */
static inline int worker_for_port(const engine_t *e, uint16_t port)
{
    return (int)(port % (uint16_t)e->nworkers);
}

/* receive() -> [(data, client address, thread), ...]: the datagrams waiting on the control
 * socket (STUN requests, steered there by steer()'s program), read by the Python thread
 * itself -- CTL_ROUNDS recvmmsg calls at most, without blocking.  A datagram longer than a
 * slot cannot be: CTL_SLOT is the largest UDP payload; MSG_TRUNC is still checked and counted. */
static PyObject *Engine_receive(engine_t *e, PyObject *unused)
{
    if (check_open(e) < 0)
        return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL || e->cfd < 0)
        return list;
    struct mmsghdr mm[CTL_BATCH];
    struct iovec iov[CTL_BATCH];
    sockaddr_u sa[CTL_BATCH];
    for (int round = 0; round < CTL_ROUNDS; round++) {
        for (int i = 0; i < CTL_BATCH; i++) {
            iov[i].iov_base = e->cbuf + (size_t)i * CTL_SLOT;
            iov[i].iov_len = CTL_SLOT;
            memset(&mm[i], 0, sizeof mm[i]);
            mm[i].msg_hdr.msg_name = &sa[i];
            mm[i].msg_hdr.msg_namelen = sizeof sa[i];
            mm[i].msg_hdr.msg_iov = &iov[i];
            mm[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(e->cfd, mm, CTL_BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0)
            break; /* EAGAIN: drained (any other error: as if nothing waited, like recvfrom) */
        e->ctl_recv_calls++;
        for (int i = 0; i < n; i++) {
            addr_t a;
            if ((mm[i].msg_hdr.msg_flags & MSG_TRUNC) != 0) {
                e->ctl_truncated++;
                continue;
            }
            if (addr_from_sa(&a, &sa[i]) != 0)
                continue;
            e->ctl_rx++;
            PyObject *item = Py_BuildValue("(y#Ni)", (const char *)iov[i].iov_base,
                                           (Py_ssize_t)mm[i].msg_len, addr_to_py(&a),
                                           worker_for_port(e, a.port));
            if (item == NULL || PyList_Append(list, item) != 0) {
                Py_XDECREF(item);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(item);
        }
        if (n < CTL_BATCH)
            break;
    }
    return list;
}

static worker_t *worker_arg(engine_t *e, int k)
{
    if (k < 0 || k >= e->nworkers) {
        PyErr_Format(PyExc_ValueError, "no relay thread %d", k);
        return NULL;
    }
    return e->workers[k];
}

static PyObject *Engine_send(engine_t *e, PyObject *args)
{
    int k;
    Py_buffer data;
    PyObject *addr;
    addr_t a;
    sockaddr_u sa;
    if (!PyArg_ParseTuple(args, "iy*O", &k, &data, &addr))
        return NULL;
    worker_t *w;
    if (check_open(e) < 0 || (w = worker_arg(e, k)) == NULL || addr_from_py(addr, &a) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    socklen_t salen = sa_from_addr(&sa, &a);
    if (sendto(w->lfd, data.buf, (size_t)data.len, MSG_DONTWAIT, &sa.sa, salen) < 0)
        e->py_send_errors++; /* an answer the kernel refused: like a lost datagram */
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

/* send_many's batch: sendmmsg takes at most this many answers per call */
#define SEND_MANY_MAX 64

/* Send the prepared answers mm[0..m) on fd; one the kernel refuses is counted like a lost
 * datagram and the rest still go. */
static void send_answers(engine_t *e, int fd, struct mmsghdr *mm, int m)
{
    int k = 0;
    while (k < m) {
        int r = sendmmsg(fd, &mm[k], (unsigned)(m - k), MSG_DONTWAIT);
        e->ctl_send_calls++;
        if (r > 0) {
            k += r;
        } else if (!(r < 0 && errno == EINTR)) {
            e->py_send_errors++;
            k++;
        }
    }
}

/* send_many([(thread, data, addr), ...]): the answers to one drain of control-plane requests,
 * one sendmmsg per relay thread's listener (up to SEND_MANY_MAX answers a call) instead of a
 * sendto each.  A drain's requests come from clients of every thread in turn (the thread is
 * the client's source port mod N), so the answers are grouped by thread first: each client's
 * answers keep their order, and only answers to different clients change places, which UDP
 * never promised anyway.  (Grouping runs of the same thread only, as before, made one
 * sendmmsg per answer when the clients alternate, as a burst of Allocates from many ports
 * does.) */
static PyObject *Engine_send_many(engine_t *e, PyObject *items)
{
    if (check_open(e) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(items, "send_many takes a list of (thread, data, addr)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), ok = 0;
    int failed = 0;
    struct answer {
        PyObject *data; /* borrowed: seq holds the tuples, they hold the bytes */
        sockaddr_u sa;
        socklen_t salen;
        int thread;
    } *ans = NULL;
    if (n > 0 && (ans = PyMem_New(struct answer, (size_t)n)) == NULL) {
        PyErr_NoMemory();
        failed = 1;
        n = 0;
    }
    /* what precedes a malformed item still goes, then its error is raised */
    for (; ok < n; ok++) {
        PyObject *addr;
        addr_t a;
        struct answer *x = &ans[ok];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, ok), "iSO", &x->thread, &x->data,
                              &addr) ||
            worker_arg(e, x->thread) == NULL || addr_from_py(addr, &a) < 0) {
            failed = 1;
            break;
        }
        x->salen = sa_from_addr(&x->sa, &a);
    }
    struct mmsghdr mm[SEND_MANY_MAX];
    struct iovec iov[SEND_MANY_MAX];
    for (int k = 0; k < e->nworkers && ok > 0; k++) {
        int m = 0;
        for (Py_ssize_t i = 0; i < ok; i++) {
            if (ans[i].thread != k)
                continue;
            iov[m].iov_base = PyBytes_AS_STRING(ans[i].data);
            iov[m].iov_len = (size_t)PyBytes_GET_SIZE(ans[i].data);
            memset(&mm[m], 0, sizeof mm[m]);
            mm[m].msg_hdr.msg_name = &ans[i].sa;
            mm[m].msg_hdr.msg_namelen = ans[i].salen;
            mm[m].msg_hdr.msg_iov = &iov[m];
            mm[m].msg_hdr.msg_iovlen = 1;
            if (++m == SEND_MANY_MAX) {
                send_answers(e, e->workers[k]->lfd, mm, m);
                m = 0;
            }
        }
        if (m > 0)
            send_answers(e, e->workers[k]->lfd, mm, m);
    }
    PyMem_Free(ans);
    Py_DECREF(seq);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static alloc_t *alloc_arg(engine_t *e, long long id)
{
    alloc_t *al = id_find(e, id);
    if (al == NULL)
        PyErr_Format(PyExc_KeyError, "no allocation %lld", id);
    return al;
}

static PyObject *Engine_add_allocation(engine_t *e, PyObject *args)
{
    long long id;
    int k, fd, family, user_slot = -1, mux = -1;
    unsigned long long rate = 0;
    PyObject *client;
    if (!PyArg_ParseTuple(args, "LiiiO|iKi", &id, &k, &fd, &family, &client, &user_slot, &rate,
                          &mux))
        return NULL;
    mux_t *m = NULL;
    if (mux >= 0) {
        /* on a shared relay socket: relay_fd is not used (and not ours) */
        if (mux >= e->nmux || e->muxes[mux]->worker != k || e->muxes[mux]->family != family) {
            return PyErr_Format(PyExc_ValueError,
                                "shared relay socket %d is not one of thread %d, IPv%d", mux, k,
                                family);
        }
        m = e->muxes[mux];
        fd = -1;
    }
    if (user_slot >= USER_SLOTS) {
        PyErr_Format(PyExc_ValueError, "user slot %d out of range", user_slot);
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    worker_t *w;
    alloc_t *al = NULL;
    if (check_open(e) < 0 || (w = worker_arg(e, k)) == NULL)
        goto fail;
    if (id_find(e, id) != NULL) {
        PyErr_Format(PyExc_ValueError, "allocation %lld exists", id);
        goto fail;
    }
    al = calloc(1, sizeof *al);
    if (al == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    al->kind = KIND_ALLOC;
    al->fd = m != NULL ? m->fd : fd;
    al->mux = m;
    al->family = family;
    al->worker = k;
    al->id = id;
    if (addr_from_py(client, &al->client) < 0)
        goto fail;
    al->client_salen = sa_from_addr(&al->client_sa, &al->client);
    al->ubw = user_slot >= 0 ? &e->ubw[2 * user_slot] : NULL;
    bucket_set(&al->bw[0], rate, mono_ns());
    bucket_set(&al->bw[1], rate, mono_ns());
    if (rate != 0)
        __atomic_store_n(&e->bw_on, 1, __ATOMIC_RELEASE);
    if (m == NULL)
        set_bufs(fd, 1024 * 1024);
    wlock(w);
    if (client_find(w, &al->client) != NULL) {
        wunlock(w);
        PyErr_SetString(PyExc_ValueError, "this client already has an allocation");
        goto fail;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = al};
    if (client_insert(w, al) != 0) {
        wunlock(w);
        PyErr_NoMemory();
        goto fail;
    }
    if (m == NULL && epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        client_remove(w, al);
        wunlock(w);
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    if (m != NULL)
        m->nallocs++;
    wunlock(w);
    if (id_insert(e, al) != 0) {
        /* cannot really happen (tiny table); undo */
        wlock(w);
        client_remove(w, al);
        if (m != NULL)
            m->nallocs--;
        else
            epoll_ctl(w->epfd, EPOLL_CTL_DEL, fd, NULL);
        wunlock(w);
        PyErr_NoMemory();
        goto fail;
    }
    Py_RETURN_NONE;
fail:
    free(al);
    if (fd >= 0)
        close(fd); /* the fd was handed over: never leak it */
    return NULL;
}

/* (pkts, bytes to peer, pkts, bytes to client, dropped, kernel drops, dropped by bandwidth).
 * The relay socket's kernel drops (SO_MEMINFO, a system call) are the ones read at the
 * allocation's end (0 while it lives; a shared socket's are the engine's stats): the control
 * plane samples every live allocation's counters each second (core.sample) and has no use for
 * them there, and with thousands of allocations reading them was thousands of system calls a
 * second on its thread. Engine.stats() still reads the live sockets' drops on demand. */
static PyObject *counters_tuple(alloc_t *al)
{
    return Py_BuildValue("(KKKKKKK)", (unsigned long long)(LOAD(al->pkts_to_peer) + al->py_pkts_to_peer),
                         (unsigned long long)(LOAD(al->bytes_to_peer) + al->py_bytes_to_peer),
                         (unsigned long long)LOAD(al->pkts_to_client),
                         (unsigned long long)LOAD(al->bytes_to_client),
                         (unsigned long long)LOAD(al->dropped),
                         (unsigned long long)al->kernel_drops,
                         (unsigned long long)LOAD(al->dropped_bw));
}

/* The allocation named by the only argument: 0 with *out set (NULL if unknown), -1 on error. */
static int one_alloc_arg(engine_t *e, PyObject *args, alloc_t **out)
{
    long long id;
    if (!PyArg_ParseTuple(args, "L", &id) || check_open(e) < 0)
        return -1;
    *out = id_find(e, id);
    return 0;
}

static PyObject *Engine_remove_allocation(engine_t *e, PyObject *args)
{
    alloc_t *al;
    if (one_alloc_arg(e, args, &al) < 0)
        return NULL;
    if (al == NULL)
        Py_RETURN_NONE;
    worker_t *w = e->workers[al->worker];
    id_remove(e, al);
    wlock(w);
    client_remove(w, al);
    if (al->mux != NULL) {
        mux_leave(al); /* its peers are free for other allocations on the socket */
    } else {
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, al->fd, NULL);
        al->kernel_drops = kernel_drops(al->fd);
        close(al->fd); /* the relay port is free from here on */
    }
    al->fd = -1;
    al->dead = 1;
    al->gnext = w->graveyard;
    w->graveyard = al;
    PyObject *c = counters_tuple(al); /* al->kernel_drops was read just above */
    e->ended[0] += LOAD(al->pkts_to_peer) + al->py_pkts_to_peer;
    e->ended[1] += LOAD(al->bytes_to_peer) + al->py_bytes_to_peer;
    e->ended[2] += LOAD(al->pkts_to_client);
    e->ended[3] += LOAD(al->bytes_to_client);
    e->ended[4] += LOAD(al->dropped);
    e->ended[5] += LOAD(al->dropped_bw);
    wunlock(w);
    /* the worker frees the memory at the end of its next round: wake it */
    uint64_t one = 1;
    ssize_t r = write(w->wakefd, &one, sizeof one);
    (void)r;
    return c;
}

static PyObject *Engine_add_permission(engine_t *e, PyObject *args)
{
    long long id;
    const char *ip;
    int fast;
    perm_t pm;
    if (!PyArg_ParseTuple(args, "Lsp", &id, &ip, &fast))
        return NULL;
    alloc_t *al;
    if (check_open(e) < 0 || (al = alloc_arg(e, id)) == NULL)
        return NULL;
    memset(&pm, 0, sizeof pm);
    if (parse_ip(ip, &pm.fam, pm.ip) != 0)
        return PyErr_Format(PyExc_ValueError, "not an IP address: %s", ip);
    pm.fast_send = (uint8_t)fast;
    worker_t *w = e->workers[al->worker];
    wlock(w);
    perm_t *old = perm_find(al, pm.fam, pm.ip);
    int r = al->mux != NULL && old == NULL ? mux_perm_add(al, pm.fam, pm.ip) : 0;
    if (r == 0)
        r = put_elem((void **)&al->perms, &al->nperms, &al->capperms, sizeof pm, old, &pm);
    if (r != 0 && al->mux != NULL && old == NULL)
        mux_perm_del(al, pm.fam, pm.ip);
    /* channels suspended when this IP's permission lapsed relay again (RFC 8656 §9) */
    if (r == 0)
        r = chans_move(&al->held, &al->nheld, &al->chans, &al->nchans, &al->capchans, pm.fam,
                       pm.ip);
    wunlock(w);
    if (r != 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Engine_remove_permission(engine_t *e, PyObject *args)
{
    long long id;
    const char *ip;
    uint8_t fam, raw[16];
    if (!PyArg_ParseTuple(args, "Ls", &id, &ip))
        return NULL;
    if (check_open(e) < 0)
        return NULL;
    alloc_t *al = id_find(e, id);
    if (al == NULL || parse_ip(ip, &fam, raw) != 0)
        Py_RETURN_NONE;
    worker_t *w = e->workers[al->worker];
    wlock(w);
    perm_t *pm = perm_find(al, fam, raw);
    int r = 0;
    if (pm != NULL) {
        *pm = al->perms[--al->nperms];
        if (al->mux != NULL)
            mux_perm_del(al, fam, raw);
        /* RFC 8656 §9, §12: without a permission nothing is relayed, also on a bound channel;
         * the channel stays bound (held) until its own expiry or the permission's return */
        r = chans_move(&al->chans, &al->nchans, &al->held, &al->nheld, &al->capheld, fam, raw);
    }
    wunlock(w);
    if (r != 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Engine_add_channel(engine_t *e, PyObject *args)
{
    long long id;
    int number;
    PyObject *peer;
    chan_t ch;
    if (!PyArg_ParseTuple(args, "LiO", &id, &number, &peer))
        return NULL;
    alloc_t *al;
    if (check_open(e) < 0 || (al = alloc_arg(e, id)) == NULL)
        return NULL;
    if (number < 0x4000 || number > 0x7FFF)
        return PyErr_Format(PyExc_ValueError, "not a channel number: %d", number);
    memset(&ch, 0, sizeof ch);
    if (addr_from_py(peer, &ch.peer) < 0)
        return NULL;
    ch.number = (uint16_t)number;
    ch.peer_salen = sa_from_addr(&ch.peer_sa, &ch.peer);
    worker_t *w = e->workers[al->worker];
    wlock(w);
    int r = al->mux != NULL ? mux_claim(al, &ch.peer, CLAIM_CHANNEL) : 0;
    if (r == 1 || r == 2) {
        wunlock(w);
        if (r == 1)
            return PyErr_Format(PeerTaken, "in use by another allocation");
        return PyErr_Format(PeerTaken, "the allocation already uses %d peer addresses",
                            MUX_MAX_CLAIMS);
    }
    if (r == 0) {
        /* relayed only while its peer IP has a permission (the core installs it first) */
        if (perm_find(al, ch.peer.fam, ch.peer.ip) != NULL)
            r = put_elem((void **)&al->chans, &al->nchans, &al->capchans, sizeof ch,
                         chan_by_number(al, ch.number), &ch);
        else
            r = put_elem((void **)&al->held, &al->nheld, &al->capheld, sizeof ch,
                         held_by_number(al, ch.number), &ch);
    }
    wunlock(w);
    if (r != 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *Engine_remove_channel(engine_t *e, PyObject *args)
{
    long long id;
    int number;
    if (!PyArg_ParseTuple(args, "Li", &id, &number))
        return NULL;
    if (check_open(e) < 0)
        return NULL;
    alloc_t *al = id_find(e, id);
    if (al == NULL)
        Py_RETURN_NONE;
    worker_t *w = e->workers[al->worker];
    wlock(w);
    chan_t *ch = chan_by_number(al, (uint16_t)number);
    if (ch != NULL) {
        if (al->mux != NULL)
            mux_release(al, &ch->peer, CLAIM_CHANNEL);
        *ch = al->chans[--al->nchans];
    } else if ((ch = held_by_number(al, (uint16_t)number)) != NULL) {
        if (al->mux != NULL)
            mux_release(al, &ch->peer, CLAIM_CHANNEL);
        *ch = al->held[--al->nheld];
    }
    wunlock(w);
    Py_RETURN_NONE;
}

static PyObject *Engine_send_to_peer(engine_t *e, PyObject *args)
{
    long long id;
    PyObject *peer;
    Py_buffer data;
    addr_t a;
    sockaddr_u sa;
    if (!PyArg_ParseTuple(args, "LOy*", &id, &peer, &data))
        return NULL;
    alloc_t *al = NULL;
    if (check_open(e) < 0 || addr_from_py(peer, &a) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    al = id_find(e, id);
    if (al != NULL && al->mux != NULL) {
        worker_t *w = e->workers[al->worker];
        wlock(w);
        int r = mux_claim(al, &a, CLAIM_SEND);
        wunlock(w);
        if (r != 0) {
            e->py_mux_conflict++; /* another allocation's peer: dropped (§10.2) */
            al = NULL;
        }
    }
    if (al != NULL) {
        socklen_t salen = sa_from_addr(&sa, &a);
        /* the fd stays open while the allocation is in the id table (closed only by Python) */
        ssize_t r = sendto(al->fd, data.buf, (size_t)data.len, MSG_DONTWAIT, &sa.sa, salen);
        (void)r;
        __atomic_store_n(&al->py_pkts_to_peer, al->py_pkts_to_peer + 1, __ATOMIC_RELAXED);
        __atomic_store_n(&al->py_bytes_to_peer, al->py_bytes_to_peer + (uint64_t)data.len,
                         __ATOMIC_RELAXED);
    }
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

static PyObject *Engine_counters(engine_t *e, PyObject *args)
{
    alloc_t *al;
    if (one_alloc_arg(e, args, &al) < 0)
        return NULL;
    if (al == NULL)
        Py_RETURN_NONE;
    return counters_tuple(al);
}

static PyObject *Engine_totals(engine_t *e, PyObject *unused)
{
    uint64_t t[6];
    memcpy(t, e->ended, sizeof t);
    for (size_t i = 0; i < e->idcap; i++) {
        for (alloc_t *x = e->idtab[i]; x != NULL; x = x->idnext) {
            t[0] += LOAD(x->pkts_to_peer) + x->py_pkts_to_peer;
            t[1] += LOAD(x->bytes_to_peer) + x->py_bytes_to_peer;
            t[2] += LOAD(x->pkts_to_client);
            t[3] += LOAD(x->bytes_to_client);
            t[4] += LOAD(x->dropped);
            t[5] += LOAD(x->dropped_bw);
        }
    }
    return Py_BuildValue("(KKKKKK)", (unsigned long long)t[0], (unsigned long long)t[1],
                         (unsigned long long)t[2], (unsigned long long)t[3],
                         (unsigned long long)t[4], (unsigned long long)t[5]);
}

/* Bandwidth caps (bytes/s, 0 = unlimited). Setting any cap turns the per-packet check on. */
static void bw_enable(engine_t *e, unsigned long long rate)
{
    if (rate != 0)
        __atomic_store_n(&e->bw_on, 1, __ATOMIC_RELEASE);
}

static PyObject *Engine_set_total_rate(engine_t *e, PyObject *args)
{
    unsigned long long rate;
    if (!PyArg_ParseTuple(args, "K", &rate) || check_open(e) < 0)
        return NULL;
    bw_enable(e, rate);
    bucket_set(&e->total[0], rate, mono_ns());
    bucket_set(&e->total[1], rate, mono_ns());
    Py_RETURN_NONE;
}

static PyObject *Engine_set_user_rate(engine_t *e, PyObject *args)
{
    int slot;
    unsigned long long rate;
    if (!PyArg_ParseTuple(args, "iK", &slot, &rate) || check_open(e) < 0)
        return NULL;
    if (slot < 0 || slot >= USER_SLOTS)
        return PyErr_Format(PyExc_ValueError, "user slot %d out of range", slot);
    bw_enable(e, rate);
    for (int d = 0; d < 2; d++) {
        bucket_t *b = &e->ubw[2 * slot + d];
        bucket_set(b, rate, mono_ns());
        /* a slot may be reused for another user: start full, whatever the last one left */
        __atomic_store_n(&b->tokens, __atomic_load_n(&b->burst, __ATOMIC_RELAXED),
                         __ATOMIC_RELAXED);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_set_allocation_rate(engine_t *e, PyObject *args)
{
    long long id;
    unsigned long long rate;
    if (!PyArg_ParseTuple(args, "LK", &id, &rate) || check_open(e) < 0)
        return NULL;
    alloc_t *al = id_find(e, id);
    if (al != NULL) {
        bw_enable(e, rate);
        bucket_set(&al->bw[0], rate, mono_ns());
        bucket_set(&al->bw[1], rate, mono_ns());
    }
    Py_RETURN_NONE;
}

/* The Python plane's stream (TCP/TLS) clients under the native data plane: charge n bytes in
 * direction dir to the user slot's bucket (slot < 0: none) and the total bucket, the ones the
 * relay threads use for UDP clients, so one username and the whole relay have one budget
 * whatever the client's transport (docs/TURN.md "Bandwidth caps"). All or nothing, as
 * bw_admit: True = send; False = over a cap and nothing taken. */
static PyObject *Engine_charge(engine_t *e, PyObject *args)
{
    int slot, dir;
    unsigned long long len;
    if (!PyArg_ParseTuple(args, "iiK", &slot, &dir, &len) || check_open(e) < 0)
        return NULL;
    if (slot >= USER_SLOTS || dir < 0 || dir > 1)
        return PyErr_Format(PyExc_ValueError, "charge(%d, %d): slot or direction out of range",
                            slot, dir);
    int64_t n = (int64_t)len * BW_SCALE;
    uint64_t now = mono_ns();
    bucket_t *tot = &e->total[dir], *user = slot >= 0 ? &e->ubw[2 * slot + dir] : NULL;
    if (bucket_has(user, now, n, 1) && bucket_has(tot, now, n, 1)) {
        bucket_spend(user, n, 1);
        bucket_spend(tot, n, 1);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *Engine_stats(engine_t *e, PyObject *unused)
{
    if (check_open(e) < 0)
        return NULL;
    wstats_t s;
    memset(&s, 0, sizeof s);
    uint64_t *dst = (uint64_t *)&s;
    for (int k = 0; k < e->nworkers; k++) {
        uint64_t *src = (uint64_t *)&e->workers[k]->st;
        for (size_t i = 0; i < sizeof s / sizeof(uint64_t); i++)
            dst[i] += __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    }
    int gso = 1;
    for (int k = 0; k < e->nworkers; k++)
        gso &= e->workers[k]->gso;
    uint64_t kernel_relay = 0, kernel_listener = 0;
    for (int k = 0; k < e->nworkers; k++)
        kernel_listener += kernel_drops(e->workers[k]->lfd);
    kernel_listener += kernel_drops(e->cfd);
    s.drop_truncated += e->ctl_truncated;
    for (size_t i = 0; i < e->idcap; i++)
        for (alloc_t *x = e->idtab[i]; x != NULL; x = x->idnext)
            if (x->mux == NULL)
                kernel_relay += kernel_drops(x->fd);
    for (int i = 0; i < e->nmux; i++)
        kernel_relay += kernel_drops(e->muxes[i]->fd);
    PyObject *d = Py_BuildValue(
        "{s:i,s:i,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:n}",
        "threads", e->nworkers, "gso", gso, "rx_client", (unsigned long long)s.rx_client,
        "rx_peer", (unsigned long long)s.rx_peer, "upcalls", (unsigned long long)s.upcalls,
        "recv_calls", (unsigned long long)s.recv_calls, "send_calls",
        (unsigned long long)s.send_calls, "gso_msgs", (unsigned long long)s.gso_msgs,
        "gso_segments", (unsigned long long)s.gso_segments, "drop_unknown_channel",
        (unsigned long long)s.drop_unknown_channel, "drop_short", (unsigned long long)s.drop_short,
        "drop_truncated", (unsigned long long)s.drop_truncated, "drop_send",
        (unsigned long long)s.drop_send, "drop_queue", (unsigned long long)s.drop_queue,
        "drop_no_allocation", (unsigned long long)s.drop_no_allocation, "drop_too_big",
        (unsigned long long)s.drop_too_big, "kernel_drops_listener",
        (unsigned long long)kernel_listener, "kernel_drops_relay",
        (unsigned long long)kernel_relay, "tx_client", (unsigned long long)s.tx_client, "tx_peer",
        (unsigned long long)s.tx_peer, "allocations", (Py_ssize_t)e->idcount);
    if (d == NULL)
        return NULL;
    /* turn.relay_multiplex (turn/multiplex.py): shared sockets and their drops; folding */
    PyObject *extra = Py_BuildValue(
        "{s:i,s:K,s:K,s:i,s:K,s:K,s:K,s:i,s:K,s:K,s:K}", "folded",
        __atomic_load_n(&e->folded, __ATOMIC_ACQUIRE), "folds",
        (unsigned long long)LOAD(e->folds), "unfolds", (unsigned long long)LOAD(e->unfolds),
        "mux_sockets", e->nmux, "drop_mux_unknown",
        (unsigned long long)s.drop_mux_unknown, "drop_mux_ambiguous",
        (unsigned long long)s.drop_mux_ambiguous, "drop_mux_conflict",
        (unsigned long long)(s.drop_mux_conflict + e->py_mux_conflict), "steered",
        e->cfd >= 0, "control_rx", (unsigned long long)e->ctl_rx, "control_recv_calls",
        (unsigned long long)e->ctl_recv_calls, "control_send_calls",
        (unsigned long long)e->ctl_send_calls);
    if (extra == NULL || PyDict_Update(d, extra) != 0) {
        Py_XDECREF(extra);
        Py_DECREF(d);
        return NULL;
    }
    Py_DECREF(extra);
    return d;
}

static PyObject *Engine_add_mux(engine_t *e, PyObject *args)
{
    int fd, k, family, bufbytes = 4 * 1024 * 1024;
    if (!PyArg_ParseTuple(args, "iii|i", &fd, &k, &family, &bufbytes))
        return NULL;
    worker_t *w;
    mux_t *m = NULL;
    if (check_open(e) < 0 || (w = worker_arg(e, k)) == NULL)
        goto fail;
    if (family != 4 && family != 6) {
        PyErr_Format(PyExc_ValueError, "not an address family: %d", family);
        goto fail;
    }
    if (e->nmux == e->capmux) {
        int ncap = e->capmux ? e->capmux * 2 : 8;
        mux_t **nm = realloc(e->muxes, (size_t)ncap * sizeof *nm);
        if (nm == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        e->muxes = nm;
        e->capmux = ncap;
    }
    m = calloc(1, sizeof *m);
    if (m == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    m->kind = KIND_MUX;
    m->fd = fd;
    m->family = family;
    m->worker = k;
    set_bufs(fd, bufbytes); /* many allocations' bursts: sized like a listener */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = m};
    wlock(w);
    int r = epoll_ctl(w->epfd, EPOLL_CTL_ADD, fd, &ev);
    wunlock(w);
    if (r != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    e->muxes[e->nmux] = m;
    return PyLong_FromLong(e->nmux++);
fail:
    free(m);
    close(fd); /* the fd was handed over: never leak it */
    return NULL;
}

static PyObject *Engine_worker_of(engine_t *e, PyObject *args)
{
    alloc_t *al;
    if (one_alloc_arg(e, args, &al) < 0)
        return NULL;
    if (al == NULL)
        Py_RETURN_NONE;
    return PyLong_FromLong(al->worker);
}

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the relay threads."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS,
     "Stop the threads, close every socket (listeners included)."},
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS,
     "The eventfd that becomes readable when packets wait for the control plane."},
    {"drain", (PyCFunction)Engine_drain, METH_NOARGS,
     "Take every queued (data, client address, thread) for the control plane, in order."},
    {"control_fileno", (PyCFunction)Engine_control_fileno, METH_NOARGS,
     "The control socket (readable when STUN requests wait for receive()), -1 without one."},
    {"receive", (PyCFunction)Engine_receive, METH_NOARGS,
     "Read the waiting datagrams of the control socket: [(data, client address, thread)]."},
    {"send", (PyCFunction)Engine_send, METH_VARARGS,
     "send(thread, data, addr): a control-plane answer from that thread's listener socket."},
    {"send_many", (PyCFunction)Engine_send_many, METH_O,
     "send_many([(thread, data, addr), ...]): answers in order, one sendmmsg per run of a "
     "thread's listener."},
    {"add_allocation", (PyCFunction)Engine_add_allocation, METH_VARARGS,
     "add_allocation(id, thread, relay_fd, family, client_addr, user_slot=-1, rate=0, mux=-1); "
     "takes ownership of relay_fd; user_slot: the per-user bandwidth bucket, rate: the "
     "allocation's cap in bytes/s; mux: relay on that shared socket instead (relay_fd -1)."},
    {"remove_allocation", (PyCFunction)Engine_remove_allocation, METH_VARARGS,
     "remove_allocation(id) -> counters or None; closes the relay socket."},
    {"add_permission", (PyCFunction)Engine_add_permission, METH_VARARGS,
     "add_permission(id, ip, fast_send)"},
    {"remove_permission", (PyCFunction)Engine_remove_permission, METH_VARARGS,
     "remove_permission(id, ip)"},
    {"add_channel", (PyCFunction)Engine_add_channel, METH_VARARGS,
     "add_channel(id, number, (ip, port))"},
    {"remove_channel", (PyCFunction)Engine_remove_channel, METH_VARARGS,
     "remove_channel(id, number)"},
    {"send_to_peer", (PyCFunction)Engine_send_to_peer, METH_VARARGS,
     "send_to_peer(id, (ip, port), payload)"},
    {"counters", (PyCFunction)Engine_counters, METH_VARARGS,
     "counters(id) -> (pkts_to_peer, bytes_to_peer, pkts_to_client, bytes_to_client, dropped, "
     "kernel_drops, dropped_bandwidth) or None"},
    {"totals", (PyCFunction)Engine_totals, METH_NOARGS,
     "Counters over live and ended allocations (without kernel drops)."},
    {"stats", (PyCFunction)Engine_stats, METH_NOARGS, "Data-plane counters (dict)."},
    {"set_total_rate", (PyCFunction)Engine_set_total_rate, METH_VARARGS,
     "set_total_rate(bytes_per_s): turn.bandwidth_total (0 = unlimited)."},
    {"set_user_rate", (PyCFunction)Engine_set_user_rate, METH_VARARGS,
     "set_user_rate(slot, bytes_per_s): the per-user bucket in that slot (refilled to full)."},
    {"charge", (PyCFunction)Engine_charge, METH_VARARGS,
     "charge(user_slot, direction, nbytes) -> bool: take nbytes from that user slot's and the "
     "total bucket (stream clients relayed in Python); False = over a cap, nothing taken."},
    {"set_allocation_rate", (PyCFunction)Engine_set_allocation_rate, METH_VARARGS,
     "set_allocation_rate(id, bytes_per_s): one allocation's cap (0 = unlimited)."},
    {"add_mux", (PyCFunction)Engine_add_mux, METH_VARARGS,
     "add_mux(fd, thread, family, buffer_bytes=4 MiB) -> index: a shared relay socket "
     "(turn.relay_multiplex) polled by that thread; takes ownership of fd."},
    {"worker_of", (PyCFunction)Engine_worker_of, METH_VARARGS,
     "The relay thread an allocation lives on (None if unknown)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "confedge.turn._native.Engine",
    .tp_basicsize = sizeof(engine_t),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native TURN relay: threads, sockets and forwarding tables.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

/* steer(fd, threads): attach to the SO_REUSEPORT group of fd (the TURN port: `threads` worker
 * sockets bound first, then the control socket, so the group's socket i is worker i and socket
 * `threads` the control socket) the classic BPF program that picks a socket per datagram.
 * The program sees the UDP payload at offset 0 and the IP header at SKF_NET_OFF:
 *
 *   - first byte 0b01xxxxxx: ChannelData (RFC 8656 §12.4; RFC 7983 §7 demultiplexing), and
 *     STUN type 0x0016: a Send indication (§10.2) -> worker (UDP source port % threads);
 *   - anything else (STUN requests, other indications, junk) -> the control socket.
 *
 * The source port is read from the UDP header after the IPv4 header (its IHL) or after the
 * fixed 40-byte IPv6 header; an IPv6 datagram with extension headers before UDP (not seen on
 * media paths) reads another field, lands on some worker, and is dropped there as from an
 * unknown client, never misdelivered. A datagram too short for a load (under 2 bytes) ends
 * the program with 0: worker 0, which handles it as every worker did before steering (too
 * short for ChannelData: up through the queue, where the core ignores it). */
static PyObject *native_steer(PyObject *mod, PyObject *args)
{
    int fd, n;
    if (!PyArg_ParseTuple(args, "ii", &fd, &n))
        return NULL;
    if (n < 1 || n > 1024) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1-1024");
        return NULL;
    }
    const uint32_t net = (uint32_t)SKF_NET_OFF;
    struct sock_filter code[] = {
        /* 0 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),
        /* 1 */ BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x80, 3, 0), /* 1x: not ours -> 5 */
        /* 2 */ BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x40, 3, 0), /* 01: ChannelData -> 6 */
        /* 3 */ BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 0),
        /* 4 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x0016, 1, 0), /* Send indication -> 6 */
        /* 5 */ BPF_STMT(BPF_RET | BPF_K, (uint32_t)n),             /* the control socket */
        /* 6 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, net),            /* IP version */
        /* 7 */ BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 4),
        /* 8 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 4, 2, 0),       /* IPv4 -> 11 */
        /* 9 */ BPF_STMT(BPF_LD | BPF_H | BPF_ABS, net + 40),       /* IPv6: UDP source port */
        /* 10 */ BPF_STMT(BPF_JMP | BPF_JA, 5),                     /* -> 16 */
        /* 11 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, net),
        /* 12 */ BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0x0f),         /* IHL, in 32-bit words */
        /* 13 */ BPF_STMT(BPF_ALU | BPF_LSH | BPF_K, 2),
        /* 14 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),
        /* 15 */ BPF_STMT(BPF_LD | BPF_H | BPF_IND, net),           /* IPv4: UDP source port */
        /* 16 */ BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, (uint32_t)n),  /* = worker_for_port() */
        /* 17 */ BPF_STMT(BPF_RET | BPF_A, 0),
    };
    struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof prog) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef native_functions[] = {
    {"steer", native_steer, METH_VARARGS,
     "steer(fd, threads): attach the program that sends ChannelData and Send indications to "
     "worker socket (source port % threads) and everything else to socket `threads` (the "
     "control socket) of fd's SO_REUSEPORT group."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT, "_native",
    "Native TURN data plane (see turn/native.py for the Python side).", -1, native_functions,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "BATCH", BATCH);
    PeerTaken = PyErr_NewExceptionWithDoc(
        "confedge.turn._native.PeerTaken",
        "add_channel on a shared relay socket: another allocation claimed that peer.",
        PyExc_ValueError, NULL);
    if (PeerTaken == NULL || PyModule_AddObject(m, "PeerTaken", Py_NewRef(PeerTaken)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
