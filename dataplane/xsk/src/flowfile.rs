//! The flow file: the worker's conntrack as fixed-size records (`dataplane::conntrack::record`)
//! in a file mapped shared, one record per conntrack slot, so the flows outlive the process.
//!
//! Why a mapped file, written as flows change, rather than state handed over at exit: a
//! `kill -9` (or a panic, or the OOM killer) gives no chance to hand anything over. A store
//! into a shared mapping of a tmpfs file is in the page cache the moment it is made, so
//! whatever the process had written when it died is there for its successor, with no syscall
//! and no flush. The worker writes the records of the slots that changed (a flow created, a
//! state change, NAT fields set, a removal: a few times per flow, not per packet) after each
//! poll pass (`Worker::poll` then `FlowFile::write_changes`), so a crash loses at most the
//! changes of one pass; a record torn by the crash fails its checksum and is skipped.
//!
//! Contract:
//! - `FlowFile::load` reads what an earlier process left, with creation times moved to the
//!   reader's clock (the header holds the writer's clock origin on CLOCK_MONOTONIC, which
//!   runs across processes and stops only at reboot: tmpfs is empty after one anyway).
//! - `FlowFile::create` writes the current flows to a new file beside `path` and renames it
//!   into place only once complete, so at every instant `path` holds a whole table: the old
//!   process's or the new one's.
//! - A file of another format (magic, record version or length) is refused by `load` and
//!   replaced by `create`: the flows are lost, never misread.
//!
//! Layout: a 128-byte header (magic, record version, record length, slot count, the writer's
//! clock origin, how many slots from the first were ever written (a reader reads no further,
//! so a restart reads what the table held, not its capacity), and how many retired flows were
//! ever written), then one `RECORD_LEN`-byte record per slot, then a ring of as many records
//! of retired flows: flows that left the table while the backend may still hold their SNAT
//! tuple (`ConnTrack::retire`; a new connection reopened the key, or the flow expired open).
//! Their `expires_at` is when the hold ends; a ring full of holds younger than the hold time
//! (more tuples retired per hold time than the table has slots) loses the oldest.

use dataplane::conntrack::record::{self, RECORD_LEN};
use dataplane::conntrack::{ConnTrack, Flow};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

const MAGIC: [u8; 8] = *b"VXNATFL\x01";
const HEADER_LEN: usize = RECORD_LEN;

/// Nanoseconds on CLOCK_MONOTONIC (system-wide, unaffected by wall-clock changes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// What `load` found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Intact flows, creation times on the reader's clock.
    pub flows: Vec<Flow>,
    /// Retired flows (module docs), newest first, `expires_at` (the hold's end) on the
    /// reader's clock.
    pub retired: Vec<Flow>,
    /// Records that were neither empty nor intact (torn by a crash, or damaged).
    pub corrupt: usize,
}

/// Why a flow file was not read.
#[derive(Debug)]
pub enum LoadError {
    /// There is none (a first start, or after a reboot).
    Missing,
    Io(std::io::Error),
    /// Not a flow file of this format.
    Format(String),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing => f.write_str("no flow file"),
            LoadError::Io(e) => write!(f, "reading the flow file: {e}"),
            LoadError::Format(why) => write!(f, "flow file of another format ({why}): not restored"),
        }
    }
}

/// The live flow file: a shared mapping the worker writes records into.
pub struct FlowFile {
    map: NonNull<u8>,
    len: usize,
    slots: usize,
    /// Slots `0..written` may hold records (the header says so).
    written: usize,
    /// Retired flows ever written into the ring.
    retired: u64,
    path: PathBuf,
}

impl std::fmt::Debug for FlowFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowFile").field("path", &self.path).field("slots", &self.slots).finish()
    }
}

// SAFETY: the mapping is owned by one FlowFile, used by one thread at a time (the worker's).
unsafe impl Send for FlowFile {}

impl FlowFile {
    /// Reads the flow file at `path`; `origin` is the reader's clock origin on CLOCK_MONOTONIC
    /// (its `now` is nanoseconds since then).
    pub fn load(path: &Path, origin: u64) -> Result<Loaded, LoadError> {
        use std::io::Read;
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(LoadError::Missing),
            Err(e) => return Err(LoadError::Io(e)),
        };
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header).map_err(|_| LoadError::Format("shorter than its header".into()))?;
        let u32_at = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        if header[..8] != MAGIC {
            return Err(LoadError::Format("magic".into()));
        }
        let (version, len) = (u32_at(8), u32_at(12) as usize);
        if version != u32::from(record::VERSION) || len != RECORD_LEN {
            return Err(LoadError::Format(format!("record version {version}, length {len}")));
        }
        let (slots, writer_origin, written, retired) = (u64_at(16), u64_at(24), u64_at(32), u64_at(40));
        let mut bytes = Vec::new();
        (&mut file).take(written.saturating_mul(RECORD_LEN as u64)).read_to_end(&mut bytes).map_err(LoadError::Io)?;
        let mut out = Loaded::default();
        let to_reader = |t: u64| writer_origin.saturating_add(t).saturating_sub(origin);
        // The ring, newest first (a tuple retired twice: its later hold counts).
        let ring = slots.max(1);
        let mut ring_bytes = vec![0u8; (retired.min(ring) as usize).saturating_mul(RECORD_LEN)];
        {
            use std::os::unix::fs::FileExt;
            let at = HEADER_LEN as u64 + slots.saturating_mul(RECORD_LEN as u64);
            file.read_exact_at(&mut ring_bytes, at).map_err(LoadError::Io)?;
        }
        for k in 1..=retired.min(ring) {
            let i = ((retired - k) % ring) as usize * RECORD_LEN;
            let Some(r) = ring_bytes.get(i..i + RECORD_LEN).and_then(|r| <&[u8; RECORD_LEN]>::try_from(r).ok()) else {
                continue;
            };
            match record::decode(r) {
                Ok(Some(mut f)) => {
                    f.expires_at = to_reader(f.expires_at);
                    out.retired.push(f);
                }
                Ok(None) => {}
                Err(_) => out.corrupt += 1,
            }
        }
        for r in bytes.chunks_exact(RECORD_LEN) {
            let r: &[u8; RECORD_LEN] = r.try_into().expect("chunks_exact");
            match record::decode(r) {
                Ok(Some(mut f)) => {
                    // Writer's clock to the reader's: absolute, then relative to `origin`.
                    f.created = to_reader(f.created);
                    out.flows.push(f);
                }
                Ok(None) => {}
                Err(_) => out.corrupt += 1,
            }
        }
        Ok(out)
    }

    /// A new flow file for `ct` (whose slots it mirrors), holding every flow `ct` tracks now,
    /// renamed over `path` once written; enables `ct`'s journal so `write_changes` keeps it
    /// current. `origin`: the writer's clock origin on CLOCK_MONOTONIC.
    pub fn create(path: &Path, ct: &mut ConnTrack, origin: u64) -> std::io::Result<FlowFile> {
        let mut f = Self::prepare(path, ct.capacity(), origin)?;
        f.publish(ct)?;
        Ok(f)
    }

    /// `create` in two steps, so a successor makes the file (beside `path`, not yet in its
    /// place) before its predecessor stops, and its forwarding gap holds only `publish`.
    /// `slots`: the capacity of the table it will mirror.
    pub fn prepare(path: &Path, slots: usize, origin: u64) -> std::io::Result<FlowFile> {
        let len = HEADER_LEN + 2 * slots * RECORD_LEN;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(Self::new_path(path))?;
        // Sparse: tmpfs keeps pages only for the records written.
        file.set_len(len as u64)?;
        // SAFETY: a shared read-write mapping of the whole file just sized to `len`; checked
        // against MAP_FAILED. The file may be closed afterwards: the mapping keeps it.
        let area = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if area == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let map = NonNull::new(area.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        let mut f = FlowFile { map, len, slots, written: 0, retired: 0, path: path.to_path_buf() };
        let h = f.bytes_mut(0, HEADER_LEN).ok_or_else(|| std::io::Error::other("flow file shorter than its header"))?;
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&u32::from(record::VERSION).to_le_bytes());
        h[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(slots as u64).to_le_bytes());
        h[24..32].copy_from_slice(&origin.to_le_bytes());
        Ok(f)
    }

    /// Writes every flow `ct` tracks into a prepared file, enables `ct`'s journal and puts
    /// the file in place of the old one. The old one's pages are freed on another thread
    /// (kept alive by a second link until then): a replaced file of many flows takes
    /// milliseconds to free, in no one's way.
    pub fn publish(&mut self, ct: &mut ConnTrack) -> std::io::Result<()> {
        if ct.capacity() != self.slots {
            return Err(std::io::Error::other(format!(
                "flow file of {} slots for a table of {}",
                self.slots,
                ct.capacity()
            )));
        }
        ct.enable_journal();
        self.write_changes(ct);
        let mut old = self.path.as_os_str().to_owned();
        old.push(".old");
        let old = PathBuf::from(old);
        let _ = std::fs::remove_file(&old);
        let kept = std::fs::hard_link(&self.path, &old).is_ok();
        std::fs::rename(Self::new_path(&self.path), &self.path)?;
        if kept {
            let _ =
                std::thread::Builder::new().name("vxnat-flows-free".into()).spawn(move || std::fs::remove_file(old));
        }
        Ok(())
    }

    fn new_path(path: &Path) -> PathBuf {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        PathBuf::from(tmp)
    }

    fn bytes_mut(&mut self, at: usize, n: usize) -> Option<&mut [u8]> {
        if at.checked_add(n)? > self.len {
            return None;
        }
        // SAFETY: in bounds of the mapping (checked above), which lives as long as `self`;
        // `&mut self` makes this the only reference into it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(at), n) })
    }

    /// Writes the records of the slots `ct` changed since the last call (its journal).
    /// Memory stores only; called by the worker after each poll pass.
    pub fn write_changes(&mut self, ct: &mut ConnTrack) {
        let mut written = self.written;
        ct.drain_journal(|slot, flow| {
            let at = HEADER_LEN + slot as usize * RECORD_LEN;
            let Some(r) = self.bytes_mut(at, RECORD_LEN).and_then(|b| <&mut [u8; RECORD_LEN]>::try_from(b).ok()) else {
                return;
            };
            match flow {
                Some(f) => record::encode(f, r),
                None => *r = [0; RECORD_LEN],
            }
            written = written.max(slot as usize + 1);
        });
        let (ring, mut retired) = (self.slots.max(1), self.retired);
        ct.drain_retired(|flow| {
            let at = HEADER_LEN + (self.slots + (retired % ring as u64) as usize) * RECORD_LEN;
            if let Some(r) = self.bytes_mut(at, RECORD_LEN).and_then(|b| <&mut [u8; RECORD_LEN]>::try_from(b).ok()) {
                record::encode(flow, r);
                retired += 1;
            }
        });
        if retired > self.retired {
            // After the records, as `written` below.
            self.retired = retired;
            if let Some(h) = self.bytes_mut(40, 8) {
                h.copy_from_slice(&retired.to_le_bytes());
            }
        }
        if written > self.written {
            // After the records it covers, so it never covers an unwritten one; a crash
            // between the two loses this pass's new slots, as a crash may lose any pass.
            self.written = written;
            if let Some(h) = self.bytes_mut(32, 8) {
                h.copy_from_slice(&(written as u64).to_le_bytes());
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FlowFile {
    fn drop(&mut self) {
        // SAFETY: unmapping what `create` mapped. The file stays: it is the successor's.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::conntrack::{Flow, FlowKey, Timeouts};
    use std::net::Ipv4Addr;

    fn key(i: u16) -> FlowKey {
        FlowKey { proto: 6, src: Ipv4Addr::new(10, 0, 0, 1), dst: Ipv4Addr::new(10, 0, 0, 2), sport: i, dport: 80 }
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vxnat-flowfile-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// What one process wrote (flows created, one removed, one changed) is what the next reads
    /// back, creation times moved to its clock; the file is replaced whole by the next one.
    #[test]
    fn a_successor_reads_what_was_written_and_replaces_it() {
        let path = dir().join("flows");
        let mut ct = ConnTrack::new(64, Timeouts::default());
        for i in 0..10 {
            ct.insert(key(i), key(i).reversed(), 1_000 + u64::from(i), 0).unwrap();
        }
        let mut file = FlowFile::create(&path, &mut ct, 5_000_000).unwrap();
        let (id, _) = ct.lookup(&key(3), 2_000).unwrap();
        ct.remove(id);
        let (id, _) = ct.lookup(&key(4), 2_000).unwrap();
        ct.get_mut(id).unwrap().tag = 77;
        file.write_changes(&mut ct);
        // The successor's clock started 1 ms later.
        let loaded = FlowFile::load(&path, 6_000_000).unwrap();
        assert_eq!((loaded.flows.len(), loaded.corrupt), (9, 0));
        assert!(loaded.flows.iter().all(|f| f.orig.sport != 3));
        let f4 = loaded.flows.iter().find(|f| f.orig.sport == 4).unwrap();
        assert_eq!((f4.tag, f4.created), (77, 0), "created at 1004 ns on the old clock: before the new origin");
        drop(file);
        let mut ct2 = ConnTrack::new(8, Timeouts::default());
        ct2.insert(key(100), key(100).reversed(), 0, 0).unwrap();
        let _file2 = FlowFile::create(&path, &mut ct2, 6_000_000).unwrap();
        let again = FlowFile::load(&path, 6_000_000).unwrap();
        assert_eq!(again.flows.iter().map(|f| f.orig.sport).collect::<Vec<_>>(), [100]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// Retired flows (their tuple held after they left the table) come back newest first,
    /// their hold's end on the reader's clock; the ring keeps the newest when it wraps.
    #[test]
    fn retired_flows_come_back_newest_first_and_the_ring_keeps_the_newest() {
        let path = dir().join("flows");
        let mut ct = ConnTrack::new(4, Timeouts::default());
        let mut file = FlowFile::create(&path, &mut ct, 1_000).unwrap();
        let id = ct.insert(key(1), key(1).reversed(), 0, 0).unwrap();
        let f = ct.get(id).unwrap().clone();
        for i in 0..6u64 {
            ct.retire(&Flow { tag: i, ..f.clone() }, 5_000 + i);
        }
        file.write_changes(&mut ct);
        let loaded = FlowFile::load(&path, 2_000).unwrap();
        let got: Vec<(u64, u64)> = loaded.retired.iter().map(|f| (f.tag, f.expires_at)).collect();
        assert_eq!(got, [(5, 4_005), (4, 4_004), (3, 4_003), (2, 4_002)], "a ring of 4, newest first");
        assert!(loaded.retired.iter().all(|f| f.snat_released));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn another_format_is_refused_and_a_torn_record_skipped() {
        let path = dir().join("flows");
        assert!(matches!(FlowFile::load(&path, 0), Err(LoadError::Missing)));
        let mut ct = ConnTrack::new(4, Timeouts::default());
        ct.insert(key(1), key(1).reversed(), 0, 0).unwrap();
        ct.insert(key(2), key(2).reversed(), 0, 0).unwrap();
        drop(FlowFile::create(&path, &mut ct, 0).unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + 40] ^= 0xff; // inside the first record
        std::fs::write(&path, &bytes).unwrap();
        let loaded = FlowFile::load(&path, 0).unwrap();
        assert_eq!((loaded.flows.len(), loaded.corrupt), (1, 1));
        bytes[8] = 9; // record version
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(FlowFile::load(&path, 0), Err(LoadError::Format(_))));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
