//! Boot assets over plain HTTP/1.1 with `sendfile(2)`, in front of hyper.
//!
//! Why: hyper writes bodies from user-space buffers, so pxed copied every byte of a kernel or an
//! image twice (page cache to a buffer, the buffer to the socket), where nginx sends straight
//! from the page cache. On a busy machine that made pxed spend 4-6x nginx's CPU per GiB
//! (BENCHMARKS.md "HTTP"), and boot assets are most of the bytes a boot server sends.
//!
//! How: every plain-HTTP connection starts here ([`AssetListener`]). The request head is read
//! and parsed (`httparse`). A GET or HEAD of a path that only the router's asset fallback
//! serves, without a body or an upgrade, is answered here with the same decision as that
//! handler ([`assets::open_and_decide`]: path safety, validators, preconditions, one range), the
//! same events and the same metrics, and its body leaves with `sendfile`. Anything else (the
//! API, scripts, templates, the dashboard, a request hyper should judge) hands the connection,
//! with every byte read so far, to hyper and the router, which serve it from then on.
//! Keep-alive connections that only fetch assets stay here.
//!
//! `sendfile` never faults on a file that shrinks while it is served (where `mmap` would raise
//! SIGBUS): it returns 0 at the new end, and the connection is closed short of its promised
//! Content-Length, as the hyper path does.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::extract::connect_info::Connected;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::assets::{self, PathError};
use super::limits::{ClientAddr, Limited, LimitedListener};
use super::server::{self, HttpState, RequestLabels};

/// Longest request head read here; a longer one goes to hyper, with its own limit (~400 KiB).
const MAX_HEAD_BYTES: usize = 16 << 10;
/// Most header fields parsed here; a request with more goes to hyper.
const MAX_HEADERS: usize = 64;
/// How long a client may take to send a request head, the first one or the next on a
/// keep-alive connection, before the connection is closed.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes per `sendfile` call: bounds how long one call can hold a runtime worker when the
/// file is not in the page cache yet (the range was also announced with `POSIX_FADV_WILLNEED`).
const SENDFILE_CHUNK: usize = 4 << 20;
/// Most bytes announced to the kernel ahead of a send (`POSIX_FADV_WILLNEED`): enough for the
/// first calls; the kernel's own readahead follows a sequential send, and a client that stops
/// after a few MiB of a 4 GiB ISO must not make the disk read all of it.
const WILL_NEED_MAX: u64 = 2 * SENDFILE_CHUNK as u64;
/// Connections waiting for hyper to take them.
const HANDOVER_QUEUE: usize = 64;
/// Read size while collecting a request head.
const READ_BYTES: usize = 4096;

/// A parsed request head.
#[derive(Debug, PartialEq)]
pub(crate) enum Head {
    /// Not complete yet: read more.
    Partial,
    /// Not for this path: hyper serves it.
    Pass,
    /// A request for a boot asset (boxed: a header map is large, the other variants empty).
    Asset(Box<AssetRequest>),
}

/// A GET or HEAD of a boot asset, as parsed from its head.
#[derive(Debug, PartialEq)]
pub(crate) struct AssetRequest {
    /// GET or HEAD.
    pub method: Method,
    /// The raw (percent-encoded) path.
    pub path: String,
    /// `mac` and `kind` from the query, the only parameters the asset route reads.
    pub query: HashMap<String, String>,
    /// The header fields.
    pub headers: HeaderMap,
    /// Close after the response (`Connection: close`, or HTTP/1.0).
    pub close: bool,
    /// Length of the head in bytes.
    pub len: usize,
}

/// Parse the request head at the start of `buf`. Pure.
///
/// Anything this path does not serve itself is `Pass`: another method, a path the router
/// routes elsewhere ([`server::routed_elsewhere`]), a body, `Expect`, `Upgrade`, a target that
/// is not origin-form, bad syntax, too many fields or too long a head (hyper answers those).
pub(crate) fn parse_head(buf: &[u8]) -> Head {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Head::Partial,
        Ok(httparse::Status::Partial) | Err(_) => return Head::Pass,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Head::Pass,
    };
    let Some(target) = req.path.filter(|t| t.starts_with('/')) else {
        return Head::Pass;
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if server::routed_elsewhere(path) {
        return Head::Pass;
    }
    // RFC 9112 section 9.3: HTTP/1.1 persists unless told otherwise; 1.0 is closed here.
    let mut close = req.version != Some(1);
    let mut headers = HeaderMap::new();
    for field in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Head::Pass;
        };
        let Ok(value) = HeaderValue::from_bytes(field.value) else {
            return Head::Pass;
        };
        if name == header::CONTENT_LENGTH && value.as_bytes() != b"0"
            || name == header::TRANSFER_ENCODING
            || name == header::EXPECT
            || name == header::UPGRADE
        {
            return Head::Pass;
        }
        if name == header::CONNECTION
            && value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
        headers.append(name, value);
    }
    // Decoded as the router's `Query` extractor does (a later duplicate wins there too); a
    // query it would refuse goes to it.
    let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(query) else {
        return Head::Pass;
    };
    let query = pairs
        .into_iter()
        .filter(|(k, _)| k == "mac" || k == "kind")
        .collect();
    Head::Asset(Box::new(AssetRequest {
        method,
        path: path.to_string(),
        query,
        headers,
        close,
        len,
    }))
}

/// The status line and header fields of a response. Pure. `headers` come from the asset
/// decision; `Content-Length: 0` is added where a response without one has no body (never on
/// 304, RFC 9110 section 8.6), `Date` from `now`, `Connection: close` when closing.
fn response_head(status: StatusCode, headers: &HeaderMap, close: bool, now: SystemTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut field = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in headers {
        field(name.as_str(), value.as_bytes());
    }
    if !headers.contains_key(header::CONTENT_LENGTH) && status != StatusCode::NOT_MODIFIED {
        field("content-length", b"0");
    }
    field("date", httpdate::fmt_http_date(now).as_bytes());
    if close {
        field("connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A plain-text response (an error): head, and the body unless the request was a HEAD (RFC
/// 9110 section 9.3.2: the same header fields, no content).
fn text_response(method: &Method, status: StatusCode, body: &str, close: bool) -> Vec<u8> {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    let mut out = response_head(status, &headers, close, SystemTime::now());
    if method != Method::HEAD {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A connection on its way to hyper: the bytes already read from it come first.
pub struct Handover {
    read: Vec<u8>,
    at: usize,
    stream: Limited<TcpStream>,
    client: ClientAddr,
}

impl AsyncRead for Handover {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.read.get(this.at..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Handover {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The plain-HTTP listener of [`server::serve`]: accepts (within the connection caps of
/// [`LimitedListener`]), serves asset requests itself, and yields the other connections to
/// hyper.
pub struct AssetListener {
    handed: mpsc::Receiver<(Handover, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl AssetListener {
    /// Start accepting on `inner` with `state` (whose shutdown signal stops the acceptor and
    /// ends idle connections).
    pub fn new(inner: LimitedListener, state: Arc<HttpState>) -> io::Result<AssetListener> {
        let local = Listener::local_addr(&inner)?;
        let (tx, handed) = mpsc::channel(HANDOVER_QUEUE);
        let acceptor = tokio::spawn(accept_loop(inner, state, tx));
        Ok(AssetListener {
            handed,
            local,
            acceptor,
        })
    }
}

impl Drop for AssetListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Listener for AssetListener {
    type Io = Handover;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handed.recv().await {
            Some(conn) => conn,
            // The acceptor stopped (shutdown): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, AssetListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, AssetListener>) -> Self {
        // The same memo as the requests served before the handover: one MAC lookup per
        // connection.
        stream.io().client.clone()
    }
}

async fn accept_loop(
    mut inner: LimitedListener,
    state: Arc<HttpState>,
    tx: mpsc::Sender<(Handover, SocketAddr)>,
) {
    let mut shutdown = state.shutdown.clone();
    loop {
        let (stream, addr) = tokio::select! {
            conn = Listener::accept(&mut inner) => conn,
            _ = shutdown.wait_for(|down| *down) => return,
        };
        tokio::spawn(connection(
            state.clone(),
            stream,
            ClientAddr::new(addr),
            tx.clone(),
        ));
    }
}

/// One connection: asset requests until the client closes, asks to, or sends something else
/// (then hyper takes over).
async fn connection(
    state: Arc<HttpState>,
    mut stream: Limited<TcpStream>,
    client: ClientAddr,
    tx: mpsc::Sender<(Handover, SocketAddr)>,
) {
    let mut shutdown = state.shutdown.clone();
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BYTES);
    loop {
        // One deadline for the whole head: a client trickling bytes gets no more time.
        let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
        let head = loop {
            match parse_head(&buf) {
                Head::Partial => {}
                head => break head,
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, read_more(&mut stream, &mut buf)) => r,
                _ = shutdown.wait_for(|down| *down) => return,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        };
        let req = match head {
            Head::Asset(req) => req,
            _ => {
                let addr = client.0;
                let conn = Handover {
                    read: buf,
                    at: 0,
                    stream,
                    client,
                };
                tokio::select! {
                    _ = tx.send((conn, addr)) => {}
                    _ = shutdown.wait_for(|down| *down) => {}
                }
                return;
            }
        };
        buf.drain(..req.len.min(buf.len()));
        let close = req.close;
        match serve_asset(&state, &mut stream, &client, *req).await {
            Ok(()) if !close && !*shutdown.borrow() => {}
            Ok(()) => {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
                return;
            }
            Err(err) => {
                tracing::debug!(client = %client.0, %err, "asset connection ended");
                return;
            }
        }
    }
}

async fn read_more(stream: &mut Limited<TcpStream>, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; READ_BYTES];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(n)
}

/// Answer one asset request: what the router's asset handler does, with the body sent by
/// `sendfile`. `Err` when the connection cannot go on.
async fn serve_asset(
    state: &Arc<HttpState>,
    stream: &mut Limited<TcpStream>,
    client: &ClientAddr,
    req: AssetRequest,
) -> io::Result<()> {
    let AssetRequest {
        method,
        path,
        query,
        headers,
        close,
        ..
    } = req;
    let mac = state.client_mac_at(query.get("mac").map(String::as_str), client);
    let stage = server::asset_stage(query.get("kind").map(String::as_str));
    let count_status = |status: StatusCode| {
        state
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "asset".to_string(),
                status: status.as_u16(),
            })
            .inc();
    };
    let refuse = |e: PathError| {
        server::asset_refused(state, mac, &method, &path, Some(client.0.ip()), &e);
        count_status(e.status());
        text_response(&method, e.status(), &format!("{e}\n"), close)
    };
    let (rel, shown) = match server::asset_path(&path) {
        Ok(found) => found,
        Err(e) => return send_all(stream, &refuse(e), false).await,
    };
    let root = state.root.clone();
    let blocking_method = method.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        let (opened, decision) =
            assets::open_and_decide(&root, &rel, &blocking_method, &headers, &shown)?;
        if let Some((start, count)) = decision.body {
            will_need(&opened.file, start, count);
        }
        Ok::<_, PathError>((opened, decision))
    })
    .await;
    let (opened, decision) = match prepared {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(e)) => return send_all(stream, &refuse(e), false).await,
        Err(e) => {
            // The task panicked or the runtime is shutting down: not the client's fault.
            tracing::error!("file task failed: {e}");
            let status = StatusCode::INTERNAL_SERVER_ERROR;
            count_status(status);
            let out = text_response(&method, status, "internal error\n", true);
            send_all(stream, &out, false).await?;
            return Err(io::Error::other("file task failed"));
        }
    };
    let served = decision.served();
    count_status(served.status);
    let complete = server::asset_served(state, mac, &method, stage, &served);
    let head = response_head(decision.status, &decision.headers, close, SystemTime::now());
    let Some((start, count)) = decision.body else {
        send_all(stream, &head, false).await?;
        if let Some(report) = complete {
            report();
        }
        return Ok(());
    };
    // The head waits for the first body bytes (MSG_MORE), so both leave in one segment.
    send_all(stream, &head, count > 0).await?;
    let bytes = state.metrics.asset_bytes.clone();
    let sending = send_file(stream, &opened.file, start, count, |n| {
        bytes.inc_by(n);
    });
    // As in the router's path: once shutdown starts, a download has SHUTDOWN_GRACE to finish.
    let sent = tokio::select! {
        sent = sending => sent,
        () = server::grace_ended(state.shutdown.clone()) => {
            Err(io::Error::other("server shutting down"))
        }
    };
    if let Err(err) = sent {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            tracing::warn!(%err, path = %opened.path.display(), "cannot send");
        }
        return Err(err);
    }
    if let Some(report) = complete {
        report();
    }
    Ok(())
}

/// Start reading `count` bytes at `start` into the page cache, so that `sendfile` on the
/// runtime's worker rarely waits for the disk. Advisory: failures do not matter.
fn will_need(file: &std::fs::File, start: u64, count: u64) {
    let count = count.min(WILL_NEED_MAX);
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(count)) else {
        return;
    };
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open.
    let _ =
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
}

/// Run one write `call` when the socket can take bytes; an error when the client took none for
/// the connection's send timeout (`[http] send_timeout_secs`, as in the router's path).
async fn write_progress<T>(
    stream: &mut Limited<TcpStream>,
    call: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let (sock, stall) = stream.parts();
    stall.limit(sock.async_io(Interest::WRITABLE, call)).await
}

/// Write all of `bytes`; with `more`, tell the kernel more data follows at once (MSG_MORE).
async fn send_all(stream: &mut Limited<TcpStream>, bytes: &[u8], more: bool) -> io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    let fd = stream.get_ref().as_raw_fd();
    let mut at = 0;
    while let Some(rest) = bytes.get(at..).filter(|r| !r.is_empty()) {
        let n = write_progress(stream, || {
            // SAFETY: `rest` is a live buffer of the given length; the socket is open.
            let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), flags) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        })
        .await?;
        at += n;
    }
    Ok(())
}

/// Send `count` bytes of `file` from `start` with `sendfile`, calling `on_sent` with each
/// call's byte count. A file that ends early is an `UnexpectedEof` error.
async fn send_file(
    stream: &mut Limited<TcpStream>,
    file: &std::fs::File,
    start: u64,
    count: u64,
    on_sent: impl Fn(u64),
) -> io::Result<()> {
    let fd = stream.get_ref().as_raw_fd();
    let mut offset = libc::off_t::try_from(start).map_err(io::Error::other)?;
    let mut left = count;
    while left > 0 {
        let chunk = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(SENDFILE_CHUNK);
        let sent = write_progress(stream, || {
            // SAFETY: both descriptors are open for the call; the kernel reads `chunk` bytes at
            // `offset` and advances `offset` by what it sent.
            let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut offset, chunk) };
            u64::try_from(n).map_err(|_| io::Error::last_os_error())
        })
        .await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file shrank while being served: {} of {count} bytes",
                    count - left
                ),
            ));
        }
        left = left.saturating_sub(sent);
        on_sent(sent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(head: &str) -> AssetRequest {
        match parse_head(head.as_bytes()) {
            Head::Asset(req) => *req,
            other => panic!("{head:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn asset_requests_are_taken_with_their_fields() {
        let req = asset(
            "GET /debian/linux?mac=52:54:00:12:34:56&kind=kernel&x=1 HTTP/1.1\r\n\
             Host: pxed\r\nRange: bytes=0-99\r\nIf-None-Match: \"a\"\r\n\r\nGET /next",
        );
        assert_eq!(req.method, Method::GET);
        assert_eq!(req.path, "/debian/linux");
        assert_eq!(req.query.get("kind").map(String::as_str), Some("kernel"));
        assert_eq!(
            req.query.get("mac").map(String::as_str),
            Some("52:54:00:12:34:56")
        );
        assert!(!req.query.contains_key("x"));
        assert_eq!(
            req.headers.get(header::RANGE).map(|v| v.as_bytes()),
            Some(&b"bytes=0-99"[..])
        );
        assert!(!req.close);
        // The head ends before the pipelined next request.
        assert_eq!(req.len, 119);
        let head = asset("HEAD /a HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert_eq!(head.method, Method::HEAD);
        assert!(head.close);
        assert!(asset("GET /a HTTP/1.0\r\n\r\n").close, "HTTP/1.0 closes");
        assert!(!asset("GET /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n").close);
    }

    #[test]
    fn everything_else_goes_to_hyper() {
        for head in [
            "POST /a HTTP/1.1\r\n\r\n",
            "DELETE /a HTTP/1.1\r\n\r\n",
            "GET /api/machines HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET /boot.ipxe HTTP/1.1\r\n\r\n",
            "GET /ipxe/script?mac=x HTTP/1.1\r\n\r\n",
            "GET /m/52-54-00-12-34-56/p/t/user-data HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n\r\n",
            "GET http://pxed/a HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET /a HTTP/1.1\r\nBad Header\r\n\r\n",
            "GET /a HTTP/2.0\r\n\r\n",
            "\x16\x03\x01\x02\x00",
        ] {
            assert_eq!(parse_head(head.as_bytes()), Head::Pass, "{head:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(
            parse_head(format!("GET /a HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Head::Pass
        );
        let long = format!("GET /a HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse_head(long.as_bytes()), Head::Pass);
    }

    #[test]
    fn a_head_in_pieces_waits_for_the_rest() {
        for cut in [
            "",
            "GE",
            "GET /a HTTP/1.1\r\n",
            "GET /a HTTP/1.1\r\nHost: x\r\n",
        ] {
            assert_eq!(parse_head(cut.as_bytes()), Head::Partial, "{cut:?}");
        }
    }

    #[test]
    fn response_heads() {
        let now = SystemTime::UNIX_EPOCH;
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(10u64));
        h.insert(header::ETAG, HeaderValue::from_static("\"t\""));
        let text = String::from_utf8(response_head(StatusCode::PARTIAL_CONTENT, &h, false, now))
            .expect("ascii");
        assert!(
            text.starts_with("HTTP/1.1 206 Partial Content\r\n"),
            "{text}"
        );
        assert!(text.contains("content-length: 10\r\n"));
        assert!(text.contains("etag: \"t\"\r\n"));
        assert!(text.contains("date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"));
        assert!(!text.contains("connection"));
        assert!(text.ends_with("\r\n\r\n"));
        let empty = HeaderMap::new();
        let text = String::from_utf8(response_head(StatusCode::NOT_MODIFIED, &empty, true, now))
            .expect("ascii");
        assert!(!text.contains("content-length"), "304 has none: {text}");
        assert!(text.contains("connection: close\r\n"));
        let text = String::from_utf8(response_head(
            StatusCode::RANGE_NOT_SATISFIABLE,
            &empty,
            false,
            now,
        ))
        .expect("ascii");
        assert!(text.contains("content-length: 0\r\n"), "{text}");
    }

    #[test]
    fn error_answers_to_head_have_no_body() {
        let get = text_response(&Method::GET, StatusCode::NOT_FOUND, "not found\n", false);
        let head = text_response(&Method::HEAD, StatusCode::NOT_FOUND, "not found\n", false);
        assert!(get.ends_with(b"\r\n\r\nnot found\n"));
        assert!(head.ends_with(b"\r\n\r\n"));
        assert!(String::from_utf8_lossy(&head).contains("content-length: 10\r\n"));
    }
}
