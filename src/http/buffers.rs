//! Reusable buffers for file bodies read into memory in one piece (ranges and small files up to
//! [`super::assets::SINGLE_READ_MAX`]; larger bodies are streamed through tokio's file).
//!
//! Why: profiling 100 concurrent 1 MiB range readers (BENCHMARKS.md, "HTTP") showed about a
//! fifth of pxed's CPU time going to fresh buffers rather than to the file: zeroing each new
//! `vec![0; n]`, and the kernel faulting in and clearing the pages the allocator had just
//! returned to it. A buffer that comes back from hyper after its bytes were written is kept
//! here and handed to the next read, already initialised, so a read is one `pread` into
//! memory that is already mapped.
//!
//! Buffers come in power-of-two classes from [`MIN_POOLED`] to [`MAX_POOLED`]; smaller reads
//! are not worth pooling and larger ones never happen (bodies above `SINGLE_READ_MAX` are
//! streamed in chunks). At most [`MAX_IDLE_BYTES`] wait here unused; the rest are freed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use bytes::Bytes;

/// Smallest pooled buffer: below this, zeroing a fresh one costs less than the pool's lock.
pub const MIN_POOLED: usize = 64 * 1024;
/// Largest pooled buffer: the largest body read in one piece (`SINGLE_READ_MAX`).
pub const MAX_POOLED: usize = 2 * 1024 * 1024;
/// Most bytes kept in idle buffers: enough for a burst of readers to find warm buffers, small
/// next to what the same readers hold while their bodies are written.
pub const MAX_IDLE_BYTES: usize = 32 * 1024 * 1024;

/// Number of size classes: 64 KiB, 128 KiB, ..., 2 MiB.
const CLASSES: usize = (MAX_POOLED / MIN_POOLED).trailing_zeros() as usize + 1;

struct Idle {
    by_class: [Vec<Box<[u8]>>; CLASSES],
    bytes: usize,
}

static IDLE: Mutex<Idle> = Mutex::new(Idle {
    by_class: [const { Vec::new() }; CLASSES],
    bytes: 0,
});

fn idle() -> std::sync::MutexGuard<'static, Idle> {
    match IDLE.lock() {
        Ok(g) => g,
        // A panic while holding the lock leaves the lists valid: keep using them.
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The class index and capacity for a read of `len` bytes, or `None` when not pooled.
fn class_of(len: usize) -> Option<(usize, usize)> {
    if !(MIN_POOLED..=MAX_POOLED).contains(&len) {
        return None;
    }
    let size = len.next_power_of_two();
    Some(((size / MIN_POOLED).trailing_zeros() as usize, size))
}

/// An initialised buffer of at least `len` bytes: an idle one when there is one.
fn take(len: usize) -> Box<[u8]> {
    let Some((class, size)) = class_of(len) else {
        return vec![0; len].into_boxed_slice();
    };
    let reused = {
        let mut idle = idle();
        let buf = idle.by_class.get_mut(class).and_then(Vec::pop);
        if let Some(b) = &buf {
            idle.bytes -= b.len();
        }
        buf
    };
    reused.unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Keep `buf` for the next read, unless it is not a pooled size or the pool is full.
fn give_back(buf: Box<[u8]>) {
    let Some((class, size)) = class_of(buf.len()) else {
        return;
    };
    if size != buf.len() {
        return;
    }
    let mut idle = idle();
    if idle.bytes + size > MAX_IDLE_BYTES {
        return;
    }
    if let Some(list) = idle.by_class.get_mut(class) {
        list.push(buf);
        idle.bytes += size;
    }
}

/// The first `len` bytes of a buffer, returned to the pool when hyper drops them.
struct Filled {
    buf: Box<[u8]>,
    len: usize,
}

impl AsRef<[u8]> for Filled {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl Drop for Filled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }
}

/// Read exactly `len` bytes at offset `start` of `file` (blocking: call on the blocking pool).
/// A file that is now shorter than that (truncated while being served) is an error, never a
/// short body under a promised `Content-Length`.
pub fn read_at(file: &File, start: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = take(len);
    let Some(dest) = buf.get_mut(..len) else {
        return Err(io::Error::other("read buffer smaller than asked"));
    };
    file.read_exact_at(dest, start).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends before byte {}: it shrank while being served",
                    start + len as u64
                ),
            )
        } else {
            e
        }
    })?;
    Ok(Bytes::from_owner(Filled { buf, len }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn classes() {
        assert_eq!(class_of(MIN_POOLED - 1), None);
        assert_eq!(class_of(MIN_POOLED), Some((0, MIN_POOLED)));
        assert_eq!(class_of(MIN_POOLED + 1), Some((1, 2 * MIN_POOLED)));
        assert_eq!(class_of(1024 * 1024), Some((4, 1024 * 1024)));
        assert_eq!(class_of(MAX_POOLED), Some((CLASSES - 1, MAX_POOLED)));
        assert_eq!(class_of(MAX_POOLED + 1), None);
    }

    #[test]
    fn reads_exact_ranges_through_reused_buffers_and_refuses_short_files() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 * MIN_POOLED as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        for (start, len) in [
            (0, 10),
            (5, MIN_POOLED),
            (7, 2 * MIN_POOLED + 3),
            (5, MIN_POOLED),
        ] {
            let got = read_at(&f, start as u64, len).unwrap();
            assert_eq!(&got[..], &data[start..start + len], "{start}+{len}");
            // Dropped here: the next read of the class reuses the buffer, old bytes and all;
            // only the asked length is ever visible.
        }
        let err = read_at(&f, data.len() as u64 - 5, MIN_POOLED).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("shrank"), "{err}");
    }
}
