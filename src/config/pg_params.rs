//! PostgreSQL parameters and `pg_hba` lines from leasedog's configuration
//! (`[postgres.parameters]`, `postgres.pg_hba`, and the cluster-wide
//! `postgresql.parameters` in etcd): validation that needs nothing from the
//! outside world, and the text of the files the agent owns. The driver
//! (`postgres::conf`) writes them and checks names against the installed
//! server (`postgres --describe-config`).

use std::collections::BTreeMap;

/// Parameter name -> TOML value (string, integer, float or boolean).
pub type Params = BTreeMap<String, toml::Value>;

/// Parameters the agent sets itself (or that would move the files it
/// owns): refused in the configuration, with the reason.
pub const MANAGED: &[(&str, &str)] = &[
    ("port", "set from postgres.port"),
    (
        "unix_socket_directories",
        "set from postgres.host (a socket directory)",
    ),
    (
        "primary_conninfo",
        "written by the agent for the current leader",
    ),
    (
        "primary_slot_name",
        "written by the agent (replication slots)",
    ),
    (
        "synchronous_standby_names",
        "managed by the leader in synchronous mode",
    ),
    ("data_directory", "postgres.data_dir"),
    ("config_file", "the agent includes its own file"),
    ("hba_file", "the agent writes pg_hba.conf (postgres.pg_hba)"),
    ("ident_file", "not managed by leasedog"),
    ("include", "the agent owns its include file"),
    ("include_if_exists", "the agent owns its include file"),
    ("include_dir", "the agent owns its include file"),
    (
        "hot_standby",
        "replicas must accept the agent's read-only queries",
    ),
];

fn valid_name(n: &str) -> bool {
    let mut parts = n.split('.');
    let ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    parts.all(ok) && n.split('.').count() <= 2
}

/// The value as PostgreSQL's configuration file syntax: strings quoted
/// (quotes doubled), numbers and booleans bare.
pub fn render_value(name: &str, v: &toml::Value) -> Result<String, String> {
    Ok(match v {
        toml::Value::String(s) => {
            if s.contains(['\n', '\r', '\0']) {
                return Err(format!("{name}: a value must be one line"));
            }
            format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
        }
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) if f.is_finite() => f.to_string(),
        toml::Value::Boolean(b) => if *b { "on" } else { "off" }.into(),
        other => {
            return Err(format!(
                "{name}: {other} is not a string, number or boolean"
            ))
        }
    })
}

/// An extension's parameters written as TOML dotted keys
/// (`pg_stat_statements.max = 100` is a table in TOML) as flat names.
pub fn flatten(params: &Params) -> Params {
    let mut flat = Params::new();
    for (name, v) in params {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    flat.insert(format!("{name}.{k}"), v.clone());
                }
            }
            v => {
                flat.insert(name.clone(), v.clone());
            }
        }
    }
    flat
}

/// Names (syntax, not managed by the agent) and values (renderable).
pub fn check(params: &Params) -> Result<(), String> {
    for (name, v) in &flatten(params) {
        if !valid_name(name) {
            return Err(format!(
                "{name:?} is not a PostgreSQL parameter name (letters, digits, '_', one '.' for an extension's)"
            ));
        }
        let lower = name.to_ascii_lowercase();
        if let Some((_, why)) = MANAGED.iter().find(|(m, _)| *m == lower) {
            return Err(format!("{name} cannot be set here: {why}"));
        }
        render_value(name, v)?;
    }
    Ok(())
}

/// The include file's text (after [`check`]).
pub fn render_conf(params: &Params) -> String {
    let mut s = String::from(
        "# Written by leasedog from its configuration ([postgres.parameters] and the\n\
         # scope's cluster-wide config in etcd). Edits here are overwritten.\n",
    );
    for (name, v) in &flatten(params) {
        let v = render_value(name, v).unwrap_or_else(|e| format!("# invalid: {e}"));
        s.push_str(&format!("{name} = {v}\n"));
    }
    s
}

const HBA_TYPES: &[&str] = &[
    "local",
    "host",
    "hostssl",
    "hostnossl",
    "hostgssenc",
    "hostnogssenc",
];

/// One `pg_hba.conf` line: a known connection type and at least the
/// fields it needs (local: type, database, user, method; host*: plus an
/// address).
pub fn check_hba_line(line: &str) -> Result<(), String> {
    if line.contains(['\n', '\r']) {
        return Err(format!("{line:?}: one line per entry"));
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let Some(kind) = fields.first() else {
        return Err("an empty pg_hba line".into());
    };
    if !HBA_TYPES.contains(kind) {
        return Err(format!(
            "{line:?}: the connection type must be one of {}",
            HBA_TYPES.join(", ")
        ));
    }
    let need = if *kind == "local" { 4 } else { 5 };
    if fields.len() < need {
        return Err(format!(
            "{line:?}: {kind} needs {need} fields (type database user{} method)",
            if *kind == "local" { "" } else { " address" }
        ));
    }
    Ok(())
}

/// The `pg_hba.conf` the agent writes (after [`check_hba_line`] of each).
pub fn render_hba(lines: &[String]) -> String {
    let mut s =
        String::from("# Written by leasedog from postgres.pg_hba. Edits here are overwritten.\n");
    for l in lines {
        s.push_str(l.trim());
        s.push('\n');
    }
    s
}

/// Cluster-wide parameters (etcd) under the node's own
/// (`[postgres.parameters]`): the node's TOML wins for a name set in both.
pub fn merge(cluster: &Params, node: &Params) -> Params {
    let mut m = flatten(cluster);
    for (k, v) in &flatten(node) {
        m.insert(k.clone(), v.clone());
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(toml_text: &str) -> Params {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn values_render_in_postgresql_conf_syntax() {
        let p = params(
            "work_mem = '8MB'\nmax_connections = 50\nrandom_page_cost = 1.5\nfsync = true\n\
             application_name = \"it's\"\n",
        );
        check(&p).unwrap();
        let text = render_conf(&p);
        for line in [
            "work_mem = '8MB'\n",
            "max_connections = 50\n",
            "random_page_cost = 1.5\n",
            "fsync = on\n",
            "application_name = 'it''s'\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_cause() {
        for (t, want) in [
            ("port = 5433", "set from postgres.port"),
            ("primary_conninfo = 'x'", "current leader"),
            ("\"work mem\" = 1", "not a PostgreSQL parameter name"),
            ("\"a.b.c\" = 1", "not a PostgreSQL parameter name"),
            ("work_mem = [1]", "not a string, number or boolean"),
            ("work_mem = \"1\\nfsync = off\"", "one line"),
        ] {
            let e = check(&params(t)).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
        let ext = params("pg_stat_statements.max = 100");
        check(&ext).unwrap();
        assert!(render_conf(&ext).contains("pg_stat_statements.max = 100\n"));
    }

    #[test]
    fn hba_lines_need_a_type_and_their_fields() {
        check_hba_line("host replication all 127.0.0.1/32 trust").unwrap();
        check_hba_line("local all all peer").unwrap();
        assert!(check_hba_line("host all all trust")
            .unwrap_err()
            .contains("needs 5 fields"));
        assert!(check_hba_line("hots all all ::1/128 md5")
            .unwrap_err()
            .contains("connection type"));
        assert!(render_hba(&["local all all peer".into()]).ends_with("local all all peer\n"));
    }

    #[test]
    fn the_nodes_own_parameters_win_over_the_cluster_wide_ones() {
        let m = merge(
            &params("work_mem = '4MB'\nmax_connections = 100"),
            &params("work_mem = '8MB'"),
        );
        assert_eq!(m["work_mem"].as_str(), Some("8MB"));
        assert_eq!(m["max_connections"].as_integer(), Some(100));
    }
}
