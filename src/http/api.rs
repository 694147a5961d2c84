//! Phone-home, the JSON API, the event stream, metrics and the dashboard.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::server::{HttpState, peer_ip};
use crate::events::BootEvent;
use crate::mac::MacAddr;
use crate::stage::BootStage;
use crate::timeline::{self, Span};

/// Largest phone-home or event body read: a few form fields, nothing more.
pub const MAX_API_BODY: usize = 4096;
/// Longest custom stage name a booted OS may report (it goes into events and the dashboard).
pub const MAX_CUSTOM_STAGE: usize = 64;
/// Longest free-text detail kept from a client.
pub const MAX_DETAIL: usize = 256;

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// Query plus, for a form or JSON body, the body's fields (body wins).
fn fields(
    q: HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<HashMap<String, String>, String> {
    let mut all = q;
    if body.is_empty() {
        return Ok(all);
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parsed: HashMap<String, String> = if ctype.starts_with("application/json") {
        let v: HashMap<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
        v.into_iter()
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, s)
            })
            .collect()
    } else {
        // busybox wget --post-data and curl -d send a form without always saying so.
        serde_urlencoded::from_bytes(body).map_err(|e| format!("bad form body: {e}"))?
    };
    all.extend(parsed);
    Ok(all)
}

fn clip(s: &str, max: usize) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match cleaned.char_indices().nth(max) {
        Some((i, _)) => cleaned.get(..i).unwrap_or("").to_string(),
        None => cleaned,
    }
}

/// The stage a booted OS reports: `os.*` stages by name, anything else as `os.custom` with the
/// name kept in the detail.
pub fn os_stage(name: &str) -> Result<(BootStage, Option<String>), String> {
    match name.parse::<BootStage>() {
        Ok(s) if s.family() == "os" && s != BootStage::OsCustom => Ok((s, None)),
        _ => {
            let ok = !name.is_empty()
                && name.len() <= MAX_CUSTOM_STAGE
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if ok {
                Ok((BootStage::OsCustom, Some(name.to_string())))
            } else {
                Err(format!(
                    "stage must be 1-{MAX_CUSTOM_STAGE} characters of [A-Za-z0-9._-]"
                ))
            }
        }
    }
}

/// `GET|POST /api/phone-home`: fields `mac` (else the client IP lookup), `stage` (default
/// `os.phone-home`), optional `detail`, and `profile` + `token` from the boot's script (needed
/// with `[http] require_token`); from the query, a form body or a JSON body. A stage that
/// completes a one-shot profile is stored before the reply: the next boot is local.
pub async fn phone_home(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
    req: Request,
) -> Response {
    let peer = peer_ip(req.extensions());
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_API_BODY).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let f = match fields(q, &parts.headers, &body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(mac) = state.client_mac(f.get("mac").map(String::as_str), &parts.extensions) else {
        return error(
            StatusCode::BAD_REQUEST,
            "no valid `mac` and the client IP is unknown",
        );
    };
    // A token, when given, must be this machine's; with `require_token` one must be given.
    match (f.get("token"), f.get("profile")) {
        (Some(token), Some(profile)) if state.secret.verify(token, mac, profile).is_some() => {}
        (None, _) if !state.config.require_token => {}
        (given, _) => {
            let what = if given.is_some() { "bad" } else { "missing" };
            state.events.emit(
                mac,
                BootStage::HttpError,
                format!("phone-home refused: {what} boot token"),
            );
            return error(
                StatusCode::FORBIDDEN,
                format!("{what} boot token: use the phone-home URL from this boot's script"),
            );
        }
    }
    let stage_name = f.get("stage").map_or("os.phone-home", String::as_str);
    let (stage, custom) = match os_stage(stage_name) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let one_shot = {
        let policy = match state.policy.read() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        policy.is_one_shot_stage(stage_name)
    };
    let mut remembered = false;
    if one_shot {
        let store = state.boot_states.clone();
        let name = stage_name.to_string();
        match tokio::task::spawn_blocking(move || store.record(mac, &name)).await {
            Ok(Ok(_)) => remembered = true,
            Ok(Err(e)) => {
                tracing::error!(%mac, "cannot store boot state: {e}");
                state.events.emit(
                    mac,
                    BootStage::HttpError,
                    format!("phone-home {stage_name}: cannot store boot state: {e}"),
                );
                // The client retries; the stage must not be lost.
                return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot store boot state");
            }
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
    let mut detail = custom.unwrap_or_default();
    if let Some(d) = f.get("detail") {
        if !detail.is_empty() {
            detail.push_str(": ");
        }
        detail.push_str(&clip(d, MAX_DETAIL));
    }
    if let Some(ip) = peer {
        if !detail.is_empty() {
            detail.push(' ');
        }
        detail.push_str(&format!("from {ip}"));
    }
    if remembered {
        detail.push_str("; one-shot done: next boot is local");
    }
    state.events.emit(mac, stage, detail);
    Json(serde_json::json!({ "ok": true, "mac": mac, "stage": stage, "one_shot_done": remembered }))
        .into_response()
}

/// One machine in the API.
#[derive(Serialize)]
struct MachineView {
    mac: MacAddr,
    last_stage: Option<BootStage>,
    last_at_ms: Option<u64>,
    events: Vec<BootEvent>,
    /// Where the time of its last boot went, from [`timeline::boot_spans`].
    timeline: Vec<Span>,
}

fn view(state: &HttpState, mac: MacAddr) -> MachineView {
    let events = state.events.timeline(&mac);
    MachineView {
        mac,
        last_stage: events.last().map(|e| e.stage),
        last_at_ms: events.last().map(|e| e.at_ms),
        timeline: timeline::boot_spans(&events),
        events,
    }
}

/// `GET /api/machines`: every machine seen, first seen first, each as
/// `{mac, last_stage, last_at_ms, events, timeline}`: `events` are its recent [`BootEvent`]s
/// (oldest first) and `timeline` is its last boot cut into named spans
/// `{kind, what, start_ms, end_ms}` (Unix ms): `kind` is `dhcp` (DISCOVER to ACK or to the
/// proxy offer), `transfer` (a TFTP or HTTP file, `what` names it), `wait` (nothing happened
/// for at least [`timeline::MIN_WAIT_MS`]; `what` names the steps around it), `kernel-start`,
/// `kernel-boot` (the last transfer until the OS's own DHCP or its userspace report) or
/// `userspace` (until a phone-home stage). The boot starts at the firmware's DISCOVER: pxed
/// does not see power-on.
pub async fn machines(State(state): State<Arc<HttpState>>) -> Response {
    let all: Vec<MachineView> = state
        .events
        .machines()
        .into_iter()
        .map(|m| view(&state, m))
        .collect();
    Json(all).into_response()
}

/// `GET /api/machines/{mac}`: one machine, as in [`machines`].
pub async fn machine(State(state): State<Arc<HttpState>>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return error(StatusCode::BAD_REQUEST, "not a MAC address");
    };
    if !state.events.machines().contains(&mac) {
        return error(StatusCode::NOT_FOUND, "machine not seen");
    }
    Json(view(&state, mac)).into_response()
}

/// `GET /api/machines/{mac}/state`: the remembered one-shot stages.
pub async fn boot_state(State(state): State<Arc<HttpState>>, Path(mac): Path<String>) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return error(StatusCode::BAD_REQUEST, "not a MAC address");
    };
    Json(state.boot_states.get(&mac)).into_response()
}

/// `DELETE /api/machines/{mac}/state`: forget the one-shot stages, so the machine installs
/// again on its next boot. Needs the bearer token (see [`authorize`]).
pub async fn clear_boot_state(
    State(state): State<Arc<HttpState>>,
    Path(mac): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = authorize(&state, &headers) {
        return *resp;
    }
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return error(StatusCode::BAD_REQUEST, "not a MAC address");
    };
    let store = state.boot_states.clone();
    match tokio::task::spawn_blocking(move || store.clear(&mac)).await {
        Ok(Ok(existed)) => Json(serde_json::json!({ "cleared": existed })).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Resolves when shutdown starts; never when the state has no live shutdown sender.
async fn shutdown_started(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|down| *down).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `GET /api/events[?mac=]`: Server-Sent Events. Each boot event is an SSE event `boot` with
/// the [`BootEvent`] as JSON; a subscriber too slow to keep up gets an event `lagged` with the
/// number of events it missed. The stream ends when the server shuts down.
pub async fn events(
    State(state): State<Arc<HttpState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let filter: Option<MacAddr> = match q.get("mac") {
        Some(m) => match m.parse() {
            Ok(m) => Some(m),
            Err(_) => return error(StatusCode::BAD_REQUEST, "not a MAC address"),
        },
        None => None,
    };
    let rx = state.events.subscribe();
    let shutdown = Box::pin(shutdown_started(state.shutdown.clone()));
    Sse::new(event_stream(rx, shutdown, filter))
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn event_stream(
    rx: broadcast::Receiver<BootEvent>,
    shutdown: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    filter: Option<MacAddr>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    use tokio::sync::broadcast::error::RecvError;
    futures_util::stream::unfold((rx, shutdown), move |(mut rx, mut shutdown)| async move {
        loop {
            let got = tokio::select! {
                () = &mut shutdown => return None,
                r = rx.recv() => r,
            };
            let ev = match got {
                Ok(ev) if filter.is_none_or(|m| m == ev.mac) => {
                    match Event::default().event("boot").json_data(&ev) {
                        Ok(e) => e,
                        Err(_) => continue,
                    }
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            };
            return Some((Ok(ev), (rx, shutdown)));
        }
    })
}

/// A [`BootEvent`] posted to the API.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostedEvent {
    mac: MacAddr,
    stage: BootStage,
    #[serde(default)]
    detail: String,
}

/// Compare without an early exit, so the time taken says nothing about the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Ok` when the request carries `Authorization: Bearer <token>` with the configured token.
/// Without a configured token nothing is authorized: `pxed serve` always has one (configured
/// or generated), so this only refuses in states built without one.
fn authorize(state: &HttpState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let token = state.config.api_token.as_deref().unwrap_or_default();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if !token.is_empty() && same_secret(g.as_bytes(), token.as_bytes()) => Ok(()),
        _ => {
            let mut resp = error(StatusCode::UNAUTHORIZED, "a bearer token is required");
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Err(Box::new(resp))
        }
    }
}

/// `POST /api/events`: publish an event (JSON `{mac, stage, detail}`), e.g. from the lab's
/// serial console watcher. Needs the bearer token (see [`authorize`]).
pub async fn post_event(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(resp) = authorize(&state, &headers) {
        return *resp;
    }
    if body.len() > MAX_API_BODY {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    let ev: PostedEvent = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad event: {e}")),
    };
    state
        .events
        .emit(ev.mac, ev.stage, clip(&ev.detail, MAX_DETAIL));
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &state.metrics.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            out,
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /`: the dashboard, one self-contained page.
pub async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

const DASHBOARD: &str = include_str!("dashboard.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_stages() {
        assert_eq!(os_stage("os.userspace"), Ok((BootStage::OsUserspace, None)));
        assert_eq!(
            os_stage("os.phone-home"),
            Ok((BootStage::OsPhoneHome, None))
        );
        assert_eq!(
            os_stage("install.done"),
            Ok((BootStage::OsCustom, Some("install.done".into())))
        );
        // Not an OS stage: kept as a custom name, never a DHCP event.
        assert_eq!(
            os_stage("dhcp.ack"),
            Ok((BootStage::OsCustom, Some("dhcp.ack".into())))
        );
        assert!(os_stage("").is_err());
        assert!(os_stage("a b").is_err());
        assert!(os_stage(&"x".repeat(65)).is_err());
    }

    fn state_with_token(token: Option<&str>) -> HttpState {
        HttpState::new(
            std::path::PathBuf::from("/nonexistent"),
            Default::default(),
            crate::policy::ServerAddrs {
                ip: std::net::Ipv4Addr::LOCALHOST,
                http_port: 8080,
            },
            crate::events::EventBus::new(),
            crate::http::HttpConfig {
                api_token: token.map(str::to_string),
                ..Default::default()
            },
        )
    }

    #[test]
    fn mutations_need_the_configured_token_and_none_pass_without_one() {
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
            h
        };
        let with = state_with_token(Some("0123456789abcdef0123"));
        assert!(authorize(&with, &bearer("0123456789abcdef0123")).is_ok());
        assert!(authorize(&with, &bearer("0123456789abcdef0124")).is_err());
        assert!(authorize(&with, &HeaderMap::new()).is_err());
        // No token configured: nothing is authorized, not even an empty bearer.
        let without = state_with_token(None);
        assert!(authorize(&without, &bearer("")).is_err());
        assert!(authorize(&without, &HeaderMap::new()).is_err());
    }

    #[test]
    fn secrets_compare() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn clipping() {
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("héllo", 2), "hé");
    }
}
