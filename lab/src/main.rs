//! The `pxelab` command: run labs, check the host, clean up leftovers.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pxelab",
    about = "Network-boot lab: QEMU machines, a virtual LAN, a stage oracle"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a lab file (or a bundle) and report every machine's stages.
    Run {
        /// The lab definition (TOML), or a bundle made by `pxelab bundle`.
        lab: PathBuf,
        /// Put artifacts here instead of under $PXELAB_RUNS.
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Boot the demo lab: a BIOS and a UEFI machine network-boot through pxed.
    Demo {
        /// The pxed binary (default: $PXELAB_PXED, else `pxed` on PATH).
        #[arg(long)]
        pxed: Option<PathBuf>,
    },
    /// List the built-in firmware quirk profiles with their sources; show or check one.
    Quirks {
        /// Print this profile's TOML.
        #[arg(long)]
        show: Option<String>,
        /// Run this profile's check (both sides) in the lab.
        #[arg(long)]
        check: Option<String>,
        /// Run every built-in profile's check.
        #[arg(long)]
        check_all: bool,
    },
    /// Replay the client side of a capture from a real network against pxed in the lab and
    /// show where pxed's replies differ from the captured ones.
    Replay {
        /// The capture (pcap or pcapng, Ethernet).
        capture: PathBuf,
        /// pxed config template (default lab/labs/pxed-full.pxed.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Put the lab's capture and logs here.
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Pack a lab (TOML, pxed config, quirk profiles, ROMs, and a run's pcaps and logs) into
    /// one file that `pxelab run` takes.
    Bundle {
        /// The lab definition (TOML).
        lab: PathBuf,
        /// A run directory whose artifacts to include.
        #[arg(long)]
        run: Option<PathBuf>,
        /// The bundle to write.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Boot the firmware x NIC matrix through pxed and print machines x stages.
    Matrix(MatrixArgs),
    /// Check QEMU, ROMs, firmware, KVM, namespace rights and disk space.
    Doctor,
    /// Remove namespaces and QEMU processes left by crashed runs.
    Clean,
    /// Export prepared VMs (vm-images/*.toml) as OVA (VirtualBox) and libvirt XML.
    Export {
        /// VM definitions.
        #[arg(required = true)]
        definitions: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "pxelab-export")]
        out: PathBuf,
        /// The pxed binary for the server image (default: $PXELAB_PXED, then PATH).
        #[arg(long)]
        pxed: Option<PathBuf>,
    },
    /// Power-cut durability: pxed in the server VM under perfdhcp load, QEMU SIGKILLed
    /// `--kills` times and rebooted from its disk; every acknowledged lease must survive.
    Durability(DurabilityArgs),
    /// Import a VirtualBox or VMware export (.ova or .ovf) as a lab machine.
    Import {
        /// The .ova or .ovf.
        file: PathBuf,
        /// The machine goes into <out>/<name>/.
        #[arg(long, default_value = "pxelab-machines")]
        out: PathBuf,
        /// Give every NIC a new MAC (default: keep them).
        #[arg(long)]
        new_macs: bool,
    },
}

/// Run a lab, print its report, and turn the verdict into an exit code.
fn run_and_report(lab: &pxelab::labfile::LabFile, run_dir: Option<PathBuf>) -> ExitCode {
    let opts = pxelab::run::RunOptions {
        progress: true,
        run_dir,
    };
    match pxelab::run::run_lab(lab, &opts) {
        Ok(report) => {
            print!("{}", report.summary());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("pxelab: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(clap::Args)]
struct MatrixArgs {
    /// Entries (or name prefixes, e.g. `bios-`) to run; default: the standard set.
    names: Vec<String>,
    /// Every entry, including the slow ones.
    #[arg(long)]
    all: bool,
    /// Only the representative subset `cargo test` runs.
    #[arg(long)]
    ci: bool,
    /// Machines booted at once.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// List the entries and exit.
    #[arg(long)]
    list: bool,
    /// The pxed binary (default $PXELAB_PXED, else pxed on PATH).
    #[arg(long)]
    pxed: Option<PathBuf>,
    /// Put artifacts here instead of under $PXELAB_RUNS.
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

fn matrix(args: MatrixArgs) -> ExitCode {
    let opts = pxelab::matrix::MatrixOptions {
        only: args.names,
        all: args.all,
        ci: args.ci,
        parallel: args.parallel,
        pxed: args.pxed,
        run_dir: args.run_dir,
        progress: true,
    };
    if args.list {
        return match pxelab::matrix::select(&opts) {
            Ok(list) => {
                for e in list {
                    println!(
                        "{:<20} {:<13} {:<15} {:<9} {}",
                        e.name,
                        e.firmware.as_str(),
                        e.nic,
                        format!("{:?}", e.tier).to_lowercase(),
                        e.about
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pxelab: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match pxelab::matrix::run_matrix(&opts) {
        Ok(report) => {
            print!("{}", report.table());
            println!("artifacts in {}", report.run_dir.display());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("pxelab: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[derive(clap::Args)]
struct DurabilityArgs {
    /// Power cuts.
    #[arg(long, default_value_t = 20)]
    kills: u32,
    /// Seed of the kill moments (default: from the clock; the report prints it).
    #[arg(long)]
    seed: Option<u64>,
    /// perfdhcp exchanges per second.
    #[arg(long)]
    rate: Option<u32>,
    /// The pxed binary for the server image (default $PXELAB_PXED, else pxed on PATH).
    #[arg(long)]
    pxed: Option<PathBuf>,
    /// Where the disk, captures and consoles go (default: a new directory under /tmp).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

fn durability(args: DurabilityArgs) -> ExitCode {
    let pxed = args
        .pxed
        .or_else(|| std::env::var_os("PXELAB_PXED").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("pxed"));
    let pxed = match pxelab::vmserver::resolve_binary(pxed) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pxelab: {e:#}");
            return ExitCode::from(2);
        }
    };
    let run_dir = args.run_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pxelab-durability-{}", std::process::id()))
    });
    let mut opts = pxelab::durability::DurabilityOptions::new(args.kills, run_dir, pxed);
    if let Some(seed) = args.seed {
        opts.seed = seed;
    }
    if let Some(rate) = args.rate {
        opts.rate = rate;
    }
    match pxelab::durability::run_durability(&opts) {
        Ok(report) => {
            print!("{}", report.summary());
            println!(
                "report in {}",
                report.run_dir.join("durability.json").display()
            );
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("pxelab: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Matrix(args) => matrix(args),
        Cmd::Durability(args) => durability(args),
        Cmd::Run { lab, run_dir } => match pxelab::bundle::load_lab(&lab) {
            Ok(l) => run_and_report(&l, run_dir),
            Err(e) => {
                eprintln!("pxelab: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Demo { pxed } => {
            let dir = pxelab::run::runs_root().join("demo-config");
            match pxelab::demo::demo_lab(&dir) {
                Ok(mut lab) => {
                    lab.server.binary = pxed;
                    run_and_report(&lab, None)
                }
                Err(e) => {
                    eprintln!("pxelab: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Quirks {
            show,
            check,
            check_all,
        } => pxelab_quirks(show, check, check_all),
        Cmd::Replay {
            capture,
            config,
            run_dir,
        } => {
            let result = std::fs::read(&capture)
                .map_err(anyhow::Error::from)
                .and_then(|b| pxelab::replay::read_capture(&b))
                .and_then(|frames| {
                    let opts = pxelab::replay::ReplayOptions {
                        pxed: std::env::var_os("PXELAB_PXED")
                            .map(PathBuf::from)
                            .unwrap_or_else(|| PathBuf::from("pxed")),
                        config: config
                            .unwrap_or_else(|| PathBuf::from("lab/labs/pxed-full.pxed.toml")),
                        run_dir: run_dir
                            .unwrap_or_else(|| pxelab::replay::default_run_dir(&capture)),
                    };
                    pxelab::replay::replay(&frames, &opts)
                });
            match result {
                Ok(report) => {
                    print!("{}", report.render());
                    if report.difference_count() == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("pxelab: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Bundle { lab, run, output } => {
            match pxelab::bundle::pack(&lab, run.as_deref(), &output) {
                Ok(files) => {
                    println!("{}: {}", output.display(), files.join(", "));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pxelab: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Doctor => {
            let mut bad = 0;
            for c in pxelab::doctor::doctor() {
                match &c.result {
                    Ok(d) => println!("ok    {:<26} {d}", c.what),
                    Err(p) => {
                        bad += 1;
                        println!("FAIL  {:<26} {p}", c.what);
                        if let Some(fix) = &c.fix {
                            println!("      fix: {fix}");
                        }
                    }
                }
            }
            if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Cmd::Export {
            definitions,
            out,
            pxed,
        } => match pxelab::export::export_definitions(&definitions, &out, pxed.as_deref()) {
            Ok(done) => {
                for e in done {
                    println!("{}\n{}", e.ova.display(), e.libvirt_xml.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pxelab: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Import {
            file,
            out,
            new_macs,
        } => pxelab::import::cli_import(&file, &out, new_macs),
        Cmd::Clean => {
            let done = pxelab::cleanup::clean(&pxelab::run::runs_root());
            if done.is_empty() {
                println!("nothing to clean");
            }
            for d in done {
                println!("{d}");
            }
            ExitCode::SUCCESS
        }
    }
}

fn pxelab_quirks(show: Option<String>, check: Option<String>, check_all: bool) -> ExitCode {
    use pxelab::quirks::{BUILTIN, QuirkProfile};
    if let Some(name) = show {
        return match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("pxelab: no built-in profile `{name}`");
                ExitCode::from(2)
            }
        };
    }
    let profiles = match QuirkProfile::builtins() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pxelab: {e:#}");
            return ExitCode::from(2);
        }
    };
    let selected: Vec<&QuirkProfile> = match (&check, check_all) {
        (Some(name), _) => profiles.iter().filter(|p| &p.name == name).collect(),
        (None, true) => profiles.iter().collect(),
        (None, false) => {
            for p in &profiles {
                println!("{:<28} {}", p.name, p.summary);
                println!("{:<28} source: {}", "", p.source);
                if let Some(c) = &p.check
                    && let Some(stage) = c.fail_stage
                {
                    println!(
                        "{:<28} fails at {stage} with {}; pxed's defaults boot",
                        "",
                        toml::Value::Table(c.fail_config.clone())
                    );
                } else {
                    println!("{:<28} boot side only: no lab server setup fails on it", "");
                }
            }
            return ExitCode::SUCCESS;
        }
    };
    if selected.is_empty() {
        eprintln!(
            "pxelab: no built-in profile `{}`",
            check.unwrap_or_default()
        );
        return ExitCode::from(2);
    }
    let labs = std::env::var_os("PXELAB_LABS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("lab/labs"));
    let scratch = pxelab::run::runs_root().join("quirk-configs");
    let started = std::time::Instant::now();
    let mut bad = 0;
    for p in selected {
        match pxelab::quirks::run_check(p, &labs, &scratch, &|_| {}) {
            Ok(sides) => {
                for s in sides {
                    if !s.as_expected {
                        bad += 1;
                    }
                    println!(
                        "{:<5} {:<28} {:<6} {:>6.1} s  {}  ({})",
                        if s.as_expected { "ok" } else { "FAIL" },
                        p.name,
                        format!("{:?}", s.side).to_lowercase(),
                        s.duration_ms as f64 / 1000.0,
                        s.summary,
                        s.run_dir.display()
                    );
                }
            }
            Err(e) => {
                bad += 1;
                println!("ERROR {:<28} {e:#}", p.name);
            }
        }
    }
    println!("{bad} unexpected, {:.0} s", started.elapsed().as_secs_f64());
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
