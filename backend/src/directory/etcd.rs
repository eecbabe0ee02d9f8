//! A small synchronous client of etcd's v3 API through its JSON gateway (`/v3/...` over
//! HTTP): what a server of the cluster directory needs and nothing more. Leases (grant, keep
//! alive, revoke), puts under a lease, put-if-absent (a transaction on the key's creation
//! revision, so two servers cannot both register one GID), prefix listing with the revision
//! it was read at, deletes, and a watch from a revision.
//!
//! Why the gateway and not gRPC: the server has no async runtime, and etcd's gateway speaks
//! the same API as plain JSON over HTTP/1.1 with a blocking client. Keys and values are
//! base64 on the wire, as the gateway wants; the client takes and returns bytes. Answers are
//! read with bounded sizes: an etcd is trusted to be etcd, but a wrong address must not make
//! the server buffer without limit.
//!
//! What etcd's own clients offer to reach a secured cluster, as etcdctl's `--cacert`,
//! `--cert`, `--key`, `--user` and `--password`: https endpoints ([`EtcdTls`]), and a user
//! ([`EtcdUser`]) whose token (`/v3/auth/authenticate`) goes in the `Authorization` header of
//! every request. etcd's simple tokens expire after a while unused (5 minutes by default),
//! so a request refused for its token authenticates again and is retried, once.

mod tls;

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Value, json};
use thiserror::Error;

pub use tls::{EtcdTls, TlsError};

/// Longest answer read for one request (a listing of a large prefix included).
const MAX_ANSWER: u64 = 64 << 20;

/// Longest line of a watch stream (one batch of events).
const MAX_WATCH_LINE: u64 = 16 << 20;

/// Longest auth token taken from etcd (a simple token is some twenty characters, a JWT a
/// few hundred): it is sent back in a header of every request.
const MAX_TOKEN: usize = 8 << 10;

/// Why an etcd request failed.
#[derive(Debug, Error)]
pub enum EtcdError {
    #[error("cannot reach etcd at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("etcd at {endpoint} answered {status}: {body}")]
    Status {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("etcd's answer is not what the v3 API returns: {0}")]
    Malformed(String),
    #[error("the lease {0:#x} has expired or was revoked")]
    LeaseGone(i64),
    #[error("the watch was cancelled by etcd: {0}")]
    WatchCancelled(String),
    #[error("the watch's start revision was compacted (etcd keeps from {compact_revision})")]
    Compacted { compact_revision: i64 },
    #[error("etcd at {endpoint} refused to authenticate the user {user:?}: {reason}")]
    AuthFailed {
        endpoint: String,
        user: String,
        reason: String,
    },
    #[error("etcd at {endpoint} has authentication enabled and no user was given ({reason})")]
    AuthRequired { endpoint: String, reason: String },
    #[error("TLS with etcd at {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("{endpoint} is https and the client has no TLS settings")]
    NoTls { endpoint: String },
}

impl EtcdError {
    /// Whether etcd refused the request's token as one it no longer knows (expired, or
    /// issued before etcd's auth store changed): a new token may well be accepted.
    fn stale_token(&self) -> bool {
        let said = |text: &str| {
            text.contains("invalid auth token") || text.contains("revision of auth store is old")
        };
        match self {
            EtcdError::Status { status, body, .. } => *status == 401 || said(body),
            EtcdError::WatchCancelled(reason) => said(reason),
            _ => false,
        }
    }

    /// etcd's answer to a client without a user when authentication is on.
    fn needs_user(&self) -> Option<(String, String)> {
        const EMPTY: &str = "user name is empty";
        match self {
            EtcdError::Status { endpoint, body, .. } if body.contains(EMPTY) => {
                Some((endpoint.clone(), etcd_message(body)))
            }
            EtcdError::WatchCancelled(reason) if reason.contains(EMPTY) => {
                Some(("(watch)".into(), reason.trim_matches('"').to_string()))
            }
            _ => None,
        }
    }
}

/// The message of a JSON error answer of the gateway (`{"error": ..., "code": ...}`), or
/// the answer itself when it is not one.
fn etcd_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|answer| answer.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().to_string())
}

/// One key and its value, with the revision that last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A listing and the store's revision when it was read (watch from `revision + 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub revision: i64,
    pub kvs: Vec<KeyValue>,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: Vec<u8>, mod_revision: i64 },
}

/// A user of etcd's authentication and its password.
#[derive(Clone)]
pub struct EtcdUser {
    name: String,
    password: String,
}

impl EtcdUser {
    pub fn new(name: impl Into<String>, password: impl Into<String>) -> EtcdUser {
        EtcdUser {
            name: name.into(),
            password: password.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How a client reaches etcd: [`Etcd::new`] is this with neither TLS nor a user.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://HOST:PORT`, `https://HOST:PORT`, or `HOST:PORT` (https with `tls`, http
    /// without), tried in order.
    pub endpoints: Vec<String>,
    /// The longest one request may take (a watch runs for as long as it is read).
    pub timeout: Duration,
    /// What https endpoints are trusted by, and the certificate shown to them.
    pub tls: Option<EtcdTls>,
    /// Who the client authenticates as, for an etcd with authentication enabled.
    pub user: Option<EtcdUser>,
}

impl EtcdConfig {
    /// Plain http (or `https://` endpoints, which then fail for want of TLS settings), no user.
    pub fn new(endpoints: &[String], timeout: Duration) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.to_vec(),
            timeout,
            tls: None,
            user: None,
        }
    }
}

/// The user and its current token, shared by the clones of a client (the membership's
/// threads), so that one expiry costs one new authentication.
struct Auth {
    user: EtcdUser,
    token: Mutex<Option<String>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the password nor the token.
        f.debug_struct("Auth")
            .field("user", &self.user.name)
            .finish_non_exhaustive()
    }
}

/// A client of one etcd cluster, trying its endpoints in order.
#[derive(Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    /// For requests: each bounded by the configured timeout.
    agent: ureq::Agent,
    /// For watches: no overall timeout, as a watch lasts as long as the server runs.
    watch_agent: ureq::Agent,
    /// Whether https endpoints can be reached (TLS settings were given).
    tls: bool,
    /// Whether the client shows etcd a certificate.
    client_cert: bool,
    auth: Option<Arc<Auth>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the agents: their TLS settings would list every trusted certificate.
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("client_cert", &self.client_cert)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): the range runs to the end of the key space.
    vec![0]
}

fn number(value: &Value, field: &str) -> i64 {
    // The gateway writes 64-bit integers as strings; absent means 0 (proto3 defaults).
    match value.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn bytes(value: &Value, field: &str) -> Result<Vec<u8>, EtcdError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => BASE64
            .decode(s)
            .map_err(|e| EtcdError::Malformed(format!("{field} is not base64: {e}"))),
        Some(other) => Err(EtcdError::Malformed(format!("{field} is {other}"))),
    }
}

fn key_value(kv: &Value) -> Result<KeyValue, EtcdError> {
    Ok(KeyValue {
        key: bytes(kv, "key")?,
        value: bytes(kv, "value")?,
        mod_revision: number(kv, "mod_revision"),
        lease: number(kv, "lease"),
    })
}

/// The endpoint did not answer (or there was none to ask).
fn unreachable(endpoint: &str, reason: impl ToString) -> EtcdError {
    EtcdError::Unreachable {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    }
}

/// A failure to talk to `endpoint`, TLS ones (certificates, the handshake) named as such.
/// `certless`: the client reached an https endpoint without a client certificate.
fn failed(endpoint: &str, error: ureq::Error, certless: bool) -> EtcdError {
    // What a client without a certificate may hear from etcd refusing it.
    let refused = |e: &rustls::Error| {
        use rustls::AlertDescription::{BadCertificate, CertificateRequired};
        certless
            && matches!(
                e,
                rustls::Error::AlertReceived(BadCertificate | CertificateRequired)
            )
    };
    let hint = "; etcd may require a client certificate";
    let rustls_error = match &error {
        ureq::Error::Rustls(e) => Some(e),
        // rustls' errors met while reading or writing (an alert etcd sends once the
        // handshake is over, as TLS 1.3 refuses a missing client certificate).
        ureq::Error::Io(io) => io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    let tls = match (rustls_error, &error) {
        (Some(e), _) if refused(e) => Some(format!("{e}{hint}")),
        (Some(e), _) => Some(e.to_string()),
        // etcd sends that alert and closes the connection: the client, writing its request
        // by then, mostly finds the connection gone before it reads the alert.
        (None, ureq::Error::Io(io))
            if certless
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
        {
            Some(format!("etcd closed the connection ({io}){hint}"))
        }
        _ => None,
    };
    match tls {
        Some(reason) => EtcdError::Tls {
            endpoint: endpoint.to_string(),
            reason,
        },
        None => unreachable(endpoint, error),
    }
}

fn revision(answer: &Value) -> i64 {
    answer.get("header").map_or(0, |h| number(h, "revision"))
}

/// An agent of the client: etcd's errors are answers to read, not ureq errors; and no idle
/// connection is kept, so each request has a connection of its own, as it had when the
/// client built an agent per request.
fn agent(timeout: Option<Duration>, tls: ureq::tls::TlsConfig) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(timeout)
        .http_status_as_error(false)
        .tls_config(tls)
        .max_idle_connections(0)
        .build()
        .into()
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`http://HOST:PORT`, or `HOST:PORT`).
    pub fn new(endpoints: &[String], timeout: Duration) -> Etcd {
        Etcd::with_config(EtcdConfig::new(endpoints, timeout))
    }

    /// A client as `config` says (TLS, a user).
    pub fn with_config(config: EtcdConfig) -> Etcd {
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let e = e.trim_end_matches('/');
                if e.contains("://") {
                    e.to_string()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect();
        let tls = config
            .tls
            .as_ref()
            .map_or_else(tls::no_tls, EtcdTls::ureq_config);
        Etcd {
            endpoints,
            agent: agent(Some(config.timeout), tls.clone()),
            watch_agent: agent(None, tls),
            tls: config.tls.is_some(),
            client_cert: config.tls.as_ref().is_some_and(EtcdTls::has_client_cert),
            auth: config.user.map(|user| {
                Arc::new(Auth {
                    user,
                    token: Mutex::new(None),
                })
            }),
        }
    }

    /// Whether `endpoint` is reached over TLS without a client certificate.
    fn certless(&self, endpoint: &str) -> bool {
        endpoint.starts_with("https://") && !self.client_cert
    }

    /// POSTs `body` to `path` at `endpoint`, with `token` if any.
    fn post(
        &self,
        agent: &ureq::Agent,
        endpoint: &str,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<ureq::http::Response<ureq::Body>, EtcdError> {
        if endpoint.starts_with("https://") && !self.tls {
            return Err(EtcdError::NoTls {
                endpoint: endpoint.to_string(),
            });
        }
        let mut request = agent.post(format!("{endpoint}{path}"));
        if let Some(token) = token {
            request = request.header("Authorization", token);
        }
        request
            .send_json(body)
            .map_err(|e| failed(endpoint, e, self.certless(endpoint)))
    }

    /// The token to send (none without a user): the current one, or a new one when there
    /// is none yet or the current one is `refused`. The lock is held while authenticating,
    /// so that threads finding one token refused authenticate once between them.
    fn token(&self, refused: Option<&str>) -> Result<Option<String>, EtcdError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let mut token = auth.token.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = token.as_deref()
            && Some(current) != refused
        {
            return Ok(Some(current.to_string()));
        }
        *token = None;
        let fresh = self.authenticate(&auth.user)?;
        *token = Some(fresh.clone());
        Ok(Some(fresh))
    }

    /// A new token for `user`.
    fn authenticate(&self, user: &EtcdUser) -> Result<String, EtcdError> {
        let body = json!({ "name": user.name, "password": user.password });
        let answer = self
            .call_with("/v3/auth/authenticate", &body, None)
            .map_err(|e| match e {
                EtcdError::Status { endpoint, body, .. } => EtcdError::AuthFailed {
                    endpoint,
                    user: user.name.clone(),
                    reason: etcd_message(&body),
                },
                other => other,
            })?;
        match answer.get("token").and_then(Value::as_str) {
            // Sent back as a header value: visible ASCII only.
            Some(token)
                if !token.is_empty()
                    && token.len() <= MAX_TOKEN
                    && token.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Ok(token.to_string())
            }
            _ => Err(EtcdError::Malformed(
                "/v3/auth/authenticate gave no usable token".into(),
            )),
        }
    }

    /// `attempt` with the current token; with a new one, once, if etcd refused it as stale.
    /// Without a user, an etcd that wants one is named as such.
    fn authorized<T>(
        &self,
        mut attempt: impl FnMut(Option<&str>) -> Result<T, EtcdError>,
    ) -> Result<T, EtcdError> {
        let token = self.token(None)?;
        let result = match attempt(token.as_deref()) {
            Err(e) if token.is_some() && e.stale_token() => {
                log::info!("etcd refused the auth token ({e}); authenticating again");
                let token = self.token(token.as_deref())?;
                attempt(token.as_deref())
            }
            other => other,
        };
        result.map_err(|e| match (&self.auth, e.needs_user()) {
            (None, Some((endpoint, reason))) => EtcdError::AuthRequired { endpoint, reason },
            _ => e,
        })
    }

    /// POSTs `body` to `path` on the first endpoint that answers (authenticated when the
    /// client has a user); the answer as JSON.
    fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        self.authorized(|token| self.call_with(path, body, token))
    }

    /// [`Etcd::call`] with `token`, once.
    fn call_with(&self, path: &str, body: &Value, token: Option<&str>) -> Result<Value, EtcdError> {
        let mut last = None;
        for endpoint in &self.endpoints {
            match self.post(&self.agent, endpoint, path, body, token) {
                Ok(mut response) => {
                    let status = response.status().as_u16();
                    let mut text = String::new();
                    response
                        .body_mut()
                        .as_reader()
                        .take(MAX_ANSWER)
                        .read_to_string(&mut text)
                        .map_err(|e| failed(endpoint, e.into(), self.certless(endpoint)))?;
                    if status != 200 {
                        return Err(EtcdError::Status {
                            endpoint: endpoint.clone(),
                            status,
                            body: text.chars().take(300).collect(),
                        });
                    }
                    return serde_json::from_str(&text)
                        .map_err(|e| EtcdError::Malformed(format!("{path}: {e}")));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| unreachable("(none)", "no endpoint given")))
    }

    /// A lease of `ttl` seconds; returns its id.
    pub fn grant(&self, ttl: i64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))?;
        match number(&answer, "ID") {
            0 => Err(EtcdError::Malformed(format!("no lease id in {answer}"))),
            id => Ok(id),
        }
    }

    /// Renews lease `id`; returns the TTL it has again.
    pub fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let answer = self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        let result = answer.get("result").unwrap_or(&answer);
        match number(result, "TTL") {
            ttl if ttl > 0 => Ok(ttl),
            _ => Err(EtcdError::LeaseGone(id)),
        }
    }

    /// Ends lease `id` now: every key under it is deleted.
    pub fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .map(drop)
    }

    /// Sets `key` to `value`, under lease `lease` (0: none); returns the new revision.
    pub fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let answer = self.call(
            "/v3/kv/put",
            &json!({
                "key": BASE64.encode(key),
                "value": BASE64.encode(value),
                "lease": lease.to_string(),
            }),
        )?;
        Ok(revision(&answer))
    }

    /// Creates every key of `entries` under `lease` if none of them exists, in one
    /// transaction (one proposal of etcd's log, one revision for its watchers); whether it
    /// did. Nothing is written if any key exists: the caller then claims them one by one.
    pub fn put_all_if_absent(
        &self,
        entries: &[(Vec<u8>, Vec<u8>)],
        lease: i64,
    ) -> Result<bool, EtcdError> {
        let keys: Vec<String> = entries.iter().map(|(k, _)| BASE64.encode(k)).collect();
        let compare: Vec<Value> = keys
            .iter()
            .map(|key| json!({ "key": key, "target": "CREATE", "create_revision": "0" }))
            .collect();
        let success: Vec<Value> = keys
            .iter()
            .zip(entries)
            .map(|(key, (_, value))| {
                json!({ "request_put": {
                    "key": key, "value": BASE64.encode(value), "lease": lease.to_string(),
                } })
            })
            .collect();
        let answer = self.call(
            "/v3/kv/txn",
            &json!({ "compare": compare, "success": success }),
        )?;
        Ok(answer.get("succeeded").and_then(Value::as_bool) == Some(true))
    }

    /// Creates `key` only if it does not exist; `Ok(true)` if this call created it,
    /// `Ok(false)` if someone holds it (whose value is `owner`).
    pub fn put_if_absent(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<(bool, Option<Vec<u8>>), EtcdError> {
        let key = BASE64.encode(key);
        let answer = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [{ "key": key, "target": "CREATE", "create_revision": "0" }],
                "success": [{ "request_put": {
                    "key": key, "value": BASE64.encode(value), "lease": lease.to_string(),
                } }],
                "failure": [{ "request_range": { "key": key } }],
            }),
        )?;
        if answer.get("succeeded").and_then(Value::as_bool) == Some(true) {
            return Ok((true, None));
        }
        let owner = answer
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .and_then(|r| r.get("kvs"))
            .and_then(|kvs| kvs.get(0))
            .map(|kv| bytes(kv, "value"))
            .transpose()?;
        Ok((false, owner))
    }

    /// Sets `key` to `value` under `lease` only if it still holds `expected`; whether it
    /// did (so a record is taken over from its earlier writer, and from nobody else).
    pub fn put_if_value(
        &self,
        key: &[u8],
        expected: &[u8],
        value: &[u8],
        lease: i64,
    ) -> Result<bool, EtcdError> {
        let key = BASE64.encode(key);
        let answer = self.call(
            "/v3/kv/txn",
            &json!({
                "compare": [{
                    "key": key, "target": "VALUE", "result": "EQUAL",
                    "value": BASE64.encode(expected),
                }],
                "success": [{ "request_put": {
                    "key": key, "value": BASE64.encode(value), "lease": lease.to_string(),
                } }],
            }),
        )?;
        Ok(answer.get("succeeded").and_then(Value::as_bool) == Some(true))
    }

    /// Deletes `key`; whether it existed.
    pub fn delete(&self, key: &[u8]) -> Result<bool, EtcdError> {
        let answer = self.call("/v3/kv/deleterange", &json!({ "key": BASE64.encode(key) }))?;
        Ok(number(&answer, "deleted") > 0)
    }

    /// Every key that starts with `prefix`, and the revision of the listing.
    pub fn list(&self, prefix: &[u8]) -> Result<Listing, EtcdError> {
        let answer = self.call(
            "/v3/kv/range",
            &json!({
                "key": BASE64.encode(prefix),
                "range_end": BASE64.encode(prefix_end(prefix)),
            }),
        )?;
        let kvs = match answer.get("kvs") {
            None => Vec::new(),
            Some(Value::Array(kvs)) => kvs.iter().map(key_value).collect::<Result<_, _>>()?,
            Some(other) => return Err(EtcdError::Malformed(format!("kvs is {other}"))),
        };
        Ok(Listing {
            revision: revision(&answer),
            kvs,
        })
    }

    /// Watches every key under `prefix` from `start_revision` on (0: from now). The watch
    /// blocks in [`Watch::changes`]; drop it to stop. A start revision etcd has compacted away
    /// is refused by the first [`Watch::changes`] with [`EtcdError::Compacted`]: list again.
    pub fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, EtcdError> {
        let body = json!({ "create_request": {
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        } });
        // etcd checks the token when the watch is created (a refused one cancels it in the
        // first message); a running watch outlives its token.
        self.authorized(|token| self.watch_with(&body, token))
    }

    /// [`Etcd::watch`] with `token`, once.
    fn watch_with(&self, body: &Value, token: Option<&str>) -> Result<Watch, EtcdError> {
        let mut last = None;
        for endpoint in &self.endpoints {
            match self.post(&self.watch_agent, endpoint, "/v3/watch", body, token) {
                Ok(response) if response.status().as_u16() == 200 => {
                    let reader = BufReader::new(response.into_body().into_reader());
                    let mut watch = Watch { reader };
                    // The first message confirms the watch (or says why not).
                    watch.batch()?;
                    return Ok(watch);
                }
                Ok(response) => {
                    last = Some(EtcdError::Status {
                        endpoint: endpoint.clone(),
                        status: response.status().as_u16(),
                        body: String::new(),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| unreachable("(none)", "no endpoint given")))
    }
}

/// A running watch.
pub struct Watch {
    reader: BufReader<ureq::BodyReader<'static>>,
}

impl Watch {
    /// One message of the stream: its events (none for a progress or created message).
    fn batch(&mut self) -> Result<Vec<Event>, EtcdError> {
        let mut line = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_WATCH_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| EtcdError::Unreachable {
                endpoint: "(watch)".into(),
                reason: e.to_string(),
            })?;
        if read == 0 {
            return Err(EtcdError::WatchCancelled("the stream ended".into()));
        }
        let message: Value = serde_json::from_slice(&line)
            .map_err(|e| EtcdError::Malformed(format!("a watch message: {e}")))?;
        if let Some(error) = message.get("error") {
            return Err(EtcdError::WatchCancelled(error.to_string()));
        }
        let result = message.get("result").ok_or_else(|| {
            EtcdError::Malformed(format!("a watch message without result: {message}"))
        })?;
        let compact = number(result, "compact_revision");
        if compact > 0 {
            return Err(EtcdError::Compacted {
                compact_revision: compact,
            });
        }
        if result.get("canceled").and_then(Value::as_bool) == Some(true) {
            let reason = result
                .get("cancel_reason")
                .map_or_else(String::new, Value::to_string);
            return Err(EtcdError::WatchCancelled(reason));
        }
        let Some(Value::Array(events)) = result.get("events") else {
            return Ok(Vec::new());
        };
        events
            .iter()
            .map(|event| {
                let kv = event
                    .get("kv")
                    .ok_or_else(|| EtcdError::Malformed(format!("an event without kv: {event}")))?;
                // proto3 leaves the default (PUT) out.
                Ok(match event.get("type").and_then(Value::as_str) {
                    Some("DELETE") => Event::Delete {
                        key: bytes(kv, "key")?,
                        mod_revision: number(kv, "mod_revision"),
                    },
                    _ => Event::Put(key_value(kv)?),
                })
            })
            .collect()
    }

    /// The next changes (blocks until there are some).
    pub fn changes(&mut self) -> Result<Vec<Event>, EtcdError> {
        loop {
            let events = self.batch()?;
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_keys_end() {
        assert_eq!(prefix_end(b"pvrdma/"), b"pvrdma0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn gateway_numbers_and_bytes_are_read_as_etcd_writes_them() {
        let kv = json!({"key": BASE64.encode("k"), "value": BASE64.encode("v"),
                        "mod_revision": "12", "lease": "7"});
        assert_eq!(
            key_value(&kv).unwrap(),
            KeyValue {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                mod_revision: 12,
                lease: 7
            }
        );
        // proto3 leaves defaults out: no value is an empty one.
        assert_eq!(
            key_value(&json!({"key": BASE64.encode("k")}))
                .unwrap()
                .value,
            b""
        );
        assert!(key_value(&json!({"key": "not base64!"})).is_err());
    }
}
