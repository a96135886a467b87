//! What each path of the metadata service answers, from an instance's
//! [`Content`](super::content::Content): the EC2 listing, `meta-data/…`
//! (identity, placement, public keys, tags, network interfaces), user-data
//! and the instance identity document; EC2's rules before any route (the
//! endpoint switch and IMDSv2 tokens, [`super::tokens`]). A dated API
//! version is served as `latest` ([`versioned`]).

use super::content::{Guest, Shared};
use super::tokens::{HopLimit, TTL_HEADER};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use nimbus_proto::network::Nic;

/// The routes of one instance's service.
pub(super) fn router(guest: Guest) -> Router {
    let content = guest.content.clone();
    Router::new()
        .route("/", get(|| async { "latest\n" }))
        .route("/latest", get(|| async { "api/\ndynamic\nmeta-data\nuser-data\n" }))
        .route("/latest/", get(|| async { "api/\ndynamic\nmeta-data\nuser-data\n" }))
        .route("/latest/meta-data", get(listing))
        .route("/latest/meta-data/", get(listing))
        .route("/latest/meta-data/{*key}", get(meta_data))
        .route("/latest/user-data", get(serve_user_data))
        .route("/latest/dynamic", get(|| async { "instance-identity/\n" }))
        .route("/latest/dynamic/", get(|| async { "instance-identity/\n" }))
        .route("/latest/dynamic/instance-identity", get(|| async { "document\n" }))
        .route("/latest/dynamic/instance-identity/", get(|| async { "document\n" }))
        .route("/latest/dynamic/instance-identity/document", get(identity))
        .with_state(content)
        .route("/latest/api/token", axum::routing::put(new_token).with_state(guest.clone()))
        .layer(axum::middleware::from_fn_with_state(guest, imds_policy))
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (status, text).into_response()
}

/// EC2's rules, before any route: nothing when the endpoint is disabled; a
/// token, when sent, must be live (401 otherwise, in either mode); without
/// one, IMDSv1 only when tokens are optional.
async fn imds_policy(State(g): State<Guest>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let options = g.content.read().unwrap_or_else(|p| p.into_inner()).meta.options;
    if !options.endpoint_enabled {
        return plain(StatusCode::FORBIDDEN, "Forbidden\n");
    }
    if req.method() == axum::http::Method::PUT {
        return next.run(req).await;
    }
    if let Err((status, text)) = g.tokens.check(&options, req.headers()) {
        return plain(status, text);
    }
    next.run(req).await
}

/// `PUT /latest/api/token`: a session token (see [`super::tokens::Tokens::issue`]),
/// leaving with the instance's hop limit as its IP TTL.
async fn new_token(State(g): State<Guest>, headers: axum::http::HeaderMap) -> Response {
    let (token, ttl) = match g.tokens.issue(&headers) {
        Ok(issued) => issued,
        Err((status, text)) => return plain(status, text),
    };
    let hop_limit = g.content.read().unwrap_or_else(|p| p.into_inner()).meta.options.hop_limit;
    let mut resp = ([(TTL_HEADER, ttl.to_string())], token).into_response();
    resp.extensions_mut().insert(HopLimit(hop_limit.max(1)));
    resp
}

/// The path to route: a dated API version (`/2009-04-04/…`, what
/// cloud-init's EC2 data source asks for) is served as `latest`.
pub(super) fn versioned(path: &str) -> String {
    if !path.starts_with('/') {
        return "/".to_string();
    }
    let rest = &path[1..];
    let (first, tail) = rest.split_once('/').map_or((rest, ""), |(a, b)| (a, b));
    let dated = first.len() == 10 && first.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    if dated {
        format!("/latest/{tail}")
    } else {
        path.to_string()
    }
}

type Ctx = State<Shared>;

const KEYS: &[&str] = &[
    "ami-id",
    "ami-launch-index",
    "hostname",
    "instance-id",
    "instance-type",
    "local-hostname",
    "placement/availability-zone",
    "reservation-id",
];

async fn listing(State(c): Ctx) -> String {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    let has_keys = !c.meta.public_keys.is_empty();
    let mut out = String::new();
    for k in KEYS {
        if let Some((dir, _)) = k.split_once('/') {
            let entry = format!("{dir}/\n");
            if !out.contains(&entry) {
                out.push_str(&entry);
            }
        } else {
            out.push_str(k);
            out.push('\n');
        }
    }
    if has_keys {
        out.push_str("public-keys/\n");
    }
    if c.meta.options.tags_enabled {
        out.push_str("tags/\n");
    }
    if let Some(n) = c.nics.first() {
        out.push_str("local-ipv4\nmac\nnetwork/\n");
        if n.public_ip.is_some() {
            out.push_str("public-ipv4\n");
        }
    }
    out
}

/// `network/interfaces/macs/...` as EC2 serves it.
fn network(nics: &[Nic], path: &str) -> Option<String> {
    let path = path.trim_end_matches('/');
    let lines = |v: Vec<String>| Some(v.join("\n"));
    match path {
        "" => Some("interfaces/".into()),
        "interfaces" => Some("macs/".into()),
        "interfaces/macs" => lines(nics.iter().map(|n| format!("{}/", n.mac)).collect()),
        _ => {
            let rest = path.strip_prefix("interfaces/macs/")?;
            let (mac, key) = rest.split_once('/').unwrap_or((rest, ""));
            let n = nics.iter().find(|n| n.mac == mac)?;
            match key {
                "" => {
                    let mut keys = vec!["device-number", "local-ipv4s", "mac", "security-group-ids", "subnet-ipv4-cidr-block", "vpc-id"];
                    if n.public_ip.is_some() {
                        keys.push("public-ipv4s");
                    }
                    lines(keys.into_iter().map(str::to_string).collect())
                }
                "device-number" => Some(n.device_index.to_string()),
                "local-ipv4s" => Some(n.private_ip.to_string()),
                "mac" => Some(n.mac.clone()),
                "security-group-ids" => lines(n.group_ids.clone()),
                "subnet-ipv4-cidr-block" => Some(n.subnet.to_string()),
                "vpc-id" => Some(n.vpc_id.clone()),
                "public-ipv4s" => n.public_ip.map(|p| p.to_string()),
                _ => None,
            }
        }
    }
}

/// `public-keys/...` as EC2 serves it: `0=<name>` per key, then
/// `N/` → `openssh-key`, `N/openssh-key` → the key.
fn public_keys(keys: &[(String, String)], path: &str) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    if path.is_empty() {
        return Some(keys.iter().enumerate().map(|(i, (name, _))| format!("{i}={name}")).collect::<Vec<_>>().join("\n"));
    }
    let (index, rest) = path.split_once('/').unwrap_or((path, ""));
    // Digits only: "+1" or "01" would parse too.
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) || (index.len() > 1 && index.starts_with('0')) {
        return None;
    }
    let (_, key) = keys.get(index.parse::<usize>().ok()?)?;
    match rest {
        "" => Some("openssh-key".to_string()),
        "openssh-key" => Some(key.clone()),
        _ => None,
    }
}

async fn meta_data(State(c): Ctx, Path(key): Path<String>) -> Response {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    let m = &c.meta;
    let value = match key.trim_end_matches('/') {
        "ami-id" => m.image_id.clone(),
        "ami-launch-index" => m.ami_launch_index.to_string(),
        "hostname" | "local-hostname" => m.instance_id.clone(),
        "instance-id" => m.instance_id.clone(),
        "instance-type" => m.instance_type.clone(),
        "placement" => "availability-zone".to_string(),
        "placement/availability-zone" => m.availability_zone.clone(),
        "reservation-id" => m.reservation_id.clone(),
        "local-ipv4" | "mac" | "public-ipv4" => {
            let primary = c.nics.iter().find(|n| n.device_index == 0);
            match (key.trim_end_matches('/'), primary) {
                ("local-ipv4", Some(n)) => n.private_ip.to_string(),
                ("mac", Some(n)) => n.mac.clone(),
                ("public-ipv4", Some(Nic { public_ip: Some(p), .. })) => p.to_string(),
                _ => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
            }
        }
        "tags" if m.options.tags_enabled => "instance".to_string(),
        "tags/instance" if m.options.tags_enabled => m.tags.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join("\n"),
        k if m.options.tags_enabled && k.starts_with("tags/instance/") => {
            match m.tags.iter().find(|(t, _)| t == &k["tags/instance/".len()..]) {
                Some((_, v)) => v.clone(),
                None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
            }
        }
        k if k == "network" || k.starts_with("network/") => {
            match network(&c.nics, k.strip_prefix("network").unwrap_or("").trim_start_matches('/')) {
                Some(v) => v,
                None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
            }
        }
        "public-keys" => match public_keys(&m.public_keys, "") {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        k if k.starts_with("public-keys/") => match public_keys(&m.public_keys, &k["public-keys/".len()..]) {
            Some(v) => v,
            None => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
        },
        _ => return (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    };
    value.into_response()
}

async fn serve_user_data(State(c): Ctx) -> Response {
    match c.read().unwrap_or_else(|p| p.into_inner()).user_data.clone() {
        Some(data) => data.into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    }
}

async fn identity(State(c): Ctx) -> Response {
    let c = c.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(doc) = &c.doc {
        return axum::Json(doc.identity()).into_response();
    }
    let m = c.meta;
    axum::Json(serde_json::json!({
        "instanceId": m.instance_id,
        "imageId": m.image_id,
        "instanceType": m.instance_type,
        "availabilityZone": m.availability_zone,
        "accountId": m.owner_id,
        "architecture": "x86_64",
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::super::testing::{call, get, sample_metadata, Fixture};

    #[tokio::test]
    async fn public_keys_are_served_like_ec2() {
        let f = Fixture::new();
        let none = f.serve(&sample_metadata("i-000000000000000dd"), None).await;
        let listing = get(&none, "/latest/meta-data/").await;
        assert_eq!(listing.0, 200);
        assert!(!listing.1.contains("public-keys"), "no keys, no listing entry: {}", listing.1);
        assert_eq!(get(&none, "/latest/meta-data/public-keys/").await.0, 404);
        assert_eq!(get(&none, "/latest/meta-data/public-keys/0/openssh-key").await.0, 404);

        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample user@example".to_string();
        let mut m = sample_metadata("i-000000000000000ee");
        m.public_keys = vec![("my-key".into(), key.clone())];
        let s = f.serve(&m, None).await;
        let listing = get(&s, "/latest/meta-data/").await.1;
        assert!(listing.lines().any(|l| l == "public-keys/"), "{listing}");
        assert_eq!(get(&s, "/latest/meta-data/public-keys").await, (200, "0=my-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/").await, (200, "0=my-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/0").await, (200, "openssh-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/0/").await, (200, "openssh-key".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/0/openssh-key").await, (200, key.clone()));
        for missing in [
            "public-keys/1/",
            "public-keys/1/openssh-key",
            "public-keys/00/openssh-key",
            "public-keys/+0/",
            "public-keys/0/nope",
            "public-keys/my-key",
        ] {
            assert_eq!(get(&s, &format!("/latest/meta-data/{missing}")).await.0, 404, "{missing}");
        }
        // Keys can change (a later assignment): the same server answers the new ones.
        m.public_keys.push(("second".into(), "ssh-rsa AAAAB3 second".into()));
        assert_eq!(f.serve(&m, None).await, s);
        assert_eq!(get(&s, "/latest/meta-data/public-keys/").await, (200, "0=my-key\n1=second".into()));
        assert_eq!(get(&s, "/latest/meta-data/public-keys/1/openssh-key").await, (200, "ssh-rsa AAAAB3 second".into()));
    }

    /// cloud-init's EC2 data source asks for dated versions and directories
    /// with a trailing slash.
    #[tokio::test]
    async fn dated_versions_and_directories_are_served_like_latest() {
        let f = Fixture::new();
        let socket = f.serve(&sample_metadata("i-0000000000000000a"), None).await;
        assert_eq!(call(&socket, "GET", "/2009-04-04/meta-data/instance-id", &[]).await, (200, "i-0000000000000000a".into()));
        assert_eq!(call(&socket, "GET", "/2021-03-23/meta-data/placement/", &[]).await, (200, "availability-zone".into()));
        assert_eq!(call(&socket, "GET", "/2021-03-23/dynamic/instance-identity/", &[]).await, (200, "document\n".into()));
        assert_eq!(call(&socket, "GET", "/2021-3-23/meta-data/instance-id", &[]).await.0, 404, "not a date");
    }
}
