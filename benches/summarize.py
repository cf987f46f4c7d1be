#!/usr/bin/env python3
"""Prints criterion medians from target/criterion as a markdown table.

Pipeline benchmarks run batches of 32 frames: the table divides by 32 for ns per packet and
subtracts the matching `rearm_only` run (the per-iteration frame restore, a memcpy) to show
the pipeline's own cost. Checksum benchmarks are shown as GiB/s.
"""
import json, pathlib, sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")

def median_ns(group, bench):
    f = root / group / bench / "new" / "estimates.json"
    if not f.exists():
        return None
    return json.loads(f.read_text())["median"]["point_estimate"]

print("| benchmark | frame | median ns/packet | minus re-arm |")
print("|---|---|---|---|")
for case in ["pod_to_encap", "pod_partial_csum_to_encap", "uplink_decap_to_pod", "pod_to_service_hit_dnat_encap"]:
    for size in ["64B", "1400B"]:
        m = median_ns("pipeline", f"{case}_{size}")
        r = median_ns("pipeline", f"rearm_only_{size}")
        if m is None:
            continue
        net = f"{(m - r) / 32:.1f}" if r is not None else "n/a"
        print(f"| {case} | {size} | {m / 32:.1f} | {net} |")
print()
print("| checksum | size | median | GiB/s |")
print("|---|---|---|---|")
for d in sorted((root / "checksum").glob("*")):
    if not (d / "new" / "estimates.json").exists():
        continue
    name = d.name
    kind, _, size = name.rpartition("_")
    n = int(size.rstrip("B"))
    m = median_ns("checksum", name)
    print(f"| {kind} | {size} | {m:.1f} ns | {n / m * 1e9 / 2**30:.2f} |")
