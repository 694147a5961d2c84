//! Per-machine files rendered from templates: preseed, kickstart, cloud-init `user-data` /
//! `meta-data`, and the kernel command line of `kernel` profiles.
//!
//! Templates are files under `<boot root>/templates/` (never served raw), rendered with
//! MiniJinja. Why MiniJinja: Jinja2 syntax is what cloud-init, Ansible and Salt users already
//! write; it is a pure-Rust crate with few dependencies, loads templates at run time (edits
//! need no restart), reports errors with template name and line, has a strict-undefined mode
//! and a fuel limit that stops runaway loops. Handlebars/Tera were the alternatives: Tera has
//! no fuel limit, Handlebars' logic-less syntax is unfamiliar to these users.
//!
//! Settings: autoescape off (these are not HTML; escaping would corrupt YAML and shell), strict
//! undefined (a typo such as `{{ hostnme }}` is an error, not an empty string), fuel-limited.
//! A broken template is an error with its name and line for the response and the event; it
//! never takes the server down.

use std::path::{Component, Path, PathBuf};

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde::Serialize;

/// The folder under the boot root that holds templates.
pub const TEMPLATE_DIR: &str = "templates";

/// Largest template read: installer answer files are kilobytes.
pub const MAX_TEMPLATE_BYTES: u64 = 1024 * 1024;

/// Fuel (MiniJinja instructions) per render: far more than any answer file needs, small
/// enough that a loop over `range(10**9)` ends in milliseconds with an error.
pub const TEMPLATE_FUEL: u64 = 2_000_000;

/// What a template can use. Every field is always defined (absent values are `none`).
#[derive(Clone, Debug, Serialize, Default)]
pub struct TemplateFacts {
    /// `52:54:00:12:34:56`.
    pub mac: String,
    /// `52-54-00-12-34-56`.
    pub mac_hyphen: String,
    /// SMBIOS UUID when the client sent it.
    pub uuid: Option<String>,
    /// The client's address (its lease IP as seen by pxed).
    pub ip: Option<String>,
    /// Hostname from the `[[machine]]` entry.
    pub hostname: Option<String>,
    /// Labels from the `[[machine]]` entry.
    pub labels: Vec<String>,
    /// The profile being booted.
    pub profile: String,
    /// pxed's HTTP base URL (`http://10.0.0.1:8080`).
    pub server: String,
    /// This boot's token (see [`super::token`]).
    pub token: String,
    /// Where the booted OS reports; add `&stage=<name>`.
    pub phone_home_url: String,
    /// Prefix of this machine's rendered templates: `{{ templates_url }}preseed.cfg`, or a
    /// cloud-init NoCloud seed `ds=nocloud;s={{ templates_url }}` (it appends `user-data`).
    pub templates_url: String,
}

/// A template that cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// No such template (or a name that is not a plain relative path).
    #[error("template `{0}` not found")]
    NotFound(String),
    /// The template is broken or uses something undefined.
    #[error("template `{name}`{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Broken {
        /// Template name.
        name: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

/// A template name as a relative path with plain segments only.
fn clean_name(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if name.is_empty() || name.contains('\0') || name.contains('\\') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Read a template under `dir`, refusing names that leave it (also through symlinks).
fn load(dir: &Path, name: &str) -> Result<Option<String>, minijinja::Error> {
    let Some(rel) = clean_name(name) else {
        return Ok(None);
    };
    let Ok(base) = dir.canonicalize() else {
        return Ok(None);
    };
    let Ok(full) = base.join(rel).canonicalize() else {
        return Ok(None);
    };
    if !full.starts_with(&base) || !full.is_file() {
        return Ok(None);
    }
    let too_big = std::fs::metadata(&full).map_or(true, |m| m.len() > MAX_TEMPLATE_BYTES);
    if too_big {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("larger than {MAX_TEMPLATE_BYTES} bytes"),
        ));
    }
    std::fs::read_to_string(&full).map(Some).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("cannot read: {e}"))
    })
}

fn environment(dir: Option<PathBuf>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(TEMPLATE_FUEL));
    if let Some(dir) = dir {
        env.set_loader(move |name| load(&dir, name));
    }
    env
}

fn broken(name: &str, outer: &minijinja::Error) -> TemplateError {
    // An error inside an included template is chained under the include: report the innermost.
    let mut e = outer;
    while let Some(inner) =
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<minijinja::Error>())
    {
        e = inner;
    }
    if e.kind() == ErrorKind::TemplateNotFound && e.name().is_none_or(|n| n == name) {
        return TemplateError::NotFound(name.to_string());
    }
    let mut message = e.kind().to_string();
    if let Some(d) = e.detail() {
        message.push_str(": ");
        message.push_str(d);
    }
    // The error may be in an included template: name that one.
    TemplateError::Broken {
        name: e.name().unwrap_or(name).to_string(),
        line: e.line(),
        message,
    }
}

/// Render `<root>/templates/<name>` with `facts`. Blocking (reads files): call it off the
/// async runtime.
pub fn render_file(
    root: &Path,
    name: &str,
    facts: &TemplateFacts,
) -> Result<String, TemplateError> {
    let env = environment(Some(root.join(TEMPLATE_DIR)));
    let tmpl = env.get_template(name).map_err(|e| broken(name, &e))?;
    tmpl.render(facts).map_err(|e| broken(name, &e))
}

/// Render a template given as text (a profile's kernel command line); `name` is used in
/// errors. Text without `{{` or `{%` is returned as it is.
pub fn render_str(
    name: &str,
    source: &str,
    facts: &TemplateFacts,
) -> Result<String, TemplateError> {
    if !source.contains("{{") && !source.contains("{%") {
        return Ok(source.to_string());
    }
    environment(None)
        .render_named_str(name, source, facts)
        .map_err(|e| broken(name, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> TemplateFacts {
        TemplateFacts {
            mac: "52:54:00:12:34:56".into(),
            hostname: Some("web1".into()),
            labels: vec!["rack1".into()],
            profile: "debian".into(),
            ..Default::default()
        }
    }

    fn root_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = d.path().join(TEMPLATE_DIR).join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    #[test]
    fn renders_facts_without_escaping() {
        let d = root_with(&[(
            "user-data",
            "#cloud-config\nhostname: {{ hostname }}\n# <&> {{ '<&>' }}\n{% for l in labels %}- {{ l }}\n{% endfor %}",
        )]);
        let out = render_file(d.path(), "user-data", &facts()).unwrap();
        assert_eq!(out, "#cloud-config\nhostname: web1\n# <&> <&>\n- rack1\n");
    }

    #[test]
    fn undefined_is_an_error_with_name_and_line() {
        let d = root_with(&[("ks.cfg", "line one\nnetwork --hostname={{ hostnme }}\n")]);
        let err = render_file(d.path(), "ks.cfg", &facts()).unwrap_err();
        let TemplateError::Broken { name, line, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!((name.as_str(), *line), ("ks.cfg", Some(2)));
        assert!(
            err.to_string().starts_with("template `ks.cfg` line 2: "),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_and_runaway_loops_are_errors() {
        let d = root_with(&[
            ("bad", "a\nb\n{% if %}\n"),
            ("loop", "{% for i in range(100000000) %}{{ i }}{% endfor %}"),
        ]);
        let err = render_file(d.path(), "bad", &facts())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("template `bad` line 3: syntax error"),
            "{err}"
        );
        let err = render_file(d.path(), "loop", &facts())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("template `loop`"), "{err}");
    }

    #[test]
    fn names_cannot_leave_the_template_dir() {
        let d = root_with(&[("ok", "x")]);
        std::fs::write(d.path().join("outside"), "secret").unwrap();
        for name in ["../outside", "/etc/passwd", "", "a/../../outside"] {
            assert_eq!(
                render_file(d.path(), name, &facts()),
                Err(TemplateError::NotFound(name.to_string())),
                "{name:?}"
            );
        }
        std::os::unix::fs::symlink(
            d.path().join("outside"),
            d.path().join(TEMPLATE_DIR).join("link"),
        )
        .unwrap();
        assert!(matches!(
            render_file(d.path(), "link", &facts()),
            Err(TemplateError::NotFound(_))
        ));
        assert_eq!(render_file(d.path(), "ok", &facts()).unwrap(), "x");
    }

    #[test]
    fn includes_work_and_name_the_broken_one() {
        let d = root_with(&[("main", "{% include 'part' %}"), ("part", "\n{{ nope }}")]);
        let err = render_file(d.path(), "main", &facts())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("template `part` line 2"), "{err}");
    }

    #[test]
    fn plain_strings_pass_through() {
        assert_eq!(render_str("c", "quiet a=b", &facts()).unwrap(), "quiet a=b");
        assert_eq!(
            render_str("c", "h={{ hostname }}", &facts()).unwrap(),
            "h=web1"
        );
    }
}
