//! pxed's HTTP server against the real `curl` (and busybox `wget` for phone-home): boot assets
//! with ranges and conditional requests, path traversal, iPXE scripts, phone-home, the API,
//! Server-Sent Events and metrics.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use pxed::events::{BootEvent, EventBus};
use pxed::http::{HttpConfig, HttpState};
use pxed::mac::MacAddr;
use pxed::policy::{PolicyConfig, ServerAddrs};
use pxed::stage::BootStage;
use tokio::io::AsyncReadExt;

const POLICY: &str = r#"
[[profile]]
name = "default"
kernel = "linux/vmlinuz"
initrd = ["linux/initrd.img"]
cmdline = "console=ttyS0"

[[profile]]
name = "disk"
local = true

[[group]]
name = "menu-machines"
profile = "menu"
match = { mac = ["52:54:00:99"] }

[[profile]]
name = "menu"
menu = [{ label = "Linux", profile = "default" }, { label = "Disk", profile = "disk" }]
"#;

const SECRET: &[u8] = b"TOP-SECRET-pxed-must-never-serve-this";
const TOKEN: &str = "test-token-123";

/// A running server on 127.0.0.1 with a temporary boot root; shuts down when dropped.
struct Server {
    base: String,
    bus: EventBus,
    root: PathBuf,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn start() -> Server {
    start_with(Ipv4Addr::LOCALHOST, POLICY).await
}

/// A server whose scripts point clients at `url_ip` (the address the client reaches us on).
async fn start_with(url_ip: Ipv4Addr, policy_toml: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("linux")).unwrap();
    std::fs::write(dir.path().join("secret.txt"), SECRET).unwrap();
    std::fs::write(root.join("linux/vmlinuz"), b"kernel-bytes").unwrap();
    std::fs::write(root.join("linux/initrd.img"), b"initrd-bytes").unwrap();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg: PolicyConfig = toml::from_str(policy_toml).unwrap();
    let policy = Arc::new(RwLock::new(cfg.validate().unwrap()));
    let server = ServerAddrs {
        ip: url_ip,
        http_port: port,
    };
    let bus = EventBus::new();
    let config = HttpConfig {
        port,
        api_token: Some(TOKEN.into()),
        ..HttpConfig::default()
    };
    let state = HttpState::new(root.clone(), policy, server, bus.clone(), config);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        pxed::http::serve(listener, state, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Server {
        base: format!("http://127.0.0.1:{port}"),
        bus,
        root,
        dir,
        stop: Some(tx),
    }
}

/// One curl run: status, response headers (lower-cased names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Run curl with headers dumped to stderr and the body on stdout.
async fn curl(args: &[&str]) -> Reply {
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-S",
            "--max-time",
            "30",
            "-D",
            "/dev/stderr",
            "-o",
            "-",
        ])
        .args(args)
        .output()
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&out.stderr).into_owned();
    // The last header block (curl prints one per response; we never follow redirects).
    let block = head
        .split("\r\n\r\n")
        .filter(|b| b.starts_with("HTTP/"))
        .last()
        .unwrap_or_else(|| panic!("no HTTP response from curl {args:?}: {head}"));
    let mut lines = block.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: out.stdout,
    }
}

fn pattern(len: usize) -> Vec<u8> {
    // A sequence where every slice differs from its neighbours (xorshift).
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_head_and_content_types() {
    let s = start().await;
    let data = pattern(1 << 20);
    std::fs::write(s.root.join("snponly.efi"), &data).unwrap();
    std::fs::write(s.root.join("disk.iso"), b"iso").unwrap();
    std::fs::write(s.root.join("disk.img"), b"img").unwrap();
    let url = format!("{}/snponly.efi", s.base);

    let full = curl(&[&url]).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.body, data);
    assert_eq!(full.header("content-length"), Some("1048576"));
    assert_eq!(full.header("content-type"), Some("application/efi"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));

    let part = curl(&["-r", "1000-4999", &url]).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &data[1000..5000]);
    assert_eq!(
        part.header("content-range"),
        Some("bytes 1000-4999/1048576")
    );
    assert_eq!(part.header("content-length"), Some("4000"));

    let tail = curl(&["-r", "-100", &url]).await;
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &data[data.len() - 100..]);

    let open = curl(&["-r", "1048000-", &url]).await;
    assert_eq!(open.status, 206);
    assert_eq!(open.body, &data[1_048_000..]);

    let bad = curl(&["-r", "1048576-", &url]).await;
    assert_eq!(bad.status, 416);
    assert_eq!(bad.header("content-range"), Some("bytes */1048576"));
    assert!(bad.body.is_empty());

    let head = curl(&["-I", &url]).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1048576"));
    // With -I curl writes the header block to stdout: nothing else may follow it.
    assert!(head.text().starts_with("HTTP/1.1 200"), "{}", head.text());
    assert!(
        head.text().ends_with("\r\n\r\n") && head.body.len() < 1024,
        "{}",
        head.text()
    );

    for (file, ctype) in [
        ("disk.iso", "application/vnd.efi-iso"),
        ("disk.img", "application/vnd.efi-img"),
        ("linux/vmlinuz", "application/octet-stream"),
    ] {
        let r = curl(&["-I", &format!("{}/{file}", s.base)]).await;
        assert_eq!(r.header("content-type"), Some(ctype), "{file}");
    }

    // Directories are never listed.
    for dir in ["/linux", "/linux/"] {
        let r = curl(&[&format!("{}{dir}", s.base)]).await;
        assert_eq!(r.status, 404, "{dir}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_get() {
    let s = start().await;
    let url = format!("{}/linux/vmlinuz", s.base);
    let first = curl(&[&url]).await;
    assert_eq!(first.status, 200);
    let etag = first.header("etag").unwrap().to_string();
    let modified = first.header("last-modified").unwrap().to_string();

    let r = curl(&["-H", &format!("If-None-Match: {etag}"), &url]).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));

    let r = curl(&["-H", &format!("If-Modified-Since: {modified}"), &url]).await;
    assert_eq!(r.status, 304);

    let r = curl(&["-H", "If-None-Match: \"something-else\"", &url]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"kernel-bytes");

    let r = curl(&[
        "-H",
        "If-Modified-Since: Thu, 01 Jan 1998 00:00:00 GMT",
        &url,
    ])
    .await;
    assert_eq!(r.status, 200);

    // If-Range with a stale tag: the range is ignored, the whole file sent.
    let r = curl(&["-r", "0-1", "-H", "If-Range: \"stale\"", &url]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"kernel-bytes");
    let r = curl(&["-r", "0-1", "-H", &format!("If-Range: {etag}"), &url]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, b"ke");

    // Rewriting the file changes the validator.
    std::fs::write(s.root.join("linux/vmlinuz"), b"new-kernel-bytes!").unwrap();
    let r = curl(&["-H", &format!("If-None-Match: {etag}"), &url]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"new-kernel-bytes!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_corpus_never_leaks() {
    let s = start().await;
    let outside = s.dir.path();
    let secret = outside.join("secret.txt");
    std::os::unix::fs::symlink(&secret, s.root.join("link-secret")).unwrap();
    std::os::unix::fs::symlink(outside, s.root.join("link-out")).unwrap();
    std::os::unix::fs::symlink("../secret.txt", s.root.join("linux/rel-link")).unwrap();
    // A FIFO must not hang the request.
    let fifo = std::ffi::CString::new(s.root.join("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let abs = secret.to_str().unwrap().trim_start_matches('/').to_string();

    let mut corpus: Vec<String> = [
        "/../secret.txt",
        "/../../secret.txt",
        "/linux/../../secret.txt",
        "/./../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/%2e%2e%2Fsecret.txt",
        "/..%2fsecret.txt",
        "/..%2Fsecret.txt",
        "/.%2e/secret.txt",
        "/%2e./secret.txt",
        "/linux/%2e%2e/%2e%2e/secret.txt",
        "/linux%2f..%2f..%2fsecret.txt",
        "/%252e%252e/secret.txt",
        "/%252e%252e%252fsecret.txt",
        "/..%5csecret.txt",
        "/..%5Csecret.txt",
        "/%5c..%5csecret.txt",
        "/linux\\..\\..\\secret.txt",
        "/..\\secret.txt",
        "/secret.txt%00.efi",
        "/../secret.txt%00",
        "/%00../secret.txt",
        "/%c0%ae%c0%ae/secret.txt",
        "/%c0%ae%c0%ae%c0%afsecret.txt",
        "/%e0%80%ae%e0%80%ae/secret.txt",
        "/..;/secret.txt",
        "/....//secret.txt",
        "/...//secret.txt",
        "/..%00/secret.txt",
        "/%2e%2e%00/secret.txt",
        "/link-secret",
        "/link-out/secret.txt",
        "/link-out/root/linux/vmlinuz/../../../secret.txt",
        "/linux/rel-link",
        "/link-out/",
        "/link-out",
        "//secret.txt",
        "/%2fsecret.txt",
        "/%2f..%2fsecret.txt",
        "/ipxe/../../secret.txt",
        "/api/../../secret.txt",
        "/boot.ipxe/../../secret.txt",
        "/linux/vmlinuz/../../../secret.txt",
        "/%",
        "/%2",
        "/%zz/secret.txt",
        "/fifo",
        "/linux",
        "/.",
        "/..",
        "/%2e",
        "/%2e%2e",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    corpus.push(format!("//{abs}"));
    corpus.push(format!("/%2f{}", abs.replace('/', "%2f")));
    corpus.push(format!("/../../../../../../../../../../{abs}"));
    corpus.push(format!("/{}", "../".repeat(40) + &abs));
    corpus.push(format!("/{}", "%2e%2e/".repeat(40) + &abs));
    corpus.push(format!("/{}secret.txt", "a/".repeat(3000)));
    assert!(corpus.len() >= 50, "{}", corpus.len());

    for path in &corpus {
        let url = format!("{}{path}", s.base);
        for method in [&["--path-as-is"][..], &["--path-as-is", "-I"][..]] {
            let mut args: Vec<&str> = method.to_vec();
            args.push(&url);
            let r = curl(&args).await;
            assert!(
                !r.text().contains(std::str::from_utf8(SECRET).unwrap()),
                "{path} leaked the secret"
            );
            assert!(
                matches!(r.status, 400 | 404),
                "{path}: status {} (expected 400 or 404)",
                r.status
            );
        }
    }
    // The server still serves real files afterwards.
    let r = curl(&[&format!("{}/linux/vmlinuz", s.base)]).await;
    assert_eq!(r.body, b"kernel-bytes");
}

fn timeline_stages(bus: &EventBus, mac: &MacAddr) -> Vec<BootStage> {
    bus.timeline(mac).into_iter().map(|e| e.stage).collect()
}

/// The machine's stages once `n` are recorded (or what there is after 10 s). A download's
/// completion is published after its last byte left, so curl can have read it all and
/// exited a moment before.
async fn timeline_stages_once(bus: &EventBus, mac: &MacAddr, n: usize) -> Vec<BootStage> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stages = timeline_stages(bus, mac);
        if stages.len() >= n || Instant::now() > deadline {
            return stages;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipxe_scripts_for_bios_uefi_and_arm64() {
    let s = start().await;
    let entry = curl(&[&format!("{}/boot.ipxe", s.base)]).await;
    assert_eq!(entry.status, 200);
    let text = entry.text();
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    assert!(
        text.contains(&format!(
            "chain {}/ipxe/script?mac=${{netX/mac:hexhyp}}&uuid=${{uuid}}&buildarch=${{buildarch}}&platform=${{platform}}&busid=${{netX/busid}} || goto failed",
            s.base
        )),
        "{text}"
    );

    // The first is a PCnet NIC, which would get its kernel by TFTP, but this server runs no
    // TFTP: it gets HTTP like the others.
    let cases = [
        (
            "52-54-00-00-00-01",
            "pcbios",
            "i386",
            false,
            "01:10:22:20:00",
        ),
        ("52-54-00-00-00-02", "efi", "x86_64", true, "01:80:86:10:0e"),
        ("52-54-00-00-00-03", "efi", "arm64", true, ""),
    ];
    for (mac, platform, buildarch, uefi, busid) in cases {
        let url = format!(
            "{}/ipxe/script?mac={mac}&uuid=8a3b1c2d-0000-4000-8000-0123456789ab&buildarch={buildarch}&platform={platform}&busid={busid}",
            s.base
        );
        let r = curl(&[&url]).await;
        assert_eq!(r.status, 200);
        let script = r.text();
        let kernel = script
            .lines()
            .find(|l| l.starts_with("kernel "))
            .unwrap_or_else(|| panic!("{script}"));
        let kernel_url = format!("{}/linux/vmlinuz?mac={mac}&kind=kernel", s.base);
        assert!(
            kernel.starts_with(&format!("kernel {kernel_url} console=ttyS0")),
            "{script}"
        );
        assert_eq!(
            kernel.contains("initrd=initrd.img"),
            uefi,
            "{platform}/{buildarch}: {script}"
        );
        let initrd_url = format!("{}/linux/initrd.img?mac={mac}&kind=initrd", s.base);
        assert!(
            script.contains(&format!(
                "initrd --name initrd.img {initrd_url} || goto failed"
            )),
            "{script}"
        );

        // Follow the script the way iPXE would: the files come back and are classified.
        let m: MacAddr = mac.parse().unwrap();
        assert_eq!(curl(&[&kernel_url]).await.body, b"kernel-bytes");
        // iPXE asks for the initrd long after the kernel's completion is recorded; curl can
        // be quicker than that, and the order is what this checks.
        timeline_stages_once(&s.bus, &m, 3).await;
        assert_eq!(curl(&[&initrd_url]).await.body, b"initrd-bytes");
        assert_eq!(
            timeline_stages_once(&s.bus, &m, 5).await,
            vec![
                BootStage::HttpScript,
                BootStage::HttpKernel,
                BootStage::HttpComplete,
                BootStage::HttpInitrd,
                BootStage::HttpComplete
            ],
            "{mac}"
        );
        let script_event = &s.bus.timeline(&m)[0];
        assert!(
            script_event.detail.starts_with("profile default"),
            "{}",
            script_event.detail
        );
    }

    // A menu machine may pick its menu's entries, and nothing else.
    let menu = curl(&[&format!(
        "{}/ipxe/script?mac=52-54-00-99-00-01&uuid=&buildarch=x86_64&platform=efi",
        s.base
    )])
    .await;
    assert!(
        menu.text().contains("\nitem p0 Linux\nitem p1 Disk\n"),
        "{}",
        menu.text()
    );
    let pick = curl(&[&format!(
        "{}/ipxe/script?mac=52-54-00-99-00-01&profile=disk&buildarch=x86_64&platform=efi",
        s.base
    )])
    .await;
    assert_eq!(pick.status, 200);
    assert!(pick.text().contains("exit 0"), "{}", pick.text());
    let other = curl(&[&format!(
        "{}/ipxe/script?mac=52-54-00-00-00-01&profile=disk&buildarch=x86_64&platform=efi",
        s.base
    )])
    .await;
    assert_eq!(other.status, 403);
    assert!(
        other.text().starts_with("#!ipxe\necho pxed:"),
        "{}",
        other.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_home_events_sse_metrics_and_token() {
    let s = start().await;

    // Subscribe to the live stream first.
    let mut sse = tokio::process::Command::new("curl")
        .args(["-s", "-N", &format!("{}/api/events", s.base)])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut sse_out = sse.stdout.take().unwrap();

    // busybox wget, as a booted test OS would phone home.
    let mac = "52:54:00:aa:bb:01";
    let url = format!("{}/api/phone-home", s.base);
    let status = tokio::process::Command::new("busybox")
        .args([
            "wget",
            "-q",
            "-O",
            "/dev/null",
            "--post-data",
            &format!("mac={mac}&stage=os.userspace"),
            &url,
        ])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let r = curl(&[&format!("{url}?mac={mac}&stage=install.done&detail=ok")]).await;
    assert_eq!(r.status, 200);
    let r = curl(&["-d", "mac=52:54:00:aa:bb:01&stage=bad stage!", &url]).await;
    assert_eq!(r.status, 400);

    let machines = curl(&[&format!("{}/api/machines", s.base)]).await;
    let list: serde_json::Value = serde_json::from_slice(&machines.body).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mac"] == mac)
        .unwrap_or_else(|| panic!("{list}"));
    let stages: Vec<&str> = entry["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["os.userspace", "os.custom"]);
    assert_eq!(
        entry["events"][1]["detail"]
            .as_str()
            .unwrap()
            .split(':')
            .next(),
        Some("install.done")
    );
    let one = curl(&[&format!("{}/api/machines/{mac}", s.base)]).await;
    assert_eq!(one.status, 200);
    assert_eq!(
        curl(&[&format!("{}/api/machines/02:00:00:00:00:00", s.base)])
            .await
            .status,
        404
    );

    // The SSE stream delivers an event. The subscription may not be live yet when we start,
    // so keep publishing until one arrives (deadline 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    let marker = "sse-probe";
    let mut buf = [0u8; 4096];
    'outer: loop {
        assert!(
            Instant::now() < deadline,
            "no SSE event: {}",
            String::from_utf8_lossy(&seen)
        );
        let r = curl(&[&format!("{url}?mac=52:54:00:aa:bb:02&stage={marker}")]).await;
        assert_eq!(r.status, 200);
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(n)) = tokio::time::timeout_at(until.into(), sse_out.read(&mut buf)).await {
            assert!(n > 0, "SSE stream closed");
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(marker) {
                break 'outer;
            }
        }
    }
    let text = String::from_utf8_lossy(&seen);
    let data_line = text
        .lines()
        .find(|l| l.starts_with("data:") && l.contains(marker))
        .unwrap();
    let ev: BootEvent = serde_json::from_str(data_line.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(ev.stage, BootStage::OsCustom);
    assert!(text.contains("event: boot"), "{text}");
    drop(sse);

    // Mutating API: token required.
    let ev = r#"{"mac":"52:54:00:aa:bb:03","stage":"os.kernel","detail":"serial banner"}"#;
    let events_url = format!("{}/api/events", s.base);
    let r = curl(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        ev,
        &events_url,
    ])
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = curl(&["-H", "Authorization: Bearer wrong", "-d", ev, &events_url]).await;
    assert_eq!(r.status, 401);
    let auth = format!("Authorization: Bearer {TOKEN}");
    let r = curl(&["-H", &auth, "-d", ev, &events_url]).await;
    assert_eq!(r.status, 204);
    let m: MacAddr = "52:54:00:aa:bb:03".parse().unwrap();
    assert_eq!(timeline_stages(&s.bus, &m), vec![BootStage::OsKernel]);

    // Metrics parse as Prometheus/OpenMetrics text and count what happened.
    let r = curl(&[&format!("{}/metrics", s.base)]).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
    let mut samples = std::collections::HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(name.to_string(), v);
    }
    assert!(
        samples.get("pxed_boot_events_total{stage=\"os.userspace\"}") >= Some(&1.0),
        "{text}"
    );
    assert!(
        samples.get("pxed_http_requests_total{route=\"/api/phone-home\",status=\"200\"}")
            >= Some(&2.0),
        "{text}"
    );
    assert!(
        samples.get("pxed_http_requests_total{route=\"/api/events\",status=\"401\"}") == Some(&2.0),
        "{text}"
    );

    // The dashboard is one page with no external resources.
    let r = curl(&[&format!("{}/", s.base)]).await;
    assert_eq!(r.status, 200);
    let page = r.text();
    assert!(page.contains("new EventSource(\"/api/events\")"));
    assert!(!page.contains("http://") && !page.contains("https://"));
}

/// Read a field of /proc/self/status in KiB.
fn proc_status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sparse_file_is_streamed() {
    const SIZE: u64 = 3 << 30;
    let s = start().await;
    let path = s.root.join("big.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    let tail = b"the-end-of-a-3-GiB-file";
    std::os::unix::fs::FileExt::write_at(&f, tail, SIZE - tail.len() as u64).unwrap();
    drop(f);
    let url = format!("{}/big.img", s.base);

    let head = curl(&["-I", &url]).await;
    assert_eq!(
        head.header("content-length"),
        Some(SIZE.to_string().as_str())
    );

    let started = Instant::now();
    let r = curl(&["-r", &format!("{}-", SIZE - tail.len() as u64), &url]).await;
    let range_time = started.elapsed();
    assert_eq!(r.status, 206);
    assert_eq!(r.body, tail);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {}-{}/{SIZE}", SIZE - tail.len() as u64, SIZE - 1).as_str())
    );

    // A full download of 1 GiB must not grow this process (the server) by anything like its
    // size: the peak resident set stays within 256 MiB of where it started.
    let gib = s.root.join("one.img");
    std::fs::File::create(&gib)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let before = proc_status_kib("VmHWM:");
    let started = Instant::now();
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .arg(format!("{}/one.img", s.base))
        .output()
        .await
        .unwrap();
    let full_time = started.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {}", 1u64 << 30)
    );
    let grown_kib = proc_status_kib("VmHWM:").saturating_sub(before);
    assert!(grown_kib < 256 * 1024, "peak RSS grew by {grown_kib} KiB");
    eprintln!(
        "range at 3 GiB: {range_time:?}; 1 GiB full download: {full_time:?} ({:.0} MB/s); peak RSS growth {grown_kib} KiB",
        (1u64 << 30) as f64 / 1e6 / full_time.as_secs_f64()
    );
}

/// Responses read off one connection: status, body.
fn split_responses(mut raw: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad head {head}"));
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        let body_end = (end + 4 + len).min(raw.len());
        out.push((status, raw[end + 4..body_end].to_vec()));
        raw = &raw[body_end..];
    }
    out
}

/// Asset requests are answered with sendfile, outside hyper. On the same keep-alive connection
/// a request for the router (the entry script) hands the connection to hyper together with the
/// pipelined bytes already read, and hyper serves what follows, assets included. curl, a real
/// client, reuses one connection across both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keep_alive_connection_mixes_sendfile_and_router() {
    use tokio::io::AsyncWriteExt;
    let s = start().await;
    let mut conn = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let pipelined = "GET /linux/vmlinuz HTTP/1.1\r\nHost: t\r\n\r\n\
                     GET /linux/initrd.img HTTP/1.1\r\nHost: t\r\nRange: bytes=0-5\r\n\r\n\
                     GET /boot.ipxe HTTP/1.1\r\nHost: t\r\n\r\n\
                     GET /linux/vmlinuz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    conn.write_all(pipelined.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut raw))
        .await
        .expect("the server closes after `Connection: close`")
        .unwrap();
    let replies = split_responses(&raw);
    assert_eq!(replies.len(), 4, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(replies[0], (200, b"kernel-bytes".to_vec()));
    assert_eq!(replies[1], (206, b"initrd".to_vec()));
    assert_eq!(replies[2].0, 200);
    assert!(replies[2].1.starts_with(b"#!ipxe"), "{:?}", replies[2]);
    assert_eq!(replies[3], (200, b"kernel-bytes".to_vec()));

    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code} %{num_connects}\n"])
        .arg(format!("{}/linux/vmlinuz", s.base))
        .arg(format!("{}/api/machines", s.base))
        .arg(format!("{}/linux/initrd.img", s.base))
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 1\n200 0\n200 0\n",
        "three answers over one connection"
    );
}

/// A file cut short while it is being sent ends that response early (the client gets fewer
/// bytes than Content-Length promised, then the connection closes), never the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cut_while_served_ends_the_response_not_the_server() {
    use tokio::io::AsyncWriteExt;
    const SIZE: u64 = 256 << 20;
    let s = start().await;
    let path = s.root.join("shrinks.img");
    std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    let mut conn = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    conn.write_all(b"GET /shrinks.img HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // The head leaves with the first body bytes: once it is here, sending has begun, and 256
    // MiB do not fit in the socket buffers of an unread connection.
    let mut first = vec![0u8; 4096];
    let n = conn.read(&mut first).await.unwrap();
    let head = String::from_utf8_lossy(&first[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {SIZE}")), "{head}");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut rest))
        .await
        .expect("the server ends the response")
        .unwrap();
    let got = (n + rest.len()) as u64;
    assert!(got < SIZE, "got {got} bytes of a file cut to 0");
    // The server goes on.
    assert_eq!(
        curl(&[&format!("{}/linux/vmlinuz", s.base)]).await.body,
        b"kernel-bytes"
    );
}

/// Kills QEMU when the test ends, passed or not.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real iPXE boots from pxed: DHCP from QEMU's user network hands it `boot.ipxe`, whose
/// settings (`${netX/mac:hexhyp}`, `${uuid}`, `${platform}`, `${buildarch}`) must expand so that
/// pxed recognises the machine, and the rendered script must parse far enough to download the
/// kernel and the named initrd. The "kernel" is the iPXE image itself, which iPXE accepts.
async fn ipxe_boot(mac: &str, firmware: &[&str], ipxe_image: &str, arch_text: &str) {
    const UUID: &str = "8a3b1c2d-5e6f-4a7b-8c9d-0123456789ab";
    let file = Path::new(ipxe_image).file_name().unwrap().to_str().unwrap();
    // Only the machine with this SMBIOS UUID gets the kernel: proves `${uuid}` reaches pxed
    // in the form policy matches on.
    let policy = format!(
        r#"
[[profile]]
name = "netboot"
kernel = "bin/{file}"
initrd = ["bin/extra.cpio"]
cmdline = "console=ttyS0"

[[profile]]
name = "default"
local = true

[[group]]
name = "by-uuid"
profile = "netboot"
match = {{ uuid = ["{UUID}"] }}
"#
    );
    // QEMU's user network puts the host's loopback at 10.0.2.2 for the guest.
    let s = start_with(Ipv4Addr::new(10, 0, 2, 2), &policy).await;
    std::fs::create_dir_all(s.root.join("bin")).unwrap();
    std::fs::copy(ipxe_image, s.root.join("bin").join(file)).unwrap();
    std::fs::write(s.root.join("bin/extra.cpio"), pattern(4096)).unwrap();
    let port = s.base.rsplit(':').next().unwrap().to_string();

    let child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "none", "-monitor", "none", "-nodefaults"])
        .args(firmware)
        .args(["-kernel", ipxe_image, "-uuid", UUID])
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,ipv6=off,bootfile=http://10.0.2.2:{port}/boot.ipxe"
        ))
        .args(["-device", &format!("e1000,netdev=n0,mac={mac},romfile=")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let _qemu = Qemu(child);

    let m: MacAddr = mac.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !timeline_stages(&s.bus, &m).contains(&BootStage::HttpInitrd) {
        assert!(
            Instant::now() < deadline,
            "iPXE did not fetch the initrd; events so far: {:?}",
            s.bus
                .machines()
                .iter()
                .map(|m| s.bus.timeline(m))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let timeline = s.bus.timeline(&m);
    let stages: Vec<BootStage> = timeline.iter().map(|e| e.stage).take(4).collect();
    assert_eq!(
        stages,
        [
            BootStage::HttpScript,
            BootStage::HttpKernel,
            BootStage::HttpComplete,
            BootStage::HttpInitrd
        ]
    );
    // Starts are what the rest checks; each transfer's completion follows it.
    let timeline: Vec<BootEvent> = timeline
        .into_iter()
        .filter(|e| e.stage != BootStage::HttpComplete)
        .collect();
    let script = &timeline[0].detail;
    assert!(script.contains(arch_text), "{script}");
    assert!(
        script.starts_with("profile netboot (group `by-uuid`"),
        "{script}"
    );
    assert!(
        timeline[1].detail.starts_with(&format!("/bin/{file}")),
        "{}",
        timeline[1].detail
    );
    assert!(
        timeline[2]
            .detail
            .starts_with("/bin/extra.cpio (4096 bytes)"),
        "{}",
        timeline[2].detail
    );
}

/// Debian's ipxe.lkrn under SeaBIOS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ipxe_bios_follows_the_scripts() {
    ipxe_boot(
        "52:54:00:12:34:77",
        &[],
        "/usr/lib/ipxe/ipxe.lkrn",
        "x86 BIOS",
    )
    .await;
}

/// Debian's ipxe.efi under OVMF (x64 UEFI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ipxe_uefi_follows_the_scripts() {
    let vars = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars.path()).unwrap();
    let code = "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd".to_string();
    let var = format!("if=pflash,format=raw,file={}", vars.path().display());
    ipxe_boot(
        "52:54:00:12:34:78",
        &["-drive", &code, "-drive", &var],
        "/usr/lib/ipxe/ipxe.efi",
        "x64 UEFI",
    )
    .await;
}

/// Shutdown ends open event streams at once, so `serve` returns promptly even with a dashboard
/// connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_event_streams() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = ServerAddrs {
        ip: Ipv4Addr::LOCALHOST,
        http_port: port,
    };
    let state = HttpState::new(
        dir.path().to_path_buf(),
        Arc::default(),
        server,
        EventBus::new(),
        HttpConfig::default(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(pxed::http::serve(listener, state, async {
        let _ = rx.await;
    }));
    let mut sse = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-N",
            "-D",
            "-",
            &format!("http://127.0.0.1:{port}/api/events"),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until the stream is open (its response headers arrive).
    let mut out = sse.stdout.take().unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), out.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), serving)
        .await
        .expect("serve did not return after shutdown")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < pxed::http::server::SHUTDOWN_GRACE);
    let status = tokio::time::timeout(Duration::from_secs(3), sse.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "curl saw the stream end cleanly: {status}"
    );
}

// ---- Templates, per-boot tokens, one-shot profiles, HTTPS, connection caps ----

const INSTALL_POLICY: &str = r#"
[[profile]]
name = "install"
kernel = "linux/vmlinuz"
cmdline = "auto url={{ templates_url }}preseed.cfg ds=nocloud;s={{ templates_url }}cloud/ pxed.phone={{ phone_home_url }}"
one_shot = "os.installed"

[[group]]
name = "lab"
profile = "install"
match = { mac = ["52:54:00"] }

[[machine]]
mac = "52:54:00:aa:00:01"
hostname = "web1"
labels = ["rack1", "ssd"]
"#;

const MAC_A: &str = "52:54:00:aa:00:01";
const MAC_B: &str = "52:54:00:aa:00:02";

/// A server with a persistent state directory, `require_token`, and 127.0.0.1 known as MAC_A
/// (as a lease or ARP entry would say).
async fn start_stateful(state_dir: &Path, root_dir: &Path) -> (String, EventBus, Server2) {
    let root = root_dir.to_path_buf();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let cfg: PolicyConfig = toml::from_str(INSTALL_POLICY).unwrap();
    let policy = Arc::new(RwLock::new(cfg.validate().unwrap()));
    let server = ServerAddrs {
        ip: Ipv4Addr::LOCALHOST,
        http_port: port,
    };
    let bus = EventBus::new();
    let config = HttpConfig {
        port,
        api_token: Some(TOKEN.into()),
        require_token: true,
        ..HttpConfig::default()
    };
    let a: MacAddr = MAC_A.parse().unwrap();
    let store = pxed::http::FileBootStates::open(&state_dir.join("boot-state.json")).unwrap();
    let secret = pxed::http::Secret::load_or_create(&state_dir.join("http-secret")).unwrap();
    let state = HttpState::new(root, policy, server, bus.clone(), config)
        .with_mac_lookup(Arc::new(move |ip| {
            (ip == std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)).then_some(a)
        }))
        .with_boot_states(Arc::new(store))
        .with_secret(secret);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        pxed::http::serve(listener, state, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (
        format!("http://127.0.0.1:{port}"),
        bus,
        Server2 {
            stop: Some(tx),
            task: Some(task),
        },
    )
}

/// Stops a server on drop, or on [`Server2::stop`] (which waits until it is gone).
struct Server2 {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server2 {
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

impl Drop for Server2 {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn install_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("linux")).unwrap();
    std::fs::create_dir_all(root.join("templates/cloud")).unwrap();
    std::fs::write(root.join("linux/vmlinuz"), b"kernel-bytes").unwrap();
    std::fs::write(
        root.join("templates/preseed.cfg"),
        "d-i netcfg/get_hostname string {{ hostname }}\n\
         d-i preseed/late_command string wget -q -O- '{{ phone_home_url }}&stage=os.installed'\n\
         # {{ mac }} {{ labels | join(',') }} {{ profile }} & <not escaped>\n",
    )
    .unwrap();
    std::fs::write(
        root.join("templates/cloud/user-data"),
        "#cloud-config\nhostname: {{ hostname }}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("templates/cloud/meta-data"),
        "instance-id: {{ mac_hyphen }}\nlocal-ipv4: {{ ip }}\nsmbios-uuid: {{ uuid }}\n",
    )
    .unwrap();
    std::fs::write(
        root.join("templates/broken.cfg"),
        "fine line\n{{ hostnme }}\n",
    )
    .unwrap();
    dir
}

/// The value of `key=` on the kernel line of a script.
fn kernel_arg(script: &str, key: &str) -> String {
    let line = script
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("no kernel line: {script}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .to_string()
}

/// `token` with its last character replaced by a different hex digit.
fn altered_last_digit(token: &str) -> String {
    let (head, last) = token.split_at(token.len() - 1);
    format!("{head}{}", if last == "0" { '1' } else { '0' })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_tokens_and_one_shot_install() {
    let state_dir = tempfile::tempdir().unwrap();
    let root = install_root();
    let (base, bus, server) = start_stateful(state_dir.path(), root.path()).await;
    let a: MacAddr = MAC_A.parse().unwrap();
    let script_url =
        |mac: &str| format!("{base}/ipxe/script?mac={mac}&platform=pcbios&buildarch=i386");

    // Another machine's MAC from this IP: no script, no token.
    let r = curl(&[&script_url(MAC_B)]).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("not 52:54:00:aa:00:02"), "{}", r.text());

    // Our own: the installer, with the command line rendered from the facts. iPXE fills in
    // `${uuid}`; the template requests carry no UUID, pxed remembers it from here.
    let r = curl(&[&format!(
        "{}&uuid=8A3B1C2D-0000-4000-8000-0123456789AB",
        script_url(MAC_A)
    )])
    .await;
    assert_eq!(r.status, 200);
    let script = r.text();
    let preseed = kernel_arg(&script, "url=");
    let seed = kernel_arg(&script, "ds=nocloud;s=");
    let phone = kernel_arg(&script, "pxed.phone=");
    assert!(
        preseed.starts_with(&format!("{base}/m/52-54-00-aa-00-01/install/")),
        "{preseed}"
    );
    assert!(seed.ends_with("/cloud/"), "{seed}");

    // The installer's view: curl and busybox wget fetch the rendered files.
    let r = curl(&[&preseed]).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("get_hostname string web1\n"), "{text}");
    assert!(
        text.contains(&format!("wget -q -O- '{phone}&stage=os.installed'")),
        "{text}"
    );
    assert!(
        text.contains("# 52:54:00:aa:00:01 rack1,ssd install & <not escaped>\n"),
        "{text}"
    );
    let out = tokio::process::Command::new("busybox")
        .args(["wget", "-q", "-O", "-", &format!("{seed}meta-data")])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "instance-id: 52-54-00-aa-00-01\nlocal-ipv4: 127.0.0.1\n\
         smbios-uuid: 8a3b1c2d-0000-4000-8000-0123456789ab\n"
    );
    assert_eq!(
        curl(&[&format!("{seed}user-data")]).await.text(),
        "#cloud-config\nhostname: web1\n"
    );

    // A token is bound to its MAC and profile, and cannot be altered.
    let token = preseed.split('/').nth_back(1).unwrap().to_string();
    for bad in [
        preseed.replace("52-54-00-aa-00-01", "52-54-00-aa-00-02"),
        preseed.replace("/install/", "/other/"),
        // The last hex digit changed (to '1' if it was '0'; any fixed digit would
        // leave one token in sixteen unaltered).
        preseed.replace(&token, &altered_last_digit(&token)),
    ] {
        assert_eq!(curl(&[&bad]).await.status, 403, "{bad}");
    }
    // Raw templates are never served.
    assert_eq!(
        curl(&[&format!("{base}/templates/preseed.cfg")])
            .await
            .status,
        404
    );

    // A broken template: name and line, a 500, an event, and the server carries on.
    let broken = preseed.replace("preseed.cfg", "broken.cfg");
    let r = curl(&[&broken]).await;
    assert_eq!(r.status, 500);
    assert!(
        r.text()
            .starts_with("template `broken.cfg` line 2: undefined value"),
        "{}",
        r.text()
    );
    assert!(
        bus.timeline(&a)
            .iter()
            .any(|e| e.stage == BootStage::HttpError
                && e.detail.contains("template `broken.cfg` line 2"))
    );
    assert_eq!(
        curl(&[&preseed.replace("preseed.cfg", "missing")])
            .await
            .status,
        404
    );
    assert_eq!(curl(&[&preseed]).await.status, 200);

    // Phone-home needs the token; with it, the one-shot stage is stored.
    let r = curl(&[&format!(
        "{base}/api/phone-home?mac={MAC_A}&stage=os.installed"
    )])
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = curl(&[&format!("{phone}&stage=os.userspace")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"one_shot_done\":false"), "{}", r.text());
    // The installer reports as the preseed says, with busybox wget.
    let out = tokio::process::Command::new("busybox")
        .args([
            "wget",
            "-q",
            "-O",
            "-",
            &format!("{phone}&stage=os.installed"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"one_shot_done\":true"),
        "{out:?}"
    );

    // Restart: the state and the secret come back from the state directory.
    server.stop().await;
    let (base, _bus, server) = start_stateful(state_dir.path(), root.path()).await;
    let script_url =
        |mac: &str| format!("{base}/ipxe/script?mac={mac}&platform=pcbios&buildarch=i386");
    let r = curl(&[&script_url(MAC_A)]).await;
    assert!(
        r.text()
            .contains("echo pxed: booting from the next device\nexit 0\n"),
        "{}",
        r.text()
    );
    assert!(
        r.text().contains("one-shot, done (os.installed"),
        "{}",
        r.text()
    );
    // The old boot's URLs still verify after the restart (same secret).
    let old = preseed.replace(&preseed[..preseed.find("/m/").unwrap()], &base);
    assert_eq!(curl(&[&old]).await.status, 200, "{old}");
    let st = curl(&[&format!("{base}/api/machines/{MAC_A}/state")]).await;
    assert_eq!(st.text(), r#"{"reached":["os.installed"]}"#);

    // Re-install: clearing needs the API token; then the installer is back.
    let url = format!("{base}/api/machines/{MAC_A}/state");
    assert_eq!(curl(&["-X", "DELETE", &url]).await.status, 401);
    let auth = format!("Authorization: Bearer {TOKEN}");
    let r = curl(&["-X", "DELETE", "-H", &auth, &url]).await;
    assert_eq!(r.text(), r#"{"cleared":true}"#);
    assert!(
        curl(&[&script_url(MAC_A)])
            .await
            .text()
            .contains("\nkernel ")
    );
    server.stop().await;
}

/// Serve `root` with the default policy and `config` (its port filled in) on `bind`, for the
/// connection-limit tests: the port, the server's connection counters, and the sender whose
/// drop stops it.
async fn serve_limited(
    root: &Path,
    bind: Ipv4Addr,
    config: HttpConfig,
) -> (
    u16,
    pxed::http::limits::ConnLimits,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = tokio::net::TcpListener::bind((bind, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = HttpConfig { port, ..config };
    let policy = Arc::new(RwLock::new(PolicyConfig::default().validate().unwrap()));
    let server = ServerAddrs {
        ip: Ipv4Addr::LOCALHOST,
        http_port: port,
    };
    let state = HttpState::new(root.into(), policy, server, EventBus::new(), config);
    let limits = state.limits.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(pxed::http::serve(listener, state, async {
        let _ = rx.await;
    }));
    (port, limits, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_per_ip_and_global() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"file").unwrap();
    let config = HttpConfig {
        max_connections: 3,
        max_connections_per_ip: 2,
        ..HttpConfig::default()
    };
    let (port, limits, _stop) = serve_limited(dir.path(), Ipv4Addr::UNSPECIFIED, config).await;
    let url = |ip: &str| format!("http://{ip}:{port}/f");
    let hold = |src: Ipv4Addr| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((src, 0).into()).unwrap();
        sock.connect((Ipv4Addr::LOCALHOST, port).into())
            .await
            .unwrap()
    };
    let wait_open = |n: usize| {
        let limits = limits.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while limits.open() != n {
                assert!(Instant::now() < deadline, "open {} != {n}", limits.open());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    // Two idle connections from 127.0.0.1 use up its share: curl from there gets a 503.
    let h1 = hold(Ipv4Addr::LOCALHOST).await;
    let _h2 = hold(Ipv4Addr::LOCALHOST).await;
    wait_open(2).await;
    let r = curl(&["--interface", "127.0.0.1", &url("127.0.0.1")]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another client IP still gets through, and then the global cap of 3 is reached.
    let r = curl(&["--interface", "127.0.0.2", &url("127.0.0.1")]).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"file"[..]));
    // curl has gone: its connection closes on the server side too.
    wait_open(2).await;
    let _h3 = hold(Ipv4Addr::new(127, 0, 0, 2)).await;
    wait_open(3).await;
    let r = curl(&["--interface", "127.0.0.3", &url("127.0.0.1")]).await;
    assert_eq!(r.status, 503);
    // A closed connection frees its place.
    drop(h1);
    wait_open(2).await;
    let r = curl(&["--interface", "127.0.0.1", &url("127.0.0.1")]).await;
    assert_eq!(r.status, 200);
}

/// A client that stops reading a download is disconnected after `send_timeout_secs`, on the
/// sendfile path (an asset request first on its connection) and on hyper's (an asset request
/// after an API request), and its place under the per-IP cap is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_frees_its_place() {
    const SIZE: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    // Sparse: a GiB that costs no disk, far more than any socket buffers hold.
    std::fs::File::create(dir.path().join("big"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    std::fs::write(dir.path().join("f"), b"file").unwrap();
    let config = HttpConfig {
        max_connections_per_ip: 1,
        // Long enough for curl to start and be refused on a busy machine while the stalled
        // download holds the place.
        send_timeout_secs: 3,
        ..HttpConfig::default()
    };
    let (port, limits, _stop) = serve_limited(dir.path(), Ipv4Addr::LOCALHOST, config).await;
    let url = format!("http://127.0.0.1:{port}/f");

    for (path, requests) in [
        (
            "sendfile",
            "GET /big HTTP/1.1\r\nHost: pxed\r\n\r\n".to_string(),
        ),
        (
            "hyper",
            "GET /metrics HTTP/1.1\r\nHost: pxed\r\n\r\nGET /big HTTP/1.1\r\nHost: pxed\r\n\r\n"
                .to_string(),
        ),
    ] {
        // The previous pass's curl may still hold the place until the server sees it close.
        let deadline = Instant::now() + Duration::from_secs(5);
        while limits.open() != 0 {
            assert!(
                Instant::now() < deadline,
                "{path}: a connection is still open"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        // A small receive buffer, so the server's writes wait soon.
        sock.set_recv_buffer_size(64 << 10).unwrap();
        let mut conn = sock
            .connect((Ipv4Addr::LOCALHOST, port).into())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut conn, requests.as_bytes())
            .await
            .unwrap();
        let asked = Instant::now();
        // The one place this IP has is taken while the download waits for us.
        let deadline = Instant::now() + Duration::from_secs(5);
        while limits.open() != 1 {
            assert!(
                Instant::now() < deadline,
                "{path}: connection never counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(curl(&[&url]).await.status, 503, "{path}");
        // We read nothing: after the send timeout pxed closes the connection.
        let deadline = asked + Duration::from_secs(30);
        while limits.open() != 0 {
            assert!(
                Instant::now() < deadline,
                "{path}: a client that reads nothing still holds its connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Not before the timeout: the server's writes began waiting after the request.
        assert!(asked.elapsed() >= Duration::from_secs(3), "{path}");
        let r = curl(&[&url]).await;
        assert_eq!((r.status, r.body.as_slice()), (200, &b"file"[..]), "{path}");
        // What did arrive ends short of the file: the response was cut, not finished.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
        assert!(
            (got.len() as u64) < SIZE / 2,
            "{path}: {} bytes arrived",
            got.len()
        );
        assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_api_not_the_assets() {
    let s = start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=pxed-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let tls = pxed::http::tls::server_config(&cert, &key).unwrap();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let policy: PolicyConfig = toml::from_str(POLICY).unwrap();
    let state = HttpState::new(
        s.root.clone(),
        Arc::new(RwLock::new(policy.validate().unwrap())),
        ServerAddrs {
            ip: Ipv4Addr::LOCALHOST,
            http_port: port,
        },
        s.bus.clone(),
        HttpConfig {
            api_token: Some(TOKEN.into()),
            ..HttpConfig::default()
        },
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(pxed::http::server::serve_tls(listener, state, tls, async {
        let _ = rx.await;
    }));
    let _stop = tx;
    let https = format!("https://127.0.0.1:{port}");
    let ca = cert.to_str().unwrap();

    // Without our CA curl refuses the certificate (exit 60): it is really TLS.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", &format!("{https}/api/machines")])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(60), "{out:?}");

    let r = curl(&["--cacert", ca, &format!("{https}/")]).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("<html"), "{}", r.text());
    let r = curl(&[
        "--cacert",
        ca,
        &format!("{https}/api/phone-home?mac=52:54:00:00:00:42&stage=os.userspace"),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mac: MacAddr = "52:54:00:00:00:42".parse().unwrap();
    assert_eq!(timeline_stages(&s.bus, &mac), vec![BootStage::OsUserspace]);
    let r = curl(&["--cacert", ca, &format!("{https}/api/machines")]).await;
    assert!(r.text().contains("52:54:00:00:00:42"), "{}", r.text());
    // Boot assets and scripts are plain HTTP only.
    assert_eq!(
        curl(&["--cacert", ca, &format!("{https}/linux/vmlinuz")])
            .await
            .status,
        404
    );
    assert_eq!(
        curl(&["--cacert", ca, &format!("{https}/boot.ipxe")])
            .await
            .status,
        404
    );
    // curl asks for HTTP/2 by ALPN and gets HTTP/1.1, which is all pxed speaks.
    let r = curl(&["--cacert", ca, "--http2", &format!("{https}/metrics")]).await;
    assert_eq!(r.status, 200);
}

/// iPXE's `sanboot` reads a disk image in ranges at arbitrary offsets. A 6 GiB sparse image
/// with a marker at each interesting offset (below and across 2 GiB and 4 GiB, where 32-bit
/// arithmetic breaks, and the last bytes) must come back exactly, also for ranges that span
/// a marker and a hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sanboot_ranges_on_a_multi_gib_image() {
    const SIZE: u64 = 6 << 30;
    let s = start().await;
    let path = s.root.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    let offsets = [
        0u64,
        512,
        (1 << 31) - 7,
        1 << 31,
        (1 << 32) - 100,
        (1 << 32) + 4096,
        (5 << 30) + 12345,
        SIZE - 64,
    ];
    for (i, off) in offsets.iter().enumerate() {
        let mark = format!("<{i}@{off}>").repeat(16);
        std::os::unix::fs::FileExt::write_at(&f, &mark.as_bytes()[..64], *off).unwrap();
    }
    drop(f);
    let url = format!("{}/disk.img", s.base);
    let mut file = std::fs::File::open(&path).unwrap();
    for off in offsets {
        // A sector-aligned read around the marker (as iPXE's block reads are), 64 KiB long,
        // clipped at the end.
        let start = (off / 512) * 512;
        let end = (start + 65535).min(SIZE - 1);
        let r = curl(&["-r", &format!("{start}-{end}"), &url]).await;
        assert_eq!(r.status, 206, "range at {start}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/{SIZE}").as_str())
        );
        let mut want = vec![0u8; (end - start + 1) as usize];
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start)).unwrap();
        std::io::Read::read_exact(&mut file, &mut want).unwrap();
        assert!(r.body == want, "bytes differ in range {start}-{end}");
        assert!(
            r.body.windows(2).any(|w| w[0] == b'<'),
            "marker missing at {off}"
        );
    }
}

/// Size of the kernel the dashboard test's client fetches: larger than the loopback socket
/// buffers can absorb, so at curl's capped 40 MB/s pxed hands over the last byte a good part
/// of a second after the first, and the transfer is a segment of the timeline bar.
const DASHBOARD_KERNEL_BYTES: usize = 32 << 20;

/// The URL on the `kernel` line of a script.
fn kernel_line_url(script: &str) -> String {
    script
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no kernel line: {script}"))
        .to_string()
}

/// The dashboard in Debian's headless Chromium (driven by tests/browser/dashboard.mjs with
/// playwright-core): the page is open before the machine exists, curl fetches the machine's
/// script and kernel and phones home twice, and each stage must show up in the machine's row
/// over the event stream, without a reload; then the row's boot timeline bar must show the
/// named spans pxed cut from those events (the transfer, kernel boot, userspace). Set `PXED_DASHBOARD_PNG=docs/dashboard.png` to refresh the
/// screenshot in the docs; otherwise it goes to a temp dir and is only checked to be a PNG.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_updates_live_in_headless_chromium() {
    use tokio::io::AsyncBufReadExt;
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir()
            && Path::new("/usr/bin/chromium").exists(),
        "needs Debian's chromium and playwright-core in tests/browser/node_modules: run scripts/setup"
    );
    let state_dir = tempfile::tempdir().unwrap();
    let root = install_root();
    std::fs::write(
        root.path().join("linux/vmlinuz"),
        pattern(DASHBOARD_KERNEL_BYTES),
    )
    .unwrap();
    let (base, _bus, server) = start_stateful(state_dir.path(), root.path()).await;
    let shot_dir = tempfile::tempdir().unwrap();
    let shot = match std::env::var_os("PXED_DASHBOARD_PNG") {
        Some(p) => Path::new(env!("CARGO_MANIFEST_DIR")).join(p),
        None => shot_dir.path().join("dashboard.png"),
    };
    let mut node = tokio::process::Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .args([base.as_str(), MAC_A])
        .arg(&shot)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let mut expect = async |want: &str| {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no `{want}` from the browser within 60 s"))
            .unwrap()
            .unwrap_or_else(|| panic!("browser script ended before `{want}`"));
        assert!(line.starts_with(want), "wanted `{want}`, got `{line}`");
        line
    };
    expect("READY").await;
    let script = curl(&[&format!(
        "{base}/ipxe/script?mac={MAC_A}&platform=pcbios&buildarch=i386"
    )])
    .await
    .text();
    let phone = kernel_arg(&script, "pxed.phone=");
    expect("SEEN http.script").await;
    // The client fetches its kernel as iPXE would (curl at a capped rate, so that the transfer
    // takes long enough to be a segment of its own, whatever the machine's speed).
    let kernel_url = kernel_line_url(&script);
    let kernel = curl(&["--limit-rate", "40M", &kernel_url]).await;
    assert_eq!(kernel.status, 200);
    assert_eq!(kernel.body.len(), DASHBOARD_KERNEL_BYTES);
    assert_eq!(
        curl(&[&format!("{phone}&stage=os.userspace")]).await.status,
        200
    );
    expect("SEEN os.userspace").await;
    assert_eq!(
        curl(&[&format!("{phone}&stage=os.installed")]).await.status,
        200
    );
    expect("SEEN os.custom").await;
    let chips = expect("CHIPS").await;
    assert_eq!(
        chips,
        "CHIPS http.script http.kernel http.complete os.userspace os.custom"
    );
    // The boot timeline bar: pxed's named spans, drawn from its API.
    let spans = expect("SPANS").await;
    for want in [
        "transfer=HTTP /linux/vmlinuz",
        "kernel-boot=HTTP /linux/vmlinuz to userspace (kernel start and boot)",
        "userspace=userspace to os.installed",
    ] {
        assert!(
            spans
                .trim_start_matches("SPANS ")
                .split('|')
                .any(|s| s == want),
            "no `{want}` in {spans}"
        );
    }
    expect("DONE").await;
    assert!(node.wait().await.unwrap().success());
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 5000,
        "{} bytes",
        png.len()
    );
    server.stop().await;
}
