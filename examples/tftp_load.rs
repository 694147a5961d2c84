//! TFTP load generator for `scripts/bench-tftp`: N concurrent reads of one file from one
//! process (one socket per read, one thread), so the client is not the bottleneck. Prints one
//! JSON line: clients, failures, wall time, throughput, the checksum check, and its own CPU time.
//!
//! `tftp_load SERVER:PORT FILE CLIENTS [blksize|-] [windowsize|-] [EXPECTED_BYTES] [BIND_IP]`

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use pxed::tftp::client::{ReadSpec, read};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn opt(arg: Option<&String>) -> Option<u16> {
    arg.filter(|a| *a != "-").and_then(|a| a.parse().ok())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        anyhow::bail!(
            "usage: tftp_load SERVER:PORT FILE CLIENTS [blksize|-] [windowsize|-] [EXPECTED_BYTES] [BIND_IP]"
        );
    }
    let server: SocketAddr = args[1].parse()?;
    let clients: usize = args[3].parse()?;
    let expected: Option<u64> = args.get(6).and_then(|a| a.parse().ok());
    let bind_ip: IpAddr = match args.get(7) {
        Some(a) => a.parse()?,
        None => "0.0.0.0".parse()?,
    };
    let spec = ReadSpec {
        server,
        file: args[2].clone(),
        blksize: opt(args.get(4)),
        windowsize: opt(args.get(5)),
        timeout: Duration::from_secs(1),
        retries: 10,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let results = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let spec = spec.clone();
            set.spawn(async move { read(&spec, SocketAddr::new(bind_ip, 0)).await });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.map_err(std::io::Error::other).and_then(|x| x));
        }
        out
    });
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let mut failures = 0;
    let mut bytes = 0u64;
    let mut checksums = std::collections::HashSet::new();
    let mut slowest = 0f64;
    let mut first_error = String::new();
    for r in &results {
        match r {
            Ok(r) if expected.is_none_or(|e| e == r.bytes) => {
                bytes += r.bytes;
                checksums.insert(r.checksum);
                slowest = slowest.max(r.elapsed.as_secs_f64());
            }
            Ok(r) => {
                failures += 1;
                first_error = format!("short read {} bytes", r.bytes);
            }
            Err(e) => {
                failures += 1;
                if first_error.is_empty() {
                    first_error = e.to_string();
                }
            }
        }
    }
    println!(
        "{{\"clients\":{clients},\"failures\":{failures},\"wall_s\":{wall:.3},\"slowest_s\":{slowest:.3},\"bytes\":{bytes},\"mib_s\":{:.1},\"distinct_checksums\":{},\"client_cpu_s\":{cpu:.3},\"first_error\":{:?}}}",
        bytes as f64 / wall / 1048576.0,
        checksums.len(),
        first_error
    );
    Ok(())
}
