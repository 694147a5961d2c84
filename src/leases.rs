//! Durable leases. An ACK leaves only after the lease it grants is on disk.
//!
//! [`JournalStore`] is an append-only journal of JSON lines, `fdatasync`ed per batch, compacted
//! into a snapshot when pxed starts. A torn last line (power cut during a write) is dropped,
//! since its ACK was never sent; damage anywhere else stops pxed with the line number and a way
//! to recover, instead of silently losing leases.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::dhcp::engine::LeaseChange;
use crate::dhcp::pool::Lease;
use crate::mac::MacAddr;

/// Where leases are kept. Behind a trait so that a shared store (PostgreSQL) can serve several
/// pxed instances later.
pub trait LeaseStore: Send + Sync {
    /// Every lease, as of the last durable commit.
    fn load(&self) -> Result<Vec<Lease>, StoreError>;
    /// Make changes durable; returns only once they survive a power cut.
    fn commit(&self, changes: &[LeaseChange]) -> Result<(), StoreError>;
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error on the store file.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        source: io::Error,
    },
    /// A damaged record that is not the torn tail of a crash.
    #[error(
        "{path}:{line}: damaged lease record ({problem}). pxed will not start and drop leases \
         silently: inspect the file, remove or repair the line, or restore a backup"
    )]
    Damaged {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    Commit(Lease),
    Remove { mac: MacAddr },
}

/// The default store: a journal file in pxed's state directory.
pub struct JournalStore {
    path: PathBuf,
    file: Mutex<File>,
}

impl JournalStore {
    /// Open (creating) the journal at `path`, compacting it first.
    pub fn open(path: &Path) -> Result<JournalStore, StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let leases = if path.exists() {
            read_journal(path)?
        } else {
            Vec::new()
        };
        // Compact: write the snapshot beside the journal, sync it, then rename over it.
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err)?;
            for lease in &leases {
                let line = serde_json::to_string(&Record::Commit(lease.clone()))
                    .map_err(|e| io_err(io::Error::other(e)))?;
                writeln!(f, "{line}").map_err(io_err)?;
            }
            f.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent()
            && let Ok(d) = File::open(dir)
        {
            d.sync_all().map_err(io_err)?;
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io_err)?;
        Ok(JournalStore {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }
}

fn read_journal(path: &Path) -> Result<Vec<Lease>, StoreError> {
    let file = File::open(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut leases: std::collections::BTreeMap<MacAddr, Lease> = Default::default();
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(Record::Commit(lease)) => {
                leases.insert(lease.mac, lease);
            }
            Ok(Record::Remove { mac }) => {
                leases.remove(&mac);
            }
            // The last line may be torn by a power cut; its ACK was never sent.
            Err(_) if i + 1 == last => {
                tracing::warn!(path = %path.display(), line = i + 1, "dropping torn last lease record");
            }
            Err(e) => {
                return Err(StoreError::Damaged {
                    path: path.to_path_buf(),
                    line: i + 1,
                    problem: e.to_string(),
                });
            }
        }
    }
    Ok(leases.into_values().collect())
}

impl LeaseStore for JournalStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        read_journal(&self.path)
    }

    fn commit(&self, changes: &[LeaseChange]) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let mut buf = Vec::new();
        for change in changes {
            let record = match change {
                LeaseChange::Commit(l) => Record::Commit(l.clone()),
                LeaseChange::Remove(l) => Record::Remove { mac: l.mac },
            };
            serde_json::to_writer(&mut buf, &record).map_err(|e| io_err(io::Error::other(e)))?;
            buf.push(b'\n');
        }
        let mut file = self
            .file
            .lock()
            .map_err(|_| io_err(io::Error::other("lease journal lock poisoned")))?;
        file.write_all(&buf).map_err(io_err)?;
        // The ACK waits for this: the lease must survive a power cut before the client uses it.
        file.sync_data().map_err(io_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn lease(n: u8) -> Lease {
        Lease {
            mac: MacAddr([2, 0, 0, 0, 0, n]),
            ip: Ipv4Addr::new(10, 0, 0, n),
            expires: 1000,
            hostname: None,
        }
    }

    #[test]
    fn survives_reopen_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.jsonl");
        {
            let s = JournalStore::open(&path).unwrap();
            s.commit(&[LeaseChange::Commit(lease(1)), LeaseChange::Commit(lease(2))])
                .unwrap();
            s.commit(&[LeaseChange::Remove(lease(1))]).unwrap();
        }
        let s = JournalStore::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), vec![lease(2)]);
    }

    #[test]
    fn torn_tail_is_dropped_damage_elsewhere_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.jsonl");
        {
            let s = JournalStore::open(&path).unwrap();
            s.commit(&[LeaseChange::Commit(lease(1))]).unwrap();
        }
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"op\":\"commit\",\"mac\":\"02:0");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            JournalStore::open(&path).unwrap().load().unwrap(),
            vec![lease(1)]
        );

        std::fs::write(&path, format!("garbage\n{text}\n")).unwrap();
        let err = JournalStore::open(&path).err().unwrap().to_string();
        assert!(err.contains(":1: damaged lease record"), "{err}");
    }
}
