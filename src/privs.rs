//! Dropping root after the privileged sockets are bound: switch every thread of the process to
//! an unprivileged user and keep only the network capabilities pxed still uses.
//!
//! Linux credentials and capabilities belong to each thread, not to the process, and the
//! tokio runtime has started its worker threads before pxed binds anything. So the change is
//! made on every thread, the way glibc's `setuid` and libcap's psx do it: the calling thread
//! signals each other thread, whose handler makes the same raw system calls on itself
//! (`prctl`, `setgroups`, `setresgid`, `setresuid`, `capset`: all async-signal-safe), and waits
//! until every thread has done so. A thread that fails aborts the start.
//!
//! Capabilities pxed may keep (see SECURITY.md, "Privileges"):
//! - `CAP_NET_ADMIN`: the ARP entry (SIOCSARP) that lets a DHCP reply be unicast to a client
//!   without an address; without it pxed broadcasts, which every client accepts.
//! - `CAP_NET_RAW`: the raw ICMPv6 socket of the router-advertisement responder, and
//!   SO_BINDTODEVICE on the sockets that look for other DHCP servers.
//! - `CAP_NET_BIND_SERVICE`: the port-68 sockets of the foreign-server watch, bound by tasks
//!   that may start after the drop.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// `CAP_NET_BIND_SERVICE` (linux/capability.h).
pub const CAP_NET_BIND_SERVICE: u32 = 10;
/// `CAP_NET_ADMIN`.
pub const CAP_NET_ADMIN: u32 = 12;
/// `CAP_NET_RAW`.
pub const CAP_NET_RAW: u32 = 13;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAP_VERSION_3: u32 = 0x2008_0522;
/// How long the other threads get to apply the change: they only run a handful of system
/// calls, so a thread that has not answered in this time is stuck and the start fails.
const THREAD_DEADLINE: Duration = Duration::from_secs(5);

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

// What every thread applies, set before the signals are sent.
static TARGET_UID: AtomicU32 = AtomicU32::new(0);
static TARGET_GID: AtomicU32 = AtomicU32::new(0);
static KEEP_CAPS: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

/// The user pxed switches to, looked up in the user database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// Look a user up by name (or a numeric uid written as digits).
pub fn lookup_user(name: &str) -> io::Result<User> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name contains NUL"))?;
    // SAFETY: passwd is plain data; all-zero is a valid value that getpwnam_r overwrites.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; `buf` outlives the use of `pwd` below.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Ok(User {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(User { uid, gid: uid });
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no user `{name}`"),
    ))
}

/// Make `dir` and the files directly in it belong to `user`, so that pxed can still write
/// its state (leases, journal, boot state) after the switch. What systemd's `StateDirectory=`
/// does for the unit in dist/.
pub fn give_dir(dir: &Path, user: &User) -> io::Result<()> {
    chown(dir, user)?;
    for entry in std::fs::read_dir(dir)? {
        chown(&entry?.path(), user)?;
    }
    Ok(())
}

fn chown(path: &Path, user: &User) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
}

/// Switch every thread of the process to `user`, keeping only the capabilities in `keep`
/// (numbers such as [`CAP_NET_RAW`]) as permitted and effective. Also sets no-new-privileges,
/// so that the lease hook cannot regain anything through a setuid program.
pub fn drop_to(user: &User, keep: &[u32]) -> io::Result<()> {
    let mask = keep
        .iter()
        .filter(|c| **c < 64)
        .fold(0u64, |m, c| m | (1u64 << c));
    TARGET_UID.store(user.uid, Ordering::SeqCst);
    TARGET_GID.store(user.gid, Ordering::SeqCst);
    KEEP_CAPS.store(mask, Ordering::SeqCst);
    DONE.store(0, Ordering::SeqCst);
    FAILED.store(0, Ordering::SeqCst);

    let signal = libc::SIGRTMIN() + 4;
    // SAFETY: installing a handler that only makes raw system calls and atomic stores.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let mut signalled = std::collections::HashSet::new();
    let deadline = Instant::now() + THREAD_DEADLINE;
    // Threads can start while this runs; scan again until a scan finds none new.
    loop {
        let mut new = 0;
        for entry in std::fs::read_dir("/proc/self/task")? {
            let Some(tid) = entry?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            if tid == me || !signalled.insert(tid) {
                continue;
            }
            new += 1;
            // SAFETY: tgkill to a thread of this process with the handler installed above.
            let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
            if rc != 0 {
                // The thread ended between the listing and the signal.
                signalled.remove(&tid);
                new -= 1;
            }
        }
        while DONE.load(Ordering::SeqCst) + FAILED.load(Ordering::SeqCst) < signalled.len() {
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "some threads did not drop their privileges in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if new == 0 {
            break;
        }
    }
    if !apply() {
        return Err(io::Error::last_os_error());
    }
    if FAILED.load(Ordering::SeqCst) > 0 {
        return Err(io::Error::other("a thread could not drop its privileges"));
    }
    Ok(())
}

/// Whether this thread's real, effective and saved user and group ids are already `uid` and
/// `gid` (raw system calls: async-signal-safe).
fn switched(uid: u32, gid: u32) -> bool {
    let (mut r, mut e, mut s) = (0u32, 0u32, 0u32);
    let (mut rg, mut eg, mut sg) = (0u32, 0u32, 0u32);
    // SAFETY: the kernel writes three ids through valid pointers to live locals.
    let ok = unsafe {
        libc::syscall(libc::SYS_getresuid, &mut r, &mut e, &mut s) == 0
            && libc::syscall(libc::SYS_getresgid, &mut rg, &mut eg, &mut sg) == 0
    };
    ok && [r, e, s] == [uid; 3] && [rg, eg, sg] == [gid; 3]
}

extern "C" fn on_signal(_: libc::c_int) {
    if apply() {
        DONE.fetch_add(1, Ordering::SeqCst);
    } else {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
}

/// The raw, per-thread system calls (glibc's wrappers would broadcast to all threads and are
/// not async-signal-safe).
fn apply() -> bool {
    let uid = TARGET_UID.load(Ordering::SeqCst);
    let gid = TARGET_GID.load(Ordering::SeqCst);
    let mask = KEEP_CAPS.load(Ordering::SeqCst);
    let low = (mask & 0xffff_ffff) as u32;
    let high = (mask >> 32) as u32;
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    let groups = [gid];
    // A thread started during the switch by a thread that had already switched inherits the
    // new user (and no CAP_SETUID/CAP_SETGID, so the calls below would fail) and may still
    // be found by a rescan: it only needs its capabilities set (a reduction, always allowed)
    // and no-new-privileges.
    if switched(uid, gid) {
        // SAFETY: raw system calls on this thread with valid pointers to live locals.
        return unsafe {
            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0
                && libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
        };
    }
    // SAFETY: raw system calls on this thread with valid pointers to live locals.
    unsafe {
        libc::syscall(libc::SYS_prctl, libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0
            && libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) == 0
            && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
            && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
            && libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0
            && libc::syscall(libc::SYS_prctl, libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) == 0
            && libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    }
}
