// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* confedge: the TURN relay's ChannelData forwarding in the kernel (docs/TURN.md "Kernel offload").
 *
 * A TC ingress (clsact) program on the interface that holds the relay and listener addresses.
 * The control plane (turn/offload.py) fills two hash maps as channels are bound and empties
 * them as channels expire or their permission lapses; permissions, quotas and lifetimes are
 * still decided in Python (turn/core.py).  Anything the program does not find in a map -- STUN,
 * Send/Data indications, unbound channels, TCP/TLS, fragments, IP options -- is passed unchanged
 * (TC_ACT_OK) to the existing user-space path.
 *
 *   client -> peer (RFC 8656 §12.4/§12.5): UDP client:cport -> listener:lport carrying
 *     ChannelData [channel][length][payload]; becomes relay:rport -> peer:pport carrying
 *     only the payload (the 4-byte header removed; padded packets go to user space).
 *   peer -> client (§12.4): peer:pport -> relay:rport; becomes listener:lport -> client:cport
 *     with the 4-byte header added (no padding over UDP, §12.5).
 *
 * IPv4 (20-byte headers) and IPv6 (UDP directly after the fixed header), each with its own two
 * maps; a channel is offloaded only when client, listener, relay and peer share the family.
 *
 * Checksums: the IPv4 header checksum is recomputed (20-byte headers only); the UDP checksum is
 * updated incrementally (RFC 1624, bpf_l4_csum_replace) for the changed pseudo-header, ports,
 * length and the removed or added header word (IPv6: the addresses as one bpf_csum_diff); a UDP
 * checksum of 0 (none, RFC 768; IPv4 only) stays 0.
 * The IP and UDP headers stay where they are; the payload moves by 4 bytes (through a per-CPU
 * scratch buffer) and the tail is trimmed or extended (bpf_skb_change_tail).
 *
 * Forwarding: a FIB lookup decides; a local destination continues up the stack (TC_ACT_OK,
 * e.g. on lo), a forwarded one is redirected with bpf_redirect_neigh; when the FIB lookup is
 * refused (IP forwarding off on the interface) the packet goes back out the interface it came
 * in on (the single-interface relay).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Keys and values: every address and port in network byte order, as on the wire. */
struct in_key {           /* client -> peer: who sent it, to which listener port, which channel */
	__u32 client_ip;
	__u16 client_port;
	__u16 listener_port;
	__u16 channel;
	__u16 pad;
};

struct in_val {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot;       /* index into counters */
};

struct out_key {          /* peer -> client: the peer and the relay address it sent to */
	__u32 peer_ip;
	__u32 relay_ip;
	__u16 peer_port;
	__u16 relay_port;
};

struct out_val {
	__u32 listener_ip;
	__u32 client_ip;
	__u16 listener_port;
	__u16 client_port;
	__u16 channel;
	__u16 pad;
	__u32 slot;
};

/* IPv6: the same four structures with 16-byte addresses (maps cd_in6, cd_out6). */
struct in6_key {
	struct in6_addr client_ip;
	__u16 client_port;
	__u16 listener_port;
	__u16 channel;
	__u16 pad;
};

struct in6_val {
	struct in6_addr relay_ip;
	struct in6_addr peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 slot;
};

struct out6_key {
	struct in6_addr peer_ip;
	struct in6_addr relay_ip;
	__u16 peer_port;
	__u16 relay_port;
};

struct out6_val {
	struct in6_addr listener_ip;
	struct in6_addr client_ip;
	__u16 listener_port;
	__u16 client_port;
	__u16 channel;
	__u16 pad;
	__u32 slot;
};

struct counters {
	__u64 pkts_to_peer;
	__u64 bytes_to_peer;
	__u64 pkts_to_client;
	__u64 bytes_to_client;
};

#define MAX_CHANNELS 65536
#define PASS (-1) /* not offloaded ChannelData: the packet is unchanged */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CHANNELS);
	__type(key, struct in_key);
	__type(value, struct in_val);
} cd_in SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CHANNELS);
	__type(key, struct out_key);
	__type(value, struct out_val);
} cd_out SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CHANNELS);
	__type(key, struct in6_key);
	__type(value, struct in6_val);
} cd_in6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_CHANNELS);
	__type(key, struct out6_key);
	__type(value, struct out6_val);
} cd_out6 SEC(".maps");

/* Counter slots are shared by both families (the control plane hands out one slot per channel). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_CHANNELS);
	__type(key, __u32);
	__type(value, struct counters);
} cd_counters SEC(".maps");

#define ETH_LEN 14
#define IP_LEN 20
#define UDP_OFF (ETH_LEN + IP_LEN)
#define PAYLOAD_OFF (UDP_OFF + 8)

static __always_inline __u16 fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u64 sum = 0;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < IP_LEN / 2; i++)
		sum += w[i];
	return ~fold(sum);
}

#define LOOPBACK_IFINDEX 1 /* lo, in every network namespace */

/* Where the rewritten packet goes, from a filled-in FIB request (returns -1: give up). */
static __always_inline int route_fib(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				     __u32 *ifindex)
{
	__u32 in_if = skb->ingress_ifindex;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = 0;
	fib->ifindex = in_if;
	long rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		*ifindex = fib->ifindex;
		return 1;
	}
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED) {
		*ifindex = 0; /* local: up the stack */
		return 1;
	}
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		/* Forwarding is off, so the lookup did not look at the destination.  Come in on lo:
		 * every destination there is this host's (and IPv6 cannot route a redirect back out
		 * lo: Ip6OutNoRoutes), so up the stack; else a single-interface relay: back out. */
		*ifindex = in_if == LOOPBACK_IFINDEX ? 0 : in_if;
		return 1;
	}
	return -1;
}

/* Where the rewritten packet goes; called before anything is changed (returns -1: give up). */
static __always_inline int route(struct __sk_buff *skb, __u32 src, __u32 dst, __u32 *ifindex)
{
	if (dst == src) {
		/* To this host's own address (relay to relay between two allocations, or a client on
		 * the relay's host): local.  Asked first because the FIB lookup below refuses to
		 * answer (FWD_DISABLED) before it looks at the destination when forwarding is off. */
		*ifindex = 0;
		return 1;
	}
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	return route_fib(skb, &fib, ifindex);
}

static __always_inline int same6(const struct in6_addr *a, const struct in6_addr *b)
{
	return a->in6_u.u6_addr32[0] == b->in6_u.u6_addr32[0] &&
	       a->in6_u.u6_addr32[1] == b->in6_u.u6_addr32[1] &&
	       a->in6_u.u6_addr32[2] == b->in6_u.u6_addr32[2] &&
	       a->in6_u.u6_addr32[3] == b->in6_u.u6_addr32[3];
}

static __always_inline int route6(struct __sk_buff *skb, const struct in6_addr *src,
				  const struct in6_addr *dst, __u32 *ifindex)
{
	if (same6(src, dst)) { /* this host's own address: local (as in route()) */
		*ifindex = 0;
		return 1;
	}
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	__builtin_memcpy(fib.ipv6_src, src, 16);
	__builtin_memcpy(fib.ipv6_dst, dst, 16);
	return route_fib(skb, &fib, ifindex);
}

#define LOCAL (-2)         /* rewritten, for this host: see confedge_relay() */

/* A rewritten packet for this host.  On lo it just continues up the stack.  Arriving on another
 * interface, a packet whose source is now one of this host's addresses would be dropped as a
 * martian by the input route check, so it is handed to lo's ingress instead (destination MAC
 * zeroed: lo's address, else it would be "for another host"). */
static __always_inline int deliver_local(struct __sk_buff *skb)
{
	if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
		return TC_ACT_OK;
	__u8 zero[6] = {};
	if (bpf_skb_store_bytes(skb, 0, zero, sizeof(zero), 0) < 0)
		return TC_ACT_SHOT;
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

static __always_inline int deliver(struct __sk_buff *skb, __u32 ifindex)
{
	if (ifindex == 0)
		return LOCAL;
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

static __always_inline void count(__u32 slot, int to_peer, __u32 bytes)
{
	struct counters *c = bpf_map_lookup_elem(&cd_counters, &slot);
	if (!c)
		return;
	if (to_peer) {
		__sync_fetch_and_add(&c->pkts_to_peer, 1);
		__sync_fetch_and_add(&c->bytes_to_peer, bytes);
	} else {
		__sync_fetch_and_add(&c->pkts_to_client, 1);
		__sync_fetch_and_add(&c->bytes_to_client, bytes);
	}
}

/* A per-CPU scratch buffer: the payload is moved by 4 bytes through it. */
#define MAX_PAYLOAD 2048
struct scratch {
	__u8 buf[MAX_PAYLOAD];
};
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} cd_scratch SEC(".maps");

#define CSUM_OFF (UDP_OFF + 6)
#define IP6_LEN 40
#define UDP_OFF6 (ETH_LEN + IP6_LEN)
#define PAYLOAD_OFF6 (UDP_OFF6 + 8)
#define CSUM_OFF6 (UDP_OFF6 + 6)

/* The UDP checksum for every changed field but the addresses (RFC 1624), through the kernel's
 * helper so that it is right whatever the skb's checksum state: a full checksum is updated for
 * every change, a CHECKSUM_PARTIAL one (packets from a local socket, veth) only for the
 * pseudo-header; a zero (no checksum, RFC 768; never valid over IPv6, RFC 8200 §8.1) stays zero.
 * The length is in the pseudo-header (IPv6: as a 32-bit field, same 16-bit word) and in the UDP
 * header. */
static __always_inline int csum_rest(struct __sk_buff *skb, __u32 off, __u16 old_len,
				     __u16 new_len, __u32 old_ports, __u32 new_ports, __u32 old_word,
				     __u32 new_word)
{
	__u64 ps = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, off, old_len, new_len, ps | 2) ||
	    bpf_l4_csum_replace(skb, off, old_len, new_len, BPF_F_MARK_MANGLED_0 | 2) ||
	    bpf_l4_csum_replace(skb, off, old_ports, new_ports, BPF_F_MARK_MANGLED_0 | 4) ||
	    bpf_l4_csum_replace(skb, off, old_word, new_word, BPF_F_MARK_MANGLED_0 | 4))
		return -1;
	return 0;
}

/* IPv4: the two pseudo-header addresses, then the rest. */
static __always_inline int csum_fix(struct __sk_buff *skb, __u32 old_s, __u32 new_s, __u32 old_d,
				    __u32 new_d, __u16 old_len, __u16 new_len, __u32 old_ports,
				    __u32 new_ports, __u32 old_word, __u32 new_word)
{
	__u64 ps = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, CSUM_OFF, old_s, new_s, ps | 4) ||
	    bpf_l4_csum_replace(skb, CSUM_OFF, old_d, new_d, ps | 4))
		return -1;
	return csum_rest(skb, CSUM_OFF, old_len, new_len, old_ports, new_ports, old_word, new_word);
}

/* IPv6: the 32 bytes of pseudo-header addresses as one difference (bpf_csum_diff), then the
 * rest.  `addrs` holds the old source and destination, then the new ones. */
static __always_inline int csum_fix6(struct __sk_buff *skb, struct in6_addr addrs[4],
				     __u16 old_len, __u16 new_len, __u32 old_ports, __u32 new_ports,
				     __u32 old_word, __u32 new_word)
{
	__s64 diff = bpf_csum_diff((__be32 *)&addrs[0], 32, (__be32 *)&addrs[2], 32, 0);
	if (diff < 0 ||
	    bpf_l4_csum_replace(skb, CSUM_OFF6, 0, (__u32)diff, BPF_F_PSEUDO_HDR |
				BPF_F_MARK_MANGLED_0))
		return -1;
	return csum_rest(skb, CSUM_OFF6, old_len, new_len, old_ports, new_ports, old_word, new_word);
}

/* Ports and UDP length (both families; the checksum field is left as csum_fix made it). */
static __always_inline int set_udp(struct __sk_buff *skb, __u32 off, __u32 ports, __u16 ulen)
{
	if (bpf_skb_store_bytes(skb, off, &ports, 4, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off + 4, &ulen, 2, 0) < 0)
		return -1;
	return 0;
}

/* Rewrite the IPv4 and UDP headers in place. */
static __always_inline int set_headers(struct __sk_buff *skb, __u32 saddr, __u32 daddr,
				       __u16 tot_len, __u32 ports, __u16 ulen)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof(ip)) < 0)
		return -1;
	ip.saddr = saddr;
	ip.daddr = daddr;
	ip.tot_len = tot_len;
	ip.ttl = 64; /* RFC 8656 §14 (IP header fields): the default TTL for outgoing packets */
	ip.check = ip_checksum(&ip);
	if (bpf_skb_store_bytes(skb, ETH_LEN, &ip, sizeof(ip), 0) < 0)
		return -1;
	return set_udp(skb, UDP_OFF, ports, ulen);
}

/* Rewrite the IPv6 and UDP headers in place (no extension headers: payload length = UDP
 * length). */
static __always_inline int set_headers6(struct __sk_buff *skb, const struct in6_addr *saddr,
					const struct in6_addr *daddr, __u32 ports, __u16 ulen)
{
	struct ipv6hdr ip6;
	if (bpf_skb_load_bytes(skb, ETH_LEN, &ip6, sizeof(ip6)) < 0)
		return -1;
	ip6.saddr = *saddr;
	ip6.daddr = *daddr;
	ip6.payload_len = ulen;
	ip6.hop_limit = 64; /* RFC 8656 §14: the default hop limit for outgoing packets */
	if (bpf_skb_store_bytes(skb, ETH_LEN, &ip6, sizeof(ip6), 0) < 0)
		return -1;
	return set_udp(skb, UDP_OFF6, ports, ulen);
}

/* The payload moves 4 bytes up over the ChannelData header, the tail is trimmed (the headers
 * stay where they are, so a CHECKSUM_PARTIAL skb's csum_start stays right). */
static __always_inline int strip_cd(struct __sk_buff *skb, struct scratch *sc, __u32 off, __u16 n)
{
	/* 1 <= n < MAX_PAYLOAD (the callers' checks), so len == n; the form is for the verifier,
	 * which must see a length in [1, MAX_PAYLOAD] at the call itself. */
	__u32 len = ((__u32)(n - 1) & (MAX_PAYLOAD - 1)) + 1;
	if (bpf_skb_load_bytes(skb, off + 4, sc->buf, len) < 0 ||
	    bpf_skb_store_bytes(skb, off, sc->buf, len, 0) < 0)
		return -1;
	if (bpf_skb_change_tail(skb, off + n, 0) < 0)
		return -1;
	return 0;
}

/* The tail is extended, the payload moves 4 bytes down, the ChannelData header goes in front. */
static __always_inline int add_cd(struct __sk_buff *skb, struct scratch *sc, __u32 off, __u16 n,
				  __u16 cdh[2])
{
	__u32 len = ((__u32)(n - 1) & (MAX_PAYLOAD - 1)) + 1; /* == n, as in strip_cd() */
	if (bpf_skb_load_bytes(skb, off, sc->buf, len) < 0)
		return -1;
	if (bpf_skb_change_tail(skb, off + 4 + n, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, off + 4, sc->buf, len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, off, cdh, 4, 0) < 0)
		return -1;
	return 0;
}

static __always_inline struct scratch *scratch(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&cd_scratch, &zero);
}

/* A ChannelData header at `cd` that this program may forward: channel 0x4000-0x7FFF (the
 * core accepts RFC 5766's range too; the map lookup is what decides) and a length covering
 * exactly the datagram (padded or malformed ChannelData goes to user space, which knows what to
 * do).  Returns the payload length, 0 if not. */
static __always_inline __u16 cd_length(__u8 *cd, __u16 ulen)
{
	__u16 chan = *(__u16 *)cd;
	__u16 n = bpf_ntohs(*(__u16 *)(cd + 2));
	if ((bpf_ntohs(chan) & 0xC000) != 0x4000 || ulen != 8 + 4 + (__u32)n || n >= MAX_PAYLOAD)
		return 0;
	return n;
}

/* One packet's rewrite, resolved from a map entry; both families (IPv4 in word 0). */
struct rewrite {
	struct in6_addr addrs[4]; /* old source, old destination, new source, new destination */
	__u32 old_ports, new_ports, old_word, new_word, slot;
	__u16 old_len, new_len;   /* UDP length, network order */
	__u16 tot;                /* IPv4 total length after the change, network order */
	__u16 n;                  /* payload length */
};

static __always_inline __u32 w0(const struct in6_addr *a) { return a->in6_u.u6_addr32[0]; }

/* A rewritten packet for this host that arrived on another interface than lo can only be
 * delivered by finishing it here: handed to lo (deliver_local()), a packet from one of this
 * host's own addresses is dropped as a martian source by the input route check (unless
 * accept_local, which a host does not set).  So relay to relay (client -> peer, the peer being
 * another allocation's relayed address) is taken only when that allocation's peer -> client
 * leg is in the map too and leads off this host; anything else stays with user space, whose
 * sockets deliver locally (Data indications, a client on this host). */
static __always_inline int finishes_off_host(struct __sk_buff *skb, struct rewrite *rw, int v6)
{
	struct in6_addr *a = rw->addrs;
	__u16 sport = (__u16)rw->new_ports, dport = (__u16)(rw->new_ports >> 16);
	__u32 ifindex = 0;
	if (v6) {
		struct out6_key k = {.peer_ip = a[2], .relay_ip = a[3], .peer_port = sport,
				     .relay_port = dport};
		struct out6_val *v = bpf_map_lookup_elem(&cd_out6, &k);
		if (!v || route6(skb, &v->listener_ip, &v->client_ip, &ifindex) < 0)
			return 0;
	} else {
		struct out_key k = {.peer_ip = w0(&a[2]), .relay_ip = w0(&a[3]), .peer_port = sport,
				    .relay_port = dport};
		struct out_val *v = bpf_map_lookup_elem(&cd_out, &k);
		if (!v || route(skb, v->listener_ip, v->client_ip, &ifindex) < 0)
			return 0;
	}
	return ifindex != 0;
}

/* The steps after the lookup, the same for both families and directions: route (before
 * anything is changed), checksum, headers, the ChannelData header removed (to_peer) or added,
 * counters, delivery.  `v6` and `to_peer` are constants where it is inlined. */
static __always_inline int apply(struct __sk_buff *skb, struct rewrite *rw, int v6, int to_peer)
{
	struct in6_addr *a = rw->addrs;
	struct scratch *sc = scratch();
	if (!sc)
		return PASS;
	__u32 ifindex;
	if ((v6 ? route6(skb, &a[2], &a[3], &ifindex) : route(skb, w0(&a[2]), w0(&a[3]), &ifindex)) < 0)
		return PASS;
	if (ifindex == 0 && skb->ingress_ifindex != LOOPBACK_IFINDEX &&
	    (!to_peer || !finishes_off_host(skb, rw, v6)))
		return PASS; /* for this host, arrived on another interface: user space delivers it */
	if (v6 ? csum_fix6(skb, a, rw->old_len, rw->new_len, rw->old_ports, rw->new_ports,
			   rw->old_word, rw->new_word)
	       : csum_fix(skb, w0(&a[0]), w0(&a[2]), w0(&a[1]), w0(&a[3]), rw->old_len, rw->new_len,
			  rw->old_ports, rw->new_ports, rw->old_word, rw->new_word))
		return TC_ACT_SHOT;
	__u32 payload_off = v6 ? PAYLOAD_OFF6 : PAYLOAD_OFF;
	if (!to_peer) { /* the payload moves down first: the headers' new lengths come after */
		__u16 cdh[2] = {(__u16)rw->new_word, bpf_htons(rw->n)};
		if (add_cd(skb, sc, payload_off, rw->n, cdh))
			return TC_ACT_SHOT;
	}
	if (v6 ? set_headers6(skb, &a[2], &a[3], rw->new_ports, rw->new_len)
	       : set_headers(skb, w0(&a[2]), w0(&a[3]), rw->tot, rw->new_ports, rw->new_len))
		return TC_ACT_SHOT;
	if (to_peer && strip_cd(skb, sc, payload_off, rw->n))
		return TC_ACT_SHOT;
	count(rw->slot, to_peer, rw->n);
	return deliver(skb, ifindex);
}

/* client -> peer: strip the ChannelData header (RFC 8656 §12.4). */
static __always_inline int to_peer(struct __sk_buff *skb, int v6)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct udphdr *udp = data + (v6 ? UDP_OFF6 : UDP_OFF);
	__u8 *cd = data + (v6 ? PAYLOAD_OFF6 : PAYLOAD_OFF);
	if ((void *)(cd + 4) > data_end)
		return PASS;
	__u16 ulen = bpf_ntohs(udp->len);
	struct rewrite rw = {
		.old_ports = *(__u32 *)udp,
		.old_word = *(__u32 *)cd,
		.old_len = udp->len,
		.new_len = bpf_htons(ulen - 4),
		.n = cd_length(cd, ulen),
	};
	if (rw.n == 0)
		return PASS;
	__u16 relay_port, peer_port;
	if (v6) {
		struct ipv6hdr *ip6 = data + ETH_LEN;
		if (ip6->payload_len != udp->len)
			return PASS;
		struct in6_key k = {.client_ip = ip6->saddr, .client_port = udp->source,
				    .listener_port = udp->dest, .channel = *(__u16 *)cd};
		struct in6_val *v = bpf_map_lookup_elem(&cd_in6, &k);
		if (!v)
			return PASS; /* unbound channel: user space drops it */
		rw.addrs[0] = ip6->saddr, rw.addrs[1] = ip6->daddr;
		rw.addrs[2] = v->relay_ip, rw.addrs[3] = v->peer_ip;
		relay_port = v->relay_port, peer_port = v->peer_port, rw.slot = v->slot;
	} else {
		struct iphdr *ip = data + ETH_LEN;
		struct in_key k = {.client_ip = ip->saddr, .client_port = udp->source,
				   .listener_port = udp->dest, .channel = *(__u16 *)cd};
		struct in_val *v = bpf_map_lookup_elem(&cd_in, &k);
		if (!v)
			return PASS;
		rw.addrs[0].in6_u.u6_addr32[0] = ip->saddr, rw.addrs[1].in6_u.u6_addr32[0] = ip->daddr;
		rw.addrs[2].in6_u.u6_addr32[0] = v->relay_ip;
		rw.addrs[3].in6_u.u6_addr32[0] = v->peer_ip;
		relay_port = v->relay_port, peer_port = v->peer_port, rw.slot = v->slot;
		rw.tot = bpf_htons(bpf_ntohs(ip->tot_len) - 4);
	}
	rw.new_ports = ((__u32)peer_port << 16) | relay_port; /* little-endian: source first */
	return apply(skb, &rw, v6, 1);
}

/* peer -> client: add the ChannelData header (§12.4; no padding over UDP, §12.5). */
static __always_inline int to_client(struct __sk_buff *skb, int v6)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct udphdr *udp = data + (v6 ? UDP_OFF6 : UDP_OFF);
	if ((void *)(udp + 1) > data_end)
		return PASS;
	__u16 ulen = bpf_ntohs(udp->len);
	__u16 n = ulen - 8;
	if (ulen <= 8 || n >= MAX_PAYLOAD || skb->len != (v6 ? PAYLOAD_OFF6 : PAYLOAD_OFF) + (__u32)n)
		return PASS;
	struct rewrite rw = {
		.old_ports = *(__u32 *)udp,
		.old_len = udp->len,
		.new_len = bpf_htons(ulen + 4),
		.n = n,
	};
	__u16 listener_port, client_port, chan;
	if (v6) {
		struct ipv6hdr *ip6 = data + ETH_LEN;
		if (ip6->payload_len != udp->len)
			return PASS;
		struct out6_key k = {.peer_ip = ip6->saddr, .relay_ip = ip6->daddr,
				     .peer_port = udp->source, .relay_port = udp->dest};
		struct out6_val *v = bpf_map_lookup_elem(&cd_out6, &k);
		if (!v)
			return PASS; /* no channel: a Data indication or a drop, in user space */
		rw.addrs[0] = ip6->saddr, rw.addrs[1] = ip6->daddr;
		rw.addrs[2] = v->listener_ip, rw.addrs[3] = v->client_ip;
		listener_port = v->listener_port, client_port = v->client_port, chan = v->channel;
		rw.slot = v->slot;
	} else {
		struct iphdr *ip = data + ETH_LEN;
		struct out_key k = {.peer_ip = ip->saddr, .relay_ip = ip->daddr,
				    .peer_port = udp->source, .relay_port = udp->dest};
		struct out_val *v = bpf_map_lookup_elem(&cd_out, &k);
		if (!v)
			return PASS;
		rw.addrs[0].in6_u.u6_addr32[0] = ip->saddr, rw.addrs[1].in6_u.u6_addr32[0] = ip->daddr;
		rw.addrs[2].in6_u.u6_addr32[0] = v->listener_ip;
		rw.addrs[3].in6_u.u6_addr32[0] = v->client_ip;
		listener_port = v->listener_port, client_port = v->client_port, chan = v->channel;
		rw.slot = v->slot;
		rw.tot = bpf_htons(bpf_ntohs(ip->tot_len) + 4);
	}
	__u16 cdh[2] = {chan, bpf_htons(n)};
	rw.new_word = *(__u32 *)cdh; /* its low half (the channel, as on the wire) is read back */
	rw.new_ports = ((__u32)client_port << 16) | listener_port;
	return apply(skb, &rw, v6, 0);
}

SEC("tc")
int confedge_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	int v6;
	if ((void *)(eth + 1) > data_end || skb->gso_segs > 1)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_LEN;
		if ((void *)(ip + 1) > data_end)
			return TC_ACT_OK;
		if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
			return TC_ACT_OK;
		if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset: a fragment */
			return TC_ACT_OK;
		v6 = 0;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_LEN;
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		/* UDP right after the fixed header only: extension headers (a fragment header
		 * among them) take the user-space path. */
		if (ip6->nexthdr != IPPROTO_UDP)
			return TC_ACT_OK;
		v6 = 1;
	} else {
		return TC_ACT_OK;
	}
	/* Nothing is changed when a step answers PASS, so the next step may look at the packet. */
	int rc = to_peer(skb, v6);
	if (rc == PASS) {
		rc = to_client(skb, v6);
		if (rc == PASS)
			return TC_ACT_OK;
		return rc == LOCAL ? deliver_local(skb) : rc;
	}
	if (rc != LOCAL)
		return rc;
	/* Client -> peer where the peer is on this host: when it is another allocation's relay
	 * address (two clients of this server talking, relay to relay), its peer -> client leg is
	 * done here at once. */
	rc = to_client(skb, v6);
	if (rc == PASS || rc == LOCAL)
		return deliver_local(skb);
	return rc;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
