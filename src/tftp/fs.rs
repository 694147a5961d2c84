//! Where TFTP files come from. [`FileSource`] is the seam for virtual per-client files;
//! [`RootSource`] serves one directory and never anything outside it; [`ReadCache`] keeps
//! small files in memory so a boot storm reads each file from disk once.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::wire::ErrorCode;

/// Longest file name accepted (Linux PATH_MAX is 4096; no boot file needs more than this).
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest single path component (Linux NAME_MAX).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// An opened file, ready to serve.
#[derive(Debug)]
pub enum TftpFile {
    /// A real file on disk, already opened (so later renames cannot swap it).
    Disk {
        /// The open file.
        file: File,
        /// Its size when opened.
        len: u64,
        /// Identity for the read cache.
        key: CacheKey,
    },
    /// Bytes generated in memory (iPXE scripts, pxelinux.cfg, grub.cfg).
    Memory(Bytes),
}

/// Identity of a file's contents: device, inode, size and modification time. A changed file
/// gets a new key, so the cache never serves stale bytes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl CacheKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        CacheKey {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        }
    }
}

/// Why a file cannot be served; each maps to a TFTP error code.
#[derive(Debug, thiserror::Error)]
pub enum TftpFileError {
    /// No such file (ERROR 1).
    #[error("file not found")]
    NotFound,
    /// The name is not allowed or leads outside the root (ERROR 2).
    #[error("access violation: {0}")]
    Denied(&'static str),
    /// Reading failed (ERROR 0).
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
}

impl TftpFileError {
    /// The TFTP error code sent to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            TftpFileError::NotFound => ErrorCode::FileNotFound,
            TftpFileError::Denied(_) => ErrorCode::AccessViolation,
            TftpFileError::Io(_) => ErrorCode::Undefined,
        }
    }
}

/// A source of files by requested name. `open` may block (it is called on a blocking thread).
/// The lead's policy layer wraps [`RootSource`] to add virtual per-client files.
pub trait FileSource: Send + Sync {
    /// Open `path` (as the client sent it) for `peer`.
    fn open(&self, peer: SocketAddr, path: &str) -> Result<TftpFile, TftpFileError>;
}

/// Files under one root directory. Per-profile roots are more `RootSource`s chosen by a wrapper.
#[derive(Clone, Debug)]
pub struct RootSource {
    root: PathBuf,
    case_insensitive: bool,
    fallback_dirs: Vec<Vec<String>>,
}

/// Split a requested name into safe components: backslashes are separators (Windows-style
/// requests from WDS/PXE ROMs), a leading `/` means the root, `.` and empty parts vanish, and
/// `..`, NUL and control characters are refused rather than normalised.
pub fn sanitize(requested: &str) -> Result<Vec<String>, TftpFileError> {
    if requested.len() > MAX_PATH_BYTES {
        return Err(TftpFileError::Denied("name too long"));
    }
    if requested.chars().any(|c| c.is_control()) {
        return Err(TftpFileError::Denied("control character in name"));
    }
    let mut parts = Vec::new();
    for part in requested.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(TftpFileError::Denied("`..` in name")),
            p if p.len() > MAX_COMPONENT_BYTES => {
                return Err(TftpFileError::Denied("name component too long"));
            }
            p => parts.push(p.to_string()),
        }
    }
    if parts.is_empty() {
        return Err(TftpFileError::Denied("no file name"));
    }
    Ok(parts)
}

impl RootSource {
    /// Serve `root`. Fallback directories are relative to the root (absolute ones are taken as
    /// inside the root too).
    pub fn new(root: &Path, case_insensitive: bool, fallback_dirs: &[PathBuf]) -> io::Result<Self> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("TFTP root {} is not a directory", root.display()),
            ));
        }
        let mut dirs = Vec::new();
        for dir in fallback_dirs {
            let text = dir.to_string_lossy();
            let parts = sanitize(&text).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("fallback dir {text}: {e}"),
                )
            })?;
            dirs.push(parts);
        }
        Ok(RootSource {
            root,
            case_insensitive,
            fallback_dirs: dirs,
        })
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn find(&self, parts: &[String]) -> Result<PathBuf, TftpFileError> {
        let mut path = self.root.clone();
        for part in parts {
            let exact = path.join(part);
            if exact.symlink_metadata().is_ok() || !self.case_insensitive {
                path = exact;
                continue;
            }
            // Case-insensitive fallback: the smallest matching name, so the choice is stable.
            let wanted = part.to_lowercase();
            let mut matches: Vec<_> = std::fs::read_dir(&path)
                .map_err(|_| TftpFileError::NotFound)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().to_lowercase() == wanted)
                .collect();
            matches.sort();
            let first = matches.into_iter().next().ok_or(TftpFileError::NotFound)?;
            path = path.join(first);
        }
        Ok(path)
    }

    fn open_parts(&self, parts: &[String]) -> Result<TftpFile, TftpFileError> {
        let path = self.find(parts)?;
        // Symlinks inside the root are fine (distro trees use them); the resolved path must
        // stay inside the root.
        let real = path.canonicalize().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => TftpFileError::NotFound,
            _ => TftpFileError::Denied("cannot resolve name"),
        })?;
        if !real.starts_with(&self.root) {
            return Err(TftpFileError::Denied("outside the root"));
        }
        // O_NOFOLLOW: the canonical path has no symlinks, so one appearing now is a swap.
        // O_NONBLOCK: opening a FIFO planted in the root must not hang the server.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&real)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TftpFileError::NotFound,
                _ => TftpFileError::Denied("cannot open"),
            })?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(TftpFileError::Denied("not a regular file"));
        }
        // The authoritative check, immune to directory swaps during resolution: where the
        // kernel says the open file lives.
        let fd_path = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| TftpFileError::Denied("cannot verify location"))?;
        if !fd_path.starts_with(&self.root) {
            return Err(TftpFileError::Denied("outside the root"));
        }
        Ok(TftpFile::Disk {
            len: meta.len(),
            key: CacheKey::of(&meta),
            file,
        })
    }

    /// Open a requested name, trying the fallback directories for names at the root.
    pub fn open_name(&self, requested: &str) -> Result<TftpFile, TftpFileError> {
        let parts = sanitize(requested)?;
        match self.open_parts(&parts) {
            Err(TftpFileError::NotFound) if parts.len() == 1 => {
                for dir in &self.fallback_dirs {
                    let mut alt = dir.clone();
                    alt.extend(parts.iter().cloned());
                    match self.open_parts(&alt) {
                        Err(TftpFileError::NotFound) => continue,
                        other => return other,
                    }
                }
                Err(TftpFileError::NotFound)
            }
            other => other,
        }
    }
}

impl FileSource for RootSource {
    fn open(&self, _peer: SocketAddr, path: &str) -> Result<TftpFile, TftpFileError> {
        self.open_name(path)
    }
}

/// File bytes a transfer reads from.
#[derive(Clone, Debug)]
pub enum Content {
    /// Whole file in memory (cached or generated).
    Memory(Bytes),
    /// A large file read per window.
    Disk(Arc<File>, u64),
}

impl Content {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Content::Memory(b) => b.len() as u64,
            Content::Disk(_, len) => *len,
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Read exactly `len` bytes at `offset`; a file that shrank is an error, not short data.
pub fn read_range(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

struct Entry {
    cell: Arc<tokio::sync::OnceCell<Bytes>>,
    len: u64,
    last_used: u64,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<CacheKey, Entry>,
    used: u64,
    tick: u64,
}

/// An LRU of whole small files, bounded in bytes. Concurrent requests for the same file share
/// one disk read.
pub struct ReadCache {
    inner: Mutex<CacheInner>,
    max_bytes: u64,
    file_max: u64,
}

impl ReadCache {
    /// A cache of at most `max_bytes`, holding files of at most `file_max` bytes.
    pub fn new(max_bytes: u64, file_max: u64) -> Self {
        ReadCache {
            inner: Mutex::default(),
            max_bytes,
            file_max: file_max.min(max_bytes),
        }
    }

    /// Bytes currently held (or being loaded).
    pub fn used(&self) -> u64 {
        self.inner.lock().map(|i| i.used).unwrap_or(0)
    }

    fn cell(&self, key: &CacheKey, len: u64) -> Option<Arc<tokio::sync::OnceCell<Bytes>>> {
        let mut inner = self.inner.lock().ok()?;
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(e) = inner.map.get_mut(key) {
            e.last_used = tick;
            return Some(e.cell.clone());
        }
        while inner.used + len > self.max_bytes {
            let oldest = inner
                .map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone())?;
            if let Some(e) = inner.map.remove(&oldest) {
                inner.used -= e.len;
            }
        }
        let cell = Arc::new(tokio::sync::OnceCell::new());
        inner.used += len;
        inner.map.insert(
            key.clone(),
            Entry {
                cell: cell.clone(),
                len,
                last_used: tick,
            },
        );
        Some(cell)
    }

    fn forget(&self, key: &CacheKey) {
        if let Ok(mut inner) = self.inner.lock()
            && let Some(e) = inner.map.remove(key)
        {
            inner.used -= e.len;
        }
    }

    /// Turn an opened file into content: small files through the cache, large ones by window.
    pub async fn load(&self, file: TftpFile) -> io::Result<Content> {
        let (file, len, key) = match file {
            TftpFile::Memory(b) => return Ok(Content::Memory(b)),
            TftpFile::Disk { file, len, key } => (file, len, key),
        };
        let file = Arc::new(file);
        if len > self.file_max {
            return Ok(Content::Disk(file, len));
        }
        let Some(cell) = self.cell(&key, len) else {
            return Ok(Content::Disk(file, len));
        };
        let reader = file.clone();
        let loaded = cell
            .get_or_try_init(|| async move {
                let size = usize::try_from(len).map_err(io::Error::other)?;
                tokio::task::spawn_blocking(move || read_range(&reader, 0, size))
                    .await
                    .map_err(io::Error::other)?
                    .map(Bytes::from)
            })
            .await;
        match loaded {
            Ok(bytes) => Ok(Content::Memory(bytes.clone())),
            Err(err) => {
                self.forget(&key);
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_maps_and_refuses() {
        assert_eq!(sanitize("/a//b/./c").unwrap(), vec!["a", "b", "c"]);
        assert_eq!(sanitize("\\boot\\x.efi").unwrap(), vec!["boot", "x.efi"]);
        for bad in [
            "../x",
            "a/../../x",
            "..\\x",
            "a\0b",
            "",
            "/",
            "a\nb",
            &"a".repeat(300),
        ] {
            assert!(sanitize(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn root_source_confines() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("sub/Grubx64.efi"), b"grub").unwrap();
        std::fs::write(root.path().join("a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("leak"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("dirleak")).unwrap();
        std::os::unix::fs::symlink("a.txt", root.path().join("inside")).unwrap();
        let src = RootSource::new(root.path(), false, &[PathBuf::from("sub")]).unwrap();
        assert!(matches!(
            src.open_name("/a.txt"),
            Ok(TftpFile::Disk { len: 1, .. })
        ));
        assert!(matches!(
            src.open_name("inside"),
            Ok(TftpFile::Disk { len: 1, .. })
        ));
        assert!(matches!(
            src.open_name("leak"),
            Err(TftpFileError::Denied(_))
        ));
        assert!(matches!(
            src.open_name("dirleak/secret"),
            Err(TftpFileError::Denied(_))
        ));
        assert!(matches!(
            src.open_name("sub"),
            Err(TftpFileError::Denied(_))
        ));
        assert!(matches!(
            src.open_name("nope"),
            Err(TftpFileError::NotFound)
        ));
        // Case-sensitive: the fallback dir has Grubx64.efi, not grubx64.efi.
        assert!(matches!(
            src.open_name("grubx64.efi"),
            Err(TftpFileError::NotFound)
        ));
        assert!(matches!(
            src.open_name("Grubx64.efi"),
            Ok(TftpFile::Disk { len: 4, .. })
        ));
        let ci = RootSource::new(root.path(), true, &[PathBuf::from("sub")]).unwrap();
        assert!(matches!(
            ci.open_name("GRUBX64.EFI"),
            Ok(TftpFile::Disk { len: 4, .. })
        ));
        assert!(matches!(
            ci.open_name("SUB/grubx64.efi"),
            Ok(TftpFile::Disk { len: 4, .. })
        ));
        assert!(matches!(
            ci.open_name("A.TXT"),
            Ok(TftpFile::Disk { len: 1, .. })
        ));
    }

    #[tokio::test]
    async fn cache_shares_and_bounds() {
        let root = tempfile::tempdir().unwrap();
        for (name, size) in [("a", 400usize), ("b", 400), ("c", 400), ("big", 2000)] {
            std::fs::write(root.path().join(name), vec![7u8; size]).unwrap();
        }
        let src = RootSource::new(root.path(), false, &[]).unwrap();
        let cache = ReadCache::new(1000, 500);
        for name in ["a", "b", "a", "c"] {
            let c = cache.load(src.open_name(name).unwrap()).await.unwrap();
            assert!(matches!(c, Content::Memory(ref b) if b.len() == 400));
            assert!(cache.used() <= 1000);
        }
        assert_eq!(cache.used(), 800);
        let big = cache.load(src.open_name("big").unwrap()).await.unwrap();
        assert!(matches!(big, Content::Disk(_, 2000)));
    }
}
