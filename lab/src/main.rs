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
    /// Run a lab file and report every machine's stages.
    Run {
        /// The lab definition (TOML).
        lab: PathBuf,
        /// Put artifacts here instead of under $PXELAB_RUNS.
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
    /// Boot the firmware x NIC matrix through pxed and print machines x stages.
    Matrix(MatrixArgs),
    /// Check QEMU, ROMs, firmware, KVM, namespace rights and disk space.
    Doctor,
    /// Remove namespaces and QEMU processes left by crashed runs.
    Clean,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Matrix(args) => matrix(args),
        Cmd::Run { lab, run_dir } => {
            let lab = match pxelab::labfile::LabFile::load(&lab) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("pxelab: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let opts = pxelab::run::RunOptions {
                progress: true,
                run_dir,
            };
            match pxelab::run::run_lab(&lab, &opts) {
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
