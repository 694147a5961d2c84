//! iPXE script rendering from hostile inputs: every profile value, menu label, reason and
//! password built from iPXE's special tokens (`||`, `&&`, `;`, `#`, `${`, newlines, control and
//! non-ASCII characters), any MAC, UUID text and architecture code.
//!
//! The oracle reads the script the way iPXE does (`src/core/exec.c`: lines, whitespace-split
//! tokens, operator tokens, `#` comments, `${...}` expansion) and checks that hostile values
//! never become commands: each line starts with a command pxed writes or a label of its own;
//! the only operator is a trailing `|| goto <own label>`; no comment tokens after the shebang;
//! printed text never expands a setting; a URL is one token and the kernel line has exactly
//! one argument per command-line word. Rendering never panics; an unsafe value gives a script
//! that passes the same checks.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pxed::http::ipxe::{display, entry_script, error_script, render_script, try_render_script};
use pxed::mac::MacAddr;
use pxed::policy::{BootPlan, BootTarget, ClientFacts, DhcpBoot, MenuItem};

const FRAGS: &[&str] = &[
    "||",
    "&&",
    ";",
    "#",
    "${",
    "}",
    "${net0/mac}",
    "\n",
    "\r",
    "\t",
    " ",
    "\0",
    "://",
    "http://h/x",
    "?",
    "&",
    "%",
    "/",
    "..",
    "initrd=",
    "initrd=x",
    "é",
    "\u{2028}",
    "\u{85}",
    "goto",
    "failed",
    ":failed",
    "exit",
    "a.img",
    "$",
];

#[derive(Arbitrary, Debug)]
enum Frag {
    Known(u8),
    Free(String),
}

#[derive(Arbitrary, Debug)]
struct Text(Vec<Frag>);

impl Text {
    fn s(&self) -> String {
        self.0
            .iter()
            .take(16)
            .map(|f| match f {
                Frag::Known(i) => FRAGS[usize::from(*i) % FRAGS.len()].to_string(),
                Frag::Free(s) => s.clone(),
            })
            .collect()
    }
}

#[derive(Arbitrary, Debug)]
enum Target {
    Kernel {
        kernel: Text,
        initrd: Vec<Text>,
        cmdline: Text,
    },
    Script(Text),
    Chain(Text),
    Menu {
        title: Text,
        items: Vec<(Text, Text)>,
        default: Option<Text>,
        timeout: u32,
        password: Option<Text>,
    },
    San(Text),
    Local,
    Nbp(Text),
    Ignore(Text),
}

#[derive(Arbitrary, Debug)]
struct Input {
    profile: Text,
    reason: Text,
    target: Target,
    mac: [u8; 6],
    arch: Option<u16>,
    uuid: Option<Text>,
    error: Text,
}

const COMMANDS: &[&str] = &[
    "echo", "imgfree", "kernel", "initrd", "boot", "chain", "sanboot", "exit", "menu", "item",
    "choose", "login", "iseq", "goto", "sleep",
];

fn own_label(l: &str) -> bool {
    matches!(l, "failed" | "menu" | "cancelled" | "badpassword")
        || l.strip_prefix('p')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The iPXE reading of a script must match what pxed means to say.
fn check(script: &str) {
    check_with(script, false);
}

/// `comment_lines`: pxed's own entry script explains itself in whole-line comments.
fn check_with(script: &str, comment_lines: bool) {
    let mut lines = script.split('\n');
    assert_eq!(lines.next(), Some("#!ipxe"), "no shebang: {script:?}");
    assert!(script.ends_with('\n'));
    for line in lines.filter(|l| !l.is_empty()) {
        assert!(
            !line.chars().any(char::is_control),
            "control character in {line:?}"
        );
        let tokens = ipxe_tokens(line);
        let Some(first) = tokens.first() else {
            continue;
        };
        if comment_lines && first.starts_with('#') {
            continue;
        }
        if let Some(label) = first.strip_prefix(':') {
            assert!(
                own_label(label) && tokens.len() == 1,
                "foreign label line {line:?}"
            );
            continue;
        }
        assert!(COMMANDS.contains(first), "foreign command in {line:?}");
        for (i, t) in tokens.iter().enumerate() {
            assert!(!t.starts_with('#'), "comment token in {line:?}");
            if matches!(*t, "||" | "&&" | ";") {
                let rest = tokens.get(i..).unwrap_or(&[]);
                assert!(
                    matches!(rest, ["||", "goto", l] if own_label(l)),
                    "operator injected in {line:?}"
                );
            }
        }
        if matches!(*first, "echo" | "menu" | "item") {
            assert!(
                !line.contains("${"),
                "printed text expands a setting: {line:?}"
            );
        }
    }
}

/// iPXE splits a command line on `isspace()`: ASCII whitespace only.
fn ipxe_tokens(line: &str) -> Vec<&str> {
    line.split(|c: char| c.is_ascii_whitespace())
        .filter(|t| !t.is_empty())
        .collect()
}

fn words_before_operator(line: &str) -> usize {
    ipxe_tokens(line)
        .into_iter()
        .take_while(|t| *t != "||")
        .count()
}

fuzz_target!(|input: Input| {
    let target = match &input.target {
        Target::Kernel {
            kernel,
            initrd,
            cmdline,
        } => BootTarget::Kernel {
            kernel: kernel.s(),
            initrd: initrd.iter().take(4).map(Text::s).collect(),
            cmdline: cmdline.s(),
        },
        Target::Script(s) => BootTarget::Script { script: s.s() },
        Target::Chain(u) => BootTarget::Chain { url: u.s() },
        Target::Menu {
            title,
            items,
            default,
            timeout,
            password,
        } => BootTarget::Menu {
            title: title.s(),
            items: items
                .iter()
                .take(6)
                .map(|(l, p)| MenuItem {
                    label: l.s(),
                    profile: p.s(),
                })
                .collect(),
            default: default.as_ref().map(Text::s),
            timeout_secs: *timeout,
            password: password.as_ref().map(Text::s),
        },
        Target::San(i) => BootTarget::San { image: i.s() },
        Target::Local => BootTarget::Local,
        Target::Nbp(f) => BootTarget::Nbp { file: f.s() },
        Target::Ignore(r) => BootTarget::Ignore { reason: r.s() },
    };
    let plan = BootPlan {
        profile: input.profile.s(),
        reason: input.reason.s(),
        target: target.clone(),
        dhcp: DhcpBoot::Http {
            url: "http://10.0.0.1:8080/boot.ipxe".into(),
        },
        labels: Vec::new(),
        hostname: None,
    };
    let facts = ClientFacts {
        mac: MacAddr(input.mac),
        arch_code: input.arch,
        uuid: input.uuid.as_ref().map(Text::s),
        is_ipxe: true,
        ..Default::default()
    };
    // The base URL is pxed's own (`http://<ip>:<port>`), never hostile.
    let base = "http://10.0.0.1:8080";
    let rendered = render_script(&plan, &facts, base);
    let tried = try_render_script(&plan, &facts, base);
    match &tried {
        Ok(s) => assert_eq!(s, &rendered),
        Err(e) => assert_eq!(rendered, error_script(&e.to_string())),
    }
    if !matches!(target, BootTarget::Script { .. }) {
        check(&rendered);
    }
    if let (
        Ok(s),
        BootTarget::Kernel {
            initrd, cmdline, ..
        },
    ) = (&tried, &target)
    {
        let kernel: Vec<&str> = s.lines().filter(|l| l.starts_with("kernel ")).collect();
        assert_eq!(kernel.len(), 1);
        let words = cmdline.split_whitespace().count();
        let n = words_before_operator(kernel[0]);
        // `kernel <url> <words...> [initrd=<name>...]`
        assert!(
            n == 2 + words || n == 2 + words + initrd.len(),
            "kernel line {:?}",
            kernel[0]
        );
        let initrds: Vec<&str> = s.lines().filter(|l| l.starts_with("initrd ")).collect();
        assert_eq!(initrds.len(), initrd.len());
        for l in initrds {
            assert_eq!(words_before_operator(l), 4, "initrd line {l:?}");
        }
    }
    if let (Ok(s), BootTarget::Chain { .. } | BootTarget::Nbp { .. } | BootTarget::San { .. }) =
        (&tried, &target)
    {
        let l = s
            .lines()
            .find(|l| l.starts_with("chain ") || l.starts_with("sanboot "))
            .expect("no chain line");
        assert_eq!(words_before_operator(l), 2, "URL is not one token: {l:?}");
    }
    check(&error_script(&input.error.s()));
    check_with(&entry_script(base), true);
    let d = display(&input.error.s());
    assert!(!d.contains("${") && !d.chars().any(char::is_control));
});
