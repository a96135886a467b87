//! The agent's client of the control plane's `/v1/agent/*` API.

use nimbus_proto::agent::{Assignments, CertificateGrant, CertificateRequest, HostCredential, RegisterHost, Report};
use nimbus_proto::api::ErrorBody;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the control plane rejected the credential: {0}")]
    Unauthorized(String),
    #[error("the control plane answered {status}: {code}: {message}")]
    Api { status: u16, code: String, message: String },
    #[error("cannot reach the control plane: {0}")]
    Transport(#[from] reqwest::Error),
}

#[derive(Clone)]
pub struct ControlPlane {
    base: String,
    http: reqwest::Client,
}

impl ControlPlane {
    pub fn new(base: &str, http: reqwest::Client) -> ControlPlane {
        ControlPlane { base: base.trim_end_matches('/').to_string(), http }
    }

    async fn decode<T: serde::de::DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let body: Option<ErrorBody> = resp.json().await.ok();
        let (code, message) = body.map(|b| (b.code, b.message)).unwrap_or_else(|| ("Unknown".into(), status.to_string()));
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized(message));
        }
        Err(ClientError::Api { status: status.as_u16(), code, message })
    }

    pub async fn register(&self, join_token: &str, req: &RegisterHost) -> Result<HostCredential, ClientError> {
        let resp = self.http.post(format!("{}/v1/agent/register", self.base)).bearer_auth(join_token).json(req).send().await?;
        Self::decode(resp).await
    }

    /// Has the control plane's CA certify this host's key (see `store.rs`).
    pub async fn certificate(&self, cred: &HostCredential, req: &CertificateRequest) -> Result<CertificateGrant, ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/agent/certificate", self.base))
            .bearer_auth(cred.bearer())
            .json(req)
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        Self::decode(resp).await
    }

    pub async fn assignments(&self, cred: &HostCredential, after: i64, wait: Duration) -> Result<Assignments, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/agent/assignments", self.base))
            .query(&[("after", after.to_string()), ("wait_ms", wait.as_millis().to_string())])
            .bearer_auth(cred.bearer())
            .timeout(wait + Duration::from_secs(10))
            .send()
            .await?;
        Self::decode(resp).await
    }

    pub async fn report(&self, cred: &HostCredential, report: &Report) -> Result<(), ClientError> {
        let resp = self
            .http
            .post(format!("{}/v1/agent/report", self.base))
            .bearer_auth(cred.bearer())
            .json(report)
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        Self::decode::<serde_json::Value>(resp).await.map(|_| ())
    }
}
