//! `pxelab bundle`: one file holding a lab (its TOML, the pxed config template, every quirk
//! profile it uses, ROM files it names) and optionally the artifacts of a run (pcaps, logs,
//! report), so someone else runs `pxelab run BUNDLE` and sees the same failure.
//!
//! The file is a gzip-compressed newc cpio archive (the same format as the lab's initramfs):
//! `lab.toml`, `pxed.toml`, `quirks/*.toml`, `roms/*`, `run/*` and a `MANIFEST`.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::cpio::CpioWriter;
use crate::quirks::{QuirkProfile, is_path};

/// gzip's magic: how `pxelab run` tells a bundle from a lab file.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Largest file taken into a bundle: pcaps of a boot are a few MB; a disk image is not evidence.
const MAX_FILE: u64 = 256 << 20;
/// Largest bundle unpacked (decompressed), against a gzip bomb.
const MAX_UNPACKED: u64 = 1 << 30;
/// Run artifacts worth shipping, by file name suffix.
const RUN_FILES: &[&str] = &[".pcap", ".log", ".json", ".jsonl", ".xml", ".toml", ".txt"];

/// Whether `path` is a bundle (rather than a lab TOML).
pub fn is_bundle(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == GZIP_MAGIC
}

fn read_limited(path: &Path) -> Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len > MAX_FILE {
        bail!(
            "{} is {len} bytes; bundles take files up to {MAX_FILE}",
            path.display()
        );
    }
    Ok(std::fs::read(path)?)
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name", path.display()))
}

/// Pack the lab at `lab_path` (and the run directory `run`, if given) into `out`.
pub fn pack(lab_path: &Path, run: Option<&Path>, out: &Path) -> Result<Vec<String>> {
    // Validate first: a bundle of a broken lab helps nobody.
    crate::labfile::LabFile::load(lab_path)?;
    let text = std::fs::read_to_string(lab_path)?;
    let mut lab: toml::Table = toml::from_str(&text)?;
    let base = lab_path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();

    if let Some(server) = lab.get_mut("server").and_then(|s| s.as_table_mut())
        && let Some(cfg) = server.get("config").and_then(|c| c.as_str())
    {
        let data = read_limited(&base.join(cfg))?;
        files.push(("pxed.toml".into(), data));
        server.insert("config".into(), "pxed.toml".into());
    }
    let mut manifest = String::from("pxelab bundle\n");
    manifest.push_str(&format!("pxelab {}\n", env!("CARGO_PKG_VERSION")));
    if let Some(machines) = lab.get_mut("machine").and_then(|m| m.as_array_mut()) {
        for m in machines.iter_mut().filter_map(|m| m.as_table_mut()) {
            let name = m
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("?")
                .to_string();
            // Firmware choices, spelled out even where the lab relies on defaults.
            let fw = m
                .get("firmware")
                .and_then(|v| v.as_str())
                .unwrap_or("seabios");
            let nic = m.get("nic").and_then(|v| v.as_str()).unwrap_or("e1000");
            let rom = m.get("rom").and_then(|v| v.as_str()).unwrap_or("default");
            manifest.push_str(&format!(
                "machine {name}: firmware {fw}, nic {nic}, rom {rom}\n"
            ));
            if !matches!(rom, "default" | "none") {
                let p = base.join(rom);
                let packed = format!("roms/{}", file_name(&p)?);
                files.push((packed.clone(), read_limited(&p)?));
                m.insert("rom".into(), packed.into());
            }
            let quirks: Vec<String> = m
                .get("quirks")
                .and_then(|q| q.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            let mut packed_quirks = Vec::new();
            for q in quirks {
                // Built-ins are packed too: the receiver's pxelab may have other versions.
                let (fname, data) = if is_path(&q) {
                    let p = base.join(&q);
                    (file_name(&p)?, read_limited(&p)?)
                } else {
                    let (n, t) = crate::quirks::BUILTIN
                        .iter()
                        .find(|(n, _)| *n == q)
                        .with_context(|| format!("no built-in quirk `{q}`"))?;
                    (format!("{n}.toml"), t.as_bytes().to_vec())
                };
                let packed = format!("quirks/{fname}");
                manifest.push_str(&format!("  quirk {q} -> {packed}\n"));
                if !files.iter().any(|(n, _)| n == &packed) {
                    files.push((packed.clone(), data));
                }
                packed_quirks.push(toml::Value::from(packed));
            }
            if !packed_quirks.is_empty() {
                m.insert("quirks".into(), toml::Value::Array(packed_quirks));
            }
        }
    }
    files.push(("lab.toml".into(), toml::to_string(&lab)?.into_bytes()));
    if let Some(run) = run {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(run)
            .with_context(|| format!("reading {}", run.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        for p in entries {
            let name = file_name(&p)?;
            if RUN_FILES.iter().any(|s| name.ends_with(s)) {
                files.push((format!("run/{name}"), read_limited(&p)?));
            }
        }
        manifest.push_str(&format!("run {}\n", run.display()));
    }
    files.push(("MANIFEST".into(), manifest.into_bytes()));

    let gz = GzEncoder::new(std::fs::File::create(out)?, Compression::default());
    let mut cpio = CpioWriter::new(gz);
    let mut dirs: Vec<&str> = Vec::new();
    for (name, _) in &files {
        if let Some((dir, _)) = name.split_once('/')
            && !dirs.contains(&dir)
        {
            dirs.push(dir);
        }
    }
    for d in &dirs {
        cpio.dir(d, 0o755)?;
    }
    for (name, data) in &files {
        cpio.file(name, 0o644, data)?;
    }
    cpio.finish()?.finish()?.flush()?;
    Ok(files.into_iter().map(|(n, _)| n).collect())
}

fn hex_field(h: &[u8], i: usize) -> Result<u64> {
    let f = h
        .get(6 + i * 8..6 + i * 8 + 8)
        .context("cpio header cut short")?;
    let s = std::str::from_utf8(f).context("cpio header is not text")?;
    u64::from_str_radix(s, 16).with_context(|| format!("cpio header field `{s}`"))
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Unpack a bundle into `dir`; returns the path of its `lab.toml`.
pub fn unpack(bundle: &Path, dir: &Path) -> Result<PathBuf> {
    let mut data = Vec::new();
    GzDecoder::new(std::fs::File::open(bundle)?)
        .take(MAX_UNPACKED + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("decompressing {}", bundle.display()))?;
    if data.len() as u64 > MAX_UNPACKED {
        bail!(
            "{} unpacks to more than {MAX_UNPACKED} bytes",
            bundle.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let mut at = 0usize;
    loop {
        // newc: "070701", 13 eight-digit hex fields, the name (NUL-terminated), padding to 4,
        // the data, padding to 4.
        let h = data
            .get(at..at + 110)
            .context("bundle ends without a trailer")?;
        if h.get(..6) != Some(b"070701") {
            bail!("bundle: bad cpio magic at offset {at}");
        }
        let mode = hex_field(h, 1)?;
        let size = usize::try_from(hex_field(h, 6)?)?;
        let namesize = usize::try_from(hex_field(h, 11)?)?;
        let name_start = at + 110;
        let name = data
            .get(name_start..name_start + namesize.saturating_sub(1))
            .context("bundle: name cut short")?;
        let name = std::str::from_utf8(name).context("bundle: file name is not UTF-8")?;
        let data_start = name_start + namesize + pad4(110 + namesize);
        if name == "TRAILER!!!" {
            break;
        }
        let body = data
            .get(data_start..data_start + size)
            .context("bundle: file cut short")?;
        // Only plain relative names: a bundle must not write outside its directory.
        let rel = Path::new(name);
        if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            bail!("bundle: refusing path `{name}`");
        }
        let target = dir.join(rel);
        if mode & 0o170_000 == 0o040_000 {
            std::fs::create_dir_all(&target)?;
        } else if mode & 0o170_000 == 0o100_000 {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, body)?;
        } else {
            bail!("bundle: `{name}` is neither a file nor a directory");
        }
        at = data_start + size + pad4(size);
    }
    let lab = dir.join("lab.toml");
    if !lab.exists() {
        bail!("{} holds no lab.toml", bundle.display());
    }
    Ok(lab)
}

/// Load a lab from a lab file or a bundle (unpacked under the runs directory).
pub fn load_lab(path: &Path) -> Result<crate::labfile::LabFile> {
    if !is_bundle(path) {
        return crate::labfile::LabFile::load(path);
    }
    let dir = crate::run::runs_root().join(format!(
        "bundle-{}-{}",
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let lab = unpack(path, &dir)?;
    let loaded = crate::labfile::LabFile::load(&lab)?;
    // A bundled profile must parse here too, or the run would fail later with less context.
    for m in &loaded.machines {
        for q in &m.quirks {
            QuirkProfile::resolve(q)?;
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_then_unpack_keeps_lab_config_quirks_and_run_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("my.pxed.toml"), "[dhcp]\nmode = \"full\"\n").unwrap();
        std::fs::write(
            d.join("mine.toml"),
            "name = \"mine\"\nsummary = \"s\"\nsource = \"firmware-quirks.md Q3\"\n[[rule]]\ndirection = \"to-client\"\nstrip_options = [60]\n",
        )
        .unwrap();
        std::fs::write(
            d.join("lab.toml"),
            "[lab]\nname = \"b\"\n[server]\nkind = \"pxed\"\nconfig = \"my.pxed.toml\"\n[[machine]]\nname = \"m\"\nfirmware = \"ovmf\"\nquirks = [\"mine.toml\", \"header-only\"]\nimpair = { loss = 0.1, seed = 3 }\n[[expect]]\nstage = \"dhcp.ack\"\nwithin = \"10s\"\n",
        )
        .unwrap();
        let run = d.join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("lab.pcap"), [1u8, 2, 3]).unwrap();
        std::fs::write(run.join("m.sock"), []).unwrap();
        let out = d.join("b.pxelab");
        let names = pack(&d.join("lab.toml"), Some(&run), &out).unwrap();
        assert!(names.contains(&"run/lab.pcap".to_string()));
        assert!(!names.iter().any(|n| n.ends_with(".sock")));
        assert!(is_bundle(&out) && !is_bundle(&d.join("lab.toml")));

        let un = d.join("unpacked");
        let lab_path = unpack(&out, &un).unwrap();
        let lab = crate::labfile::LabFile::load(&lab_path).unwrap();
        assert_eq!(lab.machines[0].quirks.len(), 2);
        for q in &lab.machines[0].quirks {
            assert!(q.starts_with(un.to_str().unwrap()), "{q}");
            QuirkProfile::resolve(q).unwrap();
        }
        assert_eq!(lab.machines[0].impair.as_ref().unwrap().seed, 3);
        assert_eq!(
            std::fs::read_to_string(lab.server.config.unwrap()).unwrap(),
            "[dhcp]\nmode = \"full\"\n"
        );
        assert_eq!(std::fs::read(un.join("run/lab.pcap")).unwrap(), [1, 2, 3]);
        let manifest = std::fs::read_to_string(un.join("MANIFEST")).unwrap();
        assert!(manifest.contains("machine m: firmware ovmf, nic e1000, rom default"));
    }

    #[test]
    fn hostile_bundles_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("evil.pxelab");
        let gz = GzEncoder::new(std::fs::File::create(&out).unwrap(), Compression::default());
        let mut cpio = CpioWriter::new(gz);
        cpio.file("../escape", 0o644, b"x").unwrap();
        cpio.finish().unwrap().finish().unwrap();
        assert!(unpack(&out, &dir.path().join("u")).is_err());
        assert!(!dir.path().join("escape").exists());
        std::fs::write(&out, [0x1f, 0x8b, 0, 0]).unwrap();
        assert!(unpack(&out, &dir.path().join("v")).is_err());
    }
}
