//! The ACME account every confd shares: read from the store, or made once (under the lock)
//! and stored.

use super::storage::{Sealer, ACCOUNT};
use super::AcmeConfig;
use instant_acme::{Account, AccountBuilder, AccountCredentials, NewAccount};
use switchboard::store::KvStore;

/// An HTTP client for the directory: trusting `ca_file` when given, public roots otherwise.
fn builder(cfg: &AcmeConfig) -> Result<AccountBuilder, String> {
    match &cfg.ca_file {
        Some(p) => {
            Account::builder_with_root(p).map_err(|e| format!("acme.ca_file {}: {e}", p.display()))
        }
        None => Account::builder().map_err(|e| format!("ACME client: {e}")),
    }
}

/// The stored account, or a new one (then stored). Call under the lock, so that two confds
/// never make two accounts.
pub async fn load_or_create(
    cfg: &AcmeConfig,
    store: &KvStore,
    sealer: &Sealer,
) -> Result<Account, String> {
    if let Some(v) = store
        .get(ACCOUNT)
        .await
        .map_err(|e| format!("reading the account: {e}"))?
    {
        let creds = sealer
            .open(&v.value)
            .and_then(|b| {
                serde_json::from_slice::<AccountCredentials>(&b).map_err(|e| e.to_string())
            })
            .map_err(|e| format!("stored account {}: {e}", store.key(ACCOUNT)))?;
        return builder(cfg)?
            .from_credentials(creds)
            .await
            .map_err(|e| format!("ACME directory {}: {e}", cfg.directory));
    }
    create(cfg, store, sealer).await
}

/// A new account, stored over any previous one (the ACME server no longer knows it).
pub async fn create(cfg: &AcmeConfig, store: &KvStore, sealer: &Sealer) -> Result<Account, String> {
    let contact = cfg.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder(cfg)?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("ACME directory {}: new account: {e}", cfg.directory))?;
    let json = serde_json::to_vec(&creds).expect("credentials JSON");
    store
        .put(ACCOUNT, &sealer.seal(&json))
        .await
        .map_err(|e| format!("storing the account: {e}"))?;
    tracing::info!(directory = %cfg.directory, "ACME account created");
    Ok(account)
}
