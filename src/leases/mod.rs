//! Durable leases. An ACK leaves only after the lease it grants is on disk.
//!
//! [`SqliteStore`] keeps them in SQLite (WAL journal, `synchronous=FULL`: every commit is
//! fdatasync'ed before it returns). The driver groups the changes of many packets into one
//! transaction, so one sync covers a whole batch. A store that fails its integrity check stops
//! pxed with the path and the ways to recover, instead of silently losing leases.

pub mod hook;
pub mod import;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::dhcp::engine::LeaseChange;
use crate::dhcp::pool::Lease;
use crate::mac::MacAddr;

/// The file name of the lease database in the state directory.
pub const LEASE_DB: &str = "leases.sqlite";

/// The schema version this build writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// Where leases are kept. Behind a trait so that a shared store (PostgreSQL) can serve several
/// pxed instances later.
pub trait LeaseStore: Send + Sync {
    /// Every lease, as of the last durable commit.
    fn load(&self) -> Result<Vec<Lease>, StoreError>;
    /// Make changes durable, all or none; returns only once they survive a power cut.
    fn commit(&self, changes: &[LeaseChange]) -> Result<(), StoreError>;
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O or database error.
    #[error("lease store {path}: {message}")]
    Failed {
        /// File.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The file is damaged. pxed refuses to start rather than drop leases.
    #[error(
        "lease store {path} is damaged ({problem}). pxed will not start on it, so that no \
         lease is dropped silently. To recover: stop pxed; copy the file aside; try \
         `sqlite3 {path} \".recover\" | sqlite3 repaired.sqlite` and move repaired.sqlite into \
         place; or restore a backup; or move the file away and start with `authoritative = \
         false` in [dhcp] for one lease time, so clients keep their addresses by asking for them"
    )]
    Damaged {
        /// File.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The default store: one SQLite file in pxed's state directory.
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn is_damage(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

impl SqliteStore {
    /// Open (creating) the store at `path` and check its integrity.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Failed {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        let store = Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        store.setup()?;
        Ok(store)
    }

    /// Open an existing store read-only (`pxed leases` beside a running pxed: WAL lets
    /// readers run while the server writes).
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        let store = Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        store.check()?;
        Ok(store)
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::Failed {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, e: rusqlite::Error) -> StoreError {
        if is_damage(&e) {
            StoreError::Damaged {
                path: self.path.clone(),
                problem: e.to_string(),
            }
        } else {
            StoreError::Failed {
                path: self.path.clone(),
                message: e.to_string(),
            }
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Failed {
            path: self.path.clone(),
            message: "store lock poisoned".into(),
        })
    }

    /// `PRAGMA quick_check`: page and index structure. Anything but "ok" is damage.
    fn check(&self) -> Result<(), StoreError> {
        let conn = self.lock()?;
        let result: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if result != "ok" {
            return Err(StoreError::Damaged {
                path: self.path.clone(),
                problem: result,
            });
        }
        Ok(())
    }

    fn setup(&self) -> Result<(), StoreError> {
        self.check()?;
        let conn = self.lock()?;
        // WAL: a commit appends to the log and syncs it once. FULL: that sync happens before
        // the commit returns, which is what lets the ACK go out.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Failed {
                path: self.path.clone(),
                message: format!("cannot use the WAL journal (got {mode})"),
            });
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS leases (
                 mac TEXT PRIMARY KEY,
                 ip TEXT NOT NULL UNIQUE,
                 expires INTEGER NOT NULL,
                 hostname TEXT,
                 client_id TEXT
             );",
        )
        .map_err(|e| self.err(e))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        match version {
            0 => conn
                .execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))
                .map_err(|e| self.err(e))?,
            SCHEMA_VERSION => {}
            other => {
                return Err(StoreError::Failed {
                    path: self.path.clone(),
                    message: format!(
                        "schema version {other} is newer than this pxed ({SCHEMA_VERSION})"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The lease of one machine, if stored.
    pub fn get(&self, mac: &MacAddr) -> Result<Option<Lease>, StoreError> {
        let conn = self.lock()?;
        let row = conn
            .query_row(
                "SELECT mac, ip, expires, hostname, client_id FROM leases WHERE mac = ?1",
                params![mac.to_string()],
                row_tuple,
            )
            .optional()
            .map_err(|e| self.err(e))?;
        row.map(|r| self.lease_from(r)).transpose()
    }

    fn lease_from(&self, row: RowTuple) -> Result<Lease, StoreError> {
        let (mac, ip, expires, hostname, client_id) = row;
        let damaged = |what: String| StoreError::Damaged {
            path: self.path.clone(),
            problem: what,
        };
        Ok(Lease {
            mac: mac
                .parse()
                .map_err(|_| damaged(format!("row with mac `{mac}`")))?,
            ip: ip
                .parse()
                .map_err(|_| damaged(format!("row {mac}: ip `{ip}`")))?,
            expires: u64::try_from(expires)
                .map_err(|_| damaged(format!("row {mac}: expiry {expires}")))?,
            hostname,
            client_id,
        })
    }
}

type RowTuple = (String, String, i64, Option<String>, Option<String>);

fn row_tuple(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowTuple> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

impl LeaseStore for SqliteStore {
    fn load(&self) -> Result<Vec<Lease>, StoreError> {
        let rows: Vec<RowTuple> = {
            let conn = self.lock()?;
            let mut stmt = conn
                .prepare("SELECT mac, ip, expires, hostname, client_id FROM leases")
                .map_err(|e| self.err(e))?;
            stmt.query_map([], row_tuple)
                .map_err(|e| self.err(e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.err(e))?
        };
        rows.into_iter().map(|r| self.lease_from(r)).collect()
    }

    fn commit(&self, changes: &[LeaseChange]) -> Result<(), StoreError> {
        let mut conn = self.lock()?;
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        for change in changes {
            let l = change.lease();
            let mac = l.mac.to_string();
            if change.ends() {
                tx.prepare_cached("DELETE FROM leases WHERE mac = ?1 AND ip = ?2")
                    .and_then(|mut s| s.execute(params![mac, l.ip.to_string()]))
                    .map_err(|e| self.err(e))?;
                continue;
            }
            let expires = i64::try_from(l.expires).unwrap_or(i64::MAX);
            // An expired lease of another machine on this address is superseded; the UNIQUE
            // index on ip then guarantees no address is stored for two machines.
            tx.prepare_cached("DELETE FROM leases WHERE ip = ?1 AND mac != ?2")
                .and_then(|mut s| s.execute(params![l.ip.to_string(), mac]))
                .map_err(|e| self.err(e))?;
            tx.prepare_cached(
                "INSERT INTO leases (mac, ip, expires, hostname, client_id)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(mac) DO UPDATE SET ip = excluded.ip, expires = excluded.expires,
                   hostname = excluded.hostname, client_id = excluded.client_id",
            )
            .and_then(|mut s| {
                s.execute(params![
                    mac,
                    l.ip.to_string(),
                    expires,
                    l.hostname,
                    l.client_id
                ])
            })
            .map_err(|e| self.err(e))?;
        }
        // synchronous=FULL in WAL mode: this returns after the log is fdatasync'ed.
        tx.commit().map_err(|e| self.err(e))
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
            client_id: None,
        }
    }

    fn sorted(mut v: Vec<Lease>) -> Vec<Lease> {
        v.sort_by_key(|l| l.mac);
        v
    }

    #[test]
    fn survives_reopen_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEASE_DB);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.commit(&[LeaseChange::Commit(lease(1)), LeaseChange::Commit(lease(2))])
                .unwrap();
            s.commit(&[LeaseChange::Release(lease(1))]).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), vec![lease(2)]);
        let ro = SqliteStore::open_read_only(&path).unwrap();
        assert_eq!(ro.get(&lease(2).mac).unwrap(), Some(lease(2)));
    }

    #[test]
    fn an_address_is_stored_for_one_machine_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join(LEASE_DB)).unwrap();
        s.commit(&[LeaseChange::Commit(lease(1))]).unwrap();
        let mut taker = lease(2);
        taker.ip = lease(1).ip;
        s.commit(&[
            LeaseChange::Commit(taker.clone()),
            LeaseChange::Commit(lease(3)),
        ])
        .unwrap();
        assert_eq!(sorted(s.load().unwrap()), vec![taker, lease(3)]);
    }

    #[test]
    fn damaged_file_refuses_with_a_way_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEASE_DB);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.commit(&[LeaseChange::Commit(lease(1))]).unwrap();
        }
        // Overwrite the header: no longer a database.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..16].copy_from_slice(b"garbage garbage!");
        std::fs::write(&path, &bytes).unwrap();
        let _ = std::fs::remove_file(path.with_extension("sqlite-wal"));
        let err = SqliteStore::open(&path)
            .err()
            .expect("must refuse")
            .to_string();
        assert!(
            err.contains("is damaged") && err.contains(".recover"),
            "{err}"
        );
        // Nothing was overwritten: the damaged bytes are still there for recovery.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }
}
