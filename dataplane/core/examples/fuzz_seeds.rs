//! Writes a seed corpus for the `pipeline` fuzz target: valid frames for every path of the
//! sample node (pod, host and uplink ingress), in the target's input format
//! (port byte, headroom byte, frame).
//!
//! `cargo run -p vxnat-dataplane --example fuzz_seeds -- fuzz/corpus/pipeline`

use dataplane::testkit::*;
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus/pipeline".into()));
    std::fs::create_dir_all(&dir)?;
    let p = b"seed payload";
    let udp = |s, d| ipv4(s, d, &L4::Udp { sport: 40000, dport: 53, payload: p });
    let tcp = |s, d| ipv4(s, d, &L4::Tcp { sport: 40000, dport: 80, seq: 1, ack: 0, flags: 2, payload: p });
    let mut partial = from_pod1(&tcp(POD1_IP, REMOTE_POD_B));
    make_partial(&mut partial);
    let seeds: Vec<(u8, Vec<u8>)> = vec![
        (POD1.0 as u8, from_pod1(&udp(POD1_IP, POD2_IP))),
        (POD1.0 as u8, from_pod1(&tcp(POD1_IP, REMOTE_POD_B))),
        (POD1.0 as u8, partial),
        (
            POD1.0 as u8,
            from_pod1(&ipv4_with(
                &Ip { ttl: 1, ..Ip::new(POD1_IP, REMOTE_POD_B) },
                &L4::Udp { sport: 1, dport: 2, payload: p },
            )),
        ),
        (POD1.0 as u8, from_pod1(&ipv4(POD1_IP, GATEWAY_A, &L4::IcmpEcho { ident: 1, seq: 1, payload: p }))),
        (POD1.0 as u8, arp_request(POD1_MAC, POD1_IP, GATEWAY_A)),
        (HOST.0 as u8, eth(HOST_PORT_MAC, HOST_STACK_MAC, 0x0800, &udp(NODE_A, REMOTE_POD_B))),
        (UPLINK.0 as u8, vxlan_frame(&Vxlan::b_to_a(), &tcp(REMOTE_POD_B, POD1_IP))),
        (UPLINK.0 as u8, vxlan_frame(&Vxlan { udp_checksum: true, ..Vxlan::b_to_a() }, &udp(REMOTE_POD_B, NODE_A))),
        (
            UPLINK.0 as u8,
            vxlan_frame(
                &Vxlan::b_to_a(),
                &ipv4_with(
                    &Ip { ttl: 1, ..Ip::new(REMOTE_POD_B, POD1_IP) },
                    &L4::Udp { sport: 1, dport: 2, payload: p },
                ),
            ),
        ),
    ];
    let mut seeds = seeds;
    // Service traffic: a SYN to the ClusterIP, the endpoint's reply through the tunnel, an ICMP
    // error quoting a translated packet.
    seeds.push((
        POD1.0 as u8,
        from_pod1(&ipv4(
            POD1_IP,
            SERVICE_VIP,
            &L4::Tcp { sport: 40000, dport: 80, seq: 1, ack: 0, flags: 2, payload: b"" },
        )),
    ));
    seeds.push((
        UPLINK.0 as u8,
        vxlan_frame(
            &Vxlan::b_to_a(),
            &ipv4(
                REMOTE_POD_B,
                POD1_IP,
                &L4::Tcp { sport: 8080, dport: 40000, seq: 9, ack: 2, flags: 0x12, payload: b"" },
            ),
        ),
    ));
    let quoted =
        ipv4(POD1_IP, REMOTE_POD_B, &L4::Tcp { sport: 40000, dport: 8080, seq: 1, ack: 0, flags: 2, payload: b"" });
    let mut icmp = vec![3, 4, 0, 0, 0, 0, 5, 0x78];
    icmp.extend_from_slice(&quoted[..28]);
    seeds.push((
        UPLINK.0 as u8,
        vxlan_frame(&Vxlan::b_to_a(), &ipv4(REMOTE_POD_B, POD1_IP, &L4::Raw { proto: 1, bytes: &icmp })),
    ));
    for (i, (port, frame)) in seeds.iter().enumerate() {
        let mut input = vec![*port, 64];
        input.extend_from_slice(frame);
        std::fs::write(dir.join(format!("seed-{i:02}")), input)?;
    }
    println!("wrote {} seeds to {}", seeds.len(), dir.display());
    Ok(())
}
