//! `pxelab clean`: remove what crashed or killed runs left behind: namespaces named
//! `pxelab-*` (and the processes inside them), and QEMU processes whose pidfile is in a run
//! directory.

use std::path::Path;

use crate::netns::{delete_namespace, leftover_namespaces};

/// Remove leftovers; returns what was done, one line each.
pub fn clean(runs_root: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for dir in std::fs::read_dir(runs_root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = f.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            // Only a QEMU started with this very pidfile is ours to kill.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("qemu-system") && cmdline.contains(&*path.to_string_lossy()) {
                // SAFETY: signalling a process we identified as our own QEMU.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                done.push(format!("killed QEMU pid {pid} ({})", path.display()));
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    for ns in leftover_namespaces() {
        // Names are pxelab-<pid>-<n>: a namespace whose creator still runs is in use.
        let owner = ns
            .strip_prefix(crate::netns::NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = owner
            && pid != std::process::id()
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            done.push(format!("kept namespace {ns}: pid {pid} still runs"));
            continue;
        }
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &ns])
            .output();
        if let Ok(out) = out {
            for pid in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                // SAFETY: the process lives in a namespace only pxelab creates.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                done.push(format!("killed pid {pid} in namespace {ns}"));
            }
        }
        match delete_namespace(&ns) {
            Ok(()) => done.push(format!("deleted namespace {ns}")),
            Err(err) => done.push(format!("could not delete namespace {ns}: {err:#}")),
        }
    }
    done
}
