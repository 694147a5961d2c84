//! Remembered boot state for one-shot profiles: which one-shot stages (e.g. `os.installed`)
//! each machine has reported. Kept apart from the lease store on purpose: a small file of its
//! own under `[server] state_dir`, rewritten whole on every change (temp file, fsync, rename,
//! fsync of the directory), so a crash leaves either the old or the new state, never half.
//!
//! The policy never reads it: DHCP, TFTP and HTTP share one store, look the machine's
//! [`BootState`] up and pass it to [`crate::policy::plan`], so that all three agree.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::mac::MacAddr;
use crate::policy::BootState;

/// Largest state file read at start: a few hundred bytes per machine; anything bigger is not
/// ours.
pub const MAX_STATE_FILE: u64 = 16 * 1024 * 1024;

/// Most one-shot stages remembered per machine: the policy names only a handful of stages,
/// this only bounds a store that something else wrote.
pub const MAX_STAGES_PER_MACHINE: usize = 64;

/// A store that failed to read or write.
#[derive(Debug, thiserror::Error)]
pub enum BootStateError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The file is not a state file.
    #[error("{path}: not a pxed boot-state file: {message}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where boot state lives. `get` answers from memory (DHCP and TFTP call it on every request);
/// `record` and `clear` may block on disk, call them off the async runtime.
pub trait BootStateStore: Send + Sync + std::fmt::Debug {
    /// The state of one machine (empty when nothing is remembered).
    fn get(&self, mac: &MacAddr) -> BootState;
    /// Remember that `mac` reported `stage`, durably. `Ok(false)` when it already was.
    fn record(&self, mac: MacAddr, stage: &str) -> Result<bool, BootStateError>;
    /// Forget everything about `mac` (re-install it). `Ok(false)` when nothing was stored.
    fn clear(&self, mac: &MacAddr) -> Result<bool, BootStateError>;
}

/// In memory only: the state is lost on restart (no `state_dir` configured).
#[derive(Debug, Default)]
pub struct MemoryBootStates {
    map: Mutex<BTreeMap<MacAddr, BootState>>,
}

impl BootStateStore for MemoryBootStates {
    fn get(&self, mac: &MacAddr) -> BootState {
        lock(&self.map).get(mac).cloned().unwrap_or_default()
    }

    fn record(&self, mac: MacAddr, stage: &str) -> Result<bool, BootStateError> {
        let mut map = lock(&self.map);
        let entry = map.entry(mac).or_default();
        Ok(add_stage(entry, stage))
    }

    fn clear(&self, mac: &MacAddr) -> Result<bool, BootStateError> {
        Ok(lock(&self.map).remove(mac).is_some())
    }
}

/// The file store: `<state_dir>/boot-state.json`.
#[derive(Debug)]
pub struct FileBootStates {
    path: PathBuf,
    /// Held by a change for its whole read-modify-persist, so changes do not overwrite each
    /// other; `map` itself is only locked briefly, so a DHCP or TFTP `get` never waits for a
    /// change's fsync.
    writer: Mutex<()>,
    map: Mutex<BTreeMap<MacAddr, BootState>>,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    machines: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    mac: MacAddr,
    reached: Vec<String>,
}

const FORMAT_VERSION: u32 = 1;

impl FileBootStates {
    /// Open the store at `path`, reading it when it exists (a missing file is an empty store;
    /// an unreadable one is an error, so state is never dropped silently).
    pub fn open(path: &Path) -> Result<FileBootStates, BootStateError> {
        let io_err = |source| BootStateError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let mut map = BTreeMap::new();
        match File::open(path) {
            Ok(f) => {
                let mut text = String::new();
                f.take(MAX_STATE_FILE + 1)
                    .read_to_string(&mut text)
                    .map_err(io_err)?;
                if text.len() as u64 > MAX_STATE_FILE {
                    return Err(BootStateError::Corrupt {
                        path: path.to_path_buf(),
                        message: format!("larger than {MAX_STATE_FILE} bytes"),
                    });
                }
                let file: FileFormat =
                    serde_json::from_str(&text).map_err(|e| BootStateError::Corrupt {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    })?;
                if file.version != FORMAT_VERSION {
                    return Err(BootStateError::Corrupt {
                        path: path.to_path_buf(),
                        message: format!("unknown version {}", file.version),
                    });
                }
                for e in file.machines {
                    let mut state = BootState::default();
                    for s in e.reached {
                        add_stage(&mut state, &s);
                    }
                    map.insert(e.mac, state);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        Ok(FileBootStates {
            path: path.to_path_buf(),
            writer: Mutex::new(()),
            map: Mutex::new(map),
        })
    }

    /// Write `map` durably: a temp file beside the store, synced, renamed over it, and the
    /// directory synced so the rename itself survives a power cut.
    fn persist(&self, map: &BTreeMap<MacAddr, BootState>) -> Result<(), BootStateError> {
        let io_err = |source| BootStateError::Io {
            path: self.path.clone(),
            source,
        };
        let file = FileFormat {
            version: FORMAT_VERSION,
            machines: map
                .iter()
                .map(|(mac, s)| Entry {
                    mac: *mac,
                    reached: s.reached.clone(),
                })
                .collect(),
        };
        let text = serde_json::to_vec_pretty(&file).map_err(|e| io_err(io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err)?;
            f.write_all(&text).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io_err)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        Ok(())
    }
}

impl BootStateStore for FileBootStates {
    fn get(&self, mac: &MacAddr) -> BootState {
        lock(&self.map).get(mac).cloned().unwrap_or_default()
    }

    fn record(&self, mac: MacAddr, stage: &str) -> Result<bool, BootStateError> {
        let _writer = lock(&self.writer);
        let mut next = lock(&self.map).clone();
        if !add_stage(next.entry(mac).or_default(), stage) {
            return Ok(false);
        }
        // Only a state that reached the disk is believed.
        self.persist(&next)?;
        *lock(&self.map) = next;
        Ok(true)
    }

    fn clear(&self, mac: &MacAddr) -> Result<bool, BootStateError> {
        let _writer = lock(&self.writer);
        let mut next = lock(&self.map).clone();
        if next.remove(mac).is_none() {
            return Ok(false);
        }
        self.persist(&next)?;
        *lock(&self.map) = next;
        Ok(true)
    }
}

fn add_stage(state: &mut BootState, stage: &str) -> bool {
    if state.has_reached(stage) || state.reached.len() >= MAX_STAGES_PER_MACHINE {
        return false;
    }
    state.reached.push(stage.to_string());
    true
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_survives_reopen_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/boot-state.json");
        let a: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let b: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        {
            let s = FileBootStates::open(&path).unwrap();
            assert_eq!(s.get(&a), BootState::default());
            assert!(s.record(a, "os.installed").unwrap());
            assert!(!s.record(a, "os.installed").unwrap());
            assert!(s.record(b, "os.installed").unwrap());
        }
        let s = FileBootStates::open(&path).unwrap();
        assert!(s.get(&a).has_reached("os.installed"));
        assert!(s.clear(&a).unwrap());
        assert!(!s.clear(&a).unwrap());
        let s = FileBootStates::open(&path).unwrap();
        assert!(!s.get(&a).has_reached("os.installed"));
        assert!(s.get(&b).has_reached("os.installed"));
        // No temp file left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("boot-state.json")]);
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot-state.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = FileBootStates::open(&path).err().unwrap().to_string();
        assert!(err.contains("not a pxed boot-state file"), "{err}");
    }

    #[test]
    fn failed_write_keeps_the_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        let path = sub.join("boot-state.json");
        let s = FileBootStates::open(&path).unwrap();
        let a: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        // The directory is gone: the write fails and nothing is believed.
        std::fs::remove_dir_all(&sub).unwrap();
        assert!(s.record(a, "os.installed").is_err());
        assert!(!s.get(&a).has_reached("os.installed"));
    }

    #[test]
    fn memory_store() {
        let s = MemoryBootStates::default();
        let a: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        assert!(s.record(a, "x").unwrap());
        assert!(s.get(&a).has_reached("x"));
        assert!(s.clear(&a).unwrap());
    }
}
