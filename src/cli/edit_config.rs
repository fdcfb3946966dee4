//! `leasedog edit-config`: shows or changes the scope's cluster-wide
//! settings in etcd (`config::cluster`). Every change is validated as the
//! agent would validate it (applied to this node's TOML: timing
//! feasibility, parameter names, against the installed PostgreSQL when
//! `[postgres]` is set) before it is written, and written only if nobody
//! changed the key meanwhile.

use crate::config::cluster::ClusterConfig;
use crate::config::Config;
use std::path::PathBuf;

pub(super) fn edit_config(cfg: &Config, set: &[String], file: Option<PathBuf>, show: bool) -> i32 {
    match run(cfg, set, file, show) {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(e) => {
            eprintln!("leasedog edit-config: {e}");
            1
        }
    }
}

fn run(cfg: &Config, set: &[String], file: Option<PathBuf>, show: bool) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut d = crate::dcs::Dcs::connect(&cfg.etcd, &cfg.scope, &cfg.node)
            .await
            .map_err(|e| e.to_string())?;
        let (stored, revision) = d.cluster_config().await.map_err(|e| e.to_string())?;
        let current = stored.as_deref().map(ClusterConfig::from_json);
        if set.is_empty() && file.is_none() {
            let _ = show;
            return match current {
                None => Ok(ClusterConfig::default().to_json()),
                Some(Ok(c)) => Ok(c.to_json()),
                Some(Err(e)) => Err(format!(
                    "the stored config is malformed ({e}): {}\nreplace it with --file",
                    String::from_utf8_lossy(stored.as_deref().unwrap_or_default())
                )),
            };
        }
        let mut next = match (&file, current) {
            (Some(path), _) => {
                let bytes = if path.as_os_str() == "-" {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                        .map_err(|e| format!("reading stdin: {e}"))?;
                    b
                } else {
                    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?
                };
                ClusterConfig::from_json(&bytes).map_err(|e| format!("{}: {e}", path.display()))?
            }
            (None, None) => ClusterConfig::default(),
            (None, Some(Ok(c))) => c,
            (None, Some(Err(e))) => {
                return Err(format!(
                    "the stored config is malformed ({e}); replace it whole with --file"
                ))
            }
        };
        for s in set {
            next.set(s).map_err(|e| e.to_string())?;
        }
        let applied = next
            .apply_to(cfg)
            .map_err(|e| format!("refused, nothing written: {e}"))?;
        if let Some(pc) = &applied.postgres {
            // Names and kinds against the installed server, where there is one.
            if let Ok(pg) = crate::postgres::Pg::new(pc.clone()) {
                pg.set_cluster_parameters(next.parameters.clone());
                pg.check_parameters(&pg.parameters())
                    .await
                    .map_err(|e| format!("refused, nothing written: {e}"))?;
            }
        }
        let text = next.to_json();
        if !d
            .put_cluster_config(text.clone(), revision)
            .await
            .map_err(|e| e.to_string())?
        {
            return Err("the config changed in etcd meanwhile: nothing written, run again".into());
        }
        Ok(text)
    })
}
