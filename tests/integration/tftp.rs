//! TFTP against real clients (tftp-hpa, atftp, curl) on loopback, plus a hostile-input suite
//! that plants a secret next to the root and proves it is never served.

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdp};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pxed::events::{BootEvent, EventBus};
use pxed::mac::MacAddr;
use pxed::stage::BootStage;
use pxed::tftp::TftpConfig;
use pxed::tftp::server::{self, TftpServer};
use pxed::tftp::wire::{self, Packet};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"TOP-SECRET-MUST-NEVER-BE-SERVED";
const CLIENT_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// A real client must finish a small transfer on loopback well within this.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Lab {
    addr: SocketAddr,
    /// tmp/ holds secret.txt; tmp/root is served.
    _tmp: tempfile::TempDir,
    root: PathBuf,
    stop: CancellationToken,
    events: broadcast::Receiver<BootEvent>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Lab {
    async fn start(config: TftpConfig) -> Lab {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("secret.txt"), SECRET).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), SECRET).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(root.join("EFI/BOOT")).unwrap();
        std::fs::write(root.join("hello.txt"), b"hello from pxed\n").unwrap();
        std::fs::write(root.join("EFI/BOOT/grubx64.efi"), noise(3000, 9)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.txt"), root.join("secret-link"))
            .unwrap();
        std::os::unix::fs::symlink("../../secret.txt", root.join("sub/rel-link")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        let bus = EventBus::new();
        let events = bus.subscribe();
        let files = server::root_source(&config, root.clone()).unwrap();
        let lookup: server::MacLookup =
            Arc::new(|ip: IpAddr| ip.is_loopback().then_some(CLIENT_MAC));
        let srv = TftpServer::bind(config, "127.0.0.1:0".parse().unwrap(), files, bus, lookup)
            .await
            .unwrap();
        let addr = srv.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(srv.run(stop.clone()));
        Lab {
            addr,
            _tmp: tmp,
            root,
            stop,
            events,
        }
    }

    fn put(&self, name: &str, data: &[u8]) {
        let path = self.root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }

    /// Wait (with a deadline) for an event of `stage` whose detail contains `needle`.
    async fn wait_event(&mut self, stage: BootStage, needle: &str) -> BootEvent {
        let deadline = tokio::time::Instant::now() + CLIENT_DEADLINE;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("no {stage} event with `{needle}`"))
                .unwrap();
            if ev.stage == stage && ev.detail.contains(needle) {
                return ev;
            }
        }
    }
}

/// Run a client command with a deadline; returns (success, stdout+stderr).
async fn run_client(program: &str, args: &[String], cwd: &Path) -> (bool, String) {
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let out = tokio::time::timeout(CLIENT_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn s(v: &str) -> String {
    v.to_string()
}

fn assert_file(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: no output file: {e}"));
    assert!(
        got == want,
        "{what}: got {} bytes, want {} (first difference at {:?})",
        got.len(),
        want.len(),
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

fn test_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty.bin", Vec::new()),
        ("one.bin", noise(1, 1)),
        ("exact512.bin", noise(512 * 20, 2)),
        ("exact1468.bin", noise(1468 * 7, 3)),
        ("odd.bin", noise(1_000_003, 4)),
        ("sub/deeper/nested.efi", noise(70_001, 5)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_downloads_byte_exact() {
    let mut lab = Lab::start(TftpConfig::default()).await;
    let out = tempfile::tempdir().unwrap();
    let port = lab.addr.port().to_string();
    for (name, data) in test_files() {
        lab.put(name, &data);
        let local = out.path().join("out.bin");
        let _ = std::fs::remove_file(&local);
        let args = vec![
            s("-m"),
            s("binary"),
            s("127.0.0.1"),
            port.clone(),
            s("-c"),
            s("get"),
            s(name),
            local.display().to_string(),
        ];
        let (_, text) = run_client("tftp", &args, out.path()).await;
        assert_file(&local, &data, &format!("tftp-hpa {name}: {text}"));
        let ev = lab.wait_event(BootStage::TftpComplete, name).await;
        assert_eq!(ev.mac, CLIENT_MAC);
        assert!(
            ev.detail.contains(&format!("bytes={}", data.len())),
            "{}",
            ev.detail
        );
    }
    // Netascii: the client turns CR LF back into LF, so a Unix text file round-trips.
    let text = b"line one\nline two\n\nlast line without newline".to_vec();
    lab.put("text.cfg", &text);
    let local = out.path().join("text.out");
    let args = vec![
        s("-m"),
        s("ascii"),
        s("127.0.0.1"),
        port.clone(),
        s("-c"),
        s("get"),
        s("text.cfg"),
        local.display().to_string(),
    ];
    let (_, msg) = run_client("tftp", &args, out.path()).await;
    assert_file(&local, &text, &format!("tftp-hpa netascii: {msg}"));
    // A missing file: the client reports the server's error.
    let args = vec![
        s("-m"),
        s("binary"),
        s("127.0.0.1"),
        port,
        s("-c"),
        s("get"),
        s("missing.bin"),
        out.path().join("missing").display().to_string(),
    ];
    let (_, msg) = run_client("tftp", &args, out.path()).await;
    assert!(msg.contains("not found"), "{msg}");
    lab.wait_event(BootStage::TftpError, "missing.bin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_downloads_across_blksize_and_windowsize() {
    let mut lab = Lab::start(TftpConfig::default()).await;
    let out = tempfile::tempdir().unwrap();
    let port = lab.addr.port().to_string();
    for (name, data) in test_files() {
        lab.put(name, &data);
    }
    for blksize in ["512", "1468", "8192"] {
        for windowsize in [None, Some("4"), Some("16"), Some("64")] {
            for (name, data) in test_files() {
                let local = out.path().join("out.bin");
                let _ = std::fs::remove_file(&local);
                let mut args = vec![
                    s("-g"),
                    s("-r"),
                    s(name),
                    s("-l"),
                    local.display().to_string(),
                    s("--option"),
                    format!("blksize {blksize}"),
                    s("--option"),
                    s("tsize enable"),
                ];
                if let Some(w) = windowsize {
                    args.push(s("--option"));
                    args.push(format!("windowsize {w}"));
                }
                args.push(s("127.0.0.1"));
                args.push(port.clone());
                let (_, text) = run_client("atftp", &args, out.path()).await;
                let what = format!("atftp {name} blksize {blksize} window {windowsize:?}: {text}");
                assert_file(&local, &data, &what);
                let ev = lab.wait_event(BootStage::TftpOack, name).await;
                assert!(
                    ev.detail.contains(&format!("blksize={blksize}")),
                    "{what} {}",
                    ev.detail
                );
                assert!(
                    data.is_empty() || ev.detail.contains(&format!("tsize={}", data.len())),
                    "{what} {}",
                    ev.detail
                );
                if let Some(w) = windowsize {
                    // The server trims a window to its byte budget (RFC 7440 lets it answer less).
                    let budget =
                        pxed::tftp::engine::WINDOW_BYTES_DEFAULT / blksize.parse::<u32>().unwrap();
                    let w = w.parse::<u32>().unwrap().min(budget);
                    assert!(
                        ev.detail.contains(&format!("windowsize={w}")),
                        "{}",
                        ev.detail
                    );
                }
                lab.wait_event(BootStage::TftpComplete, name).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_downloads_across_blksize() {
    let mut lab = Lab::start(TftpConfig::default()).await;
    let out = tempfile::tempdir().unwrap();
    for (name, data) in test_files() {
        lab.put(name, &data);
    }
    for blksize in ["512", "1468", "8192"] {
        for (name, data) in test_files() {
            let local = out.path().join("out.bin");
            let _ = std::fs::remove_file(&local);
            let args = vec![
                s("-sS"),
                s("--tftp-blksize"),
                s(blksize),
                s("-o"),
                local.display().to_string(),
                format!("tftp://{}/{name}", lab.addr),
            ];
            let (ok, text) = run_client("curl", &args, out.path()).await;
            let what = format!("curl {name} blksize {blksize}: {text}");
            assert!(ok, "{what}");
            assert_file(&local, &data, &what);
            lab.wait_event(BootStage::TftpComplete, name).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_rolls_over_block_numbers_with_real_clients() {
    // 40 MiB at blksize 512 is 81 921 blocks: the block number wraps past 65535.
    let mut lab = Lab::start(TftpConfig::default()).await;
    let data = noise(40 << 20, 77);
    lab.put("big.img", &data);
    let out = tempfile::tempdir().unwrap();
    let local = out.path().join("big.out");
    let args = vec![
        s("-sS"),
        s("--tftp-blksize"),
        s("512"),
        s("-o"),
        local.display().to_string(),
        format!("tftp://{}/big.img", lab.addr),
    ];
    let (ok, text) = run_client("curl", &args, out.path()).await;
    assert!(ok, "curl: {text}");
    assert_file(&local, &data, "curl big.img");
    let ev = lab.wait_event(BootStage::TftpComplete, "big.img").await;
    eprintln!("curl 40 MiB blksize 512: {}", ev.detail);
    // atftp with a window, also past the wrap.
    std::fs::remove_file(&local).unwrap();
    let args = vec![
        s("-g"),
        s("-r"),
        s("big.img"),
        s("-l"),
        local.display().to_string(),
        s("--option"),
        s("blksize 512"),
        s("--option"),
        s("windowsize 16"),
        s("127.0.0.1"),
        lab.addr.port().to_string(),
    ];
    let (_, text) = run_client("atftp", &args, out.path()).await;
    assert_file(&local, &data, &format!("atftp big.img: {text}"));
    let ev = lab.wait_event(BootStage::TftpComplete, "big.img").await;
    eprintln!("atftp 40 MiB blksize 512 window 16: {}", ev.detail);
}

/// A minimal raw client for the hostile suite.
struct Raw {
    sock: StdUdp,
    server: SocketAddr,
}

impl Raw {
    fn new(server: SocketAddr) -> Raw {
        let sock = StdUdp::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw { sock, server }
    }

    fn send(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.server).unwrap();
    }

    fn recv(&self) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 70_000];
        let (n, from) = self
            .sock
            .recv_from(&mut buf)
            .expect("no reply from the server");
        buf.truncate(n);
        (buf, from)
    }
}

/// Send `junk` then a valid RRQ for hello.txt. The listener handles packets in order, so the
/// first reply tells whether the junk was answered (an ERROR from the request port) or dropped
/// (the first reply is hello.txt's DATA from a transfer port).
fn junk_then_probe(server: SocketAddr, junk: &[u8]) -> Option<(u16, String)> {
    let raw = Raw::new(server);
    raw.send(junk);
    raw.send(&wire::encode_request(false, "hello.txt", "octet", &[]));
    let mut answer = None;
    loop {
        let (pkt, from) = raw.recv();
        match wire::parse(&pkt).unwrap() {
            Packet::Error(code, msg) if from == server => {
                answer = Some((code, msg));
            }
            Packet::Data(1, payload) => {
                assert_eq!(payload, b"hello from pxed\n");
                raw.sock.send_to(&wire::encode_ack(1), from).unwrap();
                return answer;
            }
            other => panic!("unexpected reply to junk {junk:?}: {other:?}"),
        }
    }
}

fn traversal_corpus() -> Vec<String> {
    let targets = [
        "secret.txt",
        "outside/secret.txt",
        "root/../secret.txt",
        "etc/passwd",
    ];
    let prefixes = [
        "../",
        "..\\",
        "/../",
        "\\..\\",
        "./../",
        "sub/../../",
        "sub/deeper/../../../",
        "..//",
        "../../../../../../../../",
        "..\\..\\..\\",
        "/..\\../",
        "hello.txt/../../",
        "escape/../../",
        "EFI/BOOT/../../../",
    ];
    let mut corpus: Vec<String> = Vec::new();
    for p in prefixes {
        for t in targets {
            corpus.push(format!("{p}{t}"));
        }
    }
    for extra in [
        "escape/secret.txt",
        "escape\\secret.txt",
        "/escape/secret.txt",
        "escape/./secret.txt",
        "escape//secret.txt",
        "ESCAPE/secret.txt",
        "secret-link",
        "/secret-link",
        "sub/rel-link",
        "sub\\rel-link",
        "passwd",
        "/passwd",
        "/etc/passwd",
        "/proc/self/environ",
        "/proc/self/root/etc/passwd",
        "..",
        "../",
        ".",
        "/",
        "\\",
        "//",
        "sub",
        "sub/",
        "%2e%2e%2fsecret.txt",
        "%2e%2e/secret.txt",
        "..%2fsecret.txt",
        "..%5csecret.txt",
        "%252e%252e%252fsecret.txt",
        "....//secret.txt",
        "....\\\\secret.txt",
        ".../secret.txt",
        "..;/secret.txt",
        "..\u{2215}secret.txt",
        "..\u{2044}secret.txt",
        "\u{ff0e}\u{ff0e}/secret.txt",
        "\u{ff0e}\u{ff0e}\u{ff0f}secret.txt",
        "..\u{ff3c}secret.txt",
        "\u{202e}txt.terces/..",
        "\u{00e9}t\u{00e9}/../../secret.txt",
        "../\u{0000}hello.txt",
        "hello.txt\u{0000}../secret.txt",
        "../secret.txt\u{0000}",
        "\u{0001}../secret.txt",
        "hello.txt\n../secret.txt",
        "C:\\..\\secret.txt",
        "C:/../secret.txt",
        "file:///etc/passwd",
        "tftp://127.0.0.1/../secret.txt",
        "~/secret.txt",
        "~root/.bashrc",
        "$HOME/secret.txt",
        "`cat /etc/passwd`",
        "*",
        "?ecret.txt",
        "sub/rel-link/../secret.txt",
        "escape/../../secret.txt",
        "../root/../secret.txt",
        "./././../secret.txt",
    ] {
        corpus.push(extra.to_string());
    }
    corpus.push("a/".repeat(600) + "secret.txt");
    corpus.push("x".repeat(256));
    corpus.push("../".repeat(300) + "secret.txt");
    corpus.push(format!("{}/../../secret.txt", "\u{1f600}".repeat(70)));
    corpus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_never_escape_the_root() {
    let mut lab = Lab::start(TftpConfig {
        case_insensitive: true,
        fallback_dirs: vec![PathBuf::from("EFI/BOOT")],
        ..TftpConfig::default()
    })
    .await;
    let corpus = traversal_corpus();
    assert!(corpus.len() >= 100, "corpus has only {}", corpus.len());
    let server = lab.addr;
    let results = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        for path in corpus {
            let raw = Raw::new(server);
            // Build the RRQ by hand so NULs inside the name reach the wire as they are.
            let mut rrq = vec![0, 1];
            rrq.extend_from_slice(path.as_bytes());
            rrq.extend_from_slice(b"\0octet\0");
            raw.send(&rrq);
            let (pkt, _) = raw.recv();
            let parsed = wire::parse(&pkt).unwrap();
            match &parsed {
                Packet::Error(code, _) => results.push((path, *code)),
                Packet::Data(..) => {
                    assert!(
                        !pkt.windows(SECRET.len()).any(|w| w == SECRET),
                        "SECRET served for {path:?}"
                    );
                    panic!("{path:?} was served: {parsed:?}");
                }
                other => panic!("{path:?}: unexpected {other:?}"),
            }
        }
        results
    })
    .await
    .unwrap();
    for (path, code) in &results {
        // 1 file not found, 2 access violation, 4 malformed (NUL splits the name from the mode).
        assert!(
            matches!(code, 1 | 2 | 4),
            "{path:?} answered with ERROR {code}"
        );
    }
    // The fallback dir and case-insensitivity work for legitimate names...
    let server = lab.addr;
    tokio::task::spawn_blocking(move || {
        for name in ["grubx64.efi", "GRUBX64.EFI", "/efi/boot/grubx64.efi"] {
            let raw = Raw::new(server);
            raw.send(&wire::encode_request(false, name, "octet", &[]));
            let (pkt, _) = raw.recv();
            assert!(
                matches!(wire::parse(&pkt).unwrap(), Packet::Data(1, p) if p.len() == 512),
                "{name}"
            );
        }
    })
    .await
    .unwrap();
    // ...and the server is still up for a normal transfer.
    let out = tempfile::tempdir().unwrap();
    let local = out.path().join("hello");
    let args = vec![
        s("-sS"),
        s("-o"),
        local.display().to_string(),
        format!("tftp://{}/hello.txt", lab.addr),
    ];
    let (ok, text) = run_client("curl", &args, out.path()).await;
    assert!(ok, "{text}");
    assert_file(&local, b"hello from pxed\n", "after the hostile corpus");
    lab.wait_event(BootStage::TftpComplete, "hello.txt").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_the_right_answer_or_none() {
    let lab = Lab::start(TftpConfig::default()).await;
    let server = lab.addr;
    tokio::task::spawn_blocking(move || {
        let long_opt = format!("{}\0{}\0", "o".repeat(200), "1");
        let mut many = b"\x00\x01hello.txt\x00octet\x00".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("opt{i}\0{i}\0").as_bytes());
        }
        // (packet, expected ERROR code or None for dropped)
        let cases: Vec<(Vec<u8>, Option<u16>)> = vec![
            (b"".to_vec(), None),
            (b"\x00".to_vec(), None),
            (b"\x00\x01".to_vec(), Some(4)),
            (b"\x00\x01hello.txt".to_vec(), Some(4)),
            (b"\x00\x01hello.txt\x00".to_vec(), Some(4)),
            (b"\x00\x01hello.txt\x00octet".to_vec(), Some(4)),
            (b"\x00\x01hello.txt\x00bogus\x00".to_vec(), Some(4)),
            (b"\x00\x01hello.txt\x00mail\x00".to_vec(), Some(4)),
            (b"\x00\x01\x00octet\x00".to_vec(), Some(4)),
            (b"\x00\x01\xff\xfe\x80\x00octet\x00".to_vec(), Some(4)),
            (
                b"\x00\x01hello.txt\x00octet\x00blksize\x00".to_vec(),
                Some(4),
            ),
            (b"\x00\x01hello.txt\x00octet\x00blksize".to_vec(), Some(4)),
            (
                [
                    b"\x00\x01hello.txt\x00octet\x00".as_slice(),
                    long_opt.as_bytes(),
                ]
                .concat(),
                Some(4),
            ),
            (many, Some(4)),
            (vec![0u8; 2000], Some(4)),
            (
                [b"\x00\x01".as_slice(), &vec![b'a'; 3000], b"\x00octet\x00"].concat(),
                Some(4),
            ),
            (b"\x00\x02hello.txt\x00octet\x00".to_vec(), Some(2)),
            (b"\x00\x03\x00\x01data".to_vec(), None),
            (b"\x00\x04\x00\x01".to_vec(), None),
            (b"\x00\x05\x00\x01oops\x00".to_vec(), None),
            (b"\x00\x06blksize\x00512\x00".to_vec(), None),
            (b"\x00\x07hello".to_vec(), Some(4)),
            (b"\xff\xffhello".to_vec(), Some(4)),
        ];
        for (pkt, want) in cases {
            let got = junk_then_probe(server, &pkt);
            assert_eq!(got.as_ref().map(|(c, _)| *c), want, "{pkt:?}: {got:?}");
        }
        // Duplicate and absurd option values are tolerated: the request is served, and only
        // sane options are acknowledged.
        let o = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        for (opts, want) in [
            (
                vec![("blksize", "1024"), ("blksize", "9000")],
                o(&[("blksize", "1024")]),
            ),
            (vec![("blksize", "99999999999999999999999999")], vec![]),
            (
                vec![
                    ("blksize", "-5"),
                    ("tsize", "18446744073709551616"),
                    ("timeout", "0"),
                ],
                o(&[("tsize", "16")]),
            ),
            (
                vec![("windowsize", "0"), ("blksize", "4"), ("timeout", "+1")],
                vec![],
            ),
        ] {
            let raw = Raw::new(server);
            raw.send(&wire::encode_request(false, "hello.txt", "octet", &opts));
            let (pkt, from) = raw.recv();
            let first = wire::parse(&pkt).unwrap();
            if want.is_empty() {
                assert_eq!(first, Packet::Data(1, b"hello from pxed\n"), "{opts:?}");
                raw.sock.send_to(&wire::encode_ack(1), from).unwrap();
                continue;
            }
            assert_eq!(first, Packet::Oack(want), "{opts:?}");
            raw.sock.send_to(&wire::encode_ack(0), from).unwrap();
            let (pkt, _) = raw.recv();
            assert_eq!(
                wire::parse(&pkt).unwrap(),
                Packet::Data(1, b"hello from pxed\n")
            );
            raw.sock.send_to(&wire::encode_ack(1), from).unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edk2_probe_abort_and_strangers() {
    let mut lab = Lab::start(TftpConfig::default()).await;
    lab.put("snponly.efi", &noise(200_000, 11));
    let server = lab.addr;
    tokio::task::spawn_blocking(move || {
        // EDK2's size probe: RRQ tsize=0 blksize=1468, OACK, ERROR 8.
        let raw = Raw::new(server);
        raw.send(&wire::encode_request(
            false,
            "snponly.efi",
            "octet",
            &[("tsize", "0"), ("blksize", "1468")],
        ));
        let (pkt, tid) = raw.recv();
        assert_eq!(
            wire::parse(&pkt).unwrap(),
            Packet::Oack(vec![
                ("tsize".into(), "200000".into()),
                ("blksize".into(), "1468".into())
            ])
        );
        raw.sock
            .send_to(
                &wire::encode_error(wire::ErrorCode::OptionNegotiation, "abort"),
                tid,
            )
            .unwrap();
        // The real read follows at once from the same port and must be served (windowed, as
        // EDK2 does with PcdPxeTftpWindowSize).
        raw.send(&wire::encode_request(
            false,
            "snponly.efi",
            "octet",
            &[("blksize", "1468"), ("windowsize", "4")],
        ));
        let (pkt, tid) = raw.recv();
        assert!(matches!(wire::parse(&pkt).unwrap(), Packet::Oack(_)));
        raw.sock.send_to(&wire::encode_ack(0), tid).unwrap();
        let want = noise(200_000, 11);
        let mut got = Vec::new();
        let mut block: u16 = 0;
        loop {
            let (pkt, from) = raw.recv();
            assert_eq!(from, tid);
            let Packet::Data(b, payload) = wire::parse(&pkt).unwrap() else {
                panic!("expected DATA")
            };
            assert_eq!(b, block + 1, "no loss on loopback, so blocks come in order");
            block = b;
            got.extend_from_slice(payload);
            let last = payload.len() < 1468;
            if last || b % 4 == 0 {
                raw.sock.send_to(&wire::encode_ack(b), tid).unwrap();
            }
            if last {
                break;
            }
        }
        assert!(got == want, "got {} bytes", got.len());
    })
    .await
    .unwrap();
    let ev = lab.wait_event(BootStage::TftpProbe, "snponly.efi").await;
    assert!(ev.detail.contains("tsize=200000"), "{}", ev.detail);
    assert_eq!(ev.mac, CLIENT_MAC);

    // A stranger sending junk to a transfer port gets exactly one ERROR 5, and the transfer
    // goes on; then the client aborts mid-transfer and the server stops at once.
    let server = lab.addr;
    tokio::task::spawn_blocking(move || {
        let raw = Raw::new(server);
        raw.send(&wire::encode_request(false, "snponly.efi", "octet", &[]));
        let (pkt, tid) = raw.recv();
        assert!(matches!(wire::parse(&pkt).unwrap(), Packet::Data(1, _)));
        let stranger = StdUdp::bind("127.0.0.1:0").unwrap();
        for _ in 0..5 {
            stranger.send_to(&wire::encode_ack(1), tid).unwrap();
        }
        raw.sock.send_to(&wire::encode_ack(1), tid).unwrap();
        let (pkt, _) = raw.recv();
        assert!(matches!(wire::parse(&pkt).unwrap(), Packet::Data(2, _)));
        // The transfer socket handled the stranger's packets before our ACK 1.
        stranger.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 600];
        let mut errors = 0;
        while let Ok((n, _)) = stranger.recv_from(&mut buf) {
            assert_eq!(
                wire::parse(&buf[..n]).unwrap(),
                Packet::Error(5, "unknown transfer ID".into())
            );
            errors += 1;
        }
        assert_eq!(errors, 1);
        raw.sock
            .send_to(
                &wire::encode_error(wire::ErrorCode::Undefined, "user abort"),
                tid,
            )
            .unwrap();
    })
    .await
    .unwrap();
    let ev = lab.wait_event(BootStage::TftpError, "snponly.efi").await;
    assert!(
        ev.detail.contains("client sent ERROR 0: user abort"),
        "{}",
        ev.detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_requests_are_refused_by_real_clients() {
    let lab = Lab::start(TftpConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("up.bin"), b"upload").unwrap();
    let args = vec![
        s("-sS"),
        s("-T"),
        dir.path().join("up.bin").display().to_string(),
        format!("tftp://{}/up.bin", lab.addr),
    ];
    let (ok, text) = run_client("curl", &args, dir.path()).await;
    assert!(!ok, "upload must fail: {text}");
    assert!(!lab.root.join("up.bin").exists());
}

/// What a flood socket sends; every answer it gets must fit its kind.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flood {
    /// RRQ for a file that does not exist: ERROR 1 or nothing.
    Missing,
    /// RRQ for a small file that exists: DATA block 1 with its bytes, or nothing (limits).
    Existing,
    /// Junk at the request port: ERROR 4 or nothing.
    Junk,
}

/// Thousands of requests and junk from 48 addresses while a real client (curl) downloads a
/// large file: the download finishes within twice the time it takes unloaded (measured in
/// this test), every flood packet gets the right answer or none, and the server still serves
/// afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_survives_a_request_flood() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    /// Floods shorter than this prove little.
    const MIN_FLOOD_PACKETS: u64 = 2000;
    let lab = Lab::start(TftpConfig::default()).await;
    let big = noise(24 << 20, 77);
    lab.put("big.bin", &big);
    let out = tempfile::tempdir().unwrap();
    let url = format!("tftp://{}/big.bin", lab.addr);
    let args = vec![
        s("-sS"),
        s("--tftp-blksize"),
        s("1468"),
        url.clone(),
        s("-o"),
        s("big.bin"),
    ];
    // Unloaded: the better of two runs, so a hiccup on a busy machine does not make the bound
    // easy.
    let mut unloaded = Duration::MAX;
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let (ok, log) = run_client("curl", &args, out.path()).await;
        assert!(ok, "{log}");
        unloaded = unloaded.min(t.elapsed());
    }
    assert_file(&out.path().join("big.bin"), &big, "unloaded");
    std::fs::remove_file(out.path().join("big.bin")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let server = lab.addr;
    let mut flooders = Vec::new();
    for (i, kind) in [Flood::Missing, Flood::Existing, Flood::Junk]
        .into_iter()
        .enumerate()
    {
        let (stop, sent, answered) = (stop.clone(), sent.clone(), answered.clone());
        flooders.push(std::thread::spawn(move || -> Vec<String> {
            let socks: Vec<StdUdp> = (0..16)
                .map(|n| {
                    let s = StdUdp::bind(format!("127.0.{}.{}:0", 10 + i, n + 1)).unwrap();
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect();
            let mut bad = Vec::new();
            let mut buf = [0u8; 2048];
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for s in &socks {
                    let pkt = match kind {
                        Flood::Missing => {
                            wire::encode_request(false, &format!("missing-{round}"), "octet", &[])
                        }
                        Flood::Existing => wire::encode_request(false, "hello.txt", "octet", &[]),
                        Flood::Junk => noise(40, round).into_iter().chain([0u8]).collect(),
                    };
                    if s.send_to(&pkt, server).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    while let Ok((n, _)) = s.recv_from(&mut buf) {
                        answered.fetch_add(1, Ordering::Relaxed);
                        let ok = match (kind, wire::parse(&buf[..n])) {
                            (Flood::Missing, Ok(Packet::Error(1, _))) => true,
                            (Flood::Existing, Ok(Packet::Data(1, d))) => d == b"hello from pxed\n",
                            (Flood::Junk, Ok(Packet::Error(4, _))) => true,
                            _ => false,
                        };
                        if !ok && bad.len() < 5 {
                            bad.push(format!("{kind:?} got {:?}", wire::parse(&buf[..n])));
                        }
                    }
                }
                // Pacing: 3 threads x 16 packets per 10 ms, about 5000 packets a second.
                std::thread::sleep(Duration::from_millis(10));
            }
            bad
        }));
    }
    // Loaded: the better of two runs too, so that both sides use the same statistic and a
    // VM booting beside this test on the 2-core machine hits neither side harder.
    let mut loaded = Duration::MAX;
    let (mut ok, mut log) = (true, String::new());
    for _ in 0..2 {
        let t = std::time::Instant::now();
        let (run_ok, run_log) = run_client("curl", &args, out.path()).await;
        loaded = loaded.min(t.elapsed());
        ok &= run_ok;
        log.push_str(&run_log);
    }
    // Keep flooding until enough packets went out, even if the transfer was quick.
    let deadline = std::time::Instant::now() + CLIENT_DEADLINE;
    while sent.load(Ordering::Relaxed) < MIN_FLOOD_PACKETS && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let bad: Vec<String> = flooders
        .into_iter()
        .flat_map(|f| f.join().unwrap())
        .collect();
    assert!(ok, "{log}");
    assert_file(&out.path().join("big.bin"), &big, "under flood");
    let (sent, answered) = (
        sent.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    eprintln!(
        "unloaded {unloaded:?}, under flood {loaded:?} (ratio {:.2}); flood {sent} packets, {answered} answers",
        loaded.as_secs_f64() / unloaded.as_secs_f64()
    );
    assert!(sent >= MIN_FLOOD_PACKETS, "only {sent} flood packets");
    assert!(answered > 0, "the flood got no answers at all");
    assert!(bad.is_empty(), "wrong answers: {bad:?}");
    assert!(
        loaded <= unloaded * 2,
        "under flood {loaded:?}, unloaded {unloaded:?}"
    );
    // Still serving.
    let (ok, log) = run_client(
        "curl",
        &[
            format!("tftp://{}/hello.txt", lab.addr),
            s("-o"),
            s("after.txt"),
        ],
        out.path(),
    )
    .await;
    assert!(ok, "{log}");
    assert_file(
        &out.path().join("after.txt"),
        b"hello from pxed\n",
        "after the flood",
    );
}

/// 300 clients at once (the in-tree client, lock-step and windowed, three blksizes, three
/// files): every one gets its file byte for byte, without a failure. The transfers share the
/// server's few event threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_transfers_arrive_byte_exact() {
    use pxed::tftp::client::{self, ReadSpec};
    const CLIENTS: usize = 300;
    let lab = Lab::start(TftpConfig {
        max_transfers: 1024,
        max_transfers_per_client: 1024,
        ..TftpConfig::default()
    })
    .await;
    let files: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| {
            (
                format!("file{i}.bin"),
                noise(200_000 + 7_001 * i as usize, 40 + i),
            )
        })
        .collect();
    for (name, data) in &files {
        lab.put(name, data);
    }
    let mut set = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let (name, data) = &files[i % files.len()];
        let spec = ReadSpec {
            server: lab.addr,
            file: name.clone(),
            blksize: [None, Some(1468), Some(8192)][(i / 9) % 3],
            windowsize: [None, None, Some(8)][(i / 3) % 3],
            timeout: Duration::from_secs(1),
            retries: 10,
        };
        let want = (data.len() as u64, client::checksum(data));
        set.spawn(async move {
            let got = client::read(&spec, "127.0.0.1:0".parse().unwrap()).await;
            (i, spec, want, got)
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (i, spec, want, got) = joined.unwrap();
        match got {
            Ok(r) if (r.bytes, r.checksum) == want => {}
            other => failures.push(format!("client {i} ({spec:?}): {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
}

/// `tftp_root` in a profile: a real client (curl) whose machine entry picks that profile gets
/// the profile root's file; another client gets the main root's file of the same name, and
/// neither can climb out of its root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_tftp_root_serves_that_profiles_clients() {
    const INSTALLER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x11]);
    const OTHER_MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 0x12]);
    // curl --interface picks the source address; loopback owns all of 127/8.
    const INSTALLER_IP: &str = "127.0.0.11";
    const OTHER_IP: &str = "127.0.0.12";
    let tmp = tempfile::tempdir().unwrap();
    let main = tmp.path().join("main");
    let installer = tmp.path().join("installer");
    std::fs::create_dir_all(&main).unwrap();
    std::fs::create_dir_all(&installer).unwrap();
    std::fs::write(tmp.path().join("secret.txt"), SECRET).unwrap();
    let main_boot = noise(70_001, 21);
    let installer_boot = noise(90_001, 22);
    std::fs::write(main.join("boot.efi"), &main_boot).unwrap();
    std::fs::write(installer.join("boot.efi"), &installer_boot).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret.txt"), installer.join("leak")).unwrap();
    let text = format!(
        r#"
[server]
root = "{main}"

[[profile]]
name = "default"
nbp = "boot.efi"

[[profile]]
name = "installer"
nbp = "boot.efi"
tftp_root = "{installer}"

[[machine]]
mac = "{INSTALLER_MAC}"
profile = "installer"
"#,
        main = main.display(),
        installer = installer.display(),
    );
    let cfg = pxed::config::Config::parse(&text, Path::new("test.toml")).unwrap();
    let policy = Arc::new(cfg.policy.clone());
    let mac_of: server::MacLookup = Arc::new(|ip: IpAddr| match ip.to_string().as_str() {
        INSTALLER_IP => Some(INSTALLER_MAC),
        OTHER_IP => Some(OTHER_MAC),
        _ => None,
    });
    let addrs = pxed::policy::ServerAddrs {
        ip: std::net::Ipv4Addr::LOCALHOST,
        http_port: 8080,
    };
    let plan_mac = mac_of.clone();
    let plan_of: pxed::tftp::roots::PlanLookup = Arc::new(move |ip: IpAddr| {
        let facts = pxed::policy::ClientFacts {
            mac: plan_mac(ip)?,
            ..Default::default()
        };
        Some(pxed::policy::plan(
            &policy,
            &facts,
            &pxed::policy::BootState::default(),
            &addrs,
        ))
    });
    let main_source = server::root_source(&cfg.tftp, cfg.server.root.clone()).unwrap();
    let files = Arc::new(
        pxed::tftp::roots::ProfileRoots::new(main_source, &cfg.policy, &cfg.tftp, plan_of).unwrap(),
    );
    let srv = TftpServer::bind(
        cfg.tftp.clone(),
        "127.0.0.1:0".parse().unwrap(),
        files,
        EventBus::new(),
        mac_of,
    )
    .await
    .unwrap();
    let addr = srv.local_addr().unwrap();
    let stop = CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    tokio::spawn(srv.run(stop));

    let out = tempfile::tempdir().unwrap();
    let fetch = |from: &'static str, name: &'static str| {
        let local = out
            .path()
            .join(format!("{from}-{}", name.replace('/', "_")));
        let args = vec![
            s("-sS"),
            // Send `..` as written instead of resolving it in the URL.
            s("--path-as-is"),
            s("--interface"),
            s(from),
            s("--tftp-blksize"),
            s("1468"),
            s("-o"),
            local.display().to_string(),
            format!("tftp://{addr}/{name}"),
        ];
        (args, local)
    };
    for (from, want) in [(INSTALLER_IP, &installer_boot), (OTHER_IP, &main_boot)] {
        let (args, local) = fetch(from, "boot.efi");
        let (ok, text) = run_client("curl", &args, out.path()).await;
        let what = format!("curl from {from}: {text}");
        assert!(ok, "{what}");
        assert_file(&local, want, &what);
    }
    // The profile root confines like the main one: no climbing to the main root or the
    // secret next to it, no symlink out.
    for name in ["../main/boot.efi", "..%2fsecret.txt", "leak"] {
        let (args, local) = fetch(INSTALLER_IP, name);
        let (ok, text) = run_client("curl", &args, out.path()).await;
        let got = std::fs::read(&local).unwrap_or_default();
        assert!(
            !ok && got != SECRET && got != main_boot,
            "{name} from the installer root: {text}"
        );
    }
}

/// Stopping the server ends a running transfer with an ERROR to its client (the transfer runs
/// on an event thread, outside tokio, which must still see the shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_error_to_a_running_transfer() {
    let mut lab = Lab::start(TftpConfig::default()).await;
    lab.put("big.bin", &noise(2_000_000, 31));
    let server = lab.addr;
    let raw = tokio::task::spawn_blocking(move || {
        let raw = Raw::new(server);
        raw.send(&wire::encode_request(false, "big.bin", "octet", &[]));
        let (pkt, tid) = raw.recv();
        assert!(matches!(wire::parse(&pkt).unwrap(), Packet::Data(1, _)));
        (raw, tid)
    })
    .await
    .unwrap();
    lab.stop.cancel();
    let error = tokio::task::spawn_blocking(move || {
        let (raw, tid) = raw;
        // Until the ERROR: at most the retransmitted DATA 1 (never acknowledged) before it.
        loop {
            let (pkt, from) = raw.recv();
            assert_eq!(from, tid);
            match wire::parse(&pkt).unwrap() {
                Packet::Data(1, _) => continue,
                Packet::Error(code, msg) => return (code, msg.to_string()),
                other => panic!("expected ERROR after the shutdown, got {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(error, (0, "server shutting down".to_string()));
    let ev = lab.wait_event(BootStage::TftpError, "big.bin").await;
    assert!(ev.detail.contains("server shutting down"), "{}", ev.detail);
}
