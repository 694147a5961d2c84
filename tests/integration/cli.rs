//! The `pxed` command line as a user meets it: the README's config example checks clean, a
//! broken config is reported with every problem at its line, help text explains the commands.

use std::process::Command;

fn pxed(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pxed"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn readme_config_example_passes_check() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```toml\n").expect("README has a TOML example") + 8;
    let len = readme[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pxed.toml");
    std::fs::write(&path, &readme[start..start + len]).unwrap();
    let (code, stdout, stderr) = pxed(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 0, "README example fails `pxed check`:\n{stderr}");
    assert!(
        stdout.contains("ok (full mode, 2 profiles, 1 groups, 1 machines)"),
        "{stdout}"
    );
}

#[test]
fn check_reports_each_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nroot = \"/srv\"\n[[profile]]\nname = \"a\"\n[[group]]\nname = \"g\"\nprofile = \"nope\"\n",
    )
    .unwrap();
    let (code, _, stderr) = pxed(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    let p = path.display();
    assert!(
        stderr.contains(&format!("{p}:3: profile `a`: sets no way to boot")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{p}:5: group `g` refers to profile `nope`")),
        "{stderr}"
    );

    std::fs::write(&path, "[server]\nroot = \"/srv\"\nrooot = 1\n").unwrap();
    let (code, _, stderr) = pxed(&["check", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&format!("{p}:3:1:")) && stderr.contains("rooot"),
        "{stderr}"
    );
}

#[test]
fn help_explains_the_commands() {
    let (code, stdout, _) = pxed(&["--help"]);
    assert_eq!(code, 0);
    for word in ["serve", "check", "leases", "--interface eth0 --root"] {
        assert!(stdout.contains(word), "help lacks {word}:\n{stdout}");
    }
}
