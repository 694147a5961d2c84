//! Per-boot tokens: the URLs pxed writes into a machine's script and templates (templates,
//! phone-home) carry a token that only pxed can make, so one machine cannot fetch another's
//! templates or report for it by putting a different MAC in the URL.
//!
//! A token is `<boot id>.<tag>`: a random 64-bit boot id drawn when the script is rendered, and
//! an HMAC-SHA256 over the MAC, the boot id and the profile under a server secret, cut to 128
//! bits. Nothing is stored per boot: any pxed holding the same secret checks it, also after a
//! restart (the secret lives in `[server] state_dir`).
//!
//! The token is only as good as the MAC it was issued to: with `[http] require_token`, the
//! script endpoint issues one only when the MAC in the request is the MAC pxed knows for the
//! client's IP (lease or ARP table).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::path::Path;

use hmac::{KeyInit, Mac};

use crate::mac::MacAddr;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of secret: the HMAC-SHA256 block-sized key needs no more than 32 to be full strength.
pub const SECRET_LEN: usize = 32;
/// Bytes of the HMAC kept in a token: 128 bits cannot be guessed online.
const TAG_LEN: usize = 16;
/// Bytes of random boot id.
const BOOT_ID_LEN: usize = 8;
/// Domain separation: a tag for this purpose is never valid for another.
const CONTEXT: &[u8] = b"pxed boot token v1\0";

/// The server's token key.
#[derive(Clone)]
pub struct Secret([u8; SECRET_LEN]);

/// Bytes of randomness in a generated admin API token (shown as hex).
pub const API_TOKEN_LEN: usize = 32;
/// The file, in the state directory, holding the admin API token pxed generated.
pub const API_TOKEN_FILE: &str = "api-token";

/// Write `bytes` to `path` with mode 0600, synced, via a temporary file renamed into place, so
/// a crash never leaves a half-written secret under the final name.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The admin API token kept at `path` (one line of text), or a new random one written there
/// with mode 0600 when the file does not exist. A file that others can read, or that holds no
/// usable token, is refused: a bearer token anyone on the host can read protects nothing.
pub fn load_or_create_api_token(path: &Path) -> io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::File::open(path) {
        Ok(f) => {
            let mode = f.metadata()?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{}: the API token file is readable by others (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    ),
                ));
            }
            let mut buf = Vec::new();
            // Twice the hex length is plenty for a hand-written token too.
            f.take(4 * API_TOKEN_LEN as u64 + 1).read_to_end(&mut buf)?;
            let text = String::from_utf8(buf).unwrap_or_default();
            let token = text.trim();
            if token.len() < MIN_API_TOKEN_CHARS || token.len() > 4 * API_TOKEN_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: not an API token (one line of {MIN_API_TOKEN_CHARS} to {} \
                         characters); delete it and pxed makes a new one",
                        path.display(),
                        4 * API_TOKEN_LEN
                    ),
                ));
            }
            Ok(token.to_string())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut raw = [0u8; API_TOKEN_LEN];
            getrandom::fill(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
            let token = raw.iter().fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            });
            write_private(path, format!("{token}\n").as_bytes())?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// The shortest API token accepted, from the config or the token file: 16 characters of a
/// password-like token are far beyond online guessing at HTTP request rates.
pub const MIN_API_TOKEN_CHARS: usize = 16;

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh random secret (tokens die with the process).
    pub fn random() -> io::Result<Secret> {
        let mut k = [0u8; SECRET_LEN];
        getrandom::fill(&mut k).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Secret(k))
    }

    /// A fixed secret (tests, or a key shared by several servers).
    pub fn from_bytes(k: [u8; SECRET_LEN]) -> Secret {
        Secret(k)
    }

    /// Read the secret at `path`, or create it (mode 0600, written then renamed into place) when
    /// it does not exist.
    pub fn load_or_create(path: &Path) -> io::Result<Secret> {
        match std::fs::File::open(path) {
            Ok(f) => {
                let mut k = [0u8; SECRET_LEN];
                let mut buf = Vec::new();
                f.take(SECRET_LEN as u64 + 1).read_to_end(&mut buf)?;
                if buf.len() != SECRET_LEN {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: a token secret is exactly {SECRET_LEN} bytes",
                            path.display()
                        ),
                    ));
                }
                k.copy_from_slice(&buf);
                Ok(Secret(k))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let s = Secret::random()?;
                write_private(path, &s.0)?;
                Ok(s)
            }
            Err(e) => Err(e),
        }
    }

    fn tag(&self, mac: MacAddr, boot_id: &str, profile: &str) -> Vec<u8> {
        let mut m = match HmacSha256::new_from_slice(&self.0) {
            Ok(m) => m,
            // HMAC takes keys of any length; this branch cannot run.
            Err(_) => return Vec::new(),
        };
        m.update(CONTEXT);
        m.update(&mac.0);
        // Length-prefixed fields: no two (boot id, profile) pairs give the same input.
        m.update(&(boot_id.len() as u32).to_be_bytes());
        m.update(boot_id.as_bytes());
        m.update(&(profile.len() as u32).to_be_bytes());
        m.update(profile.as_bytes());
        let full = m.finalize().into_bytes();
        full.get(..TAG_LEN).map(<[u8]>::to_vec).unwrap_or_default()
    }

    /// A new token for one boot of `mac` with `profile`.
    pub fn issue(&self, mac: MacAddr, profile: &str) -> io::Result<String> {
        let mut id = [0u8; BOOT_ID_LEN];
        getrandom::fill(&mut id).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(self.issue_with_boot_id(mac, &hex::encode(id), profile))
    }

    /// The token for a given boot id (deterministic; tests and re-rendering).
    pub fn issue_with_boot_id(&self, mac: MacAddr, boot_id: &str, profile: &str) -> String {
        let mut t = String::with_capacity(boot_id.len() + 1 + TAG_LEN * 2);
        t.push_str(boot_id);
        t.push('.');
        for b in self.tag(mac, boot_id, profile) {
            let _ = write!(t, "{b:02x}");
        }
        t
    }

    /// The token was issued by this secret for `mac` and `profile`; returns its boot id.
    pub fn verify<'t>(&self, token: &'t str, mac: MacAddr, profile: &str) -> Option<&'t str> {
        let (boot_id, tag_hex) = token.split_once('.')?;
        if boot_id.len() != BOOT_ID_LEN * 2 || !boot_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let given = hex::decode(tag_hex).ok()?;
        let want = self.tag(mac, boot_id, profile);
        // Constant time: how long this takes says nothing about how much of the tag matched.
        let same = given.len() == want.len()
            && given
                .iter()
                .zip(&want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(boot_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_mac_and_profile() {
        let s = Secret::from_bytes([7; SECRET_LEN]);
        let a: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        let b: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        let t = s.issue(a, "install").unwrap();
        assert_eq!(t.len(), 16 + 1 + 32, "{t}");
        assert!(s.verify(&t, a, "install").is_some());
        assert!(s.verify(&t, b, "install").is_none());
        assert!(s.verify(&t, a, "other").is_none());
        let other = Secret::from_bytes([8; SECRET_LEN]);
        assert!(other.verify(&t, a, "install").is_none());
        // Tampering with either half fails.
        let (id, tag) = t.split_once('.').unwrap();
        let mut flipped = tag.to_string();
        flipped.replace_range(0..1, if tag.starts_with('0') { "1" } else { "0" });
        assert!(s.verify(&format!("{id}.{flipped}"), a, "install").is_none());
        assert!(
            s.verify(&format!("0000000000000000.{tag}"), a, "install")
                .is_none()
        );
        assert!(s.verify("", a, "install").is_none());
        assert!(s.verify("zz.zz", a, "install").is_none());
        // Two boots get two tokens.
        assert_ne!(t, s.issue(a, "install").unwrap());
    }

    #[test]
    fn secret_file_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("http-secret");
        let s1 = Secret::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s2 = Secret::load_or_create(&p).unwrap();
        let mac = MacAddr::default();
        assert_eq!(
            s1.issue_with_boot_id(mac, "00", "p"),
            s2.issue_with_boot_id(mac, "00", "p")
        );
        std::fs::write(&p, b"short").unwrap();
        assert!(Secret::load_or_create(&p).is_err());
    }
}
