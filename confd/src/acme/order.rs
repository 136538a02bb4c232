//! One certificate for one host: order, HTTP-01 challenge through the store, finalize with a
//! key and CSR made by rcgen, fetch the chain.

use super::storage::{challenge_key, Certificate};
use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use std::time::Duration;
use switchboard::store::KvStore;

/// How long an order may wait for validation and issuance.
const ORDER_TIMEOUT: Duration = Duration::from_secs(60);

/// Orders a certificate for `host` with `account`. The key authorizations are put in the store
/// (for whichever confd the ACME server reaches) and removed when the order ends, however it
/// ends. The error is one line naming the step that failed.
pub async fn obtain(account: &Account, host: &str, store: &KvStore) -> Result<Certificate, String> {
    let mut tokens = Vec::new();
    let r = order(account, host, store, &mut tokens).await;
    for t in tokens {
        let _ = store.delete(&t).await;
    }
    r
}

async fn order(
    account: &Account,
    host: &str,
    store: &KvStore,
    tokens: &mut Vec<String>,
) -> Result<Certificate, String> {
    let ids = [Identifier::Dns(host.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    let mut authzs = order.authorizations();
    while let Some(a) = authzs.next().await {
        let mut a = a.map_err(|e| format!("authorization: {e}"))?;
        match a.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("authorization is {other:?}")),
        }
        let mut ch = a
            .challenge(ChallengeType::Http01)
            .ok_or("the ACME server offers no HTTP-01 challenge")?;
        let key = challenge_key(&ch.token)
            .ok_or_else(|| format!("the ACME server sent an invalid token {:?}", ch.token))?;
        let ka = ch.key_authorization();
        store
            .put(&key, ka.as_str().as_bytes())
            .await
            .map_err(|e| format!("storing the challenge: {e}"))?;
        tokens.push(key);
        ch.set_ready()
            .await
            .map_err(|e| format!("challenge ready: {e}"))?;
    }
    let retry = RetryPolicy::new()
        .initial_delay(Duration::from_millis(100))
        .backoff(1.5)
        .timeout(ORDER_TIMEOUT);
    let status = order
        .poll_ready(&retry)
        .await
        .map_err(|e| format!("validation: {e}"))?;
    if status != OrderStatus::Ready {
        let why = order
            .state()
            .error
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_default();
        return Err(format!("validation: order is {status:?} {why}")
            .trim()
            .to_string());
    }
    let key = rcgen::KeyPair::generate().map_err(|e| format!("key: {e}"))?;
    let params =
        rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| format!("CSR: {e}"))?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("CSR: {e}"))?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| format!("finalize: {e}"))?;
    let chain = order
        .poll_certificate(&retry)
        .await
        .map_err(|e| format!("certificate: {e}"))?;
    Certificate::from_pem(host, chain, key.serialize_pem())
        .map_err(|e| format!("issued certificate: {e}"))
}
