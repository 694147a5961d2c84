//! The axum server: shared state, routes, metrics, graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::HttpConfig;
use super::{api, assets, ipxe};
use crate::events::{BootEvent, EventBus};
use crate::mac::MacAddr;
use crate::policy::{BootTarget, ClientArch, ClientFacts, Policy, ServerAddrs};
use crate::stage::BootStage;

pub use crate::mac::MacLookup;

/// How long open downloads and event streams may take to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Menus nest by chaining back with `profile=`; this bounds the search for a reachable profile
/// (a menu cycle must not loop).
const MAX_MENU_DEPTH: usize = 8;

/// Everything the HTTP side needs. Cheap to clone (shared parts are behind `Arc`).
#[derive(Clone)]
pub struct HttpState {
    /// The boot root; files are served from here and never from outside it.
    pub root: PathBuf,
    /// The boot policy; the lead swaps the value inside on reload.
    pub policy: Arc<RwLock<Policy>>,
    /// Where clients reach pxed: the base of every URL in a script.
    pub server: ServerAddrs,
    /// The event stream.
    pub events: EventBus,
    /// Client IP to MAC, for requests without a `mac` query.
    pub mac_lookup: MacLookup,
    /// `[http]`.
    pub config: HttpConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl HttpState {
    /// State with no IP-to-MAC lookup (see [`HttpState::with_mac_lookup`]).
    pub fn new(
        root: PathBuf,
        policy: Arc<RwLock<Policy>>,
        server: ServerAddrs,
        events: EventBus,
        config: HttpConfig,
    ) -> Self {
        // A sender that is never used: streams only end on shutdown when `serve` replaces it.
        let (_tx, shutdown) = watch::channel(false);
        HttpState {
            root,
            policy,
            server,
            events,
            mac_lookup: Arc::new(|_| None),
            config,
            metrics: Arc::new(Metrics::new()),
            shutdown,
        }
    }

    /// Use `lookup` to find the MAC of clients that do not say it.
    pub fn with_mac_lookup(mut self, lookup: MacLookup) -> Self {
        self.mac_lookup = lookup;
        self
    }

    /// The client's MAC: the `mac` query value when it parses, else the IP lookup.
    pub(crate) fn client_mac(
        &self,
        query_mac: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Option<MacAddr> {
        query_mac
            .and_then(|m| m.parse().ok())
            .or_else(|| peer.and_then(|ip| (self.mac_lookup)(ip)))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StageLabels {
    pub stage: String,
}

/// Prometheus counters, in an explicit registry.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub bytes: Family<RouteLabels, Counter>,
    pub events: Family<StageLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("pxed");
        let requests = Family::<RequestLabels, Counter>::default();
        let bytes = Family::<RouteLabels, Counter>::default();
        let events = Family::<StageLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_sent_bytes",
            "File bytes sent over HTTP by route",
            bytes.clone(),
        );
        registry.register("boot_events", "Boot events by stage", events.clone());
        Metrics {
            registry,
            requests,
            bytes,
            events,
        }
    }
}

/// The peer address axum's connect info recorded, if the router was served with it.
pub(crate) fn peer_ip(req_ext: &axum::http::Extensions) -> Option<IpAddr> {
    req_ext
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip())
}

/// Every route of pxed's HTTP server. Serve it with connect info
/// (`into_make_service_with_connect_info::<SocketAddr>()`, as [`serve`] does) so the client-IP
/// lookup works.
///
/// - `GET /boot.ipxe`: the entry script ([`ipxe::entry_script`]).
/// - `GET /ipxe/script?mac=&uuid=&platform=&buildarch=[&profile=]`: the machine's script.
/// - `GET|POST /api/phone-home`: the booted OS reports a stage.
/// - `GET /api/machines`, `GET /api/machines/{mac}`: timelines as JSON.
/// - `GET /api/events`: Server-Sent Events, one `boot` event per [`crate::events::BootEvent`].
/// - `POST /api/events`: publish an event (needs the bearer token when `api_token` is set).
/// - `GET /metrics`: Prometheus text. `GET /`: the dashboard.
/// - anything else, `GET`/`HEAD`: a file under the boot root ([`assets`]).
pub fn router(state: HttpState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/", get(api::dashboard))
        .route("/boot.ipxe", get(entry))
        .route(ipxe::SCRIPT_PATH, get(script))
        .route(
            "/api/phone-home",
            get(api::phone_home).post(api::phone_home),
        )
        .route("/api/machines", get(api::machines))
        .route("/api/machines/{mac}", get(api::machine))
        .route("/api/events", get(api::events).post(api::post_event))
        .route("/metrics", get(api::metrics))
        .fallback(asset)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Serve [`router`] on `listener` until `shutdown` completes, then let open requests finish for
/// up to [`SHUTDOWN_GRACE`] (event streams end at once). Also counts every boot event on the
/// bus for `/metrics` while it runs.
pub async fn serve(
    listener: tokio::net::TcpListener,
    mut state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (tx, rx) = watch::channel(false);
    state.shutdown = rx.clone();
    // Subscribe before serving, so no event published after `serve` starts goes uncounted.
    let counter = tokio::spawn(count_events(
        state.events.subscribe(),
        state.metrics.clone(),
    ));
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let tx2 = tx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx2.send(true);
    });
    let mut rx2 = rx;
    let grace = async move {
        // Wait for shutdown to start, then give open requests their grace period.
        let _ = rx2.wait_for(|down| *down).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = server => r.map_err(anyhow::Error::from),
        () = grace => {
            tracing::warn!("HTTP requests still open after the shutdown grace period; dropping them");
            Ok(())
        }
    };
    counter.abort();
    drop(tx);
    result
}

async fn count_events(mut rx: tokio::sync::broadcast::Receiver<BootEvent>, metrics: Arc<Metrics>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(ev) => {
                metrics
                    .events
                    .get_or_create(&StageLabels {
                        stage: ev.stage.as_str().to_string(),
                    })
                    .inc();
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "metrics missed boot events");
            }
            Err(RecvError::Closed) => break,
        }
    }
}

async fn count_requests(State(state): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "asset".to_string());
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

fn text_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

async fn entry(State(state): State<Arc<HttpState>>) -> Response {
    text_response(
        StatusCode::OK,
        ipxe::entry_script(&state.server.http_base()),
    )
}

/// Profiles a client may pick from its planned target: the target's menu entries, and theirs,
/// to [`MAX_MENU_DEPTH`]. A client cannot ask for a profile its menu does not offer.
fn reachable(policy: &Policy, target: &BootTarget, want: &str) -> bool {
    let mut frontier: Vec<&BootTarget> = vec![target];
    for _ in 0..MAX_MENU_DEPTH {
        let mut next = Vec::new();
        for t in frontier {
            if let BootTarget::Menu { items, default, .. } = t {
                let names = items
                    .iter()
                    .map(|i| i.profile.as_str())
                    .chain(default.as_deref());
                for name in names {
                    if name == want {
                        return true;
                    }
                    if let Some(sub) = policy.profile(name) {
                        next.push(sub);
                    }
                }
            }
        }
        if next.is_empty() {
            return false;
        }
        frontier = next;
    }
    false
}

/// `uuid` from iPXE: text `8-4-4-4-12`, lower-cased; anything else is dropped.
fn clean_uuid(raw: Option<&String>) -> Option<String> {
    let u = raw?.trim().to_ascii_lowercase();
    let shape_ok = u.len() == 36
        && u.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    shape_ok.then_some(u)
}

async fn script(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let peer = peer_ip(req.extensions());
    let Some(mac) = state.client_mac(q.get("mac").map(String::as_str), peer) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            ipxe::error_script("no MAC in the request (`mac=` query) and the client IP is unknown"),
        );
    };
    let arch = ClientArch::from_ipxe(
        q.get("platform").map_or("", String::as_str),
        q.get("buildarch").map_or("", String::as_str),
    );
    let facts = ClientFacts {
        mac,
        arch_code: arch.map(|a| a.code),
        vendor_class: None,
        user_class: vec!["iPXE".into()],
        is_ipxe: true,
        uuid: clean_uuid(q.get("uuid")),
        relay: None,
    };
    let base = state.server.http_base();
    let rendered = {
        let policy = match state.policy.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut plan = crate::policy::plan(&policy, &facts, &state.server);
        if let Some(want) = q.get("profile") {
            match policy.profile(want) {
                Some(t) if reachable(&policy, &plan.target, want) => {
                    plan.reason = format!("chosen from the menu of profile `{}`", plan.profile);
                    plan.profile = want.clone();
                    plan.target = t.clone();
                }
                _ => {
                    let msg = format!("profile `{want}` is not offered to this machine");
                    state
                        .events
                        .emit(mac, BootStage::HttpError, format!("script: {msg}"));
                    return text_response(StatusCode::FORBIDDEN, ipxe::error_script(&msg));
                }
            }
        }
        ipxe::try_render_script(&plan, &facts, &base).map(|s| (s, plan))
    };
    match rendered {
        Ok((body, plan)) => {
            let arch_txt = arch.map_or_else(|| "unknown arch".to_string(), |a| a.to_string());
            state.events.emit(
                mac,
                BootStage::HttpScript,
                format!("profile {} ({}; {arch_txt})", plan.profile, plan.reason),
            );
            text_response(StatusCode::OK, body)
        }
        Err(e) => {
            state
                .events
                .emit(mac, BootStage::HttpError, format!("script: {e}"));
            text_response(StatusCode::OK, ipxe::error_script(&e.to_string()))
        }
    }
}

async fn asset(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, HeaderValue::from_static("GET, HEAD"))],
        )
            .into_response();
    }
    let peer = peer_ip(req.extensions());
    let raw_path = req.uri().path().to_string();
    let mac = state.client_mac(q.get("mac").map(String::as_str), peer);
    let stage = match q.get("kind").map(String::as_str) {
        Some(ipxe::KIND_KERNEL) => BootStage::HttpKernel,
        Some(ipxe::KIND_INITRD) => BootStage::HttpInitrd,
        _ => BootStage::HttpAsset,
    };
    let opened = match assets::decode_path(&raw_path) {
        Ok(rel) => assets::open_in_root(&state.root, &rel)
            .await
            .map(|o| (o, rel)),
        Err(e) => Err(e),
    };
    let ((file, meta, full), rel) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(path = %raw_path, ?peer, "asset: {e}");
            if let Some(mac) = mac
                && method == Method::GET
            {
                state
                    .events
                    .emit(mac, BootStage::HttpError, format!("{raw_path}: {e}"));
            }
            return text_response(e.status(), format!("{e}\n"));
        }
    };
    let shown = format!("/{}", rel.display());
    let metrics = state.metrics.clone();
    let bytes_counter = metrics
        .bytes
        .get_or_create(&RouteLabels {
            route: "asset".into(),
        })
        .clone();
    let (resp, served) = assets::file_response(
        &method,
        req.headers(),
        file,
        &meta,
        &full,
        &shown,
        move |n| {
            bytes_counter.inc_by(n as u64);
        },
    )
    .await;
    let serving = served.status == StatusCode::OK || served.status == StatusCode::PARTIAL_CONTENT;
    match mac {
        Some(mac) if method == Method::GET && serving => {
            state.events.emit(mac, stage, served.detail)
        }
        Some(mac) if served.status.is_server_error() => {
            state.events.emit(mac, BootStage::HttpError, served.detail)
        }
        _ => tracing::debug!(path = %shown, status = %served.status, "asset"),
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_shape() {
        let ok = "8A3B1C2D-0000-4000-8000-0123456789AB".to_string();
        assert_eq!(
            clean_uuid(Some(&ok)).as_deref(),
            Some("8a3b1c2d-0000-4000-8000-0123456789ab")
        );
        assert_eq!(clean_uuid(Some(&String::new())), None);
        assert_eq!(clean_uuid(Some(&"x".repeat(36))), None);
        assert_eq!(clean_uuid(None), None);
    }

    #[test]
    fn menu_reachability() {
        let cfg: crate::policy::PolicyConfig = toml::from_str(
            r#"
[[profile]]
name = "top"
menu = [{ label = "sub", profile = "sub" }]
[[profile]]
name = "sub"
menu = [{ label = "leaf", profile = "leaf" }, { label = "top", profile = "top" }]
[[profile]]
name = "leaf"
local = true
[[profile]]
name = "secret"
local = true
"#,
        )
        .unwrap();
        let policy = cfg.validate().unwrap();
        let top = policy.profile("top").unwrap().clone();
        assert!(reachable(&policy, &top, "sub"));
        assert!(reachable(&policy, &top, "leaf"));
        assert!(!reachable(&policy, &top, "secret"));
        assert!(!reachable(&policy, &BootTarget::Local, "leaf"));
    }
}
