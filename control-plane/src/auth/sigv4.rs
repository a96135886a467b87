//! Server-side verification of AWS Signature Version 4 (`AWS4-HMAC-SHA256`).
//!
//! The EC2 Query API front door authenticates requests the way AWS does, so
//! that the AWS CLI, boto3 and the other SDKs work unmodified. This module is
//! pure: it sees a [`RequestView`] (method, raw path, raw query, headers,
//! body), the current time and the caller's secret, and answers who signed
//! the request or why it is refused. No database, no HTTP framework.
//!
//! Both ways of carrying a signature are supported: the `Authorization`
//! header, and presigned URLs (`X-Amz-Algorithm`, `X-Amz-Credential`,
//! `X-Amz-Date`, `X-Amz-Expires`, `X-Amz-SignedHeaders`, `X-Amz-Signature`
//! in the query string).
//!
//! The steps, per AWS's "Create a signed AWS API request" guide:
//!
//! 1. Parse the credential (`AKID/YYYYMMDD/region/service/aws4_request`), the
//!    signed-header list and the hex signature.
//! 2. Take the request time from `X-Amz-Date` (or `Date`); refuse it when it
//!    is more than 15 minutes from now (presigned: past `X-Amz-Expires`), and
//!    require the credential-scope date to be the request's UTC date.
//! 3. Rebuild the canonical request: method; canonical URI (dot segments and
//!    duplicate slashes removed, then the path *as received* URI-encoded once
//!    more, i.e. double encoding as for every service but S3); canonical
//!    query (each name and value decoded — `+` as a space, as the SDKs'
//!    form decoding does — then RFC 3986-encoded, sorted by encoded name then
//!    value, `X-Amz-Signature` left out); canonical headers (the signed
//!    headers, lower-case, values trimmed with inner whitespace runs collapsed
//!    to one space, repeated headers joined by `,`); the signed-header list;
//!    and the hex SHA-256 of the body.
//! 4. String to sign: algorithm, timestamp, scope, hex SHA-256 of the
//!    canonical request. Signing key: HMAC-SHA256 chain over date, region,
//!    service and `aws4_request`, starting from `"AWS4" + secret`.
//! 5. Compare the signature in constant time.
//!
//! `host` must be signed. Callers serving HTTP/2 must put the `:authority`
//! into a `host` header before verifying. An `X-Amz-Content-Sha256` header,
//! when present, must equal the body's hash (no `UNSIGNED-PAYLOAD` outside
//! S3). Checking that `service` is `ec2` and `region` is ours is left to the
//! caller, who gets both in [`Verified`].

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The only algorithm supported.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const TERMINATOR: &str = "aws4_request";
/// AWS's limit on `X-Amz-Expires`: seven days.
const MAX_PRESIGNED_EXPIRES: i64 = 604_800;
const PARAM_ALGORITHM: &str = "X-Amz-Algorithm";
const PARAM_CREDENTIAL: &str = "X-Amz-Credential";
const PARAM_DATE: &str = "X-Amz-Date";
const PARAM_EXPIRES: &str = "X-Amz-Expires";
const PARAM_SIGNED_HEADERS: &str = "X-Amz-SignedHeaders";
const PARAM_SIGNATURE: &str = "X-Amz-Signature";

type HmacSha256 = Hmac<Sha256>;

/// What the verifier needs to see of an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method, as sent (`GET`, `POST`).
    pub method: &'a str,
    /// The path exactly as received, still percent-encoded (`uri.path()`).
    pub path: &'a str,
    /// The raw query string, without the `?` (empty when there is none).
    pub query: &'a str,
    /// All request headers; names are case-insensitive, values may repeat.
    pub headers: &'a HeaderMap,
    /// The full request body.
    pub body: &'a [u8],
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key_id: String,
    pub region: String,
    pub service: String,
}

/// Knobs of the verifier; [`Default`] is what AWS services do.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// How far the request time may be from now (AWS: 15 minutes).
    pub max_clock_skew: Duration,
    /// Remove dot segments and duplicate slashes from the path before
    /// encoding it (every service but S3).
    pub normalize_path: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self { max_clock_skew: Duration::minutes(15), normalize_path: true }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// Neither an `Authorization` header nor presigned query parameters.
    #[error("the request carries no AWS Signature Version 4 authentication")]
    MissingAuth,
    /// The authentication information is present but unusable.
    #[error("malformed authentication: {0}")]
    Malformed(String),
    /// No secret is known for the access key id.
    #[error("the access key id is not known")]
    UnknownAccessKey,
    /// The signature is not the one the secret gives.
    #[error("the request signature does not match")]
    SignatureMismatch,
    /// The request time is too far from now, or the presigned URL expired.
    #[error("the request has expired or is not yet valid")]
    RequestExpired,
}

impl SigV4Error {
    /// The EC2 error code to answer with.
    pub fn ec2_code(&self) -> &'static str {
        match self {
            SigV4Error::MissingAuth => "MissingAuthenticationToken",
            SigV4Error::Malformed(_) => "IncompleteSignature",
            SigV4Error::UnknownAccessKey | SigV4Error::SignatureMismatch => "AuthFailure",
            SigV4Error::RequestExpired => "RequestExpired",
        }
    }

    /// The HTTP status EC2 answers these with.
    pub fn http_status(&self) -> u16 {
        match self {
            SigV4Error::MissingAuth | SigV4Error::UnknownAccessKey | SigV4Error::SignatureMismatch => 401,
            SigV4Error::Malformed(_) | SigV4Error::RequestExpired => 400,
        }
    }
}

fn malformed(reason: impl Into<String>) -> SigV4Error {
    SigV4Error::Malformed(reason.into())
}

/// Verifies `req` in one go: parse, check the time, look the secret up,
/// check the signature. `lookup` maps an access key id to its secret.
pub fn verify<F, S>(req: &RequestView<'_>, now: DateTime<Utc>, options: &VerifyOptions, lookup: F) -> Result<Verified, SigV4Error>
where
    F: FnOnce(&str) -> Option<S>,
    S: AsRef<[u8]>,
{
    let auth = ParsedAuth::parse(req)?;
    auth.check_time(now, options)?;
    let secret = lookup(auth.access_key_id()).ok_or(SigV4Error::UnknownAccessKey)?;
    auth.verify(req, now, options, secret.as_ref())
}

/// How the signature was carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    Header,
    /// Presigned URL valid for this many seconds from its `X-Amz-Date`.
    Presigned {
        expires_secs: i64,
    },
}

/// The authentication parameters of a request, parsed but not yet checked.
///
/// For callers whose secret lookup is asynchronous: [`ParsedAuth::parse`],
/// look up [`ParsedAuth::access_key_id`], then [`ParsedAuth::verify`].
#[derive(Debug, Clone)]
pub struct ParsedAuth {
    kind: AuthKind,
    access_key_id: String,
    scope_date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: [u8; 32],
    timestamp: DateTime<Utc>,
}

impl ParsedAuth {
    /// Reads the signature parameters from the header or the query string.
    pub fn parse(req: &RequestView<'_>) -> Result<Self, SigV4Error> {
        let mut auth_headers = req.headers.get_all(http::header::AUTHORIZATION).iter();
        let header = auth_headers.next();
        if auth_headers.next().is_some() {
            return Err(malformed("more than one Authorization header"));
        }
        let query = parse_query(req.query);
        let presigned = query
            .iter()
            .any(|(k, _)| [PARAM_ALGORITHM.as_bytes(), PARAM_CREDENTIAL.as_bytes(), PARAM_SIGNATURE.as_bytes()].contains(&k.as_slice()));
        match (header, presigned) {
            (Some(_), true) => Err(malformed("both an Authorization header and presigned query parameters")),
            (Some(value), false) => {
                let value = value.to_str().map_err(|_| malformed("the Authorization header is not ASCII"))?;
                Self::from_header(value, req.headers)
            }
            (None, true) => Self::from_query(&query),
            (None, false) => Err(SigV4Error::MissingAuth),
        }
    }

    fn from_header(value: &str, headers: &HeaderMap) -> Result<Self, SigV4Error> {
        let value = value.trim();
        let rest = match value.split_once(|c: char| c.is_ascii_whitespace()) {
            Some((ALGORITHM, rest)) => rest,
            Some((other, _)) if other.starts_with("AWS4-") => return Err(malformed(format!("unsupported algorithm {other}"))),
            None if value == ALGORITHM => return Err(malformed("no Credential, SignedHeaders or Signature")),
            _ => return Err(malformed("the Authorization header is not AWS4-HMAC-SHA256")),
        };
        let (mut credential, mut signed_headers, mut signature) = (None, None, None);
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, val) = part.split_once('=').ok_or_else(|| malformed(format!("Authorization component without '=': {part}")))?;
            let slot = match key.trim() {
                "Credential" => &mut credential,
                "SignedHeaders" => &mut signed_headers,
                "Signature" => &mut signature,
                other => return Err(malformed(format!("unknown Authorization component {other}"))),
            };
            if slot.replace(val.trim()).is_some() {
                return Err(malformed(format!("repeated Authorization component {}", key.trim())));
            }
        }
        let credential = credential.ok_or_else(|| malformed("missing Credential"))?;
        let signed_headers = signed_headers.ok_or_else(|| malformed("missing SignedHeaders"))?;
        let signature = signature.ok_or_else(|| malformed("missing Signature"))?;
        let timestamp = header_timestamp(headers)?;
        Self::build(AuthKind::Header, credential, signed_headers, signature, timestamp)
    }

    fn from_query(query: &[(Vec<u8>, Vec<u8>)]) -> Result<Self, SigV4Error> {
        let get = |name: &str| -> Result<&str, SigV4Error> {
            let mut found = query.iter().filter(|(k, _)| k.as_slice() == name.as_bytes());
            let (_, value) = found.next().ok_or_else(|| malformed(format!("missing {name}")))?;
            if found.next().is_some() {
                return Err(malformed(format!("repeated {name}")));
            }
            std::str::from_utf8(value).map_err(|_| malformed(format!("{name} is not UTF-8")))
        };
        let algorithm = get(PARAM_ALGORITHM)?;
        if algorithm != ALGORITHM {
            return Err(malformed(format!("unsupported algorithm {algorithm}")));
        }
        let timestamp = parse_amz_date(get(PARAM_DATE)?)?;
        let expires_secs: i64 = get(PARAM_EXPIRES)?.parse().map_err(|_| malformed("X-Amz-Expires is not a number"))?;
        if !(1..=MAX_PRESIGNED_EXPIRES).contains(&expires_secs) {
            return Err(malformed("X-Amz-Expires must be between 1 and 604800"));
        }
        Self::build(
            AuthKind::Presigned { expires_secs },
            get(PARAM_CREDENTIAL)?,
            get(PARAM_SIGNED_HEADERS)?,
            get(PARAM_SIGNATURE)?,
            timestamp,
        )
    }

    fn build(
        kind: AuthKind,
        credential: &str,
        signed_headers: &str,
        signature: &str,
        timestamp: DateTime<Utc>,
    ) -> Result<Self, SigV4Error> {
        let parts: Vec<&str> = credential.split('/').collect();
        let [akid, date, region, service, terminator] = parts.as_slice() else {
            return Err(malformed("Credential must be AKID/date/region/service/aws4_request"));
        };
        if *terminator != TERMINATOR {
            return Err(malformed("Credential scope must end in aws4_request"));
        }
        if akid.is_empty() || region.is_empty() || service.is_empty() {
            return Err(malformed("empty field in Credential"));
        }
        if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("Credential date must be YYYYMMDD"));
        }
        let names: Vec<String> = signed_headers.split(';').map(str::to_owned).collect();
        for name in &names {
            let valid = !name.bytes().any(|b| b.is_ascii_uppercase()) && http::HeaderName::from_bytes(name.as_bytes()).is_ok();
            if !valid {
                return Err(malformed(format!("bad signed header name {name:?}")));
            }
        }
        if names.windows(2).any(|w| w[0] >= w[1]) {
            return Err(malformed("SignedHeaders must be sorted and unique"));
        }
        if !names.iter().any(|n| n == "host") {
            return Err(malformed("the host header must be signed"));
        }
        let mut sig = [0u8; 32];
        if signature.len() != 64 || hex::decode_to_slice(signature, &mut sig).is_err() {
            return Err(malformed("Signature must be 64 hex digits"));
        }
        Ok(Self {
            kind,
            access_key_id: (*akid).to_owned(),
            scope_date: (*date).to_owned(),
            region: (*region).to_owned(),
            service: (*service).to_owned(),
            signed_headers: names,
            signature: sig,
            timestamp,
        })
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }
    pub fn region(&self) -> &str {
        &self.region
    }
    pub fn service(&self) -> &str {
        &self.service
    }
    pub fn kind(&self) -> AuthKind {
        self.kind
    }
    /// The request time the signature was made for.
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }

    /// Refuses a request outside its validity window, or whose credential
    /// scope is not dated on the request's day. Cheap: do it before the lookup.
    pub fn check_time(&self, now: DateTime<Utc>, options: &VerifyOptions) -> Result<(), SigV4Error> {
        let ts = self.timestamp;
        if self.scope_date != format!("{:04}{:02}{:02}", ts.year(), ts.month(), ts.day()) {
            return Err(malformed("the Credential date is not the request date"));
        }
        let skew = options.max_clock_skew;
        let valid = match self.kind {
            AuthKind::Header => now.signed_duration_since(ts).abs() <= skew,
            AuthKind::Presigned { expires_secs } => now >= ts - skew && now <= ts + Duration::seconds(expires_secs),
        };
        if valid {
            Ok(())
        } else {
            Err(SigV4Error::RequestExpired)
        }
    }

    /// Checks the time and the signature against `secret` (the secret access
    /// key of [`ParsedAuth::access_key_id`]).
    pub fn verify(
        &self,
        req: &RequestView<'_>,
        now: DateTime<Utc>,
        options: &VerifyOptions,
        secret: &[u8],
    ) -> Result<Verified, SigV4Error> {
        self.check_time(now, options)?;
        let canonical = self.canonical_request(req, options)?;
        let string_to_sign = self.string_to_sign(&canonical);
        let key = signing_key(secret, &self.scope_date, &self.region, &self.service);
        let expected = hmac_sha256(&key, string_to_sign.as_bytes());
        if bool::from(expected.ct_eq(&self.signature)) {
            Ok(Verified { access_key_id: self.access_key_id.clone(), region: self.region.clone(), service: self.service.clone() })
        } else {
            Err(SigV4Error::SignatureMismatch)
        }
    }

    fn scope(&self) -> String {
        format!("{}/{}/{}/{TERMINATOR}", self.scope_date, self.region, self.service)
    }

    fn string_to_sign(&self, canonical_request: &[u8]) -> String {
        format!("{ALGORITHM}\n{}\n{}\n{}", format_amz_date(self.timestamp), self.scope(), hex::encode(Sha256::digest(canonical_request)))
    }

    /// The canonical request, as bytes (header values need not be UTF-8).
    fn canonical_request(&self, req: &RequestView<'_>, options: &VerifyOptions) -> Result<Vec<u8>, SigV4Error> {
        let mut out = Vec::with_capacity(256 + req.query.len());
        out.extend_from_slice(req.method.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(canonical_uri(req.path, options.normalize_path).as_bytes());
        out.push(b'\n');
        let exclude = match self.kind {
            AuthKind::Header => None,
            AuthKind::Presigned { .. } => Some(PARAM_SIGNATURE),
        };
        out.extend_from_slice(canonical_query(req.query, exclude).as_bytes());
        out.push(b'\n');
        for name in &self.signed_headers {
            let mut values = req.headers.get_all(name.as_str()).iter().peekable();
            if values.peek().is_none() {
                return Err(malformed(format!("signed header {name} is missing")));
            }
            out.extend_from_slice(name.as_bytes());
            out.push(b':');
            for (i, value) in values.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_trimmed(&mut out, value.as_bytes());
            }
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(self.signed_headers.join(";").as_bytes());
        out.push(b'\n');
        out.extend_from_slice(payload_hash(req)?.as_bytes());
        Ok(out)
    }
}

/// The signing key: HMAC chain from `"AWS4" + secret` over date, region,
/// service and `aws4_request`.
pub fn signing_key(secret: &[u8], date: &str, region: &str, service: &str) -> [u8; 32] {
    let mut k_secret = Vec::with_capacity(4 + secret.len());
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret);
    let k_date = hmac_sha256(&k_secret, date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, TERMINATOR.as_bytes())
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length (long ones are hashed first), so
    // `new_from_slice` cannot fail; `Mac::new` wants a block-sized key.
    let mut mac = match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(mac) => mac,
        // Unreachable; if it were not, this is what HMAC does with a key
        // longer than a block: hash it, zero-pad it.
        Err(_) => {
            let mut block = hmac::digest::Key::<HmacSha256>::default();
            for (slot, byte) in block.iter_mut().zip(Sha256::digest(key)) {
                *slot = byte;
            }
            <HmacSha256 as Mac>::new(&block)
        }
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn header_timestamp(headers: &HeaderMap) -> Result<DateTime<Utc>, SigV4Error> {
    let single = |name: &str| -> Result<Option<&str>, SigV4Error> {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(malformed(format!("more than one {name} header")));
        }
        first.map(|v| v.to_str().map(str::trim).map_err(|_| malformed(format!("{name} is not ASCII")))).transpose()
    };
    if let Some(value) = single("x-amz-date")? {
        return parse_amz_date(value);
    }
    if let Some(value) = single("date")? {
        return DateTime::parse_from_rfc2822(value)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|_| malformed("the Date header is not an HTTP date"));
    }
    Err(malformed("no X-Amz-Date or Date header"))
}

/// Parses `YYYYMMDDTHHMMSSZ`.
fn parse_amz_date(value: &str) -> Result<DateTime<Utc>, SigV4Error> {
    let bad = || malformed("X-Amz-Date must be YYYYMMDDTHHMMSSZ");
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<u32, SigV4Error> {
        let digits = &b[range];
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        Ok(digits.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0')))
    };
    let year = i32::try_from(num(0..4)?).map_err(|_| bad())?;
    let date = NaiveDate::from_ymd_opt(year, num(4..6)?, num(6..8)?).ok_or_else(bad)?;
    let time = date.and_hms_opt(num(9..11)?, num(11..13)?, num(13..15)?).ok_or_else(bad)?;
    Ok(Utc.from_utc_datetime(&time))
}

fn format_amz_date(t: DateTime<Utc>) -> String {
    format!("{:04}{:02}{:02}T{:02}{:02}{:02}Z", t.year(), t.month(), t.day(), t.hour(), t.minute(), t.second())
}

fn payload_hash(req: &RequestView<'_>) -> Result<String, SigV4Error> {
    let hash = hex::encode(Sha256::digest(req.body));
    for claimed in req.headers.get_all("x-amz-content-sha256") {
        if !claimed.as_bytes().trim_ascii().eq_ignore_ascii_case(hash.as_bytes()) {
            return Err(malformed("x-amz-content-sha256 does not match the body"));
        }
    }
    Ok(hash)
}

/// Appends `value` with leading/trailing whitespace removed and inner runs
/// of whitespace collapsed to one space (botocore's `' '.join(v.split())`).
fn push_trimmed(out: &mut Vec<u8>, value: &[u8]) {
    let mut first = true;
    for word in value.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()) {
        if !first {
            out.push(b' ');
        }
        out.extend_from_slice(word);
        first = false;
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// RFC 3986 encoding: everything but unreserved characters (and `/` when
/// `keep_slash`) becomes `%XX` with upper-case hex.
fn uri_encode(out: &mut String, bytes: &[u8], keep_slash: bool) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Removes `.`/`..` segments and empty segments (RFC 3986 5.2.4 plus AWS's
/// duplicate-slash rule), keeping a trailing slash.
fn normalize_path(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    out.push('/');
    out.push_str(&segments.join("/"));
    let trailing = ["/", "/.", "/.."].iter().any(|s| path.ends_with(s));
    if trailing && !out.ends_with('/') {
        out.push('/');
    }
    out
}

fn canonical_uri(path: &str, normalize: bool) -> String {
    let path = if path.is_empty() {
        "/".to_owned()
    } else if normalize {
        normalize_path(path)
    } else {
        path.to_owned()
    };
    let mut out = String::with_capacity(path.len() + 16);
    uri_encode(&mut out, path.as_bytes(), true);
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one query component: `%XX` sequences and `+` as a space, as the
/// SDKs' form decoding does; a stray `%` stays literal.
fn query_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => match (raw.get(i + 1).copied().and_then(hex_value), raw.get(i + 2).copied().and_then(hex_value)) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    out
}

/// Splits a raw query into decoded (name, value) pairs; empty pieces are
/// skipped, a piece without `=` has an empty value.
fn parse_query(query: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
            (query_decode(name.as_bytes()), query_decode(value.as_bytes()))
        })
        .collect()
}

fn canonical_query(query: &str, exclude: Option<&str>) -> String {
    let mut pairs: Vec<(String, String)> = parse_query(query)
        .into_iter()
        .filter(|(name, _)| exclude.is_none_or(|ex| name.as_slice() != ex.as_bytes()))
        .map(|(name, value)| {
            let (mut n, mut v) = (String::new(), String::new());
            uri_encode(&mut n, &name, false);
            uri_encode(&mut v, &value, false);
            (n, v)
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 16);
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

#[cfg(test)]
#[path = "sigv4_vectors.rs"]
mod vectors;

#[cfg(test)]
#[path = "sigv4_tests.rs"]
mod tests;
