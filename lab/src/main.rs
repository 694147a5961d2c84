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
    /// Boot the demo lab: a BIOS and a UEFI machine network-boot through pxed.
    Demo {
        /// The pxed binary (default: $PXELAB_PXED, else `pxed` on PATH).
        #[arg(long)]
        pxed: Option<PathBuf>,
    },
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run { lab, run_dir } => match pxelab::labfile::LabFile::load(&lab) {
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
