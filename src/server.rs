//! `pxed serve`: load the config, bind every socket, run DHCP, TFTP and HTTP on one runtime,
//! and stop cleanly on Ctrl-C or SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::{Config, ServerSection};
use crate::dhcp::engine::DhcpEngine;
use crate::dhcp::server::{DhcpServer, find_other_servers};
use crate::dhcp::{DhcpConfig, DhcpMode};
use crate::events::EventBus;
use crate::http::BootStateStore;
use crate::http::server::{HttpState, MacLookup};
use crate::leases::hook::LeaseHook;
use crate::leases::{LEASE_DB, LeaseStore, SqliteStore};
use crate::net;
use crate::policy::{ClientFacts, IpxeBinaries, PolicyConfig, ProfileConfig, ServerAddrs, plan};
use crate::tftp;
use tokio_util::sync::CancellationToken;

/// How long pxed listens for other DHCP servers when it starts.
const FOREIGN_SERVER_WAIT: Duration = Duration::from_secs(2);
/// Where leases live without `state_dir` in the config.
const DEFAULT_STATE_DIR: &str = "/var/lib/pxed";

/// Command-line settings; each overrides the config file.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Config file.
    pub config: Option<PathBuf>,
    /// Interface.
    pub interface: Option<String>,
    /// Boot root.
    pub root: Option<PathBuf>,
    /// DHCP mode.
    pub mode: Option<DhcpMode>,
    /// Server address.
    pub address: Option<Ipv4Addr>,
    /// Event file.
    pub event_log: Option<PathBuf>,
    /// User to switch to after binding.
    pub user: Option<String>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
}

/// The config used without a file: proxy mode and one default profile. The default boots
/// `vmlinuz` + `initrd.img` from the root when both are there, and otherwise an iPXE script
/// that says what to do.
pub fn zero_config(root: &Path) -> anyhow::Result<Config> {
    let default = if root.join("vmlinuz").is_file() && root.join("initrd.img").is_file() {
        ProfileConfig {
            name: "default".into(),
            kernel: Some("vmlinuz".into()),
            initrd: vec!["initrd.img".into()],
            ..Default::default()
        }
    } else {
        ProfileConfig {
            name: "default".into(),
            script: Some(
                "echo pxed: no boot profile is configured for this machine.\n\
                 echo Put vmlinuz and initrd.img in the boot root, or write a config\n\
                 echo (see `pxed serve --help`). Booting from local disk in 10 seconds.\n\
                 sleep 10\nexit\n"
                    .into(),
            ),
            ..Default::default()
        }
    };
    let policy = PolicyConfig {
        ipxe: IpxeBinaries::default(),
        profiles: vec![default],
        groups: Vec::new(),
        machines: Vec::new(),
    }
    .validate()?;
    Ok(Config {
        server: ServerSection {
            interface: None,
            address: None,
            root: root.to_path_buf(),
            event_log: None,
            state_dir: None,
            user: None,
        },
        dhcp: DhcpConfig::default(),
        tftp: Default::default(),
        http: Default::default(),
        policy,
    })
}

/// Apply command-line overrides to a loaded or zero config.
fn effective_config(opts: &ServeOptions) -> anyhow::Result<Config> {
    let mut cfg = match (&opts.config, &opts.root) {
        (Some(path), _) => Config::load(path)?,
        (None, Some(root)) => zero_config(root)?,
        (None, None) => bail!("give --config FILE, or --root DIR for a zero-config proxy"),
    };
    if let Some(i) = &opts.interface {
        cfg.server.interface = Some(i.clone());
    }
    if let Some(r) = &opts.root {
        cfg.server.root = r.clone();
    }
    if let Some(m) = opts.mode {
        cfg.dhcp.mode = m;
    }
    if let Some(a) = opts.address {
        cfg.server.address = Some(a);
    }
    if let Some(e) = &opts.event_log {
        cfg.server.event_log = Some(e.clone());
    }
    if let Some(u) = &opts.user {
        cfg.server.user = Some(u.clone());
    }
    if let Some(d) = &opts.state_dir {
        cfg.server.state_dir = Some(d.clone());
    }
    cfg.dhcp
        .validate()
        .map_err(|m| anyhow::anyhow!("[dhcp]: {m}"))?;
    Ok(cfg)
}

/// The `[http]` section with its admin API token: the configured one, else the one kept in
/// `<state_dir>/api-token`, generated (mode 0600) on first start. The log says where the file
/// is, never the token.
fn with_api_token(cfg: &Config) -> anyhow::Result<crate::http::HttpConfig> {
    let mut http = cfg.http.clone();
    if http.api_token.is_none() {
        let dir = cfg
            .server
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let path = dir.join(crate::http::token::API_TOKEN_FILE);
        let token = crate::http::token::load_or_create_api_token(&path)
            .with_context(|| format!("admin API token {}", path.display()))?;
        tracing::info!(file = %path.display(), "admin API token (bearer) is in this file");
        http.api_token = Some(token);
    }
    Ok(http)
}

/// Run the server until Ctrl-C or SIGTERM.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let cfg = effective_config(&opts)?;
    if !cfg.server.root.is_dir() {
        bail!("boot root {} is not a directory", cfg.server.root.display());
    }
    let server_ip = match (cfg.server.address, cfg.server.interface.as_deref()) {
        (Some(a), _) => a,
        (None, Some(ifname)) => net::interface_ipv4(ifname)?.0,
        (None, None) => bail!("give --interface (or [server] address) so pxed knows its address"),
    };
    let events = match &cfg.server.event_log {
        Some(path) => EventBus::with_file(path)
            .with_context(|| format!("cannot open event log {}", path.display()))?,
        None => EventBus::new(),
    };
    let policy = Arc::new(cfg.policy.clone());
    // One-shot state and the HTTP token secret survive restarts in the state directory (the
    // default one when a one-shot profile needs it); without either they live in memory. One
    // store for DHCP, TFTP and HTTP, so all three plan with the same state.
    let persistent_dir = cfg.server.state_dir.clone().or_else(|| {
        cfg.policy
            .has_one_shot()
            .then(|| PathBuf::from(DEFAULT_STATE_DIR))
    });
    let boot_states: Arc<dyn BootStateStore> = match &persistent_dir {
        Some(dir) => Arc::new(crate::http::FileBootStates::open(
            &dir.join("boot-state.json"),
        )?),
        None => Arc::new(crate::http::MemoryBootStates::default()),
    };

    // The UUID each client announced, seen by DHCP (option 97) and HTTP (iPXE `${uuid}`), for
    // the templates of that machine.
    let uuids = Arc::new(crate::mac::UuidMemory::default());
    // Each machine's firmware architecture and vendor class, seen by DHCP, for the TFTP
    // requests of its boot loader (which carry only the MAC).
    let firmware = Arc::new(crate::policy::FirmwareMemory::default());

    let mut tasks = tokio::task::JoinSet::new();
    let dhcp_counters = crate::dhcp::limits::DhcpCounters::default();
    let mut engine_for_lookup = None;
    let mut engine_for_reload: Option<Arc<Mutex<DhcpEngine>>> = None;
    if cfg.dhcp.mode != DhcpMode::Off {
        let (store, leases): (Arc<dyn LeaseStore>, _) = if cfg.dhcp.mode == DhcpMode::Full {
            let dir = cfg
                .server
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
            let store = SqliteStore::open(&dir.join(LEASE_DB))?;
            let leases = store.load()?;
            (Arc::new(store), leases)
        } else {
            (Arc::new(NoLeases), Vec::new())
        };
        tracing::info!(leases = leases.len(), "lease store loaded");
        let engine = Arc::new(Mutex::new(
            DhcpEngine::new(cfg.dhcp.clone(), policy.clone(), cfg.http.port, leases)
                .with_boot_states(boot_states.clone())
                .with_uuid_memory(uuids.clone())
                .with_firmware_memory(firmware.clone()),
        ));
        engine_for_lookup = Some(engine.clone());
        engine_for_reload = Some(engine.clone());
        let dhcp = DhcpServer {
            engine,
            store,
            events: events.clone(),
            interface: cfg.server.interface.clone(),
            server_ip,
            port_4011: cfg.dhcp.port_4011,
            hook: cfg.dhcp.lease_hook.clone().map(LeaseHook::start),
            max_batch: cfg.dhcp.max_commit_batch,
            counters: dhcp_counters.clone(),
        }
        .bind()?;
        tasks.spawn(dhcp);
        if let (true, Some(ifname)) = (cfg.dhcp.ipv6_ra_enabled(), cfg.server.interface.clone()) {
            tasks.spawn(crate::ipv6_ra::run(ifname, events.clone()));
        }
        if let Some(ifname) = cfg.server.interface.clone() {
            let mode = cfg.dhcp.mode;
            let probe_every = (cfg.dhcp.foreign_probe_secs > 0)
                .then(|| std::time::Duration::from_secs(cfg.dhcp.foreign_probe_secs));
            tasks.spawn(crate::dhcp::server::watch_other_servers(
                ifname.clone(),
                server_ip,
                mode,
                probe_every,
                events.clone(),
                dhcp_counters.clone(),
            ));
            tasks.spawn(async move {
                report_other_servers(&ifname, server_ip, mode).await;
                Ok(())
            });
        }
    }
    // TFTP and HTTP name the machine behind a request by its lease, else the ARP table.
    let mac_lookup: MacLookup = Arc::new(move |ip: IpAddr| {
        let IpAddr::V4(v4) = ip else { return None };
        engine_for_lookup
            .as_ref()
            .and_then(|e| e.lock().ok().and_then(|e| e.pool().owner(v4)))
            .or_else(|| net::neighbour_mac(v4))
    });
    if cfg.tftp.enabled {
        let files = tftp::server::root_source(&cfg.tftp, cfg.server.root.clone())
            .with_context(|| format!("boot root {}", cfg.server.root.display()))?;
        // Profiles with their own `tftp_root`: the client's plan (by its MAC) picks the root.
        let files: Arc<dyn tftp::fs::FileSource> = if policy.tftp_roots().next().is_some() {
            let plan_policy = policy.clone();
            let plan_mac = mac_lookup.clone();
            let addrs = ServerAddrs {
                ip: server_ip,
                http_port: cfg.http.port,
            };
            let plan_states = boot_states.clone();
            let plan_firmware = firmware.clone();
            let plan_of: tftp::roots::PlanLookup = Arc::new(move |ip: IpAddr| {
                let mac = plan_mac(ip)?;
                let facts = ClientFacts {
                    mac,
                    ..ClientFacts::default()
                }
                .with_firmware(plan_firmware.get(&mac));
                let state = plan_states.get(&facts.mac);
                Some(plan(&plan_policy, &facts, &state, &addrs))
            });
            Arc::new(tftp::roots::ProfileRoots::new(
                files, &policy, &cfg.tftp, plan_of,
            )?)
        } else {
            files
        };
        // Real files first, then pxelinux/GRUB configs and boot.ipxe rendered from the policy.
        let files = Arc::new(
            tftp::virtual_files::PolicyFiles::new(
                files,
                policy.clone(),
                ServerAddrs {
                    ip: server_ip,
                    http_port: cfg.http.port,
                },
            )
            .with_boot_states(boot_states.clone())
            .with_firmware_memory(firmware.clone()),
        );
        let bind = SocketAddr::from((server_ip, cfg.tftp.port));
        let tftp = tftp::server::TftpServer::bind(
            cfg.tftp.clone(),
            bind,
            files,
            events.clone(),
            mac_lookup.clone(),
        )
        .await?;
        tasks.spawn(tftp.run(CancellationToken::new()));
    }
    if cfg.http.enabled {
        let bind = SocketAddr::new(
            cfg.http.bind.unwrap_or(IpAddr::V4(server_ip)),
            cfg.http.port,
        );
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .with_context(|| format!("cannot bind HTTP to {bind}"))?;
        let http_config = with_api_token(&cfg)?;
        let mut state = HttpState::new(
            cfg.server.root.clone(),
            Arc::new(RwLock::new(cfg.policy.clone())),
            ServerAddrs {
                ip: server_ip,
                http_port: cfg.http.port,
            },
            events.clone(),
            http_config,
        )
        .with_mac_lookup(mac_lookup.clone())
        // Script URLs say `tftp://<ip>/`, which means port 69.
        .with_tftp(cfg.tftp.enabled && cfg.tftp.port == 69)
        .with_dhcp_counters(&dhcp_counters)
        .with_boot_states(boot_states.clone())
        .with_uuid_memory(uuids.clone());
        if let Some(dir) = &persistent_dir {
            let secret_path = dir.join("http-secret");
            let secret = crate::http::Secret::load_or_create(&secret_path)
                .with_context(|| format!("token secret {}", secret_path.display()))?;
            state = state.with_secret(secret);
        }
        if cfg.http.tls_cert.is_some() != cfg.http.tls_key.is_some() {
            bail!("[http]: give both tls_cert and tls_key, or neither");
        }
        if let (Some(cert), Some(key)) = (&cfg.http.tls_cert, &cfg.http.tls_key) {
            let tls = crate::http::tls::server_config(cert, key)?;
            let bind = SocketAddr::new(bind.ip(), cfg.http.tls_port);
            let tls_listener = tokio::net::TcpListener::bind(bind)
                .await
                .with_context(|| format!("cannot bind HTTPS to {bind}"))?;
            tasks.spawn(crate::http::server::serve_tls(
                tls_listener,
                state.clone(),
                tls,
                std::future::pending(),
            ));
        }
        tasks.spawn(crate::http::server::serve(
            listener,
            state,
            std::future::pending(),
        ));
    }
    if let Some(name) = cfg.server.user.as_deref() {
        drop_privileges(&cfg, name)?;
    }
    tracing::info!(
        %server_ip,
        mode = ?cfg.dhcp.mode,
        root = %cfg.server.root.display(),
        interface = cfg.server.interface.as_deref().unwrap_or("(all)"),
        "pxed serving"
    );

    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    tokio::pin!(shutdown);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        tokio::select! {
            _ = async { match hangup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                reload(&opts, engine_for_reload.as_ref());
            }
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                return Ok(());
            }
            done = tasks.join_next() => match done {
                None => std::future::pending::<()>().await,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(err))) => return Err(err),
                Some(Err(err)) => return Err(err.into()),
            }
        }
    }
}

/// Every socket is bound: become `name`, keeping only the capabilities the running features
/// use (src/privs.rs says which needs what), with the state directory handed over.
fn drop_privileges(cfg: &Config, name: &str) -> anyhow::Result<()> {
    let user = crate::privs::lookup_user(name)?;
    let state_dir = cfg
        .server
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    if state_dir.is_dir() {
        crate::privs::give_dir(&state_dir, &user)
            .with_context(|| format!("cannot hand {} to {name}", state_dir.display()))?;
    }
    let mut keep = Vec::new();
    if cfg.dhcp.mode != DhcpMode::Off && cfg.server.interface.is_some() {
        // ARP entries for unicast replies; port-68 sockets of the foreign-server watch,
        // bound to the interface.
        keep.extend([
            crate::privs::CAP_NET_ADMIN,
            crate::privs::CAP_NET_RAW,
            crate::privs::CAP_NET_BIND_SERVICE,
        ]);
    }
    if cfg.dhcp.mode != DhcpMode::Off && cfg.dhcp.ipv6_ra_enabled() {
        keep.push(crate::privs::CAP_NET_RAW);
    }
    crate::privs::drop_to(&user, &keep).with_context(|| format!("cannot switch to user {name}"))?;
    tracing::info!(user = name, uid = user.uid, caps = ?keep, "privileges dropped");
    Ok(())
}

/// SIGHUP: read the config again and give the DHCP engine its new subnets, reservations,
/// options and policy. Leases stay (they live in the engine's pool and the store); a config
/// that does not load is reported and the running one kept.
fn reload(opts: &ServeOptions, engine: Option<&Arc<Mutex<DhcpEngine>>>) {
    let cfg = match effective_config(opts) {
        Ok(cfg) => cfg,
        Err(err) => {
            tracing::error!(%err, "SIGHUP: config not reloaded; keeping the running one");
            return;
        }
    };
    if let Some(engine) = engine
        && let Ok(mut e) = engine.lock()
    {
        let leases = e.pool().leases().count();
        e.reconfigure(cfg.dhcp.clone(), Arc::new(cfg.policy.clone()));
        tracing::info!(
            leases,
            subnets = cfg.dhcp.subnet.len(),
            "SIGHUP: DHCP config reloaded"
        );
    }
}

async fn report_other_servers(ifname: &str, ip: Ipv4Addr, mode: DhcpMode) {
    match find_other_servers(ifname, ip, FOREIGN_SERVER_WAIT).await {
        Ok(found) if found.is_empty() => match mode {
            DhcpMode::Proxy => tracing::warn!(
                "proxy mode, but no other DHCP server answered on {ifname}: clients will get \
                 boot data but no address; run with --mode full if pxed should give addresses"
            ),
            _ => tracing::info!("no other DHCP server on {ifname}"),
        },
        Ok(found) => {
            for f in found {
                match mode {
                    DhcpMode::Full => tracing::warn!(
                        server = %f.server, offered = %f.offered, pxe = f.pxe,
                        "another DHCP server answers on {ifname}: clients may take its offers"
                    ),
                    _ => tracing::info!(
                        server = %f.server, offered = %f.offered, pxe = f.pxe,
                        "DHCP server on {ifname} gives the addresses; pxed adds boot data (proxy mode)"
                    ),
                }
            }
        }
        Err(err) => tracing::warn!(%err, "could not look for other DHCP servers"),
    }
}

/// Proxy mode keeps no leases.
struct NoLeases;

impl LeaseStore for NoLeases {
    fn load(&self) -> Result<Vec<crate::dhcp::pool::Lease>, crate::leases::StoreError> {
        Ok(Vec::new())
    }
    fn commit(
        &self,
        _: &[crate::dhcp::engine::LeaseChange],
    ) -> Result<(), crate::leases::StoreError> {
        Ok(())
    }
}

/// `pxed leases`: print the leases in the state directory.
pub fn print_leases(
    config: Option<&Path>,
    state_dir: Option<&Path>,
    json: bool,
) -> anyhow::Result<()> {
    let dir = match (state_dir, config) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(c)) => Config::load(c)?
            .server
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        (None, None) => PathBuf::from(DEFAULT_STATE_DIR),
    };
    let path = dir.join(LEASE_DB);
    if !path.exists() {
        bail!("no lease store at {}", path.display());
    }
    let mut leases = SqliteStore::open_read_only(&path)?.load()?;
    leases.sort_by_key(|l| l.ip);
    if json {
        println!("{}", serde_json::to_string_pretty(&leases)?);
    } else {
        println!("{:<17}  {:<15}  {:<10}  hostname", "mac", "ip", "expires");
        for l in leases {
            println!(
                "{:<17}  {:<15}  {:<10}  {}",
                l.mac.to_string(),
                l.ip.to_string(),
                l.expires,
                l.hostname.as_deref().unwrap_or("-")
            );
        }
    }
    Ok(())
}

/// `pxed import`: leases from another server's lease file into the store (all in one
/// transaction), static hosts printed as `[[dhcp.reservation]]` TOML to paste into the config.
pub fn import(
    source: crate::leases::import::Source,
    leases: Option<&Path>,
    hosts: Option<&Path>,
    state_dir: &Path,
) -> anyhow::Result<()> {
    use crate::leases::import;
    if let Some(path) = leases {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let found = import::leases(source, &text, now)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let store = SqliteStore::open(&state_dir.join(LEASE_DB))?;
        let changes: Vec<_> = found
            .iter()
            .cloned()
            .map(crate::dhcp::engine::LeaseChange::Commit)
            .collect();
        store.commit(&changes)?;
        eprintln!(
            "imported {} active leases from {}",
            found.len(),
            path.display()
        );
    }
    if let Some(path) = hosts {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let found = import::reservations(source, &text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for r in &found {
            println!("{}", r.to_toml());
        }
        eprintln!("{} static hosts from {}", found.len(), path.display());
    }
    Ok(())
}
