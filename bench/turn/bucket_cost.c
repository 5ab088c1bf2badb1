/* Cost of the bandwidth-cap check per relayed packet in the native data plane (issue 15).
 *
 * Includes _native.c itself, so it measures the very bw_admit() the relay threads call: 50
 * million 200-byte packets alternating directions, the clock read once per 64 packets (one
 * epoll round's batch), with no cap, with the flag on and no bucket set, with the
 * allocation's own cap, and with allocation + user + total caps (never reached).
 *
 *   PY=.venv/bin/python
 *   INC=$($PY -c "import sysconfig;print(sysconfig.get_paths()['include'])")
 *   LIB=$($PY -c "import sysconfig;print(sysconfig.get_config_var('LIBDIR'))")
 *   VER=$($PY -c "import sysconfig;print(sysconfig.get_config_var('LDVERSION'))")
 *   gcc -O2 -I"$INC" bench/turn/bucket_cost.c -o /tmp/bucket_cost -L"$LIB" -lpython"$VER" -lpthread
 *   LD_LIBRARY_PATH="$LIB" /tmp/bucket_cost
 */
#include "../../src/confedge/turn/_native.c"
#include <stdio.h>

static double run(worker_t *w, alloc_t *al, long n)
{
    uint64_t t0 = mono_ns();
    long ok = 0;
    for (long i = 0; i < n; i++) {
        if ((i & 63) == 0)
            w->now_ns = mono_ns();
        ok += bw_admit(w, al, 200, (int)(i & 1));
    }
    if (ok != n)
        fprintf(stderr, "unexpected drops: %ld\n", n - ok);
    return (double)(mono_ns() - t0) / (double)n;
}

int main(void)
{
    static engine_t e;
    static worker_t w;
    static alloc_t al;
    static bucket_t user[2];
    const uint64_t big = 1000000000000ull; /* 1 TB/s: never reached, even by this loop */
    const long n = 50000000;
    w.eng = &e;
    double off = run(&w, &al, n);
    e.bw_on = 1;
    double none = run(&w, &al, n);
    for (int d = 0; d < 2; d++)
        bucket_set(&al.bw[d], big, mono_ns());
    double mine = run(&w, &al, n);
    al.ubw = user;
    for (int d = 0; d < 2; d++) {
        bucket_set(&user[d], big, mono_ns());
        bucket_set(&e.total[d], big, mono_ns());
    }
    double all = run(&w, &al, n);
    printf("ns per packet: caps off %.1f, flag on without buckets %.1f, allocation cap %.1f, "
           "allocation + user + total caps %.1f\n",
           off, none, mine, all);
    return 0;
}
