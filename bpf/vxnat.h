/* Definitions shared by the XDP program and its Rust loader (dataplane/xsk/src/bpf.rs
 * mirrors them; its tests read this file and fail if the exit and mode lists disagree). */
#ifndef VXNAT_H
#define VXNAT_H

/* What the program does on a port. */
enum vxnat_mode {
	VXNAT_MODE_PASS = 0,     /* not configured yet: everything to the kernel */
	VXNAT_MODE_ALL = 1,      /* pod and host ports: everything to vxnat */
	VXNAT_MODE_UPLINK = 2,   /* uplink: only what vxnat owns, the rest to the kernel */
};

/* Every exit of the program, counted per CPU so userspace can reconcile totals. */
enum vxnat_exit {
	VXNAT_EXIT_REDIRECT = 0,        /* handed to vxnat's AF_XDP socket */
	VXNAT_EXIT_PASS_NOT_OURS = 1,   /* uplink traffic vxnat does not own (SSH, ARP, ...) */
	VXNAT_EXIT_DROP_NO_SOCKET = 2,  /* ours, but no socket on this queue (restarting): dropped */
	VXNAT_EXIT_PASS_UNCONFIGURED = 3, /* mode PASS */
	VXNAT_EXIT_MAX = 4,
};

/* One entry of the `config` map. Addresses and ports in network byte order. */
struct vxnat_config {
	__u32 mode;
	__u32 node_ip;
	__u16 vxlan_port;
	__u16 pad;
};

/* Key of the `frontends` map: a Service frontend reachable from outside through the uplink
 * (NodePort on the node address, external IP, load balancer IP). Network byte order. */
struct vxnat_frontend {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

#define VXNAT_MAX_QUEUES 64
#define VXNAT_MAX_FRONTENDS 65536

#endif
