//! Rust client of a Stardust domain's REST API v1 (`docs/protocol.md`).
//!
//! Every request is signed with the client's key ([`stardust_proto::request`]); the domain
//! identifies the client by it, and a job's results are readable only by the key that
//! submitted it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), stardust_sdk::Error> {
//! let key = stardust_proto::identity::Identity::from_secret_bytes(&[7; 32]);
//! let client = stardust_sdk::Client::new("http://127.0.0.1:7700", key)?;
//! let health = client.health().await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use stardust_proto::content::ContentId;
use stardust_proto::identity::Identity;
use stardust_proto::job::JobSpec;
use stardust_proto::request;

/// How long [`Client::wait`] lets the domain hold one status request before it reports
/// progress.
const PROGRESS_EVERY_MS: u64 = 1000;

/// What went wrong talking to a domain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The domain URL is not usable.
    #[error("invalid domain URL {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    Url(String),
    /// TLS settings are not usable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection failed or timed out.
    #[error("cannot reach the domain at {url}: {reason}")]
    Transport {
        /// The domain.
        url: String,
        /// Why.
        reason: String,
    },
    /// The domain answered with an error.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Stable machine-readable code (e.g. `not_found`, `invalid_job`).
        code: String,
        /// Explanation.
        message: String,
    },
    /// The domain answered something that is not the expected JSON.
    #[error("unexpected answer from the domain: {0}")]
    Decode(String),
}

/// TLS settings for talking to domains: the web's certificate authorities (webpki roots),
/// plus the CA certificates in `extra_ca_pem` if given. Used by the node's WebSocket too.
pub fn tls_config(extra_ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, Error> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Tls(format!("bad CA certificate: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("bad CA certificate: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(Error::Tls("the CA file holds no PEM certificate".into()));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client of one domain, acting as one key.
#[derive(Clone)]
pub struct Client {
    base: String,
    identity: Identity,
    http: HttpClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    /// The last signing time, shared by clones: see [`Client::signing_time`].
    clock: Arc<AtomicI64>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("key", &self.identity.id())
            .finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Client {
    /// A client of the domain at `base` (`http://HOST:PORT` or `https://HOST:PORT`),
    /// trusting the usual web certificate authorities.
    pub fn new(base: &str, identity: Identity) -> Result<Self, Error> {
        Self::with_ca(base, identity, None)
    }

    /// Like [`Client::new`], also trusting the CA certificates in `ca_pem` (for a domain
    /// with a private or self-signed certificate).
    pub fn with_ca(base: &str, identity: Identity, ca_pem: Option<&[u8]>) -> Result<Self, Error> {
        let base = base.trim_end_matches('/').to_string();
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        if rest.is_none_or(str::is_empty) {
            return Err(Error::Url(base));
        }
        base.parse::<hyper::Uri>()
            .map_err(|_| Error::Url(base.clone()))?;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(ca_pem)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            base,
            identity,
            http,
            timeout: Duration::from_secs(60),
            clock: Arc::default(),
        })
    }

    /// The domain's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The client's key.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The time to sign a request with: the clock, but later than every time this client
    /// signed with before. The domain takes a `POST` signature once, and Ed25519 signs the
    /// same bytes alike: two identical submissions in one millisecond would otherwise be
    /// one signature, and the second refused as a replay.
    fn signing_time(&self) -> i64 {
        let now = now_ms();
        let mut last = self.clock.load(Ordering::Relaxed);
        loop {
            let time = now.max(last + 1);
            match self
                .clock
                .compare_exchange_weak(last, time, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return time,
                Err(seen) => last = seen,
            }
        }
    }

    /// Sends a signed request; returns status and body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(StatusCode, Bytes), Error> {
        let [key, time, sig] = request::sign(
            &self.identity,
            method.as_str(),
            path,
            self.signing_time(),
            &body,
        );
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .header(request::KEY_HEADER, key)
            .header(request::TIME_HEADER, time)
            .header(request::SIGNATURE_HEADER, sig)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Error::Url(e.to_string()))?;
        let transport = |reason: String| Error::Transport {
            url: self.base.clone(),
            reason,
        };
        let resp = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| transport("timed out".into()))?
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status();
        let body = tokio::time::timeout(self.timeout, resp.into_body().collect())
            .await
            .map_err(|_| transport("timed out reading the answer".into()))?
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            return Err(Error::Api {
                status: status.as_u16(),
                code: v["error"]["code"]
                    .as_str()
                    .unwrap_or("http_error")
                    .to_string(),
                message: v["error"]["message"].as_str().map_or_else(
                    || String::from_utf8_lossy(&body).into_owned(),
                    str::to_string,
                ),
            });
        }
        Ok((status, body))
    }

    async fn json(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Value, Error> {
        let (_, bytes) = self.send(method, path, body, "application/json").await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Value, Error> {
        self.json(Method::GET, "/v1/health", Vec::new()).await
    }

    /// Uploads bytes; returns their content id.
    pub async fn put_blob(&self, bytes: Vec<u8>) -> Result<ContentId, Error> {
        let id = ContentId::of(&bytes);
        self.send(
            Method::PUT,
            &format!("/v1/blobs/{id}"),
            bytes,
            "application/octet-stream",
        )
        .await?;
        Ok(id)
    }

    /// Downloads a blob and checks it hashes to `id`.
    pub async fn get_blob(&self, id: ContentId) -> Result<Vec<u8>, Error> {
        let (_, bytes) = self
            .send(
                Method::GET,
                &format!("/v1/blobs/{id}"),
                Vec::new(),
                "application/octet-stream",
            )
            .await?;
        if !id.matches(&bytes) {
            return Err(Error::Decode(format!("blob {id} does not match its bytes")));
        }
        Ok(bytes.to_vec())
    }

    /// Submits a job (module and inputs already uploaded); returns the job id.
    pub async fn submit(&self, spec: &JobSpec) -> Result<u64, Error> {
        let body = serde_json::to_vec(spec).map_err(|e| Error::Decode(e.to_string()))?;
        let v = self.json(Method::POST, "/v1/jobs", body).await?;
        v["job_id"]
            .as_u64()
            .ok_or_else(|| Error::Decode(format!("no job_id in {v}")))
    }

    /// `POST /v1/jobs?wait_ms=…`: submits a job and waits, in the same request, until it
    /// ends or `wait_ms` milliseconds (at most 60,000) pass. The answer is the submission's
    /// (`job_id`, `tasks`, …) with the job's status as `job` and, when the job ended and has
    /// at most 64 tasks, its `results` as [`Client::results`] lists them (outputs inline).
    pub async fn submit_wait(&self, spec: &JobSpec, wait_ms: u64) -> Result<Value, Error> {
        let body = serde_json::to_vec(spec).map_err(|e| Error::Decode(e.to_string()))?;
        self.json(Method::POST, &format!("/v1/jobs?wait_ms={wait_ms}"), body)
            .await
    }

    /// `POST /v1/quote`: the price per SCU now, the job's maximum cost (what submission
    /// holds in escrow) and the client's balance.
    pub async fn quote(&self, spec: &JobSpec) -> Result<Value, Error> {
        let body = serde_json::to_vec(spec).map_err(|e| Error::Decode(e.to_string()))?;
        self.json(Method::POST, "/v1/quote", body).await
    }

    /// `GET /v1/account`: the client key's balances (submitter, operator, author, stake).
    pub async fn account(&self) -> Result<Value, Error> {
        self.json(Method::GET, "/v1/account", Vec::new()).await
    }

    /// `GET /v1/ledger`: ledger totals and the contribution multiplier.
    pub async fn ledger(&self) -> Result<Value, Error> {
        self.json(Method::GET, "/v1/ledger", Vec::new()).await
    }

    /// `GET /v1/jobs/{id}`: state and counts.
    pub async fn job(&self, id: u64) -> Result<Value, Error> {
        self.json(Method::GET, &format!("/v1/jobs/{id}"), Vec::new())
            .await
    }

    /// `GET /v1/jobs/{id}?wait_ms=…`: the job's status once it has ended, or after
    /// `wait_ms` milliseconds (at most 60,000) if it has not — a long poll.
    pub async fn job_wait(&self, id: u64, wait_ms: u64) -> Result<Value, Error> {
        self.json(
            Method::GET,
            &format!("/v1/jobs/{id}?wait_ms={wait_ms}"),
            Vec::new(),
        )
        .await
    }

    /// `GET /v1/jobs/{id}/tasks`.
    pub async fn tasks(&self, id: u64, offset: u32, limit: u32) -> Result<Value, Error> {
        self.json(
            Method::GET,
            &format!("/v1/jobs/{id}/tasks?offset={offset}&limit={limit}"),
            Vec::new(),
        )
        .await
    }

    /// `GET /v1/jobs/{id}/results`.
    pub async fn results(&self, id: u64) -> Result<Value, Error> {
        self.json(
            Method::GET,
            &format!("/v1/jobs/{id}/results?limit=10000"),
            Vec::new(),
        )
        .await
    }

    /// `GET /v1/jobs/{id}/why`.
    pub async fn why(&self, id: u64) -> Result<Value, Error> {
        self.json(Method::GET, &format!("/v1/jobs/{id}/why"), Vec::new())
            .await
    }

    /// `POST /v1/jobs/{id}/cancel`.
    pub async fn cancel(&self, id: u64) -> Result<Value, Error> {
        self.json(Method::POST, &format!("/v1/jobs/{id}/cancel"), Vec::new())
            .await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Value, Error> {
        self.json(Method::GET, "/v1/nodes", Vec::new()).await
    }

    /// Waits until the job ends (`completed`, `failed` or `cancelled`), calling `progress`
    /// with each status (about once a second while it runs);
    /// returns the final status. The domain answers as soon as the job ends (no polling
    /// delay).
    pub async fn wait(&self, id: u64, mut progress: impl FnMut(&Value)) -> Result<Value, Error> {
        loop {
            let status = self.job_wait(id, PROGRESS_EVERY_MS).await?;
            progress(&status);
            if matches!(
                status["state"].as_str(),
                Some("completed" | "failed" | "cancelled")
            ) {
                return Ok(status);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_times_only_grow_across_clones() {
        let client = Client::new("http://127.0.0.1:9", Identity::from_secret_bytes(&[7; 32]))
            .expect("client");
        let clone = client.clone();
        let mut last = 0;
        // Thousands of requests signed within a few milliseconds: each gets its own time,
        // so identical requests never share a signature.
        for i in 0..5_000 {
            let t = if i % 2 == 0 {
                client.signing_time()
            } else {
                clone.signing_time()
            };
            assert!(t > last, "signing time {t} after {last}");
            last = t;
        }
        assert!(last >= now_ms(), "never behind the clock");
    }
}
