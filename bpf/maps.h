/* Every map of the XDP program, declared once. */
#ifndef VXNAT_MAPS_H
#define VXNAT_MAPS_H

/* rx queue index -> AF_XDP socket of vxnat on that queue. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, VXNAT_MAX_QUEUES);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

/* Index 0: what this port's program does (written by the loader before traffic flows). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct vxnat_config);
} config SEC(".maps");

/* Service frontends the uplink redirects to vxnat (value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VXNAT_MAX_FRONTENDS);
	__type(key, struct vxnat_frontend);
	__type(value, __u8);
} frontends SEC(".maps");

/* enum vxnat_exit -> packets, per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, VXNAT_EXIT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} exits SEC(".maps");

#endif
