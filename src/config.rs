//! The config file: a TOML wire model that rejects unknown keys, checked into a [`Config`].
//! `pxed check FILE` prints every problem with its line and column.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dhcp::DhcpConfig;
use crate::http::HttpConfig;
use crate::policy::{
    GroupConfig, IpxeBinaries, MachineConfig, Policy, PolicyConfig, PolicyErrors, ProfileConfig,
};
use crate::tftp::TftpConfig;

/// `[server]`: where pxed listens and what it serves.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The interface to serve. DHCP listens only there (SO_BINDTODEVICE).
    pub interface: Option<String>,
    /// The server's address on that interface; read from the interface when absent.
    pub address: Option<Ipv4Addr>,
    /// The boot root: TFTP and HTTP serve files from here and never from outside it.
    pub root: PathBuf,
    /// Append every boot event as a JSON line to this file.
    #[serde(default)]
    pub event_log: Option<PathBuf>,
    /// Directory for pxed's state (leases, one-shot boot state).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// After binding its sockets, switch to this user (name or uid), keeping only the
    /// network capabilities pxed uses (see SECURITY.md). Unset: stay as started.
    #[serde(default)]
    pub user: Option<String>,
}

/// The whole file, as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[server]`.
    pub server: ServerSection,
    /// `[dhcp]`.
    #[serde(default)]
    pub dhcp: DhcpConfig,
    /// `[tftp]`.
    #[serde(default)]
    pub tftp: TftpConfig,
    /// `[http]`.
    #[serde(default)]
    pub http: HttpConfig,
    /// `[ipxe]`.
    #[serde(default)]
    pub ipxe: IpxeBinaries,
    /// `[[profile]]`.
    #[serde(default)]
    pub profile: Vec<ProfileConfig>,
    /// `[[group]]`.
    #[serde(default)]
    pub group: Vec<GroupConfig>,
    /// `[[machine]]`.
    #[serde(default)]
    pub machine: Vec<MachineConfig>,
}

/// A checked configuration, ready to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// `[server]`.
    pub server: ServerSection,
    /// `[dhcp]`.
    pub dhcp: DhcpConfig,
    /// `[tftp]`.
    pub tftp: TftpConfig,
    /// `[http]`.
    pub http: HttpConfig,
    /// Profiles, groups and machines.
    pub policy: Policy,
}

/// Why a config cannot be used. Each variant says where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Not valid TOML, or a key or value the model does not accept.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The policy sections do not fit together: every problem, each at its entry's line.
    #[error("{}", located.iter().map(|(line, e)| format!("{}:{line}: {e}", path.display())).collect::<Vec<_>>().join("\n"))]
    Policy {
        /// File.
        path: PathBuf,
        /// Each problem with the 1-based line of the `[[table]]` entry it is in (1 if unknown).
        located: Vec<(usize, crate::policy::PolicyError)>,
    },
    /// A value that parses but cannot work.
    #[error("{path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// The problem.
        message: String,
    },
}

/// The line of the `[[table]]` entry whose `name` (or `mac`, for machines) is `key`.
fn entry_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let header = format!("[[{table}]]");
    let field = if table == "machine" { "mac" } else { "name" };
    let mut current: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            current = (t == header).then_some(i + 1);
            continue;
        }
        if let (Some(start), Some((k, v))) = (current, t.split_once('='))
            && k.trim() == field
            && v.trim().trim_matches('"').eq_ignore_ascii_case(key)
        {
            return Some(start);
        }
    }
    None
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Config {
    /// Read and check a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Check config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_located(text, path).map_err(|e| match e {
            ConfigError::Policy { path, located } => ConfigError::Policy {
                path,
                located: located
                    .into_iter()
                    .map(|(_, err)| {
                        let (table, key) = err.subject();
                        (entry_line(text, table, &key).unwrap_or(1), err)
                    })
                    .collect(),
            },
            other => other,
        })
    }

    fn parse_located(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        Config::from_file(file, path)
    }

    /// Check a parsed file.
    pub fn from_file(file: ConfigFile, path: &Path) -> Result<Config, ConfigError> {
        let policy = PolicyConfig {
            ipxe: file.ipxe,
            profiles: file.profile,
            groups: file.group,
            machines: file.machine,
        }
        .validate()
        .map_err(|PolicyErrors(errors)| ConfigError::Policy {
            path: path.to_path_buf(),
            located: errors.into_iter().map(|e| (1, e)).collect(),
        })?;
        file.dhcp
            .validate()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("[dhcp]: {message}"),
            })?;
        file.http
            .validate()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("[http]: {message}"),
            })?;
        Ok(Config {
            server: file.server,
            dhcp: file.dhcp,
            tftp: file.tftp,
            http: file.http,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_loads() {
        let cfg = Config::parse(
            "[server]\nroot = \"/srv/pxe\"\n[[profile]]\nname = \"default\"\nlocal = true\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(cfg.server.root, PathBuf::from("/srv/pxe"));
    }

    #[test]
    fn a_short_api_token_is_refused() {
        let text = "[server]\nroot = \"/srv\"\n[http]\napi_token = \"abc\"\n";
        let err = Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[http]: api_token"), "{err}");
    }

    #[test]
    fn unknown_key_reports_line_and_column() {
        let text = "[server]\nroot = \"/srv\"\n\n[tftp]\nblksize_max = 1\nbogus = 2\n";
        let err = Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("t.toml:6:1:"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn policy_error_names_the_file() {
        let text = "[server]\nroot = \"/srv\"\n[[group]]\nname = \"g\"\nprofile = \"x\"\n";
        let err = Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t.toml:3: group `g` refers to profile `x`"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod located_tests {
    use super::*;

    #[test]
    fn every_policy_error_is_reported_at_its_entry() {
        let text = r#"[server]
root = "/srv"
[[profile]]
name = "a"
[[profile]]
name = "b"
local = true
nbp = "x"
[[group]]
name = "g"
profile = "nope"
[[machine]]
mac = "52:54:00:00:00:01"
profile = "gone"
"#;
        let err = Config::parse(text, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 4, "{err}");
        assert!(
            lines[0].starts_with("t.toml:3: profile `a`: sets no way to boot"),
            "{err}"
        );
        assert!(
            lines[1].starts_with("t.toml:5: profile `b`: sets several ways"),
            "{err}"
        );
        assert!(
            lines[2].starts_with("t.toml:9: group `g` refers to profile `nope`"),
            "{err}"
        );
        assert!(
            lines[3].starts_with("t.toml:12: machine 52:54:00:00:00:01 refers"),
            "{err}"
        );
    }
}
