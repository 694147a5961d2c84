//! `pxed media`: boot media (a USB disk image and an ISO, each BIOS and UEFI) that start iPXE
//! from a stick or CD instead of the NIC's ROM, the classic workaround for a NIC whose own PXE
//! is missing or broken. iPXE carries its own drivers, so the machine then netboots through
//! pxed whatever its NIC firmware does.
//!
//! What the media hold:
//! - BIOS: SYSLINUX (ISOLINUX on the CD) loads `ipxe.lkrn` with `boot.ipxe` as its initrd;
//!   iPXE runs an initrd that is a script, so the script (DHCP, then chain to this pxed's
//!   `boot.ipxe` URL) is embedded without rebuilding iPXE.
//! - UEFI: `EFI/BOOT/BOOTX64.EFI` is `ipxe.efi`. Debian's iPXE (a 2019 snapshot) takes no
//!   script on UEFI (no command line, no `autoexec.ipxe`), so it runs its default: DHCP, then
//!   the boot file it is offered; pxed offers iPXE its script URL in full and proxy mode
//!   alike. Pass an `ipxe.efi` built with `EMBED=` to carry the script on UEFI too.
//!
//! The images are made with the standard tools (`mkfs.fat`, `mtools`, `syslinux`, `xorriso`),
//! which are run as processes; a missing tool is reported with the package that has it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `ipxe` package puts its binaries.
pub const IPXE_DIR: &str = "/usr/lib/ipxe";
/// SYSLINUX's BIOS modules (`syslinux-common`).
const SYSLINUX_MODULES: &str = "/usr/lib/syslinux/modules/bios";
/// ISOLINUX's boot image and hybrid MBR (`isolinux`).
const ISOLINUX_DIR: &str = "/usr/lib/ISOLINUX";
/// Room left on a FAT image beyond its files: FAT tables, directories, SYSLINUX's ldlinux.
const FAT_SLACK_KIB: u64 = 2048;
/// The smallest FAT image made: mkfs.fat refuses tiny FAT12/16 volumes with many clusters.
const MIN_FAT_KIB: u64 = 4096;

/// What went wrong making media.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// An input file is missing.
    #[error("{what} {path} does not exist{hint}")]
    Missing {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// A tool failed or is missing.
    #[error("{tool} failed: {detail} (it is in Debian's `{package}` package)")]
    Tool {
        /// The program.
        tool: String,
        /// Its stderr or the spawn error.
        detail: String,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// Writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The server URL is not usable in a script.
    #[error("server URL `{0}`: expected http://host[:port] with no spaces or quotes")]
    BadUrl(String),
}

/// Which images to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    /// `pxed-boot.img`: a FAT "superfloppy" disk image for a USB stick (BIOS and UEFI).
    Usb,
    /// `pxed-boot.iso`: an El Torito CD (ISOLINUX for BIOS, a FAT EFI image for UEFI),
    /// hybrid so it can also be written to a stick.
    Iso,
}

/// Inputs for [`write_media`].
#[derive(Clone, Debug)]
pub struct MediaOptions {
    /// pxed's HTTP base URL, e.g. `http://192.168.1.10:8080`.
    pub server_url: String,
    /// Where the images go.
    pub out_dir: PathBuf,
    /// iPXE as a Linux kernel image (BIOS), default `/usr/lib/ipxe/ipxe.lkrn`.
    pub ipxe_lkrn: PathBuf,
    /// iPXE for x86-64 UEFI, default `/usr/lib/ipxe/ipxe.efi`.
    pub ipxe_efi: PathBuf,
    /// Which images.
    pub kinds: Vec<MediaKind>,
}

impl MediaOptions {
    /// Defaults for a server URL: Debian's iPXE binaries, both images, into `out_dir`.
    pub fn new(server_url: &str, out_dir: &Path) -> Self {
        MediaOptions {
            server_url: server_url.trim_end_matches('/').to_string(),
            out_dir: out_dir.to_path_buf(),
            ipxe_lkrn: Path::new(IPXE_DIR).join("ipxe.lkrn"),
            ipxe_efi: Path::new(IPXE_DIR).join("ipxe.efi"),
            kinds: vec![MediaKind::Usb, MediaKind::Iso],
        }
    }
}

/// The iPXE script the media run: get an address, then boot what this pxed says, retrying
/// forever (a machine booted from a stick has nothing better to do).
pub fn boot_script(server_url: &str) -> Result<String, MediaError> {
    let url = server_url.trim_end_matches('/');
    let ok = url.starts_with("http://")
        && url.len() > "http://".len()
        && !url
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\'' || c == '$');
    if !ok {
        return Err(MediaError::BadUrl(server_url.to_string()));
    }
    Ok(format!(
        "#!ipxe\n\
         # Written by `pxed media`: netboot through pxed at {url}, whatever the NIC's ROM.\n\
         :start\n\
         echo pxed media: booting through {url}\n\
         dhcp || goto retry\n\
         chain {url}/boot.ipxe || goto retry\n\
         :retry\n\
         echo pxed media: no boot from {url} yet, retrying in 5 s\n\
         sleep 5\n\
         goto start\n"
    ))
}

/// SYSLINUX/ISOLINUX config: iPXE with the script as its initrd, no menu, no wait.
const SYSLINUX_CFG: &str = "DEFAULT pxed\n\
PROMPT 0\n\
TIMEOUT 0\n\
LABEL pxed\n  \
KERNEL /ipxe.lkrn\n  \
INITRD /boot.ipxe\n";

/// Write the selected images; returns their paths.
pub fn write_media(opts: &MediaOptions) -> Result<Vec<PathBuf>, MediaError> {
    let script = boot_script(&opts.server_url)?;
    for (what, path) in [
        ("iPXE kernel image", &opts.ipxe_lkrn),
        ("iPXE EFI binary", &opts.ipxe_efi),
    ] {
        if !path.exists() {
            return Err(MediaError::Missing {
                what,
                path: path.clone(),
                hint: " (apt-get install ipxe)".into(),
            });
        }
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(io(&opts.out_dir))?;
    let work = opts.out_dir.join(".pxed-media-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let script_path = work.join("boot.ipxe");
    write(&script_path, script.as_bytes())?;
    let cfg_path = work.join("syslinux.cfg");
    write(&cfg_path, SYSLINUX_CFG.as_bytes())?;
    // The script also goes beside the images, so people can read what the media do.
    write(&opts.out_dir.join("pxed-boot.ipxe"), script.as_bytes())?;

    let mut out = Vec::new();
    for kind in &opts.kinds {
        match kind {
            MediaKind::Usb => {
                let img = opts.out_dir.join("pxed-boot.img");
                let files = [
                    (opts.ipxe_lkrn.as_path(), "ipxe.lkrn"),
                    (script_path.as_path(), "boot.ipxe"),
                    (cfg_path.as_path(), "syslinux.cfg"),
                    (opts.ipxe_efi.as_path(), "EFI/BOOT/BOOTX64.EFI"),
                ];
                fat_image(&img, "PXEDBOOT", &files)?;
                // SYSLINUX's boot sector and ldlinux.sys/ldlinux.c32, written through mtools.
                run(
                    "syslinux",
                    &["--install".as_ref(), img.as_os_str()],
                    "syslinux",
                )?;
                out.push(img);
            }
            MediaKind::Iso => {
                let iso = opts.out_dir.join("pxed-boot.iso");
                let tree = work.join("iso");
                let isolinux_dir = tree.join("isolinux");
                std::fs::create_dir_all(&isolinux_dir).map_err(io(&isolinux_dir))?;
                let isolinux_bin = Path::new(ISOLINUX_DIR).join("isolinux.bin");
                let hybrid_mbr = Path::new(ISOLINUX_DIR).join("isohdpfx.bin");
                for p in [&isolinux_bin, &hybrid_mbr] {
                    if !p.exists() {
                        return Err(MediaError::Missing {
                            what: "ISOLINUX file",
                            path: p.clone(),
                            hint: " (apt-get install isolinux)".into(),
                        });
                    }
                }
                copy(&isolinux_bin, &isolinux_dir.join("isolinux.bin"))?;
                copy(
                    &Path::new(SYSLINUX_MODULES).join("ldlinux.c32"),
                    &isolinux_dir.join("ldlinux.c32"),
                )?;
                copy(&cfg_path, &isolinux_dir.join("isolinux.cfg"))?;
                copy(&opts.ipxe_lkrn, &tree.join("ipxe.lkrn"))?;
                copy(&script_path, &tree.join("boot.ipxe"))?;
                // UEFI boots a CD from a FAT image named in the El Torito catalogue.
                fat_image(
                    &tree.join("efiboot.img"),
                    "PXEDEFI",
                    &[(opts.ipxe_efi.as_path(), "EFI/BOOT/BOOTX64.EFI")],
                )?;
                let args: Vec<std::ffi::OsString> = vec![
                    "-as".into(),
                    "mkisofs".into(),
                    "-quiet".into(),
                    "-V".into(),
                    "PXED_BOOT".into(),
                    "-o".into(),
                    iso.clone().into(),
                    "-isohybrid-mbr".into(),
                    hybrid_mbr.into(),
                    "-b".into(),
                    "isolinux/isolinux.bin".into(),
                    "-c".into(),
                    "isolinux/boot.cat".into(),
                    "-no-emul-boot".into(),
                    "-boot-load-size".into(),
                    "4".into(),
                    "-boot-info-table".into(),
                    "-eltorito-alt-boot".into(),
                    "-e".into(),
                    "efiboot.img".into(),
                    "-no-emul-boot".into(),
                    "-isohybrid-gpt-basdat".into(),
                    tree.clone().into(),
                ];
                let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
                run("xorriso", &refs, "xorriso")?;
                out.push(iso);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}

/// A FAT image holding `files` (source, path inside), sized to fit them.
fn fat_image(img: &Path, label: &str, files: &[(&Path, &str)]) -> Result<(), MediaError> {
    let mut kib = FAT_SLACK_KIB;
    for (src, _) in files {
        let len = std::fs::metadata(src).map_err(io(src))?.len();
        kib += len.div_ceil(1024);
    }
    let kib = kib.max(MIN_FAT_KIB);
    let _ = std::fs::remove_file(img);
    run(
        "mkfs.fat",
        &[
            "-C".as_ref(),
            "-n".as_ref(),
            label.as_ref(),
            img.as_os_str(),
            kib.to_string().as_ref(),
        ],
        "dosfstools",
    )?;
    let mut made_dirs: Vec<String> = Vec::new();
    for (src, inside) in files {
        // mtools makes no parent directories: create each level once.
        let mut prefix = String::new();
        let parts: Vec<&str> = inside.split('/').collect();
        for dir in parts.iter().take(parts.len().saturating_sub(1)) {
            prefix = if prefix.is_empty() {
                (*dir).to_string()
            } else {
                format!("{prefix}/{dir}")
            };
            if !made_dirs.contains(&prefix) {
                let target = format!("::/{prefix}");
                run(
                    "mmd",
                    &["-i".as_ref(), img.as_os_str(), target.as_ref()],
                    "mtools",
                )?;
                made_dirs.push(prefix.clone());
            }
        }
        let target = format!("::/{inside}");
        run(
            "mcopy",
            &[
                "-i".as_ref(),
                img.as_os_str(),
                src.as_os_str(),
                target.as_ref(),
            ],
            "mtools",
        )?;
    }
    Ok(())
}

fn run(tool: &str, args: &[&std::ffi::OsStr], package: &'static str) -> Result<(), MediaError> {
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| MediaError::Tool {
            tool: tool.to_string(),
            detail: e.to_string(),
            package,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MediaError::Tool {
            tool: tool.to_string(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            package,
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MediaError + '_ {
    move |source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, data: &[u8]) -> Result<(), MediaError> {
    std::fs::write(path, data).map_err(io(path))
}

fn copy(from: &Path, to: &Path) -> Result<(), MediaError> {
    if !from.exists() {
        return Err(MediaError::Missing {
            what: "file",
            path: from.to_path_buf(),
            hint: String::new(),
        });
    }
    std::fs::copy(from, to).map(|_| ()).map_err(io(to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_points_at_the_server() {
        let s = boot_script("http://10.0.0.1:8080/").unwrap();
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("chain http://10.0.0.1:8080/boot.ipxe || goto retry\n"));
        assert!(s.contains("dhcp || goto retry\n"));
        for bad in [
            "10.0.0.1",
            "http://",
            "http://a b",
            "http://x/$y",
            "ftp://x",
        ] {
            assert!(boot_script(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_ipxe_is_reported() {
        let dir = std::env::temp_dir().join(format!("pxed-media-test-{}", std::process::id()));
        let mut opts = MediaOptions::new("http://10.0.0.1:8080", &dir);
        opts.ipxe_lkrn = dir.join("nope.lkrn");
        let err = write_media(&opts).unwrap_err();
        assert!(err.to_string().contains("apt-get install ipxe"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
