//! A small typed client of the `/v1` REST API.
//!
//! Every call returns the decoded body and the raw JSON it came from (the
//! `--output json` view prints the raw body, fields the CLI does not know
//! included). Errors are mapped once, in [`decode`] and [`Client::send`].

use crate::error::CliError;
use nimbus_proto::api::*;
use nimbus_proto::InstanceState;
use reqwest::{Method, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

/// A decoded response and the JSON body it was decoded from.
#[derive(Debug, Clone)]
pub struct Response<T> {
    pub body: T,
    pub raw: Value,
}

/// Filters of `GET /v1/instances`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceQuery {
    pub instance_ids: Vec<String>,
    pub states: Vec<InstanceState>,
    pub availability_zones: Vec<String>,
    pub instance_types: Vec<String>,
    pub max_results: Option<u32>,
}

impl InstanceQuery {
    pub fn ids(ids: &[String]) -> Self {
        InstanceQuery { instance_ids: ids.to_vec(), ..Default::default() }
    }

    /// Query-string pairs; list filters are comma-separated, empty ones left out.
    pub fn to_pairs(&self, next_token: Option<&str>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut list = |k: &'static str, v: Vec<&str>| {
            if !v.is_empty() {
                out.push((k, v.join(",")));
            }
        };
        list("instance_id", self.instance_ids.iter().map(String::as_str).collect());
        list("state", self.states.iter().map(|s| s.as_str()).collect());
        list("availability_zone", self.availability_zones.iter().map(String::as_str).collect());
        list("instance_type", self.instance_types.iter().map(String::as_str).collect());
        if let Some(n) = self.max_results {
            out.push(("max_results", n.to_string()));
        }
        if let Some(t) = next_token {
            out.push(("next_token", t.to_string()));
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    endpoint: String,
    token: String,
}

/// Turns an HTTP status and body into the typed result: the body decoded as
/// `T` on success, the API's [`ErrorBody`] on failure, [`CliError::BadResponse`]
/// for anything else. Never panics, whatever the bytes.
pub fn decode<T: DeserializeOwned>(url: &str, status: u16, bytes: &[u8]) -> Result<Response<T>, CliError> {
    let bad = |detail: String| CliError::BadResponse { url: url.to_string(), status, detail };
    if !(200..300).contains(&status) {
        return match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(body) => Err(CliError::Api { status, body }),
            Err(_) => Err(bad(format!("not an API error body: {}", snippet(bytes)))),
        };
    }
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON ({e}): {}", snippet(bytes))))?;
    let body = T::deserialize(&raw).map_err(|e| bad(format!("unexpected body ({e}): {}", snippet(bytes))))?;
    Ok(Response { body, raw })
}

fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 200;
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.is_empty() {
        return "<empty body>".into();
    }
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// The innermost cause of an error: "Connection refused (os error 111)"
/// rather than reqwest's layered description.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

impl Client {
    /// `endpoint`: base URL such as `http://127.0.0.1:8787` (a path prefix is kept).
    pub fn new(endpoint: &str, token: &str) -> Result<Self, CliError> {
        let base = Url::parse(endpoint).map_err(|e| CliError::Usage(format!("invalid --endpoint {endpoint:?}: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(CliError::Usage(format!("invalid --endpoint {endpoint:?}: expected http://host:port or https://host:port")));
        }
        if token.is_empty() {
            return Err(CliError::Usage("no API token: pass --token or set NIMBUS_TOKEN".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("nimbus-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Usage(format!("cannot build the HTTP client: {}", root_cause(&e))))?;
        Ok(Client { http, base, endpoint: endpoint.trim_end_matches('/').to_string(), token: token.to_string() })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in Client::new").pop_if_empty().extend(segments);
        url
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&'static str, String)],
        json: Option<Vec<u8>>,
    ) -> Result<Response<T>, CliError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let mut req = self.http.request(method, url.clone()).bearer_auth(&self.token);
        if let Some(body) = json {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let connect = |e: reqwest::Error| CliError::Connect { endpoint: self.endpoint.clone(), detail: root_cause(&e) };
        let resp = req.send().await.map_err(connect)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(connect)?;
        decode(url.as_str(), status, &bytes)
    }

    pub async fn run_instances(&self, req: &RunInstancesRequest) -> Result<Response<Reservation>, CliError> {
        self.send(Method::POST, &["v1", "instances"], &[], json_body(req)?).await
    }

    /// One page of `GET /v1/instances`.
    pub async fn describe_instances_page(&self, q: &InstanceQuery, next_token: Option<&str>) -> Result<Response<InstanceList>, CliError> {
        self.send(Method::GET, &["v1", "instances"], &q.to_pairs(next_token), None).await
    }

    /// Every page of `GET /v1/instances`, following `next_token`; the raw body
    /// is `{"instances": [...]}` with the instances of all pages.
    pub async fn describe_instances_all(&self, q: &InstanceQuery) -> Result<Response<InstanceList>, CliError> {
        let mut instances = Vec::new();
        let mut raw_instances = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.describe_instances_page(q, token.as_deref()).await?;
            instances.extend(page.body.instances);
            if let Some(Value::Array(items)) = page.raw.get("instances") {
                raw_instances.extend(items.iter().cloned());
            }
            match page.body.next_token {
                Some(next) if Some(&next) == token.as_ref() => {
                    return Err(CliError::BadResponse {
                        url: self.url(&["v1", "instances"]).to_string(),
                        status: 200,
                        detail: format!("next_token {next:?} repeats: pagination would not end"),
                    });
                }
                Some(next) => token = Some(next),
                None => break,
            }
        }
        let raw = serde_json::json!({ "instances": raw_instances });
        Ok(Response { body: InstanceList { instances, next_token: None }, raw })
    }

    pub async fn describe_instance(&self, id: &str) -> Result<Response<Instance>, CliError> {
        self.send(Method::GET, &["v1", "instances", id], &[], None).await
    }

    pub async fn terminate_instances(&self, ids: &[String]) -> Result<Response<TerminateInstancesResponse>, CliError> {
        let req = TerminateInstancesRequest { instance_ids: ids.to_vec() };
        self.send(Method::POST, &["v1", "instances", "terminate"], &[], json_body(&req)?).await
    }

    pub async fn describe_hosts(&self) -> Result<Response<HostList>, CliError> {
        self.send(Method::GET, &["v1", "hosts"], &[], None).await
    }

    pub async fn describe_instance_types(&self) -> Result<Response<InstanceTypeList>, CliError> {
        self.send(Method::GET, &["v1", "instance-types"], &[], None).await
    }

    pub async fn describe_images(&self, query: &[(&'static str, String)]) -> Result<Response<ImageList>, CliError> {
        self.send(Method::GET, &["v1", "images"], query, None).await
    }

    pub async fn register_image(&self, req: &RegisterImageRequest) -> Result<Response<Image>, CliError> {
        self.send(Method::POST, &["v1", "images"], &[], json_body(req)?).await
    }

    pub async fn describe_account(&self) -> Result<Response<AccountView>, CliError> {
        self.send(Method::GET, &["v1", "account"], &[], None).await
    }

    pub async fn set_account_limits(&self, account: &str, limits: &SetLimits) -> Result<Response<AccountView>, CliError> {
        self.send(Method::PUT, &["v1", "admin", "accounts", account, "limits"], &[], json_body(limits)?).await
    }

    pub async fn reset_host(&self, host: &str) -> Result<Response<HostReset>, CliError> {
        self.send(Method::POST, &["v1", "hosts", host, "reset-credential"], &[], None).await
    }

    pub async fn create_key_pair(&self, req: &CreateKeyPairRequest) -> Result<Response<NewKeyPair>, CliError> {
        self.send(Method::POST, &["v1", "key-pairs"], &[], json_body(req)?).await
    }

    pub async fn import_key_pair(&self, req: &ImportKeyPairRequest) -> Result<Response<KeyPair>, CliError> {
        self.send(Method::POST, &["v1", "key-pairs", "import"], &[], json_body(req)?).await
    }

    pub async fn associate_address(&self, allocation_id: &str, req: &AssociateAddressRequest) -> Result<Response<Association>, CliError> {
        self.send(Method::POST, &["v1", "addresses", allocation_id, "associate"], &[], json_body(req)?).await
    }

    /// Any `/v1` call whose answer the CLI shows as JSON or a generic table.
    pub async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&'static str, String)],
        body: Option<&Value>,
    ) -> Result<Response<Value>, CliError> {
        let json = body.map(json_body).transpose()?.flatten();
        self.send(method, segments, query, json).await
    }

    pub async fn create_account(&self, name: &str) -> Result<Response<NewAccount>, CliError> {
        self.send(Method::POST, &["v1", "admin", "accounts"], &[], json_body(&CreateAccountRequest { name: name.to_string() })?).await
    }
}

fn json_body<T: Serialize>(v: &T) -> Result<Option<Vec<u8>>, CliError> {
    serde_json::to_vec(v).map(Some).map_err(|e| CliError::Usage(format!("cannot encode the request: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_join_lists_and_skip_empty_filters() {
        let q = InstanceQuery {
            instance_ids: vec!["i-0000000000000000a".into(), "i-0000000000000000b".into()],
            states: vec![InstanceState::Running, InstanceState::Pending],
            availability_zones: vec![],
            instance_types: vec!["t3.micro".into()],
            max_results: Some(5),
        };
        assert_eq!(
            q.to_pairs(Some("tok")),
            vec![
                ("instance_id", "i-0000000000000000a,i-0000000000000000b".to_string()),
                ("state", "running,pending".to_string()),
                ("instance_type", "t3.micro".to_string()),
                ("max_results", "5".to_string()),
                ("next_token", "tok".to_string()),
            ]
        );
        assert!(InstanceQuery::default().to_pairs(None).is_empty());
    }

    #[test]
    fn decode_success_keeps_raw_body() {
        let body = br#"{"hosts": [], "extra": 1}"#;
        let r: Response<HostList> = decode("u", 200, body).unwrap();
        assert!(r.body.hosts.is_empty());
        assert_eq!(r.raw["extra"], 1);
    }

    #[test]
    fn decode_api_error_body() {
        let body = br#"{"code":"AuthFailure","message":"invalid token","request_id":"r-1"}"#;
        let e = decode::<HostList>("u", 401, body).unwrap_err();
        assert_eq!(e.to_string(), "AuthFailure: invalid token (request id r-1)");
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn decode_garbage_is_a_bad_response_not_a_panic() {
        let e = decode::<HostList>("http://x/v1/hosts", 502, b"<html>Bad Gateway</html>").unwrap_err();
        assert!(matches!(e, CliError::BadResponse { status: 502, .. }), "{e:?}");
        assert!(e.to_string().contains("Bad Gateway"));
        let e = decode::<HostList>("u", 200, b"{not json").unwrap_err();
        assert!(matches!(e, CliError::BadResponse { status: 200, .. }));
        let e = decode::<HostList>("u", 200, br#"{"hosts": 3}"#).unwrap_err();
        assert!(matches!(e, CliError::BadResponse { .. }));
        let e = decode::<HostList>("u", 500, b"").unwrap_err();
        assert!(e.to_string().contains("<empty body>"));
    }

    #[test]
    fn client_rejects_bad_endpoint_and_missing_token() {
        assert_eq!(Client::new("127.0.0.1:8787", "t").unwrap_err().exit_code(), 2);
        assert_eq!(Client::new("ftp://h/", "t").unwrap_err().exit_code(), 2);
        let e = Client::new("http://127.0.0.1:8787", "").unwrap_err();
        assert!(e.to_string().contains("NIMBUS_TOKEN"));
    }

    #[test]
    fn urls_keep_a_path_prefix() {
        let c = Client::new("http://h:1/prefix/", "t").unwrap();
        assert_eq!(c.url(&["v1", "instances", "i-1"]).as_str(), "http://h:1/prefix/v1/instances/i-1");
        let c = Client::new("http://h:1", "t").unwrap();
        assert_eq!(c.url(&["v1", "hosts"]).as_str(), "http://h:1/v1/hosts");
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_connection_error_naming_it() {
        // A loopback port nothing listens on: bind, note, drop.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let c = Client::new(&endpoint, "t").unwrap();
        let e = c.describe_hosts().await.unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e:?}");
        assert!(e.to_string().contains(&endpoint), "{e}");
    }
}
