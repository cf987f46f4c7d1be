/* vxnat's XDP program, one instance per port. On pod and host ports it redirects every frame
 * to vxnat's AF_XDP socket; on the uplink only VXLAN to this node's address and port, the
 * Service frontends in the `frontends` map and ICMP errors about what they sent, passing
 * everything else to the kernel so the node's own
 * addressing, ARP and SSH keep working. Thin by design: vxnat validates everything itself. */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "vxnat.h"
#include "maps.h"

static __always_inline int count(__u32 exit, int action)
{
	__u64 *n = bpf_map_lookup_elem(&exits, &exit);
	if (n)
		*n += 1;
	return action;
}

static __always_inline int redirect(struct xdp_md *ctx)
{
	/* No socket on this queue: vxnat is restarting (the program outlives the process for its
	 * successor to replace). Dropped, not passed: TCP retransmits a dropped segment, while the
	 * kernel would answer a NodePort segment with a RST (no listener) and route a pod's frame
	 * out unencapsulated. */
	if (bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_DROP) == XDP_REDIRECT)
		return count(VXNAT_EXIT_REDIRECT, XDP_REDIRECT);
	return count(VXNAT_EXIT_DROP_NO_SOCKET, XDP_DROP);
}

/* An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet a
 * Service frontend sent: the quoted header's source address, source port and protocol are a
 * frontend's. A router on the path to a client outside the cluster answers vxnat's reply with
 * fragmentation needed this way; the kernel has no socket for it, vxnat translates it for the
 * endpoint (path MTU discovery through a NodePort). */
static __always_inline int is_frontend_icmp_error(struct iphdr *ip, void *end)
{
	__u8 *icmp = (void *)ip + ip->ihl * 4;
	struct iphdr *q;
	struct udphdr *ports;

	if ((void *)(icmp + 8) > end || (icmp[0] != 3 && icmp[0] != 11 && icmp[0] != 12))
		return 0;
	q = (void *)(icmp + 8);
	if ((void *)(q + 1) > end || q->ihl < 5)
		return 0;
	if (q->protocol != IPPROTO_UDP && q->protocol != IPPROTO_TCP)
		return 0;
	ports = (void *)q + q->ihl * 4;
	if ((void *)ports + 4 > end)
		return 0;
	struct vxnat_frontend key = { .addr = q->saddr, .port = ports->source, .proto = q->protocol, .pad = 0 };
	return bpf_map_lookup_elem(&frontends, &key) != 0;
}

/* On the uplink vxnat owns: VXLAN to this node (untagged IPv4 to node_ip, not fragmented, UDP
 * to vxlan_port), TCP/UDP to a Service frontend in the `frontends` map, and ICMP errors about
 * what a frontend sent. */
static __always_inline int is_ours_on_uplink(struct xdp_md *ctx, const struct vxnat_config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl < 5)
		return 0;
	if (ip->frag_off & bpf_htons(0x3fff))
		return 0;
	if (ip->protocol == IPPROTO_ICMP)
		return is_frontend_icmp_error(ip, end);
	if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
		return 0;
	/* TCP and UDP both start with source and destination ports. */
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > end)
		return 0;
	if (ip->protocol == IPPROTO_UDP && ip->daddr == cfg->node_ip && udp->dest == cfg->vxlan_port)
		return 1;
	struct vxnat_frontend key = { .addr = ip->daddr, .port = udp->dest, .proto = ip->protocol, .pad = 0 };
	return bpf_map_lookup_elem(&frontends, &key) != 0;
}

SEC("xdp.frags")
int vxnat_xdp(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct vxnat_config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg || cfg->mode == VXNAT_MODE_PASS)
		return count(VXNAT_EXIT_PASS_UNCONFIGURED, XDP_PASS);
	if (cfg->mode == VXNAT_MODE_UPLINK && !is_ours_on_uplink(ctx, cfg))
		return count(VXNAT_EXIT_PASS_NOT_OURS, XDP_PASS);
	return redirect(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
