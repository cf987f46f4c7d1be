//! A frame inside a larger buffer (a UMEM chunk): `[headroom | data | tailroom]`, so VXLAN
//! headers can be pushed in front and stripped without copying the payload.

/// A frame within its buffer. Invariant: `start + len <= buf.len()`.
#[derive(Debug)]
pub struct FrameBuf<'a> {
    buf: &'a mut [u8],
    start: usize,
    len: usize,
}

impl<'a> FrameBuf<'a> {
    /// An empty frame over no buffer (a placeholder in fixed-size batch arrays).
    pub fn empty() -> FrameBuf<'a> {
        FrameBuf { buf: &mut [], start: 0, len: 0 }
    }

    /// A frame of `len` bytes at `start` in `buf`; `None` if it does not fit.
    pub fn new(buf: &'a mut [u8], start: usize, len: usize) -> Option<Self> {
        if start.checked_add(len)? > buf.len() {
            return None;
        }
        Some(FrameBuf { buf, start, len })
    }

    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Offset of the frame's first byte in the buffer.
    #[inline]
    pub fn start(&self) -> usize {
        self.start
    }
    #[inline]
    pub fn headroom(&self) -> usize {
        self.start
    }
    /// Bytes the frame may grow to from its start.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }
    /// Grows the frame at the front by `n` bytes (contents unspecified); false if the
    /// headroom is too small.
    #[inline]
    pub fn push_front(&mut self, n: usize) -> bool {
        if n > self.start {
            return false;
        }
        self.start -= n;
        self.len += n;
        true
    }
    /// Drops `n` bytes from the front; false (and no change) if the frame is shorter.
    #[inline]
    pub fn pull_front(&mut self, n: usize) -> bool {
        if n > self.len {
            return false;
        }
        self.start += n;
        self.len -= n;
        true
    }
    /// Shortens the frame to `len` bytes; no-op if it is already shorter.
    #[inline]
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Sets the length, growing into tailroom; false if `len` exceeds the capacity.
    #[inline]
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity() {
            return false;
        }
        self.len = len;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pull_and_bounds() {
        let mut raw = [0u8; 64];
        let mut f = FrameBuf::new(&mut raw, 16, 10).unwrap();
        assert!(!f.push_front(17));
        assert!(f.push_front(16));
        assert_eq!((f.start(), f.len()), (0, 26));
        assert!(f.pull_front(20));
        assert!(!f.pull_front(7));
        assert!(f.set_len(44));
        assert!(!f.set_len(45));
        f.truncate(3);
        assert_eq!(f.data().len(), 3);
        assert!(FrameBuf::new(&mut raw, 60, 5).is_none());
        assert!(FrameBuf::new(&mut raw, usize::MAX, 5).is_none());
    }
}
