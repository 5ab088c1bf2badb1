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
 * Checksums: the IPv4 header checksum is recomputed (20-byte headers only); the UDP checksum is
 * updated incrementally (RFC 1624, bpf_l4_csum_replace) for the changed pseudo-header, ports,
 * length and the removed or added header word; a UDP checksum of 0 (none, RFC 768) stays 0.
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
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef AF_INET
#define AF_INET 2
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

/* Where the rewritten packet goes; called before anything is changed (returns -1: give up). */
static __always_inline int route(struct __sk_buff *skb, __u32 src, __u32 dst, __u32 *ifindex)
{
	__u32 in_if = skb->ingress_ifindex;
	if (dst == src) {
		/* To this host's own address (relay to relay between two allocations, or a client on
		 * the relay's host): local.  Asked first because the FIB lookup below refuses to
		 * answer (FWD_DISABLED) before it looks at the destination when forwarding is off. */
		*ifindex = 0;
		return 1;
	}
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = 0;
	fib.ipv4_src = src;
	fib.ipv4_dst = dst;
	fib.ifindex = in_if;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		*ifindex = fib.ifindex;
		return 1;
	}
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED) {
		*ifindex = 0; /* local: up the stack */
		return 1;
	}
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		*ifindex = in_if; /* single-interface relay: back out */
		return 1;
	}
	return -1;
}

#define LOOPBACK_IFINDEX 1 /* lo, in every network namespace */
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

/* The UDP checksum for every changed field (RFC 1624), through the kernel's helper so that it is
 * right whatever the skb's checksum state: a full checksum is updated for every change, a
 * CHECKSUM_PARTIAL one (packets from a local socket, veth) only for the pseudo-header; a zero
 * (no checksum, RFC 768) stays zero. */
static __always_inline int csum_fix(struct __sk_buff *skb, __u32 old_s, __u32 new_s, __u32 old_d,
				    __u32 new_d, __u16 old_len, __u16 new_len, __u32 old_ports,
				    __u32 new_ports, __u32 old_word, __u32 new_word)
{
	__u64 ps = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, CSUM_OFF, old_s, new_s, ps | 4) ||
	    bpf_l4_csum_replace(skb, CSUM_OFF, old_d, new_d, ps | 4) ||
	    bpf_l4_csum_replace(skb, CSUM_OFF, old_len, new_len, ps | 2) ||
	    bpf_l4_csum_replace(skb, CSUM_OFF, old_len, new_len, BPF_F_MARK_MANGLED_0 | 2) ||
	    bpf_l4_csum_replace(skb, CSUM_OFF, old_ports, new_ports, BPF_F_MARK_MANGLED_0 | 4) ||
	    bpf_l4_csum_replace(skb, CSUM_OFF, old_word, new_word, BPF_F_MARK_MANGLED_0 | 4))
		return -1;
	return 0;
}

/* Rewrite the IPv4 and UDP headers in place (the checksum field is left as csum_fix made it). */
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
	if (bpf_skb_store_bytes(skb, UDP_OFF, &ports, 4, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, UDP_OFF + 4, &ulen, 2, 0) < 0)
		return -1;
	return 0;
}

/* client -> peer: strip the ChannelData header (the payload moves 4 bytes up, the headers stay
 * where they are, so a CHECKSUM_PARTIAL skb's csum_start stays right). */
static __always_inline int to_peer(struct __sk_buff *skb, struct iphdr *ip, struct udphdr *udp,
				   void *data_end)
{
	__u8 *cd = (__u8 *)(udp + 1);
	if ((void *)(cd + 4) > data_end)
		return PASS;
	__u16 chan = *(__u16 *)cd;
	__u32 cdword = *(__u32 *)cd;
	__u16 n = bpf_ntohs(*(__u16 *)(cd + 2));
	__u16 ulen = bpf_ntohs(udp->len);
	/* A channel number's first two bits are 01 (0x4000-0x7FFF: the core accepts RFC 5766's
	 * range too; the map lookup below is what decides); the length must cover exactly the
	 * datagram (padded or malformed ChannelData goes to user space, which knows what to do). */
	if ((bpf_ntohs(chan) & 0xC000) != 0x4000 || ulen != 8 + 4 + (__u32)n || n == 0 ||
	    n >= MAX_PAYLOAD)
		return PASS;
	struct in_key k = {
		.client_ip = ip->saddr,
		.client_port = udp->source,
		.listener_port = udp->dest,
		.channel = chan,
	};
	struct in_val *v = bpf_map_lookup_elem(&cd_in, &k);
	if (!v)
		return PASS; /* unbound channel: user space drops it */
	__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip, slot = v->slot;
	__u16 relay_port = v->relay_port, peer_port = v->peer_port;
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&cd_scratch, &zero);
	if (!sc)
		return PASS;
	__u32 ifindex;
	if (route(skb, relay_ip, peer_ip, &ifindex) < 0)
		return PASS;

	__u32 old_s = ip->saddr, old_d = ip->daddr, old_ports = *(__u32 *)udp;
	__u16 old_len = udp->len, new_len = bpf_htons(ulen - 4);
	__u16 tot = bpf_htons(bpf_ntohs(ip->tot_len) - 4);
	__u32 new_ports = ((__u32)peer_port << 16) | relay_port; /* little-endian: source first */
	if (csum_fix(skb, old_s, relay_ip, old_d, peer_ip, old_len, new_len, old_ports, new_ports,
		     cdword, 0))
		return TC_ACT_SHOT;
	if (set_headers(skb, relay_ip, peer_ip, tot, new_ports, new_len))
		return TC_ACT_SHOT;
	__u32 len = n & (MAX_PAYLOAD - 1); /* n < MAX_PAYLOAD: the mask is for the verifier */
	if (len == 0 || bpf_skb_load_bytes(skb, PAYLOAD_OFF + 4, sc->buf, len) < 0 ||
	    bpf_skb_store_bytes(skb, PAYLOAD_OFF, sc->buf, len, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, PAYLOAD_OFF + n, 0) < 0)
		return TC_ACT_SHOT;
	count(slot, 1, n);
	return deliver(skb, ifindex);
}

/* peer -> client: add the ChannelData header (the payload moves 4 bytes down). */
static __always_inline int to_client(struct __sk_buff *skb, struct iphdr *ip, struct udphdr *udp)
{
	struct out_key k = {
		.peer_ip = ip->saddr,
		.relay_ip = ip->daddr,
		.peer_port = udp->source,
		.relay_port = udp->dest,
	};
	struct out_val *v = bpf_map_lookup_elem(&cd_out, &k);
	if (!v)
		return PASS; /* no channel: a Data indication or a drop, in user space */
	__u16 ulen = bpf_ntohs(udp->len);
	__u16 n = ulen - 8;
	if (ulen <= 8 || n >= MAX_PAYLOAD || skb->len != PAYLOAD_OFF + (__u32)n)
		return PASS;
	__u32 listener_ip = v->listener_ip, client_ip = v->client_ip, slot = v->slot;
	__u16 listener_port = v->listener_port, client_port = v->client_port, chan = v->channel;
	__u32 zero = 0;
	struct scratch *sc = bpf_map_lookup_elem(&cd_scratch, &zero);
	if (!sc)
		return PASS;
	__u32 ifindex;
	if (route(skb, listener_ip, client_ip, &ifindex) < 0)
		return PASS;

	__u32 old_s = ip->saddr, old_d = ip->daddr, old_ports = *(__u32 *)udp;
	__u16 old_len = udp->len, new_len = bpf_htons(ulen + 4);
	__u16 tot = bpf_htons(bpf_ntohs(ip->tot_len) + 4);
	__u16 cdh[2] = {chan, bpf_htons(n)};
	__u32 new_ports = ((__u32)client_port << 16) | listener_port;
	if (csum_fix(skb, old_s, listener_ip, old_d, client_ip, old_len, new_len, old_ports,
		     new_ports, 0, *(__u32 *)cdh))
		return TC_ACT_SHOT;
	__u32 len = n & (MAX_PAYLOAD - 1); /* n < MAX_PAYLOAD: the mask is for the verifier */
	if (len == 0 || bpf_skb_load_bytes(skb, PAYLOAD_OFF, sc->buf, len) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, PAYLOAD_OFF + 4 + n, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, PAYLOAD_OFF + 4, sc->buf, len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, PAYLOAD_OFF, cdh, 4, 0) < 0)
		return TC_ACT_SHOT;
	if (set_headers(skb, listener_ip, client_ip, tot, new_ports, new_len))
		return TC_ACT_SHOT;
	count(slot, 0, n);
	return deliver(skb, ifindex);
}

SEC("tc")
int confedge_relay(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_LEN;
	struct udphdr *udp = data + UDP_OFF;
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset: a fragment */
		return TC_ACT_OK;
	if (skb->gso_segs > 1)
		return TC_ACT_OK;
	int rc = to_peer(skb, ip, udp, data_end);
	if (rc == PASS) {
		/* Not client ChannelData: reload the pointers (nothing was changed) and try the peer
		 * side. */
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + ETH_LEN;
		udp = data + UDP_OFF;
		if ((void *)(udp + 1) > data_end)
			return TC_ACT_OK;
		rc = to_client(skb, ip, udp);
		if (rc == PASS)
			return TC_ACT_OK;
		return rc == LOCAL ? deliver_local(skb) : rc;
	}
	if (rc != LOCAL)
		return rc;
	/* Client -> peer where the peer is on this host: when it is another allocation's relay
	 * address (two clients of this server talking, relay to relay), its peer -> client leg is
	 * done here at once. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	ip = data + ETH_LEN;
	udp = data + UDP_OFF;
	if ((void *)(udp + 1) > data_end)
		return TC_ACT_SHOT;
	rc = to_client(skb, ip, udp);
	if (rc == PASS || rc == LOCAL)
		return deliver_local(skb);
	return rc;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
