//! The documentation says what the binary does.
//!
//! - Every `leasedog ...` command line shown in `README.md` and `docs/*.md`
//!   (fenced or indented code blocks, and inline code), and the shipped
//!   unit's `ExecStart=`, parses with the real command-line parser,
//!   [`leasedog::cli::parse`], which executes nothing.
//! - `docs/leasedog.example.toml` loads with the real configuration loader,
//!   and each of its keys is the default unless its line says
//!   `# not the default`: removing a default key changes nothing, removing a
//!   marked one changes the configuration.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pages whose command lines are checked.
fn pages() -> Vec<PathBuf> {
    let mut v = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    v.extend(docs);
    v
}

/// A command line found in a page: where, and its words after `leasedog`.
#[derive(Debug)]
struct Shown {
    at: String,
    line: String,
    args: Vec<String>,
}

/// Splits shell text into words: whitespace separates, single and double
/// quotes group, `#` at the start of a word begins a comment. Good enough
/// for documentation; no expansion.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            None if c == '#' && !in_word => break,
            None => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The `leasedog` invocations in one line of shell: each simple command
/// (split at `|`, `&&`, `||`, `;`, `&`) whose program, after an optional
/// `sudo`, is `leasedog` or a path ending in `/leasedog`.
fn invocations(shell: &str) -> Vec<Vec<String>> {
    let mut cmds: Vec<Vec<String>> = vec![Vec::new()];
    for w in words(shell) {
        if ["|", "||", "&&", ";", "&"].contains(&w.as_str()) {
            cmds.push(Vec::new());
        } else {
            cmds.last_mut().unwrap().push(w);
        }
    }
    cmds.into_iter()
        .filter_map(|mut c| {
            if c.first().is_some_and(|w| w == "sudo") {
                c.remove(0);
            }
            let prog = c.first()?;
            (prog == "leasedog" || prog.ends_with("/leasedog")).then(|| c[1..].to_vec())
        })
        // A usage synopsis: `[--json]` means the option may be given.
        .map(|args| {
            args.into_iter()
                .map(|a| a.trim_start_matches('[').trim_end_matches(']').to_owned())
                .filter(|a| !a.is_empty())
                .collect()
        })
        .collect()
}

/// Every command line a page shows.
fn shown(path: &Path) -> Vec<Shown> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.strip_prefix(root()).unwrap().display().to_string();
    let mut out = Vec::new();
    let mut fenced = false;
    let mut pending = String::new();
    let push = |n: usize, line: &str, out: &mut Vec<Shown>| {
        for args in invocations(line) {
            out.push(Shown {
                at: format!("{name}:{n}"),
                line: line.trim().to_owned(),
                args,
            });
        }
    };
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let indented = !fenced && line.starts_with("    ");
        if fenced || indented {
            // Shell line continuations.
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            let whole = std::mem::take(&mut pending) + line;
            let whole = whole.trim_start().trim_start_matches("$ ");
            push(n, whole, &mut out);
            continue;
        }
        // Inline code: `...` spans.
        for (k, span) in line.split('`').enumerate() {
            if k % 2 == 1 {
                push(n, span, &mut out);
            }
        }
    }
    out
}

/// The `ExecStart=` lines of the shipped systemd units: the command the
/// package runs must parse too.
fn unit_commands() -> Vec<Shown> {
    let dir = root().join("systemd");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "service") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if let Some(cmd) = line.strip_prefix("ExecStart=") {
                // systemd's prefixes: -, @, :, +, !.
                let cmd = cmd.trim_start_matches(['-', '@', ':', '+', '!']);
                for args in invocations(cmd) {
                    out.push(Shown {
                        at: format!(
                            "systemd/{}:{}",
                            path.file_name().unwrap().to_string_lossy(),
                            i + 1
                        ),
                        line: line.to_owned(),
                        args,
                    });
                }
            }
        }
    }
    out
}

#[test]
fn every_command_line_in_the_docs_parses() {
    let mut all: Vec<Shown> = pages().iter().flat_map(|p| shown(p)).collect();
    let units = unit_commands();
    assert!(!units.is_empty(), "no ExecStart= runs leasedog");
    all.extend(units);
    // The extraction itself must see the commands, or this test proves nothing.
    assert!(all.len() >= 15, "too few command lines found: {all:#?}");
    for expected in [
        "query-watchdog",
        "test-watchdog",
        "check",
        "run",
        "status",
        "audit",
    ] {
        assert!(
            all.iter()
                .any(|s| s.args.first().map(String::as_str) == Some(expected)),
            "no `leasedog {expected}` found in the docs: {all:#?}"
        );
    }
    let failures: Vec<String> = all
        .iter()
        .filter_map(|s| match leasedog::cli::parse(&s.args) {
            Ok(_) => None,
            Err(e) => Some(format!(
                "{}: `{}`\n    {}",
                s.at,
                s.line,
                e.lines().next().unwrap_or_default()
            )),
        })
        .collect();
    assert!(
        failures.is_empty(),
        "command lines in the docs that the binary rejects:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_extractor_finds_commands_and_leaves_other_programs_alone() {
    assert_eq!(
        invocations("./target/release/leasedog check --config /tmp/l.toml   # budget"),
        vec![vec!["check", "--config", "/tmp/l.toml"]]
    );
    assert_eq!(
        invocations("sudo leasedog audit timeline [LOGS...] [--json]"),
        vec![vec!["audit", "timeline", "LOGS...", "--json"]]
    );
    assert!(invocations("systemctl restart leasedog").is_empty());
    assert!(invocations("grep Cap /proc/$(pidof leasedog)/status").is_empty());
    assert!(invocations("apt install ./leasedog_0.1.0_amd64.deb").is_empty());
    assert_eq!(
        invocations("leasedog status | less"),
        vec![vec!["status".to_owned()]]
    );
    // The parser is the binary's: it rejects what the binary rejects.
    assert!(leasedog::cli::parse(["test-watchdog", "/dev/watchdog0"]).is_err());
    assert!(
        leasedog::cli::parse(["test-watchdog", "--device", "/dev/watchdog0"])
            .unwrap()
            .is_some()
    );
    assert!(leasedog::cli::parse(["--help"]).unwrap().is_none());
}

/// One `key = value` line of the example, outside array tables.
struct KeyLine {
    n: usize,
    key: String,
    not_default: bool,
}

fn example() -> String {
    std::fs::read_to_string(root().join("docs/leasedog.example.toml")).unwrap()
}

fn key_lines(text: &str) -> Vec<KeyLine> {
    let mut out = Vec::new();
    let mut in_array_table = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with("[[") {
            in_array_table = true;
            continue;
        }
        if t.starts_with('[') {
            in_array_table = false;
            continue;
        }
        if t.is_empty() || t.starts_with('#') || in_array_table {
            continue;
        }
        let Some((key, _)) = t.split_once('=') else {
            continue;
        };
        out.push(KeyLine {
            n: i + 1,
            key: key.trim().to_owned(),
            not_default: t.contains("# not the default") || t.contains("# required"),
        });
    }
    out
}

fn load(text: &str) -> Result<String, String> {
    leasedog::config::Config::parse(text)
        .map(|c| format!("{c:?}"))
        .map_err(|e| e.to_string())
}

#[test]
fn the_example_configuration_marks_every_value_that_is_not_the_default() {
    let text = example();
    let whole = load(&text).expect("docs/leasedog.example.toml loads");
    let keys = key_lines(&text);
    assert!(keys.len() >= 12, "too few keys found");
    let mut wrong = Vec::new();
    for k in &keys {
        let without: String = text
            .lines()
            .enumerate()
            .filter(|(i, _)| i + 1 != k.n)
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let unchanged = load(&without).is_ok_and(|c| c == whole);
        match (k.not_default, unchanged) {
            (false, false) => wrong.push(format!(
                "line {} `{}`: not the default, but not marked `# not the default: DEFAULT`",
                k.n, k.key
            )),
            (true, true) => wrong.push(format!(
                "line {} `{}`: marked as not the default, but it is the default",
                k.n, k.key
            )),
            _ => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/leasedog.example.toml:\n{}",
        wrong.join("\n")
    );
}
