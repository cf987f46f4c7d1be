//! Fuzzes software GRO and the virtio-net header: the input is a list of frames, each behind a
//! one-byte length (times 8, so frames reach past an MTU; seeds in `corpus/gro` are runs of
//! valid segments to mutate). Whatever comes in, planning must not panic, every frame must
//! leave exactly once, members must follow their head in input order, and every header
//! `finish` returns must be one the kernel accepts for the bytes that would be sent.
#![no_main]

use dataplane::gro::Coalescer;
use dataplane::wire::virtio_net::VirtioNetHdr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = VirtioNetHdr::parse(data).map(|h| h.check(data.len()));
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while let [len, bytes @ ..] = rest {
        let n = (usize::from(*len) * 8).min(bytes.len());
        frames.push(bytes[..n].to_vec());
        rest = &bytes[n..];
    }
    let mut c = Coalescer::new();
    let view = frames.clone();
    let groups = c.plan(view.len(), |i| view.get(i).map(|v| &v[..])).to_vec();
    let mut seen = vec![false; frames.len()];
    for g in &groups {
        let head = g.head as usize;
        assert!(!seen[head]);
        seen[head] = true;
        let mut last = head;
        let mut bytes = 0usize;
        for (m, at) in c.members(g) {
            assert!(m > last && !seen[m], "members in input order, once");
            seen[m] = true;
            last = m;
            bytes += frames[m].len().saturating_sub(at);
        }
        let hdr = c.finish(g, &mut frames[head]);
        assert!(hdr.check(frames[head].len() + bytes).is_ok(), "{hdr:?}");
    }
    assert!(seen.iter().all(|&s| s), "every frame leaves once");
});
