//! `pxelab import FILE.ova|FILE.ovf`: another VirtualBox or VMware export becomes a lab VM
//! definition plus qcow2 disks.
//!
//! Every NIC joins the lab network (NAT, bridged, host-only and the rest with a warning that
//! says so), MAC addresses are kept unless asked otherwise (per-MAC boot records depend on
//! them), manifest checksums are verified, disks are converted with `qemu-img`. Everything is
//! written into a private directory that is renamed into place at the end: a refusal leaves
//! nothing behind.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use pxed::mac::MacAddr;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::export::virtual_size;
use crate::images::tempdir_in;
use crate::ovf::{MAX_DISK_BYTES, MAX_OVF_BYTES, OvfMachine, parse_ovf};
use crate::vmdef::{DiskDef, LAB_NETWORK, NicDef, VmDef, VmFile};

/// Files in an OVA beyond which it is refused (descriptor, manifest, certificate, disks).
pub const MAX_OVA_ENTRIES: usize = 64;
/// A manifest larger than this is refused (a line per file).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;
/// VM names are cut to this length (file names, VirtualBox and libvirt are all happy with it).
const MAX_NAME: usize = 64;

/// Options for one import.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The machine goes into `<out_dir>/<name>/`.
    pub out_dir: PathBuf,
    /// Give every NIC a new MAC (VirtualBox's default on import; off here).
    pub new_macs: bool,
    /// MACs already on the lab (name, MAC): a clash is reported.
    pub known_macs: Vec<(String, MacAddr)>,
}

/// What an import produced.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The machine's directory.
    pub dir: PathBuf,
    /// Its definition file (`<dir>/<name>.toml`).
    pub definition: PathBuf,
    /// The definition.
    pub vm: VmFile,
    /// The converted disks (qcow2), first one boots.
    pub disks: Vec<PathBuf>,
    /// What the import changed or ignored.
    pub warnings: Vec<String>,
    /// What the descriptor said.
    pub source: OvfMachine,
}

/// Import an OVA or OVF. Errors name the file and, for descriptor problems, the element.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).with_context(|| format!("{shown}: cannot read"))?;
    if !meta.is_file() {
        bail!("{shown}: not a file");
    }
    std::fs::create_dir_all(&opts.out_dir)?;
    let out_dir = opts.out_dir.canonicalize()?;
    let work = tempdir_in(&out_dir, "import")?;
    let is_ova = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("ova"));
    // (descriptor bytes, directory holding its files, manifest path)
    let (ovf_bytes, files_dir, manifest) = if is_ova {
        let extracted = work.path.join("ova");
        std::fs::create_dir_all(&extracted)?;
        let (ovf_name, mf_name) = extract_ova(path, &extracted).with_context(|| shown.clone())?;
        let bytes = std::fs::read(extracted.join(&ovf_name))?;
        (bytes, extracted.clone(), mf_name.map(|m| extracted.join(m)))
    } else {
        if meta.len() > MAX_OVF_BYTES as u64 {
            bail!(
                "{shown}: descriptor: {} bytes, more than the {MAX_OVF_BYTES} a descriptor may have",
                meta.len()
            );
        }
        let bytes = std::fs::read(path)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mf = path.with_extension("mf");
        (bytes, dir, mf.exists().then_some(mf))
    };
    let source = parse_ovf(&ovf_bytes).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    let mut warnings = source.warnings.clone();

    if let Some(mf) = &manifest {
        verify_manifest(mf, &files_dir, is_ova.then_some(&ovf_bytes))
            .with_context(|| format!("{shown}: manifest {}", mf.display()))?;
    } else {
        warnings.push("no manifest: file checksums not verified".into());
    }

    let name = sanitize_name(&source.name);
    // Disks: every one must be there, plain-named, the size References says, and sane.
    let mut disks = Vec::new();
    for (i, d) in source.disks.iter().enumerate() {
        let el = format!("References/File `{}` (disk {})", d.href, d.disk_id);
        if d.href.contains('/') || d.href.contains('\\') || d.href == ".." || d.href.is_empty() {
            bail!("{shown}: {el}: must be a plain file name next to the descriptor");
        }
        let src = files_dir.join(&d.href);
        let len = std::fs::metadata(&src)
            .map(|m| m.len())
            .map_err(|_| anyhow::anyhow!("{shown}: {el}: the disk file is missing"))?;
        if let Some(expect) = d.file_size
            && expect != len
        {
            bail!("{shown}: {el}: the file has {len} bytes, ovf:size says {expect}");
        }
        let vsize = virtual_size(&src).with_context(|| format!("{shown}: {el}"))?;
        if vsize > MAX_DISK_BYTES {
            bail!("{shown}: {el}: virtual size {vsize} bytes is absurd");
        }
        if vsize != d.capacity {
            warnings.push(format!(
                "{el}: the image's virtual size is {vsize} bytes, the descriptor says {}",
                d.capacity
            ));
        }
        let out = work.path.join(format!("{name}-disk{}.qcow2", i + 1));
        crate::netns::run(
            Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&src)
                .arg(&out),
        )
        .with_context(|| format!("{shown}: {el}: converting"))?;
        crate::netns::run(Command::new("qemu-img").arg("check").arg(&out))
            .with_context(|| format!("{shown}: {el}: the converted disk"))?;
        disks.push(out);
    }
    if disks.len() > 1 {
        warnings.push(format!(
            "{} disks: the lab boots the first, the others are converted alongside",
            disks.len()
        ));
    }

    // NICs: all onto the lab network; MACs kept (or renewed), gaps filled, clashes reported.
    let mut nics = Vec::new();
    let mut seen: HashMap<MacAddr, String> = opts
        .known_macs
        .iter()
        .map(|(n, m)| (*m, n.clone()))
        .collect();
    for (i, n) in source.nics.iter().enumerate() {
        let label = format!("NIC {}", i + 1);
        let what = match (&n.attachment_name, n.attachment.as_str()) {
            (Some(nm), a) => format!("{a} `{nm}`"),
            (None, "") => "no connection".to_string(),
            (None, a) => a.to_string(),
        };
        if !(n.attachment == "Internal" && n.attachment_name.as_deref() == Some(LAB_NETWORK)) {
            warnings.push(format!(
                "{label} ({what}) becomes the lab network `{LAB_NETWORK}`"
            ));
        }
        let mac = match (n.mac, opts.new_macs) {
            (Some(m), false) => m,
            (old, _) => {
                let m = random_mac()?;
                warnings.push(match old {
                    Some(o) => format!("{label}: new MAC {m} (was {o}, --new-macs)"),
                    None => format!("{label}: the file has no MAC; gave it {m}"),
                });
                m
            }
        };
        if let Some(other) = seen.get(&mac) {
            warnings.push(format!(
                "{label}: MAC {mac} is also used by {other}: duplicate on the lab (use --new-macs)"
            ));
        } else {
            seen.insert(mac, format!("{name} {label}"));
        }
        nics.push(NicDef {
            model: n.model.clone(),
            mac,
            network: LAB_NETWORK.into(),
        });
    }
    let vm = VmFile {
        vm: VmDef {
            name: name.clone(),
            description: format!(
                "imported from {}",
                path.file_name().and_then(|f| f.to_str()).unwrap_or("?")
            ),
            firmware: source.firmware,
            cpus: source.cpus,
            memory_mib: source.memory_mib,
            boot: source
                .boot
                .iter()
                .copied()
                .filter(|b| match b {
                    crate::vmdef::BootDevice::Disk => !disks.is_empty(),
                    crate::vmdef::BootDevice::Network => !nics.is_empty(),
                })
                .collect(),
            nic: nics,
        },
        disk: disks.first().map(|d| DiskDef {
            recipe: None,
            path: d.file_name().map(PathBuf::from),
        }),
        server: None,
    };
    vm.validate()
        .with_context(|| format!("{shown}: the imported machine"))?;
    let mut text = String::from("# Imported by `pxelab import`.\n");
    for w in &warnings {
        text.push_str(&format!("# warning: {w}\n"));
    }
    text.push_str(&toml::to_string(&vm)?);
    std::fs::write(work.path.join(format!("{name}.toml")), text)?;
    let _ = std::fs::remove_dir_all(work.path.join("ova"));

    let dir = out_dir.join(&name);
    if dir.exists() {
        bail!(
            "{}: already exists; remove it or import elsewhere",
            dir.display()
        );
    }
    std::fs::rename(&work.path, &dir)?;
    let mut vm = vm;
    if let Some(d) = &mut vm.disk {
        d.path = d.path.as_ref().map(|p| dir.join(p));
    }
    Ok(Imported {
        definition: dir.join(format!("{name}.toml")),
        disks: disks
            .iter()
            .filter_map(|d| d.file_name().map(|f| dir.join(f)))
            .collect(),
        dir,
        vm,
        warnings,
        source,
    })
}

/// The CLI: import, print warnings and the definition's path; known MACs come from the
/// shipped definitions and machines imported before into `out`.
pub fn cli_import(file: &Path, out: &Path, new_macs: bool) -> std::process::ExitCode {
    let mut known = Vec::new();
    let mut dirs = vec![crate::vmdef::definitions_dir()];
    if let Ok(rd) = std::fs::read_dir(out) {
        dirs.extend(
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir()),
        );
    }
    for d in dirs {
        for e in std::fs::read_dir(&d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
        {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml")
                && let Ok(text) = std::fs::read_to_string(&p)
                && let Ok(def) = toml::from_str::<VmFile>(&text)
            {
                known.extend(def.vm.nic.iter().map(|n| (def.vm.name.clone(), n.mac)));
            }
        }
    }
    let opts = ImportOptions {
        out_dir: out.to_path_buf(),
        new_macs,
        known_macs: known,
    };
    match import(file, &opts) {
        Ok(imp) => {
            for w in &imp.warnings {
                eprintln!("pxelab: warning: {w}");
            }
            println!("{}", imp.definition.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pxelab: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Extract an OVA's plain files into `into`; returns (descriptor name, manifest name).
fn extract_ova(path: &Path, into: &Path) -> Result<(String, Option<String>)> {
    let f = std::fs::File::open(path)?;
    let mut ar = tar::Archive::new(f);
    let mut ovf = None;
    let mut mf = None;
    let mut count = 0;
    for entry in ar.entries().context("not a tar archive")? {
        let mut entry = entry.context("a damaged tar entry")?;
        count += 1;
        if count > MAX_OVA_ENTRIES {
            bail!("more than {MAX_OVA_ENTRIES} files in the OVA");
        }
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::GNUSparse
        ) {
            bail!(
                "OVA entry {:?}: only plain files are allowed",
                entry.path().ok()
            );
        }
        let name = entry
            .path()
            .ok()
            .and_then(|p| p.to_str().map(str::to_string))
            .context("an OVA entry with a non-UTF-8 name")?;
        let name = name.strip_prefix("./").unwrap_or(&name).to_string();
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.starts_with('.') {
            bail!("OVA entry `{name}`: must be a plain file name");
        }
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".ovf") {
            if ovf.is_some() {
                bail!("two descriptors (.ovf) in the OVA");
            }
            if count != 1 {
                // VirtualBox streams OVAs and wants the descriptor first.
                bail!("OVA entry `{name}`: the descriptor must be the first file");
            }
            if entry.size() > MAX_OVF_BYTES as u64 {
                bail!(
                    "descriptor `{name}`: {} bytes is more than {MAX_OVF_BYTES}",
                    entry.size()
                );
            }
            ovf = Some(name.clone());
        } else if lower.ends_with(".mf") {
            if entry.size() > MAX_MANIFEST_BYTES {
                bail!(
                    "manifest `{name}`: {} bytes is more than {MAX_MANIFEST_BYTES}",
                    entry.size()
                );
            }
            mf = Some(name.clone());
        }
        let dest = into.join(&name);
        if dest.exists() {
            bail!("OVA entry `{name}` appears twice");
        }
        let mut out = std::fs::File::create(&dest)?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("OVA entry `{name}`: truncated"))?;
    }
    let ovf = ovf.context("no descriptor (.ovf) in the OVA")?;
    Ok((ovf, mf))
}

/// Check every `SHA256(file)= hex` / `SHA1(file)= hex` line; in an OVA every file must be
/// listed except the manifest and certificate.
fn verify_manifest(mf: &Path, dir: &Path, _ova: Option<&Vec<u8>>) -> Result<()> {
    let len = std::fs::metadata(mf)?.len();
    if len > MAX_MANIFEST_BYTES {
        bail!("{len} bytes is more than {MAX_MANIFEST_BYTES}");
    }
    let text = std::fs::read_to_string(mf).context("not UTF-8")?;
    let mut checked = 0;
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || anyhow::anyhow!("line {}: `{line}` is not `ALG(file)= hex`", no + 1);
        let (alg, rest) = line.split_once('(').ok_or_else(bad)?;
        let (file, rest) = rest.split_once(")=").ok_or_else(bad)?;
        let want = rest.trim().to_ascii_lowercase();
        let file = file.trim();
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            bail!("line {}: `{file}` is not a plain file name", no + 1);
        }
        let path = dir.join(file);
        let got = match alg.trim() {
            "SHA256" => hash_file::<Sha256>(&path),
            "SHA1" => hash_file::<Sha1>(&path),
            other => bail!(
                "line {}: digest {other} is not supported (SHA1, SHA256)",
                no + 1
            ),
        }
        .with_context(|| format!("line {}: {file} is missing", no + 1))?;
        if got != want {
            bail!("{file}: checksum {got} does not match the manifest's {want}");
        }
        checked += 1;
    }
    if checked == 0 {
        bail!("no checksums in it");
    }
    Ok(())
}

fn hash_file<D: Digest>(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = D::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A fresh MAC in VirtualBox's OUI (08:00:27), as VirtualBox itself assigns.
fn random_mac() -> Result<MacAddr> {
    let mut b = [0u8; 3];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(MacAddr([0x08, 0x00, 0x27, b[0], b[1], b[2]]))
}

/// A lab-safe machine name: letters, digits, `-`, `_`.
pub fn sanitize_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME)
        .collect();
    if n.trim_matches('-').is_empty() {
        "imported".into()
    } else {
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize_name("Ubuntu 22.04 (x)"), "Ubuntu-22-04--x-");
        assert_eq!(sanitize_name("../.."), "imported");
        assert_eq!(sanitize_name(&"a".repeat(200)).len(), MAX_NAME);
    }

    #[test]
    fn manifests_are_checked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.ovf"), b"hello").unwrap();
        let good = format!(
            "SHA256(a.ovf)= {}\n",
            hash_file::<Sha256>(&d.path().join("a.ovf")).unwrap()
        );
        std::fs::write(d.path().join("a.mf"), &good).unwrap();
        verify_manifest(&d.path().join("a.mf"), d.path(), None).unwrap();
        std::fs::write(
            d.path().join("a.mf"),
            good.replace("SHA256(a.ovf)= 2", "SHA256(a.ovf)= 3"),
        )
        .unwrap();
        let e = verify_manifest(&d.path().join("a.mf"), d.path(), None).unwrap_err();
        assert!(format!("{e:#}").contains("does not match"), "{e:#}");
        std::fs::write(d.path().join("a.mf"), "SHA256(../etc/passwd)= 00\n").unwrap();
        assert!(verify_manifest(&d.path().join("a.mf"), d.path(), None).is_err());
        std::fs::write(d.path().join("a.mf"), "MD5(a.ovf)= 00\n").unwrap();
        assert!(verify_manifest(&d.path().join("a.mf"), d.path(), None).is_err());
    }
}
