//! `pxelab demo`: the demo lab built into the binary, so it runs from anywhere: a BIOS
//! (SeaBIOS + iPXE ROM) and a UEFI (OVMF, EDK2's own PXE) machine boot through pxed in full mode.

use std::path::Path;

use anyhow::{Context, Result};

use crate::labfile::LabFile;

/// The demo lab (lab/labs/demo.toml).
const DEMO_LAB: &str = include_str!("../labs/demo.toml");
/// Its pxed config template (lab/labs/pxed-full.pxed.toml).
const DEMO_PXED: &str = include_str!("../labs/pxed-full.pxed.toml");

/// The demo lab, with its pxed config template written into `dir`.
pub fn demo_lab(dir: &Path) -> Result<LabFile> {
    std::fs::create_dir_all(dir)?;
    let template = dir.join("pxed-full.pxed.toml");
    std::fs::write(&template, DEMO_PXED)
        .with_context(|| format!("writing {}", template.display()))?;
    let mut lab = LabFile::parse(DEMO_LAB).context("the built-in demo lab")?;
    lab.server.config = Some(template);
    Ok(lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_lab_parses_and_has_bios_and_uefi() {
        let dir = tempfile::tempdir().unwrap();
        let lab = demo_lab(dir.path()).unwrap();
        assert_eq!(lab.machines.len(), 2);
        assert!(lab.server.config.unwrap().exists());
    }
}
