//! PostgreSQL's configuration files at start-up and on a change of the
//! parameters: checked against the installed server before anything is
//! written (a bad parameter stops the agent at start-up with the reason,
//! before etcd is contacted), written (`postgres::conf`), and a running
//! server reloaded, naming what waits for a restart.

use crate::postgres::Pg;
use tracing::{info, warn};

/// At start-up, on the agent's runtime: check, write, reload if running.
pub(super) fn apply_at_start(rt: &tokio::runtime::Runtime, pg: &Pg) -> Result<(), String> {
    let params = pg.parameters();
    if params.is_empty() && pg.config().pg_hba.is_empty() {
        return Ok(()); // nothing of ours to write
    }
    rt.block_on(pg.check_parameters(&params))
        .map_err(|e| e.to_string())?;
    rt.block_on(apply(pg));
    Ok(())
}

/// Writes the files; if one changed and the server runs, reloads it and
/// logs the parameters that need a restart. Errors are logged: the server
/// keeps its previous settings.
pub(super) async fn apply(pg: &Pg) {
    match pg.write_config_files() {
        Ok(false) => {}
        Ok(true) if pg.live_postmaster().is_some() => match pg.reload().await {
            Ok(pending) if pending.is_empty() => info!("PostgreSQL configuration reloaded"),
            Ok(pending) => warn!(
                ?pending,
                "PostgreSQL configuration reloaded; these parameters take effect only after a \
                 restart of PostgreSQL (pending restart)"
            ),
            Err(e) => warn!("cannot reload PostgreSQL's configuration: {e}"),
        },
        Ok(true) => info!("PostgreSQL configuration written (applied at its next start)"),
        Err(e) => warn!("cannot write PostgreSQL's configuration files: {e}"),
    }
}
