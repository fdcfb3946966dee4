//! Runs the bootstrap actions the core decides (`decide::bootstrap`): the
//! `initialize` key in etcd (main loop, one request each, at a change of
//! state only: while this node's data directory is empty and nobody leads)
//! and `initdb` in a task of its own.

use super::Agent;
use crate::dcs::LeaseId;
use crate::decide::{Action, InitKey, Input};
use tracing::{error, info, warn};

impl Agent {
    pub(super) async fn bootstrap(&mut self, action: Action) -> Option<Input> {
        let current = self.core.lease();
        match action {
            Action::ReadInitialize => match self.dcs().await {
                Ok(d) => match d.initialize(current.map(LeaseId)).await {
                    Ok(key) => Some(Input::InitializeSeen { key }),
                    Err(e) => {
                        warn!("cannot read the initialize key: {e}");
                        Some(Input::InitializeSeen {
                            key: InitKey::Unknown,
                        })
                    }
                },
                Err(_) => Some(Input::InitializeSeen {
                    key: InitKey::Unknown,
                }),
            },
            Action::ClaimInitialize { lease } => {
                let key = match self.dcs().await {
                    Ok(d) => d
                        .claim_initialize(LeaseId(lease))
                        .await
                        .unwrap_or_else(|e| {
                            warn!("cannot claim the initialize key: {e}");
                            InitKey::Unknown
                        }),
                    Err(_) => InitKey::Unknown,
                };
                match &key {
                    InitKey::Claimed { node } if *node == self.cfg.node => {
                        info!("won the initialize key: this node creates the scope's cluster")
                    }
                    other => info!(key = ?other, "the scope's initialize key is not ours"),
                }
                Some(Input::InitializeSeen { key })
            }
            Action::Initdb => {
                let Some(pg) = self.pg.clone() else {
                    return Some(Input::InitdbDone {
                        result: Err("no [postgres] configured".into()),
                    });
                };
                let options = self
                    .cfg
                    .postgres
                    .as_ref()
                    .map(|p| p.initdb.clone())
                    .unwrap_or_default();
                let tx = self.side_tx.clone();
                info!(?options, "running initdb");
                tokio::spawn(async move {
                    let args: Vec<&str> = options.iter().map(String::as_str).collect();
                    let result = match pg.initdb(&args).await {
                        Ok(()) => {
                            info!("initdb done");
                            Ok(())
                        }
                        Err(e) => {
                            error!("initdb failed: {e}; the initialize key is given back");
                            Err(format!("initdb failed: {e}"))
                        }
                    };
                    let _ = tx.send(Input::InitdbDone { result });
                });
                None
            }
            Action::FinishInitialize { lease } => {
                let ok = match self.dcs().await {
                    Ok(d) => d
                        .finish_initialize(LeaseId(lease))
                        .await
                        .unwrap_or_else(|e| {
                            warn!("cannot mark the scope initialized: {e}");
                            false
                        }),
                    Err(_) => false,
                };
                if !ok {
                    warn!("the initialize claim is no longer ours (expired?)");
                }
                Some(Input::InitializeFinished { ok })
            }
            Action::AbandonInitialize { lease } => {
                if let Ok(d) = self.dcs().await {
                    if let Err(e) = d.abandon_initialize(LeaseId(lease)).await {
                        warn!("cannot delete the initialize claim: {e}; its lease frees it");
                    }
                }
                None
            }
            Action::MarkInitialized => {
                if let Ok(d) = self.dcs().await {
                    match d.mark_initialized().await {
                        Ok(true) => info!("marked the scope initialized"),
                        Ok(false) => {}
                        Err(e) => warn!("cannot mark the scope initialized: {e}"),
                    }
                }
                None
            }
            _ => None,
        }
    }
}
