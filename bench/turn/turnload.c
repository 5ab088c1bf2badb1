/*
 * turnload: the TURN benchmark's C load generator (sender) and peer sink.
 *
 * Why it exists: the Python generator tops out near 0.44 M packets/s straight into the sink,
 * below what the kernel-offloaded relay forwards, and its own CPU dominates the whole-machine
 * CPU figure (docs/BENCHMARKS.md, "Kernel offload"). This program does only the hot loops, in
 * batches (sendmmsg/recvmmsg: one syscall per batch, not per packet); the allocation handshake
 * (Allocate, CreatePermission, ChannelBind) stays in Python (bench/turn/loadgen.py), which hands
 * the already-connected allocation sockets over as inherited file descriptors.
 *
 * Counters live in a shared file of int64 slots (mmap'd by bench/turn/cgen.py too), so the
 * orchestrator samples them at the window edges without any messaging on the hot path, exactly
 * as with the Python generator. On exit each mode prints one line the harness parses:
 *     turnload send packets=<n> utime=<s> stime=<s>
 *     turnload sink packets=<n> bytes=<n> utime=<s> stime=<s>
 *
 * Usage:
 *     turnload send --shm PATH --stop SLOT --count SLOT --frame HEX [--rate PPS]
 *                   [--threads N] [--cpus 0,1] [--batch B] [--packet] FD...
 *     turnload sink --shm PATH --stop SLOT --count SLOT --port PORT [--threads N]
 *                   [--cpus 0,1] [--batch B] [--any]
 * The sink binds 127.0.0.1:PORT (0.0.0.0:PORT with --any, so that every 127.x.y.z peer of
 * run.py --spread-peers lands on it; SO_REUSEPORT, one socket per thread), writes packets to slot
 * COUNT and bytes to COUNT+1, and prints "ready" once bound. Both stop when slot STOP != 0.
 *
 *     turnload calib [N]
 * calib prints one JSON line, {"syscall_ns": ..., "udp_send_recv_ns": ...}: the host's cost of
 * a bare system call (getppid, N times) and of one 200-byte UDP datagram sent and received on
 * loopback (N/4 times). Why: on this shared VM both change by 2-3x from one day to the next, and
 * the servers' ratios move with them (a server that makes fewer system calls per packet gains
 * when they are dear), so each result file records the state its run saw.
 *
 * --packet (send): the datagrams do not go through the UDP sockets but are written, as whole
 * Ethernet/IPv4/UDP frames, into the loopback device with an AF_PACKET socket (sendmmsg, one
 * frame per message, PACKET_QDISC_BYPASS). Why: on loopback a UDP sendmsg pays the socket,
 * route and netfilter output path per packet in the sender's own context, which made the
 * generator, not the kernel offload, the limit (docs/BENCHMARKS.md, "Kernel offload"). The
 * frames carry each socket's own 5-tuple (getsockname/getpeername), so to every server they
 * are the allocation's client packets arriving on lo, exactly as a NIC would hand them up: the
 * same receive path (TC ingress, IP, UDP socket lookup) for coturn, confedge and the offload.
 * The UDP checksum is computed (a wire packet's), the IP header's too. IPv4 loopback only;
 * needs CAP_NET_RAW.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 256
#define MAX_THREADS 64
#define MAX_CPUS 256
#define RECV_BUF 2048

static int64_t *g_slots;
static int g_stop_slot, g_count_slot;
static int g_cpus[MAX_CPUS], g_ncpus;
static int g_batch = 64;
static int g_packet; /* --packet: AF_PACKET frames into lo instead of UDP sendmmsg */

static int64_t slot_load(int i) { return __atomic_load_n(&g_slots[i], __ATOMIC_RELAXED); }
static void slot_add(int i, int64_t v) { __atomic_fetch_add(&g_slots[i], v, __ATOMIC_RELAXED); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "turnload: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(const char *why) {
    fprintf(stderr, "turnload: %s (see the comment at the top of turnload.c)\n", why);
    exit(2);
}

static void pin(int thread_index) {
    if (!g_ncpus) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(g_cpus[thread_index % g_ncpus], &set);
    /* A refused pin (a CPU outside our cpuset) is reported, not fatal: the run is still valid. */
    int rc = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    if (rc) fprintf(stderr, "turnload: pinning to CPU %d: %s\n", g_cpus[thread_index % g_ncpus], strerror(rc));
}

static void parse_cpus(const char *s) {
    while (*s && g_ncpus < MAX_CPUS) {
        char *end;
        long c = strtol(s, &end, 10);
        if (end == s || c < 0) usage("--cpus wants a comma list of CPU numbers");
        g_cpus[g_ncpus++] = (int)c;
        s = *end == ',' ? end + 1 : end;
    }
}

static void map_slots(const char *path) {
    int fd = open(path, O_RDWR);
    if (fd < 0) die(path);
    struct stat st;
    if (fstat(fd, &st) < 0) die("fstat");
    if (st.st_size < (off_t)(8 * (g_count_slot + 2)) || st.st_size < (off_t)(8 * (g_stop_slot + 1)))
        usage("the --shm file is smaller than the slots named");
    g_slots = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (g_slots == MAP_FAILED) die("mmap");
    close(fd);
}

static void print_rusage(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf(" utime=%.6f stime=%.6f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
}

/* ---- sender ---- */

struct sender {
    pthread_t tid;
    int index;
    int *fds;
    int nfds;
    double rate; /* packets/s for this thread, 0 = as fast as possible */
    unsigned char *frame;
    size_t frame_len;
    int64_t sent;
    unsigned char **frames; /* --packet: one Ethernet frame per socket, built by build_frame() */
    size_t frames_len;
};

/* ---- --packet: whole frames into lo ---- */

static uint32_t csum_add(uint32_t sum, const unsigned char *p, size_t n) {
    for (size_t i = 0; i + 1 < n; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (n & 1) sum += (uint32_t)(p[n - 1] << 8);
    return sum;
}

static uint16_t csum_fold(uint32_t sum) {
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Ethernet (zero MACs, as lo uses) + IPv4 (RFC 791, DF, TTL 64) + UDP (RFC 768, checksum over
 * the pseudo-header) around `payload`, from the socket's local address to its peer. */
static unsigned char *build_frame(int fd, const unsigned char *payload, size_t n, size_t *out_len) {
    struct sockaddr_in src, dst;
    socklen_t sl = sizeof src, dl = sizeof dst;
    if (getsockname(fd, (struct sockaddr *)&src, &sl) < 0 || getpeername(fd, (struct sockaddr *)&dst, &dl) < 0)
        die("--packet: getsockname/getpeername of a sender socket (it must be connected)");
    if (src.sin_family != AF_INET || dst.sin_family != AF_INET)
        usage("--packet builds IPv4 frames only; a sender socket is not IPv4");
    if ((ntohl(dst.sin_addr.s_addr) >> 24) != 127)
        usage("--packet writes frames into lo; a sender socket's peer is not a 127.0.0.0/8 address");
    size_t len = 14 + 20 + 8 + n;
    if (len > 65535) usage("--packet: the frame is too large");
    unsigned char *f = calloc(1, len);
    if (!f) die("malloc");
    f[12] = 0x08; /* ethertype IPv4; both MACs zero */
    unsigned char *ip = f + 14, *udp = ip + 20;
    ip[0] = 0x45;
    ip[2] = (unsigned char)((20 + 8 + n) >> 8);
    ip[3] = (unsigned char)(20 + 8 + n);
    ip[6] = 0x40; /* DF */
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    memcpy(ip + 12, &src.sin_addr, 4);
    memcpy(ip + 16, &dst.sin_addr, 4);
    uint16_t c = csum_fold(csum_add(0, ip, 20));
    ip[10] = (unsigned char)(c >> 8);
    ip[11] = (unsigned char)c;
    memcpy(udp, &src.sin_port, 2);
    memcpy(udp + 2, &dst.sin_port, 2);
    udp[4] = (unsigned char)((8 + n) >> 8);
    udp[5] = (unsigned char)(8 + n);
    memcpy(udp + 8, payload, n);
    uint32_t sum = csum_add(0, ip + 12, 8) + IPPROTO_UDP + (uint32_t)(8 + n);
    c = csum_fold(csum_add(sum, udp, 8 + n));
    if (c == 0) c = 0xffff; /* RFC 768: a computed zero is sent as all ones */
    udp[6] = (unsigned char)(c >> 8);
    udp[7] = (unsigned char)c;
    *out_len = len;
    return f;
}

static int packet_socket(void) {
    int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: sends only, receives nothing */
    if (fd < 0) die("--packet: socket(AF_PACKET) (needs CAP_NET_RAW)");
    struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_ifindex = (int)if_nametoindex("lo")};
    if (!ll.sll_ifindex) die("--packet: if_nametoindex(lo)");
    if (bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0) die("--packet: bind to lo");
    int one = 1; /* straight to the device's xmit: lo has no queue worth modelling */
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0)
        die("--packet: PACKET_QDISC_BYPASS");
    return fd;
}

static void *send_loop(void *arg) {
    struct sender *s = arg;
    pin(s->index);
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov = {.iov_base = s->frame, .iov_len = s->frame_len};
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < g_batch; i++) {
        msgs[i].msg_hdr.msg_iov = &iov; /* connected sockets: no msg_name */
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int pfd = g_packet ? packet_socket() : -1;
    double t0 = now_s();
    int next = 0;
    int64_t published = 0;
    while (!slot_load(g_stop_slot)) {
        int want = g_batch;
        if (s->rate > 0) {
            /* Paced: the number due since the start, so a slow tick is caught up, but the
             * offered rate never exceeds the target over a window (as loadgen._blast). */
            int64_t due = (int64_t)(s->rate * (now_s() - t0)) - s->sent;
            if (due <= 0) {
                struct timespec pause = {0, 200000};
                nanosleep(&pause, NULL);
                continue;
            }
            if (due < want) want = (int)due;
        }
        int r;
        if (pfd >= 0) {
            iov.iov_base = s->frames[next];
            iov.iov_len = s->frames_len;
            r = sendmmsg(pfd, msgs, (unsigned)want, 0);
        } else {
            r = sendmmsg(s->fds[next], msgs, (unsigned)want, 0);
        }
        /* EAGAIN (a full socket buffer) or ECONNREFUSED (an ICMP from an earlier packet): the
         * packets were not offered; they are not counted. */
        if (r > 0) s->sent += r;
        next = next + 1 < s->nfds ? next + 1 : 0;
        if (s->sent - published >= 256 || next == 0) {
            slot_add(g_count_slot, s->sent - published);
            published = s->sent;
        }
    }
    slot_add(g_count_slot, s->sent - published);
    if (pfd >= 0) close(pfd);
    return NULL;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Options of both modes (each mode checks that it got the ones it needs). */
struct opts {
    const char *shm, *hex;
    double rate;
    int threads, port, any;
    int fds[4096], nfds;
};

static void parse_opts(struct opts *o, int argc, char **argv) {
    *o = (struct opts){.threads = 1, .port = -1};
    g_stop_slot = g_count_slot = -1;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int more = i + 1 < argc;
        if (!strcmp(a, "--shm") && more) o->shm = argv[++i];
        else if (!strcmp(a, "--stop") && more) g_stop_slot = atoi(argv[++i]);
        else if (!strcmp(a, "--count") && more) g_count_slot = atoi(argv[++i]);
        else if (!strcmp(a, "--frame") && more) o->hex = argv[++i];
        else if (!strcmp(a, "--rate") && more) o->rate = atof(argv[++i]);
        else if (!strcmp(a, "--port") && more) o->port = atoi(argv[++i]);
        else if (!strcmp(a, "--threads") && more) o->threads = atoi(argv[++i]);
        else if (!strcmp(a, "--cpus") && more) parse_cpus(argv[++i]);
        else if (!strcmp(a, "--batch") && more) g_batch = atoi(argv[++i]);
        else if (!strcmp(a, "--any")) o->any = 1;
        else if (!strcmp(a, "--packet")) g_packet = 1;
        else if (a[0] != '-' && o->nfds < 4096) o->fds[o->nfds++] = atoi(a);
        else usage("unknown or incomplete option");
    }
    if (!o->shm || g_stop_slot < 0 || g_count_slot < 0) usage("--shm, --stop and --count are required");
    if (o->threads < 1 || o->threads > MAX_THREADS) usage("--threads must be 1..64");
    if (g_batch < 1 || g_batch > MAX_BATCH) usage("--batch must be 1..256");
}

static int run_send(int argc, char **argv) {
    static struct opts o;
    parse_opts(&o, argc, argv);
    const char *hex = o.hex;
    int threads = o.threads, nfds = o.nfds, *fds = o.fds;
    double rate = o.rate;
    if (!hex) usage("send needs --frame");
    if (!nfds) usage("send needs at least one socket file descriptor");
    size_t hl = strlen(hex);
    if (hl % 2 || hl == 0 || hl > 2 * 65536) usage("--frame must be an even number of hex digits");
    unsigned char *frame = malloc(hl / 2);
    for (size_t i = 0; i < hl / 2; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) usage("--frame is not hex");
        frame[i] = (unsigned char)(hi << 4 | lo);
    }
    map_slots(o.shm);
    struct sender s[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        s[t] = (struct sender){.index = t, .rate = rate / threads, .frame = frame, .frame_len = hl / 2};
        /* Sockets split round-robin over threads; with fewer sockets than threads, threads share. */
        s[t].fds = malloc(sizeof(int) * (size_t)(nfds / threads + 1));
        if (nfds >= threads) {
            for (int i = t; i < nfds; i += threads) s[t].fds[s[t].nfds++] = fds[i];
        } else {
            s[t].fds[s[t].nfds++] = fds[t % nfds];
        }
        if (g_packet) {
            s[t].frames = malloc(sizeof(unsigned char *) * (size_t)s[t].nfds);
            if (!s[t].frames) die("malloc");
            for (int i = 0; i < s[t].nfds; i++)
                s[t].frames[i] = build_frame(s[t].fds[i], frame, hl / 2, &s[t].frames_len);
        }
        if (pthread_create(&s[t].tid, NULL, send_loop, &s[t])) die("pthread_create");
    }
    int64_t total = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(s[t].tid, NULL);
        total += s[t].sent;
    }
    printf("turnload send packets=%lld", (long long)total);
    print_rusage();
    return 0;
}

/* ---- sink ---- */

struct sink {
    pthread_t tid;
    int index;
    int fd;
    int64_t packets, bytes;
};

static void *sink_loop(void *arg) {
    struct sink *k = arg;
    pin(k->index);
    unsigned char (*bufs)[RECV_BUF] = malloc((size_t)MAX_BATCH * RECV_BUF);
    if (!bufs) die("malloc");
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iovs[MAX_BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < g_batch; i++) {
        iovs[i] = (struct iovec){.iov_base = bufs[i], .iov_len = RECV_BUF};
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    while (!slot_load(g_stop_slot)) {
        /* Blocks (SO_RCVTIMEO bounds it) for the first datagram, then takes what is queued. */
        int r = recvmmsg(k->fd, msgs, (unsigned)g_batch, MSG_WAITFORONE, NULL);
        if (r <= 0) continue;
        int64_t b = 0;
        for (int i = 0; i < r; i++) b += msgs[i].msg_len;
        k->packets += r;
        k->bytes += b;
        slot_add(g_count_slot, r);
        slot_add(g_count_slot + 1, b);
    }
    return NULL;
}

static int run_sink(int argc, char **argv) {
    static struct opts o;
    parse_opts(&o, argc, argv);
    int port = o.port, threads = o.threads;
    if (port < 0 || port > 65535) usage("sink needs --port 0..65535");
    if (o.nfds || o.hex || g_packet) usage("sink takes no --frame, --packet or descriptors");
    map_slots(o.shm);
    struct sink k[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0) die("socket");
        int one = 1, rcvbuf = 4 << 20;
        struct timeval tv = {0, 50000};
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        sa.sin_addr.s_addr = htonl(o.any ? INADDR_ANY : INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
        k[t] = (struct sink){.index = t, .fd = fd};
    }
    printf("ready\n");
    fflush(stdout);
    for (int t = 0; t < threads; t++)
        if (pthread_create(&k[t].tid, NULL, sink_loop, &k[t])) die("pthread_create");
    int64_t packets = 0, bytes = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(k[t].tid, NULL);
        packets += k[t].packets;
        bytes += k[t].bytes;
    }
    printf("turnload sink packets=%lld bytes=%lld", (long long)packets, (long long)bytes);
    print_rusage();
    return 0;
}

static int run_calib(int argc, char **argv) {
    long n = argc > 0 ? strtol(argv[0], NULL, 10) : 400000;
    if (n < 4 || n > 100000000) usage("calib: N must be 4 to 100000000");
    /* the bare cost of entering and leaving the kernel (SYS_getppid: nothing is cached) */
    double t0 = now_s();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    double sys_ns = (now_s() - t0) * 1e9 / (double)n;
    /* one datagram through loopback's UDP path: send, deliver, receive (same thread, so no
     * wake-up is measured) */
    int a = socket(AF_INET, SOCK_DGRAM, 0), b = socket(AF_INET, SOCK_DGRAM, 0);
    if (a < 0 || b < 0) die("socket");
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (bind(b, (struct sockaddr *)&sa, sizeof sa) != 0 ||
        getsockname(b, (struct sockaddr *)&sa, &len) != 0 ||
        connect(a, (struct sockaddr *)&sa, sizeof sa) != 0)
        die("calib: loopback socket");
    unsigned char buf[200] = {0};
    long m = n / 4;
    t0 = now_s();
    for (long i = 0; i < m; i++) {
        if (send(a, buf, sizeof buf, 0) != (ssize_t)sizeof buf) die("calib: send");
        if (recv(b, buf, sizeof buf, 0) != (ssize_t)sizeof buf) die("calib: recv");
    }
    double udp_ns = (now_s() - t0) * 1e9 / (double)m;
    close(a);
    close(b);
    printf("{\"syscall_ns\": %.1f, \"udp_send_recv_ns\": %.1f}\n", sys_ns, udp_ns);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) usage("missing mode: send, sink or calib");
    if (!strcmp(argv[1], "send")) return run_send(argc - 2, argv + 2);
    if (!strcmp(argv[1], "sink")) return run_sink(argc - 2, argv + 2);
    if (!strcmp(argv[1], "calib")) return run_calib(argc - 2, argv + 2);
    usage("unknown mode (send, sink or calib)");
    return 2;
}
