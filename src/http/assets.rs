//! Boot assets: GET and HEAD of files under the boot root, streamed, with byte ranges and
//! conditional requests (RFC 9110 sections 13 and 14).
//!
//! Path safety: the raw request path is percent-decoded once by us; a decoded path with NUL, a
//! backslash or a `..` segment is refused outright. The rest is joined to the root and
//! canonicalised (resolving symlinks); the result must still be inside the canonical root. The
//! final open uses `O_NOFOLLOW` (the canonical path has no symlink left, so one appearing now is
//! a race) and `O_NONBLOCK` (a FIFO planted in the root cannot hang the request), and only
//! regular files are served: never a directory listing.
//!
//! Events: a GET that serves bytes emits `http.kernel`, `http.initrd` or `http.asset`, chosen by
//! the `kind` query the script renderer puts in the URLs it writes (see [`super::ipxe`]). The MAC
//! comes from the `mac` query, else from the lead's client-IP lookup; with neither the request is
//! only logged, because events are keyed on MACs.

use std::ffi::OsStr;
use std::io::SeekFrom;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

/// Read size per chunk of a streamed file. Each read is a trip to tokio's blocking pool, so
/// bigger chunks mean fewer trips (64 KiB measured below nginx on 100 concurrent range
/// readers, BENCHMARKS.md); at the default cap of 1024 connections the buffers stay <= 256 MiB.
pub const STREAM_CHUNK: usize = 256 * 1024;
/// Bodies up to this size are read with one positioned read on the blocking pool and sent as
/// one buffer: a range reader (iPXE `sanboot`, many clients fetching image pieces) then costs one
/// trip to the pool (resolve, open, check and read together) instead of one per step. Bounded
/// so that 100 concurrent readers hold at most 100 x 2 MiB; the largest pooled buffer.
pub const SINGLE_READ_MAX: u64 = super::buffers::MAX_POOLED as u64;

/// Longest request path we try to resolve; PATH_MAX on Linux.
const MAX_PATH_BYTES: usize = 4096;

/// Why a path is not served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Malformed: bad percent-encoding, NUL, backslash, `..`, too long.
    #[error("refused path: {0}")]
    Refused(&'static str),
    /// Nothing servable there (missing, a directory, outside the root, not a regular file).
    #[error("not found")]
    NotFound,
}

impl PathError {
    /// The HTTP status for the error.
    pub fn status(&self) -> StatusCode {
        match self {
            PathError::Refused(_) => StatusCode::BAD_REQUEST,
            PathError::NotFound => StatusCode::NOT_FOUND,
        }
    }
}

/// The MIME type for a boot file. EDK2 HTTP Boot checks it: `application/efi` for programs,
/// `application/vnd.efi-iso` and `application/vnd.efi-img` for RAM disk images.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(OsStr::to_str)
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("efi") => "application/efi",
        Some("iso") => "application/vnd.efi-iso",
        Some("img") => "application/vnd.efi-img",
        Some("ipxe") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Decode a raw URI path into the relative path segments it names, refusing anything that could
/// leave the root. Pure; the file system is checked by [`open_in_root`].
pub fn decode_path(raw: &str) -> Result<PathBuf, PathError> {
    let bytes: Vec<u8> = percent_decode_strict(raw.as_bytes())?;
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathError::Refused("too long"));
    }
    if bytes.contains(&0) {
        return Err(PathError::Refused("NUL byte"));
    }
    if bytes.contains(&b'\\') {
        return Err(PathError::Refused("backslash"));
    }
    let mut rel = PathBuf::new();
    for seg in bytes.split(|b| *b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => return Err(PathError::Refused("`..` segment")),
            _ => rel.push(OsStr::from_bytes(seg)),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(PathError::NotFound);
    }
    Ok(rel)
}

/// Percent-decoding that rejects a `%` not followed by two hex digits (lenient decoders pass it
/// through, which makes `%%2e` style tricks ambiguous).
fn percent_decode_strict(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut it = raw.iter();
    while let Some(&b) = it.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hi = it.next().and_then(|c| (*c as char).to_digit(16));
        let lo = it.next().and_then(|c| (*c as char).to_digit(16));
        match (hi, lo) {
            (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
            _ => return Err(PathError::Refused("bad percent-encoding")),
        }
    }
    Ok(out)
}

/// A file under the boot root, opened and checked: a regular file inside the root.
#[derive(Debug)]
pub struct OpenFile {
    /// The open file.
    pub file: std::fs::File,
    /// Its metadata, taken from the open descriptor (what is served is what was checked).
    pub meta: std::fs::Metadata,
    /// The canonical path (no symlinks left).
    pub path: PathBuf,
}

/// Open a file under `root`, refusing anything that resolves outside it. Blocking (a few
/// `lstat`s, an `open`, an `fstat`): call it on the blocking pool, as [`serve_file`] does,
/// together with the rest of the request's file work.
///
/// The root is resolved on every call rather than once at start: a root that is a symlink
/// (switched to a new tree by `ln -sfn`) is followed at once, and it costs a few `lstat`s in a
/// trip to the pool the request makes anyway.
pub fn open_in_root(root: &Path, rel: &Path) -> Result<OpenFile, PathError> {
    let root = std::fs::canonicalize(root).map_err(|_| PathError::NotFound)?;
    let full = std::fs::canonicalize(root.join(rel)).map_err(|_| PathError::NotFound)?;
    if !full.starts_with(&root) {
        tracing::warn!(path = %rel.display(), "refused a path that resolves outside the boot root");
        return Err(PathError::NotFound);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&full)
        .map_err(|_| PathError::NotFound)?;
    let meta = file.metadata().map_err(|_| PathError::NotFound)?;
    if !meta.is_file() {
        return Err(PathError::NotFound);
    }
    Ok(OpenFile {
        file,
        meta,
        path: full,
    })
}

/// A strong validator from size, modification time and inode: any rewrite or replacement of the
/// file changes it.
pub fn etag(meta: &std::fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}.{:x}-{:x}\"",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    )
}

/// The modification time rounded down to whole seconds, as HTTP dates carry.
pub fn last_modified(meta: &std::fs::Metadata) -> SystemTime {
    let secs = u64::try_from(meta.mtime()).unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// What a `Range` header asks of a representation of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// Send everything (no header, a unit other than bytes, bad syntax, or several ranges).
    Full,
    /// Send bytes `start..=end`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: u64,
    },
    /// No byte of the range exists: 416.
    Unsatisfiable,
}

/// Parse a `Range` value (RFC 9110 section 14.1.2). A server may ignore a Range header
/// (section 14.2), and we do for anything but one well-formed byte range: multipart responses
/// are not worth their complexity for boot clients, which ask for one range at a time.
pub fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if first.is_empty() {
        // suffix-range: the last N bytes.
        if !digits(last) {
            return RangeRequest::Full;
        }
        let Ok(n) = last.parse::<u64>() else {
            // More digits than u64: larger than any file, so the whole file.
            return if len == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start: 0,
                    end: len - 1,
                }
            };
        };
        if n == 0 || len == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Partial {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    if !digits(first) || !(last.is_empty() || digits(last)) {
        return RangeRequest::Full;
    }
    let Ok(start) = first.parse::<u64>() else {
        return RangeRequest::Unsatisfiable;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        last.parse::<u64>().unwrap_or(u64::MAX)
    };
    if end < start {
        // Section 14.1.1: last-pos < first-pos is invalid, so the header is ignored.
        return RangeRequest::Full;
    }
    if start >= len {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Partial {
        start,
        end: end.min(len - 1),
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Does an `If-None-Match` / `If-Match` list contain our tag? `weak` allows `W/` tags (weak
/// comparison, RFC 9110 section 8.8.3.2, used by If-None-Match).
fn etag_list_matches(list: &str, ours: &str, weak: bool) -> bool {
    list.split(',').map(str::trim).any(|t| {
        if t == "*" {
            return true;
        }
        match t.strip_prefix("W/") {
            Some(w) => weak && w == ours,
            None => t == ours,
        }
    })
}

/// The outcome of the preconditions of RFC 9110 section 13.2.2, evaluated in its order.
#[derive(Debug, PartialEq, Eq)]
pub enum Precondition {
    /// Go on (with the Range header honoured or not).
    Proceed {
        /// Whether `If-Range` allows the range.
        range_allowed: bool,
    },
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluate the conditional headers against our validators.
pub fn preconditions(headers: &HeaderMap, tag: &str, modified: SystemTime) -> Precondition {
    let date = |name| header_str(headers, name).and_then(|v| httpdate::parse_http_date(v).ok());
    // Step 1-2: If-Match, else If-Unmodified-Since.
    if let Some(im) = header_str(headers, header::IF_MATCH) {
        if !etag_list_matches(im, tag, false) {
            return Precondition::Failed;
        }
    } else if let Some(ius) = date(header::IF_UNMODIFIED_SINCE)
        && modified > ius
    {
        return Precondition::Failed;
    }
    // Step 3-4: If-None-Match, else If-Modified-Since (GET and HEAD only; we serve nothing else).
    if let Some(inm) = header_str(headers, header::IF_NONE_MATCH) {
        if etag_list_matches(inm, tag, true) {
            return Precondition::NotModified;
        }
    } else if let Some(ims) = date(header::IF_MODIFIED_SINCE)
        && modified <= ims
    {
        return Precondition::NotModified;
    }
    // Step 5: If-Range, a strong tag or the exact date.
    let range_allowed = match header_str(headers, header::IF_RANGE) {
        None => true,
        Some(v) if v.starts_with('"') => v == tag,
        Some(v) => httpdate::parse_http_date(v).is_ok_and(|d| d == modified),
    };
    Precondition::Proceed { range_allowed }
}

/// What was served, for events and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Status sent.
    pub status: StatusCode,
    /// Body bytes that will be sent (0 for HEAD and 304).
    pub body_len: u64,
    /// Human-readable detail: path and range.
    pub detail: String,
}

/// What to answer to a request for a file, decided from the request headers and the file's
/// metadata alone. Pure.
#[derive(Debug)]
pub struct Decision {
    /// Status and headers of the response.
    pub status: StatusCode,
    /// Headers (validators, `Content-Range`, `Content-Type`, `Content-Length`).
    pub headers: HeaderMap,
    /// The bytes to send, `(first, count)`; `None` for HEAD, 304, 412 and 416.
    pub body: Option<(u64, u64)>,
    /// For events and logs: path and range, or why nothing is sent.
    pub detail: String,
}

/// Decide the answer to `method` with `headers` for a file with `meta` (RFC 9110 sections 13
/// and 14): validators, preconditions, range, length.
pub fn decide(
    method: &Method,
    headers: &HeaderMap,
    meta: &std::fs::Metadata,
    path: &Path,
    shown: &str,
) -> Decision {
    let len = meta.len();
    let tag = etag(meta);
    let modified = last_modified(meta);
    let mut common = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&tag) {
        common.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(modified)) {
        common.insert(header::LAST_MODIFIED, v);
    }
    common.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let nothing = |status, headers, why: &str| Decision {
        status,
        headers,
        body: None,
        detail: format!("{shown} {why}"),
    };

    let range_allowed = match preconditions(headers, &tag, modified) {
        Precondition::NotModified => {
            return nothing(StatusCode::NOT_MODIFIED, common, "not modified");
        }
        Precondition::Failed => {
            return nothing(
                StatusCode::PRECONDITION_FAILED,
                common,
                "precondition failed",
            );
        }
        Precondition::Proceed { range_allowed } => range_allowed,
    };

    let range = match header_str(headers, header::RANGE) {
        Some(r) if range_allowed => parse_range(r, len),
        _ => RangeRequest::Full,
    };
    let (status, start, count) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, len),
        RangeRequest::Partial { start, end } => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                common.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            // RFC 9110 section 15.5.17: say how long the representation is.
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                common.insert(header::CONTENT_RANGE, v);
            }
            return nothing(
                StatusCode::RANGE_NOT_SATISFIABLE,
                common,
                "range not satisfiable",
            );
        }
    };
    common.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    common.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    let detail = if status == StatusCode::PARTIAL_CONTENT {
        format!("{shown} bytes {start}-{}/{len}", start + count - 1)
    } else {
        format!("{shown} ({len} bytes)")
    };
    Decision {
        status,
        headers: common,
        body: (method != Method::HEAD).then_some((start, count)),
        detail,
    }
}

impl Decision {
    /// What this decision serves, for events and metrics.
    pub fn served(&self) -> Served {
        Served {
            status: self.status,
            body_len: self.body.map_or(0, |(_, count)| count),
            detail: self.detail.clone(),
        }
    }
}

/// Resolve `rel` under `root`, open and check it, and decide the answer: the blocking start of
/// every asset request, whichever path then sends the body.
pub fn open_and_decide(
    root: &Path,
    rel: &Path,
    method: &Method,
    headers: &HeaderMap,
    shown: &str,
) -> Result<(OpenFile, Decision), PathError> {
    let opened = open_in_root(root, rel)?;
    let decision = decide(method, headers, &opened.meta, &opened.path, shown);
    Ok((opened, decision))
}

/// The part of a request done on the blocking pool, in one trip.
enum Prepared {
    /// Nothing to read (HEAD, 304, 412, 416), or a body read whole.
    Done(Decision, Option<Bytes>),
    /// A body to stream from the open file.
    Stream(Decision, std::fs::File, u64, u64),
    /// The single read failed after the headers were decided: path, error.
    ReadFailed(PathBuf, String),
}

/// Serve `rel` under `root`: resolving, opening, checking, deciding and (for bodies up to
/// [`SINGLE_READ_MAX`]) reading happen in one trip to the blocking pool; larger bodies are
/// streamed in [`STREAM_CHUNK`] reads. Never reads a large file whole.
/// `Err` when the path is not served; `on_chunk` is called with every body chunk's length.
pub async fn serve_file(
    root: PathBuf,
    rel: PathBuf,
    method: Method,
    headers: HeaderMap,
    shown: String,
    on_chunk: impl Fn(usize) + Send + Sync + 'static,
) -> Result<(Response, Served), PathError> {
    let shown_here = shown.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let (opened, decision) = open_and_decide(&root, &rel, &method, &headers, &shown)?;
        Ok(match decision.body {
            None => Prepared::Done(decision, None),
            Some((start, count)) if count <= SINGLE_READ_MAX => {
                match read_range(&opened.file, start, count) {
                    Ok(bytes) => Prepared::Done(decision, Some(bytes)),
                    Err(e) => Prepared::ReadFailed(opened.path, e.to_string()),
                }
            }
            Some((start, count)) => Prepared::Stream(decision, opened.file, start, count),
        })
    })
    .await;
    let prepared = match prepared {
        Ok(p) => p?,
        Err(e) => {
            // The task panicked or the runtime is shutting down: not the client's fault.
            tracing::error!("file task failed: {e}");
            return Ok(read_failed(
                Path::new(&shown_here),
                &shown_here,
                &e.to_string(),
            ));
        }
    };
    let (decision, body) = match prepared {
        Prepared::ReadFailed(path, err) => return Ok(read_failed(&path, &shown_here, &err)),
        Prepared::Done(decision, bytes) => {
            let body = match bytes {
                Some(b) => {
                    on_chunk(b.len());
                    Body::from(b)
                }
                None => Body::empty(),
            };
            (decision, body)
        }
        Prepared::Stream(decision, file, start, count) => {
            let mut file = tokio::fs::File::from_std(file);
            if start > 0
                && let Err(e) = file.seek(SeekFrom::Start(start)).await
            {
                return Ok(read_failed(
                    Path::new(&shown_here),
                    &shown_here,
                    &e.to_string(),
                ));
            }
            // tokio's file reads into one buffer it keeps, which measured cheaper per GiB for
            // one stream than a buffer per chunk. A file that ends early ends the stream with
            // an error, never a short body under a promised Content-Length.
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counted = sent.clone();
            let chunks = ReaderStream::with_capacity(file.take(count), STREAM_CHUNK)
                .map(move |chunk| {
                    if let Ok(c) = &chunk {
                        on_chunk(c.len());
                        counted.fetch_add(c.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    chunk
                })
                .chain(futures_util::stream::once(async move {
                    let got = sent.load(std::sync::atomic::Ordering::Relaxed);
                    if got < count {
                        Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("the file shrank while being served: {got} of {count} bytes"),
                        ))
                    } else {
                        Ok(Bytes::new())
                    }
                }))
                .filter(|c| std::future::ready(!matches!(c, Ok(b) if b.is_empty())));
            (decision, Body::from_stream(chunks))
        }
    };
    let served = decision.served();
    let mut resp = Response::new(body);
    *resp.status_mut() = decision.status;
    *resp.headers_mut() = decision.headers;
    Ok((resp, served))
}

/// Read `count` bytes at `start` (blocking) into a pooled buffer ([`super::buffers`]).
fn read_range(file: &std::fs::File, start: u64, count: u64) -> std::io::Result<Bytes> {
    let len = usize::try_from(count).map_err(std::io::Error::other)?;
    super::buffers::read_at(file, start, len)
}

/// A read that failed after the headers were decided (the file shrank or the disk failed).
fn read_failed(path: &Path, shown: &str, err: &str) -> (Response, Served) {
    tracing::warn!(%err, path = %path.display(), "cannot read");
    let served = Served {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body_len: 0,
        detail: format!("{shown} read failed: {err}"),
    };
    (StatusCode::INTERNAL_SERVER_ERROR.into_response(), served)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-9", 100), Partial { start: 0, end: 9 });
        assert_eq!(
            parse_range("bytes=90-", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=90-1000", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=-10", 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=-1000", 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 100), Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(parse_range("bytes=a-b", 100), Full);
        assert_eq!(parse_range("bytes=-", 100), Full);
        assert_eq!(parse_range("bytes=+1-2", 100), Full);
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=99999999999999999999999-", 100),
            Unsatisfiable
        );
    }

    #[test]
    fn decoding_refuses_escapes() {
        for bad in [
            "/../x",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/a/%2e%2e%2fb",
            "/..%2fx",
            "/a\\..\\x",
            "/a%5c..%5cx",
            "/x%00.efi",
            "/%zz",
            "/%2",
        ] {
            assert!(decode_path(bad).is_err(), "{bad}");
        }
        assert_eq!(decode_path("/a/./b%20c").unwrap(), PathBuf::from("a/b c"));
        assert_eq!(decode_path("//a//b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(decode_path("/"), Err(PathError::NotFound));
        // Double encoding decodes once: a file literally named `%2e%2e`, not a parent.
        assert_eq!(decode_path("/%252e%252e").unwrap(), PathBuf::from("%2e%2e"));
    }

    /// A file truncated while it is being sent ends the body with an error (hyper then drops
    /// the connection: the client sees fewer bytes than `Content-Length`); no panic.
    #[tokio::test]
    async fn truncated_while_served_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.img");
        let len = 3 * SINGLE_READ_MAX as usize;
        std::fs::write(&path, vec![7u8; len]).unwrap();
        let serve = |headers: HeaderMap| {
            serve_file(
                dir.path().to_path_buf(),
                PathBuf::from("big.img"),
                Method::GET,
                headers,
                "/big.img".into(),
                |_| {},
            )
        };
        let (resp, served) = serve(HeaderMap::new()).await.unwrap();
        assert_eq!(served.status, StatusCode::OK);
        assert_eq!(served.body_len, len as u64);
        // Nothing was read yet: the stream reads when polled.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(SINGLE_READ_MAX)
            .unwrap();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await;
        assert!(body.is_err(), "a short body must not end cleanly");

        let mut range = HeaderMap::new();
        range.insert(header::RANGE, HeaderValue::from_static("bytes=0-1023"));
        let (_, served) = serve(range.clone()).await.unwrap();
        assert_eq!(served.status, StatusCode::PARTIAL_CONTENT);
        // Shrunk before the request: decided on the new length, never a short 206. (A file
        // that shrinks between the decision and the single read is `buffers::read_at`'s
        // error, tested there.)
        std::fs::write(&path, b"").unwrap();
        let (_, served) = serve(range).await.unwrap();
        assert_eq!(served.status, StatusCode::RANGE_NOT_SATISFIABLE);
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type(Path::new("a/SNPONLY.EFI")), "application/efi");
        assert_eq!(content_type(Path::new("a.iso")), "application/vnd.efi-iso");
        assert_eq!(content_type(Path::new("a.img")), "application/vnd.efi-img");
        assert_eq!(
            content_type(Path::new("vmlinuz")),
            "application/octet-stream"
        );
    }

    #[test]
    fn precondition_order() {
        let tag = "\"1-2.3-4\"";
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |pairs: &[(header::HeaderName, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(k.clone(), HeaderValue::from_str(v).unwrap());
            }
            m
        };
        let date = httpdate::fmt_http_date(t);
        let earlier = httpdate::fmt_http_date(t - Duration::from_secs(1));
        assert_eq!(
            preconditions(&h(&[(header::IF_NONE_MATCH, tag)]), tag, t),
            Precondition::NotModified
        );
        assert_eq!(
            preconditions(
                &h(&[(header::IF_NONE_MATCH, &format!("\"x\", W/{tag}"))]),
                tag,
                t
            ),
            Precondition::NotModified
        );
        // If-None-Match wins over If-Modified-Since.
        assert_eq!(
            preconditions(
                &h(&[
                    (header::IF_NONE_MATCH, "\"other\""),
                    (header::IF_MODIFIED_SINCE, &date)
                ]),
                tag,
                t
            ),
            Precondition::Proceed {
                range_allowed: true
            }
        );
        assert_eq!(
            preconditions(&h(&[(header::IF_MODIFIED_SINCE, &date)]), tag, t),
            Precondition::NotModified
        );
        assert_eq!(
            preconditions(&h(&[(header::IF_MODIFIED_SINCE, &earlier)]), tag, t),
            Precondition::Proceed {
                range_allowed: true
            }
        );
        assert_eq!(
            preconditions(&h(&[(header::IF_MATCH, "\"other\"")]), tag, t),
            Precondition::Failed
        );
        assert_eq!(
            preconditions(&h(&[(header::IF_UNMODIFIED_SINCE, &earlier)]), tag, t),
            Precondition::Failed
        );
        assert_eq!(
            preconditions(&h(&[(header::IF_RANGE, "\"other\"")]), tag, t),
            Precondition::Proceed {
                range_allowed: false
            }
        );
        assert_eq!(
            preconditions(&h(&[(header::IF_RANGE, &date)]), tag, t),
            Precondition::Proceed {
                range_allowed: true
            }
        );
    }
}
