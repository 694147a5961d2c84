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
use super::boot_state::{BootStateStore, MemoryBootStates};
use super::limits::{ClientAddr, ConnLimits, LimitedListener};
use super::sendfile::AssetListener;
use super::templates::{self, TemplateFacts};
use super::token::Secret;
use super::{api, assets, ipxe};
use crate::events::{BootEvent, EventBus};
use crate::mac::{MacAddr, UuidMemory};
use crate::policy::{BootPlan, BootTarget, ClientArch, ClientFacts, Policy, ServerAddrs};
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
    /// Key of the per-boot tokens.
    pub secret: Arc<Secret>,
    /// One-shot boot state.
    pub boot_states: Arc<dyn BootStateStore>,
    /// The UUID each machine last announced (iPXE `${uuid}` here, DHCP option 97 in the DHCP
    /// engine), for the `uuid` fact of templates, whose requests carry none.
    pub uuids: Arc<UuidMemory>,
    /// Connection caps, shared by the HTTP and HTTPS listeners.
    pub limits: ConnLimits,
    /// pxed's TFTP server serves the boot root, so scripts for [`ipxe::LOCKSTEP_NICS`] fetch
    /// the kernel by TFTP (off: they fetch it by HTTP like everyone else).
    pub tftp_serves_root: bool,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl HttpState {
    /// State with no IP-to-MAC lookup (see [`HttpState::with_mac_lookup`]), a random token
    /// secret ([`HttpState::with_secret`]) and boot state kept in memory
    /// ([`HttpState::with_boot_states`]).
    pub fn new(
        root: PathBuf,
        policy: Arc<RwLock<Policy>>,
        server: ServerAddrs,
        events: EventBus,
        config: HttpConfig,
    ) -> Self {
        // A sender that is never used: streams only end on shutdown when `serve` replaces it.
        let (_tx, shutdown) = watch::channel(false);
        let secret = Secret::random().unwrap_or_else(|e| {
            // The OS random source failing is fatal elsewhere too; tokens then only keep
            // honest clients apart, which the log says.
            tracing::error!("no random token secret ({e}); tokens are guessable");
            Secret::from_bytes([0; super::token::SECRET_LEN])
        });
        let limits = ConnLimits::new(
            config.max_connections,
            config.max_connections_per_ip,
            config.send_timeout(),
        );
        HttpState {
            root,
            policy,
            server,
            events,
            mac_lookup: Arc::new(|_| None),
            config,
            secret: Arc::new(secret),
            boot_states: Arc::new(MemoryBootStates::default()),
            uuids: Arc::new(UuidMemory::default()),
            limits,
            tftp_serves_root: false,
            metrics: Arc::new(Metrics::new()),
            shutdown,
        }
    }

    /// Use `lookup` to find the MAC of clients that do not say it.
    pub fn with_mac_lookup(mut self, lookup: MacLookup) -> Self {
        self.mac_lookup = lookup;
        self
    }

    /// Use `secret` for tokens (e.g. one kept in the state directory, so tokens survive a
    /// restart).
    pub fn with_secret(mut self, secret: Secret) -> Self {
        self.secret = Arc::new(secret);
        self
    }

    /// Expose the DHCP driver's counters (rate limits, foreign servers) on `/metrics`. Call
    /// before the state is shared (it registers into the not yet shared registry).
    pub fn with_dhcp_counters(mut self, counters: &crate::dhcp::limits::DhcpCounters) -> Self {
        match Arc::get_mut(&mut self.metrics) {
            Some(m) => counters.register(&mut m.registry),
            None => tracing::warn!("DHCP counters registered too late; not in /metrics"),
        }
        self
    }

    /// Say whether pxed's TFTP server serves the same boot root (see
    /// [`HttpState::tftp_serves_root`]).
    pub fn with_tftp(mut self, serves_root: bool) -> Self {
        self.tftp_serves_root = serves_root;
        self
    }

    /// Keep one-shot boot state in `store`.
    pub fn with_boot_states(mut self, store: Arc<dyn BootStateStore>) -> Self {
        self.boot_states = store;
        self
    }

    /// Share `uuids` with the DHCP engine, so that templates also know the UUID of machines
    /// whose script request did not carry one.
    pub fn with_uuid_memory(mut self, uuids: Arc<UuidMemory>) -> Self {
        self.uuids = uuids;
        self
    }

    /// The MAC of a client on a connection from `client`: the `mac` query value when it
    /// parses, else the IP lookup, done once per connection.
    pub(crate) fn client_mac_at(
        &self,
        query_mac: Option<&str>,
        client: &ClientAddr,
    ) -> Option<MacAddr> {
        if let Some(mac) = query_mac.and_then(|m| m.parse().ok()) {
            return Some(mac);
        }
        let ClientAddr(addr, memo) = client;
        memo.get_or_lookup(|| (self.mac_lookup)(addr.ip()))
    }

    /// The client's MAC: the `mac` query value when it parses, else the IP lookup (done once
    /// per connection when the connection carries a [`ClientAddr`]).
    pub(crate) fn client_mac(
        &self,
        query_mac: Option<&str>,
        req_ext: &axum::http::Extensions,
    ) -> Option<MacAddr> {
        match req_ext.get::<ConnectInfo<ClientAddr>>() {
            Some(ConnectInfo(client)) => self.client_mac_at(query_mac, client),
            None => query_mac
                .and_then(|m| m.parse().ok())
                .or_else(|| peer_ip(req_ext).and_then(|ip| (self.mac_lookup)(ip))),
        }
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
    pub events: Family<StageLabels, Counter>,
    /// `bytes{route="asset"}`, looked up once: every asset chunk adds to it.
    pub asset_bytes: Counter,
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
        let asset_bytes = bytes
            .get_or_create(&RouteLabels {
                route: "asset".into(),
            })
            .clone();
        Metrics {
            registry,
            requests,
            events,
            asset_bytes,
        }
    }
}

/// The peer address axum's connect info recorded, if the router was served with it.
pub(crate) fn peer_ip(req_ext: &axum::http::Extensions) -> Option<IpAddr> {
    req_ext
        .get::<ConnectInfo<ClientAddr>>()
        .map(|ConnectInfo(ClientAddr(a, _))| a.ip())
        .or_else(|| {
            req_ext
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(a)| a.ip())
        })
}

/// Every route of pxed's HTTP server. Serve it with connect info (`SocketAddr`, or
/// [`ClientAddr`] as [`serve`] does) so the client-IP lookup works.
///
/// - `GET /boot.ipxe`: the entry script ([`ipxe::entry_script`]).
/// - `GET /ipxe/script?mac=&uuid=&platform=&buildarch=[&profile=]`: the machine's script.
/// - `GET|POST /api/phone-home`: the booted OS reports a stage.
/// - `GET /api/machines`, `GET /api/machines/{mac}`: timelines as JSON.
/// - `GET /api/events`: Server-Sent Events, one `boot` event per [`crate::events::BootEvent`].
/// - `POST /api/events`: publish an event (needs the admin bearer token).
/// - `GET /api/machines/{mac}/state`, `DELETE` (bearer token): one-shot boot state.
/// - `GET /m/{mac}/{profile}/{token}/{*name}`: template `name` rendered for that machine.
/// - `GET /metrics`: Prometheus text. `GET /`: the dashboard.
/// - anything else, `GET`/`HEAD`: a file under the boot root ([`assets`]).
pub fn router(state: HttpState) -> Router {
    let state = Arc::new(state);
    api_routes()
        .route("/boot.ipxe", get(entry))
        .route(ipxe::SCRIPT_PATH, get(script))
        .route(TEMPLATE_ROUTE, get(template))
        .fallback(asset)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Paths that [`router`] may route to something other than the asset fallback (the API, the
/// dashboard, scripts, metrics, rendered templates), and that the sendfile path therefore hands
/// to hyper. It may say yes to more than that (hyper serves the asset fallback too), never less.
pub(crate) fn routed_elsewhere(path: &str) -> bool {
    matches!(path, "/" | "/boot.ipxe" | "/metrics" | ipxe::SCRIPT_PATH)
        || path.starts_with("/api/")
        || path.starts_with("/m/")
}

/// The routes also served over HTTPS: dashboard, API, events, metrics. No boot assets.
fn api_routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/", get(api::dashboard))
        .route(
            "/api/phone-home",
            get(api::phone_home).post(api::phone_home),
        )
        .route("/api/machines", get(api::machines))
        .route("/api/machines/{mac}", get(api::machine))
        .route(
            "/api/machines/{mac}/state",
            get(api::boot_state).delete(api::clear_boot_state),
        )
        .route("/api/events", get(api::events).post(api::post_event))
        .route("/metrics", get(api::metrics))
}

/// [`api_routes`] with state and metrics, for the HTTPS listener.
pub fn api_router(state: HttpState) -> Router {
    let state = Arc::new(state);
    api_routes()
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
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = LimitedListener::new(listener, state.limits.clone());
    serve_on(
        |state| Ok(AssetListener::new(listener, Arc::new(state.clone()))?),
        state,
        true,
        shutdown,
    )
    .await
}

/// Serve [`api_router`] over HTTPS (see [`super::tls`]) on `listener` until `shutdown`, like
/// [`serve`]. Boot events are counted by [`serve`], not here.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: HttpState,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = super::tls::TlsListener::new(listener, tls, state.limits.clone())?;
    serve_on(|_| Ok(listener), state, false, shutdown).await
}

/// Serve on the listener `make` builds from the final state (the one whose shutdown signal
/// [`serve_on`] drives).
async fn serve_on<L>(
    make: impl FnOnce(&HttpState) -> anyhow::Result<L>,
    mut state: HttpState,
    full: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    ClientAddr: for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let (tx, rx) = watch::channel(false);
    state.shutdown = rx.clone();
    let listener = make(&state)?;
    // Subscribe before serving, so no event published after `serve` starts goes uncounted.
    let counter = full.then(|| {
        tokio::spawn(count_events(
            state.events.subscribe(),
            state.metrics.clone(),
        ))
    });
    let app = if full {
        router(state)
    } else {
        api_router(state)
    }
    .into_make_service_with_connect_info::<ClientAddr>();
    let tx2 = tx.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx2.send(true);
    });
    let grace = grace_ended(rx);
    let result = tokio::select! {
        r = server => r.map_err(anyhow::Error::from),
        () = grace => {
            tracing::warn!("HTTP requests still open after the shutdown grace period; dropping them");
            Ok(())
        }
    };
    if let Some(c) = counter {
        c.abort();
    }
    drop(tx);
    result
}

/// Completes [`SHUTDOWN_GRACE`] after shutdown starts: how long open requests may still run.
pub(crate) async fn grace_ended(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
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

/// Route of rendered templates; see [`template_base`].
const TEMPLATE_ROUTE: &str = "/m/{mac}/{profile}/{token}/{*name}";

/// The prefix of a machine's rendered templates for one boot: `<base>/m/<mac>/<profile>/<token>/`.
/// Everything is in the path, not a query, because cloud-init's NoCloud seed appends file
/// names (`user-data`, `meta-data`) to it.
pub fn template_base(base: &str, mac: MacAddr, profile: &str, token: &str) -> String {
    format!(
        "{base}/m/{}/{}/{token}/",
        mac.hyphenated(),
        percent_encoding::utf8_percent_encode(profile, ipxe::PATH_SEGMENT)
    )
}

/// Where the booted OS reports for one boot (add `&stage=<name>`).
pub fn phone_home_url(base: &str, mac: MacAddr, profile: &str, token: &str) -> String {
    format!(
        "{base}/api/phone-home?mac={}&profile={}&token={token}",
        mac.hyphenated(),
        percent_encoding::utf8_percent_encode(profile, ipxe::PATH_SEGMENT)
    )
}

/// The template facts of one machine for one boot.
fn template_facts(
    state: &HttpState,
    policy: &Policy,
    mac: MacAddr,
    uuid: Option<String>,
    peer: Option<IpAddr>,
    profile: &str,
    token: &str,
) -> TemplateFacts {
    let base = state.server.http_base();
    let machine = policy.machine(&mac);
    TemplateFacts {
        mac: mac.to_string(),
        mac_hyphen: mac.hyphenated(),
        uuid,
        ip: peer.map(|ip| ip.to_string()),
        hostname: machine.and_then(|m| m.hostname.clone()),
        labels: machine.map(|m| m.labels.clone()).unwrap_or_default(),
        profile: profile.to_string(),
        server: base.clone(),
        token: token.to_string(),
        phone_home_url: phone_home_url(&base, mac, profile, token),
        templates_url: template_base(&base, mac, profile, token),
    }
}

/// With `require_token`, a token is issued only to the machine that owns the MAC: the MAC in
/// the request must be the one pxed knows for the client's IP.
fn token_binding_ok(state: &HttpState, mac: MacAddr, peer: Option<IpAddr>) -> Result<(), String> {
    if !state.config.require_token {
        return Ok(());
    }
    match peer.and_then(|ip| (state.mac_lookup)(ip)) {
        Some(known) if known == mac => Ok(()),
        Some(known) => Err(format!(
            "this client is {known}, not {mac}: no script for another machine"
        )),
        None => Err(format!(
            "cannot confirm that this client is {mac} (no lease or ARP entry for its IP)"
        )),
    }
}

async fn script(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let peer = peer_ip(req.extensions());
    let Some(mac) = state.client_mac(q.get("mac").map(String::as_str), req.extensions()) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            ipxe::error_script("no MAC in the request (`mac=` query) and the client IP is unknown"),
        );
    };
    if let Err(msg) = token_binding_ok(&state, mac, peer) {
        state
            .events
            .emit(mac, BootStage::HttpError, format!("script: {msg}"));
        return text_response(StatusCode::FORBIDDEN, ipxe::error_script(&msg));
    }
    let arch = ClientArch::from_ipxe(
        q.get("platform").map_or("", String::as_str),
        q.get("buildarch").map_or("", String::as_str),
    );
    // iPXE's `${uuid}` is remembered for the machine's templates; without one (no SMBIOS
    // UUID, an older script URL), the one DHCP saw in option 97 stands in.
    let uuid = clean_uuid(q.get("uuid"));
    if let Some(u) = &uuid {
        state.uuids.remember(mac, u);
    }
    let uuid = uuid.or_else(|| state.uuids.get(&mac));
    let facts = ClientFacts {
        mac,
        arch_code: arch.map(|a| a.code),
        vendor_class: None,
        user_class: vec!["iPXE".into()],
        is_ipxe: true,
        uuid: uuid.clone(),
        relay: None,
    };
    let boot_state = state.boot_states.get(&mac);
    let base = state.server.http_base();
    // A NIC that stalls on TCP bursts gets its kernel by lock-step TFTP (ipxe::LOCKSTEP_NICS).
    let lockstep = q
        .get("busid")
        .and_then(|b| ipxe::lockstep_nic(b))
        .filter(|_| state.tftp_serves_root);
    let transport = match lockstep {
        Some(_) => ipxe::KernelTransport::Tftp(state.server.ip),
        None => ipxe::KernelTransport::Http,
    };
    let rendered = {
        let policy = match state.policy.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut plan = crate::policy::plan(&policy, &facts, &boot_state, &state.server);
        if let Some(want) = q.get("profile") {
            let chosen = crate::policy::profile_target(&policy, want, &boot_state)
                .filter(|_| reachable(&policy, &plan.target, want));
            match chosen {
                Some((target, done)) => {
                    plan.reason = format!("chosen from the menu of profile `{}`", plan.profile);
                    if let Some(done) = done {
                        plan.reason.push_str(&format!("; {done}"));
                    }
                    plan.profile = want.clone();
                    plan.target = target;
                }
                None => {
                    let msg = format!("profile `{want}` is not offered to this machine");
                    state
                        .events
                        .emit(mac, BootStage::HttpError, format!("script: {msg}"));
                    return text_response(StatusCode::FORBIDDEN, ipxe::error_script(&msg));
                }
            }
        }
        let urls = ScriptUrls {
            base: &base,
            kernel: transport,
        };
        finish_script(&state, &policy, plan, &facts, uuid, peer, urls)
    };
    match rendered {
        Ok((body, plan)) => {
            let arch_txt = arch.map_or_else(|| "unknown arch".to_string(), |a| a.to_string());
            let by_tftp = lockstep
                .filter(|_| matches!(plan.target, BootTarget::Kernel { .. }))
                .map(|nic| format!("; kernel by TFTP: {nic} stalls on TCP bursts"))
                .unwrap_or_default();
            state.events.emit(
                mac,
                BootStage::HttpScript,
                format!(
                    "profile {} ({}; {arch_txt}{by_tftp})",
                    plan.profile, plan.reason
                ),
            );
            text_response(StatusCode::OK, body)
        }
        Err(e) => {
            state
                .events
                .emit(mac, BootStage::HttpError, format!("script: {e}"));
            text_response(StatusCode::OK, ipxe::error_script(&e))
        }
    }
}

/// Where a script's URLs point.
struct ScriptUrls<'a> {
    /// pxed's HTTP base.
    base: &'a str,
    /// How the kernel and initrds are fetched.
    kernel: ipxe::KernelTransport,
}

/// Issue this boot's token, render the command line template and the script.
fn finish_script(
    state: &HttpState,
    policy: &Policy,
    mut plan: BootPlan,
    facts: &ClientFacts,
    uuid: Option<String>,
    peer: Option<IpAddr>,
    urls: ScriptUrls<'_>,
) -> Result<(String, BootPlan), String> {
    let token = state
        .secret
        .issue(facts.mac, &plan.profile)
        .map_err(|e| format!("cannot make a boot token: {e}"))?;
    if let BootTarget::Kernel { cmdline, .. } = &mut plan.target {
        let tf = template_facts(state, policy, facts.mac, uuid, peer, &plan.profile, &token);
        let name = format!("cmdline of profile `{}`", plan.profile);
        *cmdline = templates::render_str(&name, cmdline, &tf).map_err(|e| e.to_string())?;
    }
    ipxe::try_render_script_via(&plan, facts, urls.base, urls.kernel)
        .map(|s| (s, plan))
        .map_err(|e| e.to_string())
}

/// `GET /m/{mac}/{profile}/{token}/{*name}`: `templates/<name>` rendered for the machine. The
/// token must be the one issued for this MAC and profile (always: the URL only comes from a
/// script, so a wrong token is never an honest mistake).
async fn template(
    State(state): State<Arc<HttpState>>,
    axum::extract::Path((mac, profile, token, name)): axum::extract::Path<(
        String,
        String,
        String,
        String,
    )>,
    req: Request,
) -> Response {
    let peer = peer_ip(req.extensions());
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return text_response(StatusCode::BAD_REQUEST, "not a MAC address\n".into());
    };
    if state.secret.verify(&token, mac, &profile).is_none() {
        state.events.emit(
            mac,
            BootStage::HttpError,
            format!("template {name}: bad token (profile {profile})"),
        );
        return text_response(StatusCode::FORBIDDEN, "bad or missing boot token\n".into());
    }
    let facts = {
        let policy = match state.policy.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let uuid = state.uuids.get(&mac);
        template_facts(&state, &policy, mac, uuid, peer, &profile, &token)
    };
    let root = state.root.clone();
    let name2 = name.clone();
    let rendered =
        tokio::task::spawn_blocking(move || templates::render_file(&root, &name2, &facts)).await;
    match rendered {
        Ok(Ok(body)) => {
            state.events.emit(
                mac,
                BootStage::HttpAsset,
                format!("template {name} (profile {profile}, {} bytes)", body.len()),
            );
            text_response(StatusCode::OK, body)
        }
        Ok(Err(e @ templates::TemplateError::NotFound(_))) => {
            state.events.emit(mac, BootStage::HttpError, e.to_string());
            text_response(StatusCode::NOT_FOUND, format!("{e}\n"))
        }
        Ok(Err(e)) => {
            tracing::warn!(%mac, "{e}");
            state.events.emit(mac, BootStage::HttpError, e.to_string());
            text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
        Err(e) => {
            tracing::error!(%mac, "template task failed: {e}");
            text_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "template rendering failed\n".into(),
            )
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
    let mac = state.client_mac(q.get("mac").map(String::as_str), req.extensions());
    let stage = asset_stage(q.get("kind").map(String::as_str));
    let bytes_counter = state.metrics.asset_bytes.clone();
    let headers = req.into_parts().0.headers;
    let served = match asset_path(&raw_path) {
        Ok((rel, shown)) => {
            assets::serve_file(
                state.root.clone(),
                rel,
                method.clone(),
                headers,
                shown,
                move |n| {
                    bytes_counter.inc_by(n as u64);
                },
            )
            .await
        }
        Err(e) => Err(e),
    };
    let (resp, served) = match served {
        Ok(s) => s,
        Err(e) => {
            asset_refused(&state, mac, &method, &raw_path, peer, &e);
            return text_response(e.status(), format!("{e}\n"));
        }
    };
    match asset_served(&state, mac, &method, stage, &served) {
        Some(complete) => report_completion(resp, served.body_len, complete),
        None => resp,
    }
}

/// The boot stage a served asset stands for, from the `kind` query the script renderer puts in
/// the URLs it writes.
pub(crate) fn asset_stage(kind: Option<&str>) -> BootStage {
    match kind {
        Some(ipxe::KIND_KERNEL) => BootStage::HttpKernel,
        Some(ipxe::KIND_INITRD) => BootStage::HttpInitrd,
        _ => BootStage::HttpAsset,
    }
}

/// The file a request path names under the boot root, and how to show it: templates are only
/// served rendered, for the machine holding the token, never as files.
pub(crate) fn asset_path(raw_path: &str) -> Result<(PathBuf, String), assets::PathError> {
    let rel = assets::decode_path(raw_path)?;
    if rel.starts_with(templates::TEMPLATE_DIR) {
        return Err(assets::PathError::NotFound);
    }
    let shown = format!("/{}", rel.display());
    Ok((rel, shown))
}

/// Log a request for a path that is not served, and put it on the machine's timeline.
pub(crate) fn asset_refused(
    state: &HttpState,
    mac: Option<MacAddr>,
    method: &Method,
    raw_path: &str,
    peer: Option<IpAddr>,
    e: &assets::PathError,
) {
    tracing::info!(path = %raw_path, ?peer, "asset: {e}");
    if let Some(mac) = mac
        && method == Method::GET
    {
        state
            .events
            .emit(mac, BootStage::HttpError, format!("{raw_path}: {e}"));
    }
}

/// Publish what serving a file means for the machine's timeline. For a GET that sends bytes,
/// returns the `http.complete` report, to call once the last body byte is handed to the
/// connection (a client that goes away early gets none).
pub(crate) fn asset_served(
    state: &HttpState,
    mac: Option<MacAddr>,
    method: &Method,
    stage: BootStage,
    served: &assets::Served,
) -> Option<impl FnOnce() + Send + 'static> {
    let serving = served.status == StatusCode::OK || served.status == StatusCode::PARTIAL_CONTENT;
    match mac {
        Some(mac) if method == Method::GET && serving => {
            state.events.emit(mac, stage, served.detail.clone());
            let events = state.events.clone();
            let detail = served.detail.clone();
            let started = std::time::Instant::now();
            return Some(move || {
                let secs = started.elapsed().as_secs_f64();
                events.emit(
                    mac,
                    BootStage::HttpComplete,
                    format!("{detail} sent in {secs:.3} s"),
                );
            });
        }
        Some(mac) if served.status.is_server_error() => {
            state
                .events
                .emit(mac, BootStage::HttpError, served.detail.clone())
        }
        _ => tracing::debug!(detail = %served.detail, status = %served.status, "asset"),
    }
    None
}

/// `resp` with a body that calls `complete` when its last byte (of `body_len`) is handed to the
/// connection. Counted, not taken from the end of the stream: hyper stops polling a body once
/// it has written `Content-Length` bytes.
fn report_completion(
    resp: Response,
    body_len: u64,
    complete: impl FnOnce() + Send + 'static,
) -> Response {
    use futures_util::StreamExt as _;
    if body_len == 0 {
        complete();
        return resp;
    }
    let mut left = body_len;
    let mut complete = Some(complete);
    let (parts, body) = resp.into_parts();
    let counted = body.into_data_stream().map(move |chunk| {
        if let Ok(bytes) = &chunk {
            left = left.saturating_sub(bytes.len() as u64);
            if left == 0
                && let Some(report) = complete.take()
            {
                report();
            }
        }
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(counted))
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

    /// Every route of [`router`] stays with hyper; paths only the fallback serves do not.
    #[test]
    fn only_asset_paths_bypass_the_router() {
        for path in [
            "/",
            "/boot.ipxe",
            "/metrics",
            ipxe::SCRIPT_PATH,
            "/api/phone-home",
            "/api/machines",
            "/api/machines/52-54-00-12-34-56/state",
            "/api/events",
            "/m/52-54-00-12-34-56/default/tok/user-data",
        ] {
            assert!(routed_elsewhere(path), "{path}");
        }
        for path in [
            "/vmlinuz",
            "/debian/initrd.gz",
            "/boot.ipxe.bak",
            "/apix",
            "/mx",
        ] {
            assert!(!routed_elsewhere(path), "{path}");
        }
        // The literal route patterns: a new route must be added to `routed_elsewhere` too.
        let src = include_str!("server.rs");
        let routes = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
            .filter_map(|l| l.split('"').next());
        for route in routes {
            let concrete = route
                .replace("{mac}", "52-54-00-12-34-56")
                .replace("{*name}", "x");
            assert!(
                routed_elsewhere(&concrete),
                "route {route} is not in routed_elsewhere"
            );
        }
        assert!(routed_elsewhere(
            TEMPLATE_ROUTE.split('{').next().unwrap_or("/")
        ));
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
