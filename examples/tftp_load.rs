//! TFTP load generator for `scripts/bench-tftp`: N concurrent reads of one file from one
//! process, one thread, one socket per read, so that the client is not the bottleneck. Prints
//! one JSON line: clients, failures, wall time, throughput, the checksum check, and its own CPU
//! time.
//!
//! `tftp_load SERVER:PORT FILE CLIENTS [blksize|-] [windowsize|-] [EXPECTED_BYTES] [BIND_IP]`
//!
//! The reads are [`Reader`] state machines driven by one level-triggered epoll loop: a ready
//! socket costs one `recvfrom` and at most one `sendto`, and the timers are a heap checked
//! lazily (a read's deadline moves with every block; the heap only looks again when an old
//! entry comes due). The tokio client it replaced paid per datagram for a timer registration,
//! a task wake-up and a `recvfrom` that only returned `EAGAIN`, and at 1000 concurrent reads
//! it used more CPU than the server it measured.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use pxed::tftp::client::{RECV_BYTES, ReadResult, ReadSpec, Reader, Step, size_receive_buffer};

/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;

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

/// One read in flight.
struct Flight {
    sock: UdpSocket,
    reader: Reader,
}

/// A send that finds the socket buffer full is a datagram lost: the reader's timer resends it.
/// Any other error ends that read (a failure in the results), not the run.
fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
    match sock.send_to(bytes, to) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other.map(drop),
    }
}

fn epoll() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn watch(ep: &OwnedFd, sock: &UdpSocket, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: both descriptors are open; `ev` lives across the call.
    let rc = unsafe {
        libc::epoll_ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            sock.as_raw_fd(),
            &mut ev,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Run every read to its end; the results in no particular order.
fn run(
    spec: &ReadSpec,
    clients: usize,
    bind: SocketAddr,
) -> io::Result<Vec<io::Result<ReadResult>>> {
    let ep = epoll()?;
    let mut flights: Vec<Option<Flight>> = Vec::with_capacity(clients);
    let mut timers = BinaryHeap::new();
    let mut results = Vec::with_capacity(clients);
    let now = Instant::now();
    for i in 0..clients {
        let sock = UdpSocket::bind(bind)?;
        sock.set_nonblocking(true)?;
        size_receive_buffer(socket2::SockRef::from(&sock), spec);
        watch(&ep, &sock, i as u64)?;
        let reader = Reader::start(spec, now);
        // A failed first send is retried by the reader's timer, as a lost RRQ would be.
        let _ = send(&sock, reader.outgoing(), reader.server());
        timers.push(Reverse((reader.deadline(), i)));
        flights.push(Some(Flight { sock, reader }));
    }
    let mut buf = vec![0u8; RECV_BYTES];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    let mut open = clients;
    while open > 0 {
        let wait = timers
            .peek()
            .map_or(Duration::from_millis(100), |Reverse((at, _))| {
                at.saturating_duration_since(Instant::now())
            });
        let wait_ms = libc::c_int::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(100);
        // SAFETY: the buffer holds `events.len()` entries; the epoll descriptor is open.
        let n = unsafe {
            libc::epoll_wait(
                ep.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                wait_ms,
            )
        };
        let ready = match usize::try_from(n) {
            Ok(n) => n,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
        };
        let mut finished = |flights: &mut Vec<Option<Flight>>, i: usize, r: io::Result<()>| {
            if let Some(f) = flights.get_mut(i).and_then(Option::take) {
                // Dropping the socket closes it, which also takes it out of the epoll set.
                results.push(r.map(|()| f.reader.result().clone()));
                open -= 1;
            }
        };
        for ev in events.iter().take(ready) {
            let i = ev.u64 as usize;
            let Some(Some(f)) = flights.get_mut(i) else {
                continue;
            };
            // Level-triggered: one datagram now, the next wait reports the socket again if
            // more are queued.
            let step = match f.sock.recv_from(&mut buf) {
                Ok((len, from)) => match buf.get(..len) {
                    Some(bytes) => f.reader.on_datagram(bytes, from, Instant::now()),
                    None => Step::Wait,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Wait,
                // An ICMP error for an earlier send (the server port is closed): the timer
                // decides, as a real client's would.
                Err(_) => Step::Wait,
            };
            match step {
                Step::Send(to) => {
                    if let Err(err) = send(&f.sock, f.reader.outgoing(), to) {
                        finished(&mut flights, i, Err(err));
                    }
                }
                Step::Wait => {}
                Step::Done(to) => {
                    let sent = send(&f.sock, f.reader.outgoing(), to);
                    finished(&mut flights, i, sent);
                }
                Step::Failed(err) => finished(&mut flights, i, Err(err)),
            }
        }
        // Timers: an entry whose read has moved its deadline is pushed again at the new one.
        let now = Instant::now();
        while let Some(Reverse((at, i))) = timers.peek().copied() {
            if at > now {
                break;
            }
            timers.pop();
            let Some(Some(f)) = flights.get_mut(i) else {
                continue;
            };
            if f.reader.deadline() > now {
                timers.push(Reverse((f.reader.deadline(), i)));
                continue;
            }
            match f.reader.on_timeout(now) {
                Step::Send(to) => match send(&f.sock, f.reader.outgoing(), to) {
                    Ok(()) => timers.push(Reverse((f.reader.deadline(), i))),
                    Err(err) => finished(&mut flights, i, Err(err)),
                },
                Step::Failed(err) => finished(&mut flights, i, Err(err)),
                Step::Wait | Step::Done(_) => timers.push(Reverse((f.reader.deadline(), i))),
            }
        }
    }
    Ok(results)
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
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let results = run(&spec, clients, SocketAddr::new(bind_ip, 0))?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let mut failures = 0;
    let mut bytes = 0u64;
    let mut checksums = std::collections::HashSet::new();
    let mut slowest = 0f64;
    let mut first_error = String::new();
    let (mut timeouts, mut duplicates) = (0u64, 0u64);
    let mut granted = (0u16, 0u16);
    for r in &results {
        if let Ok(r) = r {
            timeouts += r.timeouts;
            duplicates += r.duplicates;
            granted = (r.blksize, r.windowsize);
        }
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
        "{{\"clients\":{clients},\"failures\":{failures},\"wall_s\":{wall:.3},\"slowest_s\":{slowest:.3},\"bytes\":{bytes},\"mib_s\":{:.1},\"distinct_checksums\":{},\"client_cpu_s\":{cpu:.3},\"granted_blksize\":{},\"granted_windowsize\":{},\"timeouts\":{timeouts},\"duplicates\":{duplicates},\"first_error\":{:?}}}",
        bytes as f64 / wall / 1048576.0,
        checksums.len(),
        granted.0,
        granted.1,
        first_error
    );
    Ok(())
}
