//! The `pxed` command line.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use pxed::config::Config;
use pxed::dhcp::DhcpMode;
use pxed::server::{self, ServeOptions};

/// pxed: a PXE boot server (DHCP or proxyDHCP, TFTP and HTTP) in one binary.
///
/// Quick start, beside your existing DHCP server (proxy mode):
///
///     pxed serve --interface eth0 --root /srv/netboot
///
/// pxed then answers only machines that network-boot, hands BIOS firmware undionly.kpxe and
/// UEFI firmware snponly.efi by TFTP (put them in the root, e.g. from Debian's `ipxe`
/// package: /usr/lib/ipxe/), and hands iPXE a script from its HTTP server. Put the boot policy in a config file for
/// more: `pxed serve --config pxed.toml`; check it first with `pxed check pxed.toml`.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Config file (TOML). Without one, pxed runs proxy mode with a default profile.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Interface to serve (overrides the config).
        #[arg(long, short)]
        interface: Option<String>,
        /// Boot root: the directory TFTP and HTTP serve (overrides the config).
        #[arg(long, short)]
        root: Option<PathBuf>,
        /// DHCP mode (overrides the config).
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Server address (default: the interface's first IPv4 address).
        #[arg(long)]
        address: Option<Ipv4Addr>,
        /// Append every boot event as a JSON line to this file.
        #[arg(long)]
        event_log: Option<PathBuf>,
        /// After binding its sockets, switch to this user, keeping only the network
        /// capabilities pxed uses (overrides the config's `[server] user`).
        #[arg(long)]
        user: Option<String>,
        /// State directory: leases, the generated admin API token, one-shot boot state
        /// (overrides the config's `[server] state_dir`; default /var/lib/pxed).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Write boot media (USB image and ISO, BIOS and UEFI) that start iPXE from a stick or
    /// CD and netboot through this pxed: for machines whose NIC has no working PXE ROM.
    Media {
        /// pxed's HTTP base URL, e.g. http://192.168.1.10:8080.
        #[arg(long)]
        server: String,
        /// Output directory (pxed-boot.img, pxed-boot.iso, pxed-boot.ipxe).
        #[arg(long, short, default_value = ".")]
        out: PathBuf,
        /// iPXE as a Linux kernel image, for BIOS (default: Debian's ipxe.lkrn).
        #[arg(long)]
        ipxe_lkrn: Option<PathBuf>,
        /// iPXE for x86-64 UEFI (default: Debian's ipxe.efi).
        #[arg(long)]
        ipxe_efi: Option<PathBuf>,
        /// Only the USB disk image.
        #[arg(long, conflicts_with = "iso_only")]
        usb_only: bool,
        /// Only the ISO.
        #[arg(long)]
        iso_only: bool,
    },
    /// Check a config file and report every problem with its location.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// List leases from the state directory.
    Leases {
        /// Config file (for its state directory).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// State directory (overrides the config).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Import leases (into the store) and static hosts (printed as [[dhcp.reservation]]
    /// TOML) from dnsmasq or ISC dhcpd. Run it with pxed stopped.
    Import {
        /// Which server the files come from.
        #[arg(long, value_enum)]
        from: ImportFrom,
        /// Its lease file (dnsmasq.leases, dhcpd.leases).
        #[arg(long)]
        leases: Option<PathBuf>,
        /// Its config file (for static hosts).
        #[arg(long)]
        hosts: Option<PathBuf>,
        /// pxed's state directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ImportFrom {
    Dnsmasq,
    Dhcpd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Proxy,
    Full,
    Off,
}

impl From<ModeArg> for DhcpMode {
    fn from(m: ModeArg) -> DhcpMode {
        match m {
            ModeArg::Proxy => DhcpMode::Proxy,
            ModeArg::Full => DhcpMode::Full,
            ModeArg::Off => DhcpMode::Off,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PXED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Check { file } => match Config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} mode, {} profiles, {} groups, {} machines)",
                    file.display(),
                    format!("{:?}", cfg.dhcp.mode).to_lowercase(),
                    cfg.policy.profile_count(),
                    cfg.policy.group_count(),
                    cfg.policy.machine_count(),
                );
                Ok(())
            }
            Err(err) => {
                eprintln!("{err}");
                return ExitCode::from(2);
            }
        },
        Command::Serve {
            config,
            interface,
            root,
            mode,
            address,
            event_log,
            user,
            state_dir,
        } => {
            let opts = ServeOptions {
                config,
                interface,
                root,
                mode: mode.map(Into::into),
                address,
                event_log,
                user,
                state_dir,
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(server::serve(opts)))
        }
        Command::Leases {
            config,
            state_dir,
            json,
        } => server::print_leases(config.as_deref(), state_dir.as_deref(), json),
        Command::Import {
            from,
            leases,
            hosts,
            state_dir,
        } => {
            let source = match from {
                ImportFrom::Dnsmasq => pxed::leases::import::Source::Dnsmasq,
                ImportFrom::Dhcpd => pxed::leases::import::Source::Dhcpd,
            };
            server::import(source, leases.as_deref(), hosts.as_deref(), &state_dir)
        }
        Command::Media {
            server,
            out,
            ipxe_lkrn,
            ipxe_efi,
            usb_only,
            iso_only,
        } => {
            let mut opts = pxed::media::MediaOptions::new(&server, &out);
            opts.ipxe_lkrn = ipxe_lkrn.unwrap_or(opts.ipxe_lkrn);
            opts.ipxe_efi = ipxe_efi.unwrap_or(opts.ipxe_efi);
            if usb_only {
                opts.kinds = vec![pxed::media::MediaKind::Usb];
            } else if iso_only {
                opts.kinds = vec![pxed::media::MediaKind::Iso];
            }
            pxed::media::write_media(&opts)
                .map(|paths| {
                    for p in paths {
                        println!("{}", p.display());
                    }
                })
                .map_err(anyhow::Error::from)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pxed: {err:#}");
            ExitCode::FAILURE
        }
    }
}
