//! The HTTP API: `/events` (SSE), devices and their history. Parameters are parsed and
//! validated here; every failure is a JSON error naming what was wrong.

use salvo::http::header::{self, HeaderValue};
use salvo::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::auth::Principal;
use crate::domain::{self, DeviceId};
use crate::feed::{Kind, Kinds};
use crate::series;
use crate::sse::{self, Client};
use crate::store::rollup;
use crate::store::{Page, StoredReading};
use crate::web::{ApiError, principal, shared};

/// Most readings one history request returns.
pub const HISTORY_MAX_LIMIT: i64 = 10_000;
/// Readings returned when `limit` is not given.
pub const HISTORY_DEFAULT_LIMIT: i64 = 100;

/// `GET /events`
#[endpoint(tags("live feed"), parameters(("device" = Option<String>, Query, description = "a comma-separated list of device ids (at most 1000)"), ("type" = Option<String>, Query, description = "a comma-separated list of reading, status, command"), ("last_event_id" = Option<String>, Query, description = "resume after this event id (or the Last-Event-ID header)"), ("snapshot" = Option<String>, Query, description = "latest: first the latest reading of each device")), responses((status_code = 200, description = "an SSE stream: `id:` is the event id; `event:` reading, status, command, alert, gap or shutdown; `data:` its JSON. A heartbeat comment every [http] heartbeat.", content_type = "text/event-stream", body = String), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 503, description = "too many streams (max_sse_clients, max_streams_per_ip)", body = crate::openapi::ErrorBody)))]
pub async fn events(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let s = shared(depot).clone();
    let who = principal(depot);
    let params = match sse_params(req).and_then(|p| scoped(p, &who, &s)) {
        Ok(p) => p,
        Err(e) => return e.render(res),
    };
    let slot = match crate::web::acquire_slot(&s, crate::limits::Kind::Sse, req) {
        Ok(slot) => slot,
        Err(e) => return e.render(res),
    };
    let client = Client::new(&s, slot, params);
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res.stream(client.into_stream());
}

/// Limits a stream to what the principal may see; naming a device outside it is refused.
fn scoped(
    mut p: sse::Params,
    who: &Principal,
    s: &crate::app::Shared,
) -> Result<sse::Params, ApiError> {
    if let Some(devices) = &p.devices
        && let Some(d) = devices.iter().find(|d| !who.sees(d))
    {
        return Err(forbidden(
            s,
            format!("device {d:?} is outside this token's scope"),
        ));
    }
    p.scope = who.devices.clone();
    Ok(p)
}

/// A 403 (counted) unless the token is an operator's; `what` is what needs one, as in
/// "commands need".
fn require_operator(s: &crate::app::Shared, who: &Principal, what: &str) -> Result<(), ApiError> {
    if who.may_command() {
        return Ok(());
    }
    Err(forbidden(
        s,
        format!("token {:?} is a viewer; {what} an operator token", who.name),
    ))
}

/// A 403, counted.
pub fn forbidden(s: &crate::app::Shared, message: String) -> ApiError {
    s.metrics.forbidden.inc();
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

fn sse_params(req: &Request) -> Result<sse::Params, ApiError> {
    known_params(req, &["device", "type", "last_event_id", "snapshot"])?;
    let devices = match req.query::<String>("device") {
        Some(list) if !list.is_empty() => Some(parse_devices(&list)?),
        _ => None,
    };
    let kinds = match req.query::<String>("type") {
        Some(list) if !list.is_empty() => {
            let mut k = Kinds::NONE;
            for t in list.split(',') {
                k = k.with(Kind::parse(t.trim()).ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_parameter",
                        format!("type: {t:?} is not an event type; use reading, status or command"),
                    )
                })?);
            }
            k
        }
        _ => Kinds::ALL,
    };
    let header_id = req
        .headers()
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let query_id = req.query::<String>("last_event_id");
    let last_event_id = match header_id.or(query_id) {
        Some(v) if v.trim().is_empty() => None,
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "bad_parameter",
                        format!(
                            "Last-Event-ID / last_event_id: {v:?} is not a non-negative integer"
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let snapshot = match req.query::<String>("snapshot").as_deref() {
        None | Some("") => false,
        Some("latest") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_parameter",
                format!("snapshot: {other:?} is not supported; use snapshot=latest"),
            ));
        }
    };
    Ok(sse::Params {
        devices,
        kinds,
        last_event_id,
        snapshot,
        scope: None,
    })
}

fn parse_devices(list: &str) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    for d in list.split(',') {
        let d = d.trim();
        DeviceId::check(d)
            .map_err(|e| ApiError::bad_request("invalid_device", format!("device: {d:?}: {e}")))?;
        if !out.iter().any(|x: &String| x == d) {
            out.push(d.to_owned());
        }
    }
    if out.len() > 1000 {
        return Err(ApiError::bad_request(
            "bad_parameter",
            "device: at most 1000 devices",
        ));
    }
    Ok(out)
}

/// A reading as the API returns it.
#[derive(Serialize)]
struct ReadingOut {
    seq: i64,
    device: String,
    topic: String,
    ts: String,
    received_at: String,
    payload: serde_json::Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    raw: bool,
}

impl From<StoredReading> for ReadingOut {
    fn from(r: StoredReading) -> Self {
        let raw = r.flags & domain::flags::RAW != 0;
        let payload = if raw {
            serde_json::Value::String(String::from_utf8_lossy(&r.payload).into_owned())
        } else {
            serde_json::from_slice(&r.payload).unwrap_or(serde_json::Value::Null)
        };
        ReadingOut {
            seq: r.seq,
            device: r.device,
            topic: r.topic,
            ts: domain::format_ms(r.ts),
            received_at: domain::format_ms(r.received_at),
            payload,
            raw,
        }
    }
}

/// `GET /api/devices`
#[endpoint(tags("devices"), responses((status_code = 200, body = crate::openapi::DeviceList), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn list_devices(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot);
    if let Err(e) = known_params(req, &[]) {
        return e.render(res);
    }
    // Read first: a page that streams from here replays whatever the list may miss.
    let last_event_id = *s.last_seq.borrow();
    let result = async {
        let devices = s.store.devices().await?;
        let latest = s.store.latest(None, None).await?;
        Ok::<_, crate::store::StoreError>((devices, latest))
    }
    .await;
    let (devices, latest) = match result {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).render(res),
    };
    let fields: std::collections::BTreeSet<String> = latest
        .iter()
        .filter(|r| who.sees(&r.device))
        .flat_map(|r| {
            rollup::numeric_fields(&r.payload)
                .into_iter()
                .map(|(f, _)| f)
        })
        .collect();
    let units = s.series.units.of_fields(None, &fields, None);
    let mut latest: std::collections::HashMap<String, StoredReading> =
        latest.into_iter().map(|r| (r.device.clone(), r)).collect();
    let out: Vec<_> = devices
        .into_iter()
        .filter(|d| who.sees(&d.id))
        .map(|d| {
            let latest = latest.remove(&d.id);
            json!({
                "id": d.id,
                "online": d.online,
                "stale": d.stale,
                "presence": d.presence(),
                "first_seen": domain::format_ms(d.first_seen),
                "last_seen": domain::format_ms(d.last_seen),
                "units": latest.as_ref().map(|r| s.series.units.of_reading(&d.id, &r.payload)).unwrap_or_default(),
                "latest": latest.map(ReadingOut::from),
            })
        })
        .collect();
    res.render(Json(json!({
        "devices": out,
        "last_event_id": last_event_id,
        "units": units,
        "publish": *s.publish_hint,
    })));
}

/// `GET /api/devices/{id}`: one device, as the list shows it.
#[endpoint(tags("devices"), parameters(("id" = String, Path, description = "the device id: 1–64 of A-Z a-z 0-9 . _ -", pattern = "^[A-Za-z0-9._-]{1,64}$")), responses((status_code = 200, body = crate::openapi::Device), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn one_device(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot).clone();
    let result = async {
        known_params(req, &[])?;
        let id = req.param::<String>("id").unwrap_or_default();
        DeviceId::check(&id).map_err(|e| {
            ApiError::bad_request("invalid_device", format!("device id {id:?}: {e}"))
        })?;
        if !who.sees(&id) {
            return Err(forbidden(
                &s,
                format!("device {id:?} is outside this token's scope"),
            ));
        }
        let d = s.store.device(&id).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no device {id:?} has been seen"),
            )
        })?;
        let latest = s
            .store
            .latest(Some(std::slice::from_ref(&id)), None)
            .await?
            .into_iter()
            .next();
        Ok(json!({
            "id": d.id,
            "online": d.online,
            "stale": d.stale,
            "presence": d.presence(),
            "first_seen": domain::format_ms(d.first_seen),
            "last_seen": domain::format_ms(d.last_seen),
            "units": latest.as_ref().map(|r| s.series.units.of_reading(&d.id, &r.payload)).unwrap_or_default(),
            "latest": latest.map(ReadingOut::from),
        }))
    }
    .await;
    match result {
        Ok(v) => res.render(Json(v)),
        Err(e) => e.render(res),
    }
}

/// A history request's page: the device checked (valid, in scope, known) and the paging
/// parameters parsed.
async fn history_page(
    req: &Request,
    who: &Principal,
    s: &crate::app::Shared,
) -> Result<Page, ApiError> {
    let id = req.param::<String>("id").unwrap_or_default();
    DeviceId::check(&id)
        .map_err(|e| ApiError::bad_request("invalid_device", format!("device id {id:?}: {e}")))?;
    if !who.sees(&id) {
        return Err(forbidden(
            s,
            format!("device {id:?} is outside this token's scope"),
        ));
    }
    let after = int_param(req, "after")?.unwrap_or(0);
    let limit = int_param(req, "limit")?.unwrap_or(HISTORY_DEFAULT_LIMIT);
    if !(1..=HISTORY_MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            "bad_parameter",
            format!("limit: must be between 1 and {HISTORY_MAX_LIMIT}"),
        ));
    }
    let from = time_param(req, "from")?;
    let to = time_param(req, "to")?;
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(ApiError::bad_request(
            "bad_parameter",
            "from: must not be after to",
        ));
    }
    if s.store.device(&id).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {id:?}"),
        ));
    }
    let before = match req.query::<String>("before").as_deref() {
        None | Some("") => None,
        Some(_) => Some(
            int_param(req, "before")?
                .filter(|b| *b > 0)
                .ok_or_else(|| {
                    ApiError::bad_request("bad_parameter", "before: must be a seq above 0")
                })?,
        ),
    };
    let newest_first = match req.query::<String>("order").as_deref() {
        None | Some("") | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_parameter",
                format!("order: {other:?} is neither asc nor desc"),
            ));
        }
    };
    Ok(Page {
        device: id,
        after,
        limit,
        from,
        to,
        before,
        newest_first,
    })
}

/// The `after` of the next page, when this one is full.
fn next_after(page: &Page, rows: usize, last: Option<i64>) -> Option<i64> {
    (rows as i64 == page.limit).then_some(last).flatten()
}

/// Times a history or series query in storage, for `telebridge_history_query_seconds`.
async fn timed<T>(s: &crate::app::Shared, query: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = query.await;
    s.metrics.history_query.observe_duration(started.elapsed());
    out
}

/// `GET /api/devices/{id}/readings?from=&to=&after=&limit=&format=`
#[endpoint(tags("history"), parameters(("id" = String, Path, description = "the device id: 1–64 of A-Z a-z 0-9 . _ -", pattern = "^[A-Za-z0-9._-]{1,64}$"), ("from" = Option<String>, Query, description = "RFC 3339, Unix ms, now, or a time ago such as -1h"), ("to" = Option<String>, Query, description = "RFC 3339, Unix ms, now, or a time ago such as -1h"), ("after" = Option<String>, Query, description = "the last seq you have"), ("before" = Option<String>, Query, description = "newest-first paging: readings below this seq"), ("order" = Option<String>, Query, description = "asc (default) or desc"), ("limit" = Option<String>, Query, description = "1–10000, default 100"), ("format" = Option<String>, Query, description = "json (default) or csv")), responses((status_code = 200, description = "a page of readings; CSV with format=csv (`X-Next-After`, `X-Next-Before` headers)", content(("application/json" = crate::openapi::ReadingsPage), ("text/csv" = String))), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn device_readings(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot);
    let result = async {
        known_params(
            req,
            &["from", "to", "after", "before", "order", "limit", "format"],
        )?;
        let q = history_page(req, &who, s).await?;
        let csv = match req.query::<String>("format").as_deref() {
            None | Some("") | Some("json") => false,
            Some("csv") => true,
            Some(other) => {
                return Err(ApiError::bad_request(
                    "bad_parameter",
                    format!("format: {other:?} is not supported; use json or csv"),
                ));
            }
        };
        let rows = timed(s, s.store.history(&q)).await?;
        Ok((q, rows, csv))
    }
    .await;
    let (q, rows, csv) = match result {
        Ok(v) => v,
        Err(e) => return e.render(res),
    };
    // The next page's cursor: `after` going forward, `before` newest first.
    let cursor = next_after(&q, rows.len(), rows.last().map(|r| r.seq));
    let (next_after, next_before) = if q.newest_first {
        (None, cursor)
    } else {
        (cursor, None)
    };
    if csv {
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        for (name, value) in [("x-next-after", next_after), ("x-next-before", next_before)] {
            if let Some(n) = value
                && let Ok(v) = HeaderValue::from_str(&n.to_string())
            {
                res.headers_mut().insert(name, v);
            }
        }
        res.body(to_csv(&rows));
        return;
    }
    let readings: Vec<ReadingOut> = rows.into_iter().map(ReadingOut::from).collect();
    let mut body = json!({ "device": q.device, "readings": readings, "next_after": next_after });
    if q.newest_first {
        body["next_before"] = json!(next_before);
    }
    res.render(Json(body));
}

/// `GET /api/devices/{id}/status-history?from=&to=&after=&limit=`: presence changes from
/// the event log, oldest first, paged by seq (the SSE event id).
#[endpoint(tags("history"), parameters(("id" = String, Path, description = "the device id: 1–64 of A-Z a-z 0-9 . _ -", pattern = "^[A-Za-z0-9._-]{1,64}$"), ("from" = Option<String>, Query, description = "RFC 3339, Unix ms, now, or a time ago such as -1h"), ("to" = Option<String>, Query, description = "RFC 3339, Unix ms, now, or a time ago such as -1h"), ("after" = Option<String>, Query, description = "the last seq you have"), ("limit" = Option<String>, Query, description = "1–10000, default 100")), responses((status_code = 200, body = crate::openapi::StatusHistory), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn status_history(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot);
    let result = async {
        known_params(req, &["from", "to", "after", "limit"])?;
        let q = history_page(req, &who, s).await?;
        let rows = timed(s, s.store.status_history(&q)).await?;
        Ok::<_, ApiError>((q, rows))
    }
    .await;
    let (q, rows) = match result {
        Ok(v) => v,
        Err(e) => return e.render(res),
    };
    let next_after = next_after(&q, rows.len(), rows.last().map(|r| r.seq));
    let changes: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v: serde_json::Value =
                serde_json::from_str(&r.data).unwrap_or_else(|_| json!({}));
            if let Some(o) = v.as_object_mut() {
                o.insert("seq".into(), json!(r.seq));
            }
            v
        })
        .collect();
    res.render(Json(
        json!({ "device": q.device, "changes": changes, "next_after": next_after }),
    ));
}

/// One row per reading: its columns, then one column per numeric field of the page's
/// payloads (dotted paths for nested ones, in name order; empty where a reading lacks it),
/// then the payload as sent and the flags.
fn to_csv(rows: &[StoredReading]) -> String {
    let values: Vec<Vec<(String, f64)>> = rows
        .iter()
        .map(|r| rollup::numeric_fields(&r.payload))
        .collect();
    let fields: std::collections::BTreeSet<&str> = values
        .iter()
        .flat_map(|v| v.iter().map(|(f, _)| f.as_str()))
        .collect();
    let mut out = String::from("seq,device,topic,ts,received_at");
    for f in &fields {
        out.push(',');
        out.push_str(&csv_cell(f));
    }
    out.push_str(",payload,flags\n");
    for (r, vals) in rows.iter().zip(&values) {
        out.push_str(&format!(
            "{},{},{},{},{}",
            r.seq,
            r.device,
            csv_cell(&r.topic),
            domain::format_ms(r.ts),
            domain::format_ms(r.received_at),
        ));
        for f in &fields {
            out.push(',');
            if let Some((_, v)) = vals.iter().find(|(name, _)| name == f) {
                out.push_str(&v.to_string());
            }
        }
        let payload = String::from_utf8_lossy(&r.payload);
        out.push_str(&format!(
            ",\"{}\",{}\n",
            payload.replace('"', "\"\""),
            r.flags
        ));
    }
    out
}

/// An optional query parameter; empty counts as absent, anything `parse` refuses is a 400
/// that names the parameter and says what was expected.
fn param(
    req: &Request,
    name: &str,
    expected: &str,
    parse: impl Fn(&str) -> Option<i64>,
) -> Result<Option<i64>, ApiError> {
    match req.query::<String>(name) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => parse(&v).map(Some).ok_or_else(|| {
            ApiError::bad_request("bad_parameter", format!("{name}: {v:?} is {expected}"))
        }),
    }
}

fn int_param(req: &Request, name: &str) -> Result<Option<i64>, ApiError> {
    param(req, name, "not a non-negative integer", |v| {
        v.parse::<i64>().ok().filter(|n| *n >= 0)
    })
}

/// RFC 3339, Unix milliseconds, `now`, or a time relative to now such as `-1h` or `-15m`.
fn time_param(req: &Request, name: &str) -> Result<Option<i64>, ApiError> {
    param(
        req,
        name,
        "neither RFC 3339, Unix milliseconds, now, nor a time ago like -1h",
        parse_time,
    )
}

/// See [`time_param`].
fn parse_time(v: &str) -> Option<i64> {
    if v == "now" {
        return Some(domain::now_ms());
    }
    if let Some(ago) = v.strip_prefix('-')
        && ago.starts_with(|c: char| c.is_ascii_digit())
        && ago.contains(|c: char| c.is_ascii_alphabetic())
    {
        let d = humantime::parse_duration(ago).ok()?;
        return Some(domain::now_ms() - i64::try_from(d.as_millis()).ok()?);
    }
    v.parse::<i64>()
        .ok()
        .or_else(|| domain::parse_rfc3339_ms(v))
}

/// Refuses query parameters that `allowed` does not name.
fn known_params(req: &Request, allowed: &[&str]) -> Result<(), ApiError> {
    match req
        .queries()
        .keys()
        .find(|k| !allowed.contains(&k.as_str()))
    {
        Some(k) => Err(ApiError::bad_request(
            "bad_parameter",
            format!(
                "{k}: unknown parameter; this endpoint takes {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// The series request of `GET /api/devices/{id}/series`, validated; the device checked
/// (valid, in scope, known) as for history.
async fn series_query(
    req: &Request,
    who: &Principal,
    s: &crate::app::Shared,
) -> Result<(series::Query, bool), ApiError> {
    known_params(req, &["fields", "from", "to", "step", "agg", "format"])?;
    let bad = |message: String| ApiError::bad_request("bad_parameter", message);
    let fields = match req.query::<String>("fields") {
        None => None,
        Some(list) if list.trim().is_empty() => None,
        Some(list) => {
            let mut out: Vec<String> = Vec::new();
            for f in list.split(',').map(str::trim) {
                let well_formed = !f.is_empty()
                    && f.len() <= rollup::MAX_FIELD_LEN
                    && !f.chars().any(char::is_control)
                    && f.split('.').all(|part| !part.is_empty());
                if !well_formed {
                    return Err(bad(format!(
                        "fields: {f:?} is not a field name; use names from the payload, dotted for nested ones (engine.temp), at most {} characters",
                        rollup::MAX_FIELD_LEN
                    )));
                }
                if f == "ts" {
                    return Err(bad(
                        "fields: \"ts\" is the reading's time, not a field".into()
                    ));
                }
                if !out.iter().any(|x| x == f) {
                    out.push(f.to_owned());
                }
            }
            if out.len() > series::MAX_FIELDS {
                return Err(bad(format!(
                    "fields: at most {} fields",
                    series::MAX_FIELDS
                )));
            }
            Some(out)
        }
    };
    let step = match req.query::<String>("step") {
        None => series::Step::Auto,
        Some(v) if v.is_empty() => series::Step::Auto,
        Some(v) => series::Step::parse(&v).map_err(|e| bad(format!("step: {e}")))?,
    };
    let aggs = match req.query::<String>("agg") {
        None => vec![series::Agg::Avg, series::Agg::Min, series::Agg::Max],
        Some(v) if v.trim().is_empty() => {
            vec![series::Agg::Avg, series::Agg::Min, series::Agg::Max]
        }
        Some(v) => {
            let mut out = Vec::new();
            for a in v.split(',').map(str::trim) {
                let agg = series::Agg::parse(a).ok_or_else(|| {
                    bad(format!(
                        "agg: {a:?} is not an aggregate; use avg, min, max, first, last or count"
                    ))
                })?;
                if !out.contains(&agg) {
                    out.push(agg);
                }
            }
            out
        }
    };
    let csv = match req.query::<String>("format").as_deref() {
        None | Some("") | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(bad(format!(
                "format: {other:?} is not supported; use json or csv"
            )));
        }
    };
    let to = time_param(req, "to")?.unwrap_or_else(domain::now_ms);
    let from = time_param(req, "from")?.unwrap_or(to - 86_400_000);
    if from > to {
        return Err(bad("from: must not be after to".into()));
    }
    // The same checks as history: a valid device id, in scope, known.
    let page = history_page(req, who, s).await?;
    Ok((
        series::Query {
            device: page.device,
            fields,
            from,
            to,
            step,
            aggs,
        },
        csv,
    ))
}

/// `GET /api/devices/{id}/series?fields=&from=&to=&step=&agg=&format=`: numeric fields
/// aggregated per time bucket, from the stored rollups or the raw readings.
#[endpoint(tags("history"), parameters(("id" = String, Path, description = "the device id: 1–64 of A-Z a-z 0-9 . _ -", pattern = "^[A-Za-z0-9._-]{1,64}$"), ("fields" = Option<String>, Query, description = "a comma-separated list of numeric fields (dotted paths); default all"), ("from" = Option<String>, Query, description = "RFC 3339, Unix ms, now, or a time ago such as -1h"), ("to" = Option<String>, Query, description = "RFC 3339, Unix ms, now, or a time ago such as -1h"), ("step" = Option<String>, Query, description = "auto (default), or a width such as 10s, 1m, 1h, 1d"), ("agg" = Option<String>, Query, description = "a comma-separated list of avg, min, max, first, last, count"), ("format" = Option<String>, Query, description = "json (default) or csv")), responses((status_code = 200, description = "buckets per step; CSV with format=csv", content(("application/json" = crate::openapi::Series), ("text/csv" = String))), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn device_series(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot);
    let result = async {
        let (q, csv) = series_query(req, &who, s).await?;
        let plan = series::plan(&q, &s.series, domain::now_ms())
            .map_err(|e| ApiError::bad_request("bad_parameter", format!("step: {e}")))?;
        let buckets = timed(s, series::compute(&s.store, &q, &plan))
            .await
            .map_err(|e| match e {
                series::SeriesError::Store(e) => ApiError::from(e),
                e @ series::SeriesError::TooManyRaw(_) => {
                    ApiError::bad_request("bad_parameter", format!("step: {e}"))
                }
            })?;
        // The latest payload may name its fields' units.
        let latest = s
            .store
            .latest(Some(std::slice::from_ref(&q.device)), None)
            .await?
            .into_iter()
            .next()
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok());
        Ok::<_, ApiError>((q, plan, buckets, csv, latest))
    }
    .await;
    let (q, plan, buckets, csv, latest) = match result {
        Ok(v) => v,
        Err(e) => return e.render(res),
    };
    let fields: Vec<String> = match &q.fields {
        Some(f) => f.clone(),
        None => buckets.fields.iter().cloned().collect(),
    };
    if csv {
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        );
        res.body(series_csv(&fields, &q.aggs, &buckets));
        return;
    }
    let points: Vec<serde_json::Value> = buckets
        .points
        .iter()
        .map(|(t, stats)| {
            let mut point = serde_json::Map::new();
            point.insert("t".into(), json!(domain::format_ms(*t)));
            for (field, st) in stats {
                let values: serde_json::Map<String, serde_json::Value> = q
                    .aggs
                    .iter()
                    .map(|a| (a.as_str().to_owned(), a.of(st)))
                    .collect();
                point.insert(field.clone(), serde_json::Value::Object(values));
            }
            serde_json::Value::Object(point)
        })
        .collect();
    res.render(Json(json!({
        "device": q.device,
        "from": domain::format_ms(q.from),
        "to": domain::format_ms(q.to),
        "step": series::format_step(plan.step),
        "step_ms": plan.step,
        "resolution": plan.source.name(),
        "agg": q.aggs.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
        "fields": fields,
        "units": s.series.units.of_fields(Some(&q.device), &fields, latest.as_ref()),
        "raw_since": domain::format_ms(plan.raw_since),
        "past_raw": plan.lo < plan.raw_since,
        "points": points,
    })));
}

/// A series as CSV: `t`, then one column per field and aggregate (`temperature_avg`).
fn series_csv(fields: &[String], aggs: &[series::Agg], b: &series::Buckets) -> String {
    let mut out = String::from("t");
    for f in fields {
        for a in aggs {
            out.push_str(&format!(",{}", csv_cell(&format!("{f}_{}", a.as_str()))));
        }
    }
    out.push('\n');
    for (t, stats) in &b.points {
        out.push_str(&domain::format_ms(*t));
        for f in fields {
            for a in aggs {
                out.push(',');
                if let Some(st) = stats.get(f) {
                    out.push_str(&a.of(st).to_string());
                }
            }
        }
        out.push('\n');
    }
    out
}

/// A CSV cell, quoted when it holds a comma or a quote.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Largest command body over HTTP.
const COMMAND_BODY_MAX: usize = crate::ws::MAX_MESSAGE;

/// `POST /api/devices/{id}/commands`: like a WebSocket command; `202` with the id.
#[endpoint(tags("commands"), request_body = crate::openapi::NewCommand, parameters(("id" = String, Path, description = "the device id: 1–64 of A-Z a-z 0-9 . _ -", pattern = "^[A-Za-z0-9._-]{1,64}$")), responses((status_code = 202, body = crate::openapi::CommandAccepted), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 413, description = "the body is over 16 KiB", body = crate::openapi::ErrorBody), (status_code = 503, description = "commands cannot be stored now", body = crate::openapi::ErrorBody)))]
pub async fn post_command(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let s = shared(depot).clone();
    let who = principal(depot);
    let device = req.param::<String>("id").unwrap_or_default();
    if let Err(e) = require_operator(&s, &who, "commands need") {
        return e.render(res);
    }
    if DeviceId::check(&device).is_ok() && !who.sees(&device) {
        return forbidden(
            &s,
            format!("device {device:?} is outside this token's scope"),
        )
        .render(res);
    }
    let body = match req.payload_with_max_size(COMMAND_BODY_MAX).await {
        Ok(b) => b.clone(),
        Err(salvo::http::ParseError::PayloadTooLarge) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over {COMMAND_BODY_MAX} bytes"),
            )
            .render(res);
        }
        Err(e) => {
            return ApiError::bad_request("bad_json", format!("cannot read the body: {e}"))
                .render(res);
        }
    };
    let obj = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(o)) => o,
        Ok(_) => {
            return ApiError::bad_request("bad_json", "the body must be a JSON object").render(res);
        }
        Err(e) => return ApiError::bad_request("bad_json", format!("not JSON: {e}")).render(res),
    };
    let mut obj = obj;
    let reference = obj.remove("ref");
    let mut cmd = match crate::protocol::parse_command_fields(obj, reference, false) {
        Ok(c) => c,
        Err(r) => return ApiError::bad_request(r.code, r.message).render(res),
    };
    if let Err(e) = DeviceId::check(&device) {
        return ApiError::bad_request("invalid_device", format!("device id {device:?}: {e}"))
            .render(res);
    }
    cmd.device = device;
    match s.commands.submit(cmd).await {
        Ok(crate::protocol::ServerMessage::Accepted {
            id,
            status,
            duplicate,
            reference,
        }) => {
            res.status_code(StatusCode::ACCEPTED);
            res.render(Json(
                json!({"id": id, "status": status, "duplicate": duplicate, "ref": reference}),
            ));
        }
        Ok(other) => res.render(Json(other)),
        Err(r) => {
            let status = if r.code == "unavailable" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(status, r.code, r.message).render(res)
        }
    }
}

/// Every command status, for `status=`.
const COMMAND_STATUSES: [&str; 7] = [
    "queued",
    "sent",
    "acked",
    "failed",
    "timeout",
    "expired",
    "cancelled",
];

/// A command as the API shows it.
fn command_json(c: &crate::store::CommandRow) -> serde_json::Value {
    let ms = |v: Option<i64>| v.map(domain::format_ms);
    json!({
        "id": c.id,
        "device": c.device,
        "name": c.name,
        "params": serde_json::from_str::<serde_json::Value>(&c.params).unwrap_or(serde_json::Value::Null),
        "status": c.status,
        "key": c.key,
        "created_at": domain::format_ms(c.created_at),
        "expires_at": domain::format_ms(c.expires_at),
        "sent_at": ms(c.sent_at),
        "finished_at": ms(c.finished_at),
        "result": c.result.as_deref().and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok()),
        "error": c.error,
    })
}

/// `GET /api/commands/templates`: default params per command name, for the console.
#[endpoint(tags("commands"), responses((status_code = 200, body = crate::openapi::Templates), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody)))]
pub async fn command_templates(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    if let Err(e) = known_params(req, &[]) {
        return e.render(res);
    }
    res.render(Json(&*shared(depot).command_templates));
}

/// `GET /api/commands?device=&status=&limit=`: the command log, newest first.
#[endpoint(tags("commands"), parameters(("device" = Option<String>, Query, description = "only this device"), ("status" = Option<String>, Query, description = "a comma-separated list of queued, sent, acked, failed, timeout, expired, cancelled"), ("limit" = Option<String>, Query, description = "1–1000, default 100")), responses((status_code = 200, body = crate::openapi::CommandList), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn list_commands(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot);
    let result = async {
        known_params(req, &["device", "status", "limit"])?;
        let device = match req.query::<String>("device") {
            Some(d) if !d.is_empty() => {
                DeviceId::check(&d).map_err(|e| {
                    ApiError::bad_request("invalid_device", format!("device: {d:?}: {e}"))
                })?;
                Some(d)
            }
            _ => None,
        };
        let mut statuses = Vec::new();
        for st in req
            .query::<String>("status")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if !COMMAND_STATUSES.contains(&st) {
                return Err(ApiError::bad_request(
                    "bad_parameter",
                    format!(
                        "status: {st:?} is not one of {}",
                        COMMAND_STATUSES.join(", ")
                    ),
                ));
            }
            statuses.push(st.to_owned());
        }
        let limit = int_param(req, "limit")?.unwrap_or(100);
        if !(1..=HISTORY_MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(
                "bad_parameter",
                format!("limit: must be between 1 and {HISTORY_MAX_LIMIT}"),
            ));
        }
        Ok(s.store
            .commands(device.as_deref(), &statuses, limit)
            .await?)
    }
    .await;
    let rows = match result {
        Ok(r) => r,
        Err(e) => return e.render(res),
    };
    let out: Vec<_> = rows
        .iter()
        .filter(|c| who.sees(&c.device))
        .map(command_json)
        .collect();
    res.render(Json(json!({ "commands": out })));
}

/// The command `{id}` names, checked against the token's scope.
async fn scoped_command(
    req: &Request,
    who: &Principal,
    s: &crate::app::Shared,
) -> Result<crate::store::CommandRow, ApiError> {
    let id = req.param::<String>("id").unwrap_or_default();
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no command {id:?}"),
        )
    };
    let c = s.store.command(&id).await?.ok_or_else(not_found)?;
    if !who.sees(&c.device) {
        return Err(forbidden(
            s,
            format!("device {:?} is outside this token's scope", c.device),
        ));
    }
    Ok(c)
}

/// `GET /api/commands/{id}`: one command with its status and times.
#[endpoint(tags("commands"), parameters(("id" = String, Path, description = "the command id")), responses((status_code = 200, body = crate::openapi::Command), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn get_command(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot).clone();
    let result = async {
        known_params(req, &[])?;
        scoped_command(req, &who, &s).await
    }
    .await;
    match result {
        Ok(c) => res.render(Json(command_json(&c))),
        Err(e) => e.render(res),
    }
}

/// `DELETE /api/commands/{id}`: an operator cancels a queued command.
#[endpoint(tags("commands"), parameters(("id" = String, Path, description = "the command id")), responses((status_code = 200, description = "the command, now cancelled", body = crate::openapi::Command), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 409, description = "not queued: it was sent or finished", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn cancel_command(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot).clone();
    let result = async {
        known_params(req, &[])?;
        require_operator(&s, &who, "cancelling commands needs")?;
        let c = scoped_command(req, &who, &s).await?;
        let not_queued = |status: &str| {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_queued",
                format!(
                    "command {} is {status}: only a queued command can be cancelled",
                    c.id
                ),
            )
        };
        if c.status != "queued" {
            return Err(not_queued(&c.status));
        }
        if !s.store.cancel_command(&c.id, domain::now_ms()).await? {
            let now = s.store.command(&c.id).await?.map(|c| c.status);
            return Err(not_queued(now.as_deref().unwrap_or("gone")));
        }
        s.metrics.commands_cancelled.inc();
        Ok(s.store.command(&c.id).await?.unwrap_or(c))
    }
    .await;
    match result {
        Ok(c) => res.render(Json(command_json(&c))),
        Err(e) => e.render(res),
    }
}

/// Most alerts one request returns.
const ALERTS_MAX_LIMIT: i64 = 10_000;

/// `GET /api/alerts?state=&device=&limit=`: alerts, newest first; `state` a list of
/// firing, acknowledged, resolved, or `open` for the first two.
#[endpoint(tags("alerts"), parameters(("state" = Option<String>, Query, description = "a comma-separated list of firing, acknowledged, resolved, or open"), ("device" = Option<String>, Query, description = "only this device"), ("limit" = Option<String>, Query, description = "1–1000")), responses((status_code = 200, body = crate::openapi::AlertList), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn list_alerts(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    let who = principal(depot);
    let s = shared(depot).clone();
    let result = async {
        known_params(req, &["state", "device", "limit"])?;
        let states = crate::alerts::parse_states(&req.query::<String>("state").unwrap_or_default())
            .map_err(|why| ApiError::bad_request("bad_parameter", format!("state: {why}")))?;
        let device = match req.query::<String>("device") {
            Some(d) if !d.is_empty() => {
                DeviceId::check(&d).map_err(|e| {
                    ApiError::bad_request("invalid_device", format!("device: {d:?}: {e}"))
                })?;
                if !who.sees(&d) {
                    return Err(forbidden(
                        &s,
                        format!("device {d:?} is outside this token's scope"),
                    ));
                }
                Some(d)
            }
            _ => None,
        };
        let limit = int_param(req, "limit")?.unwrap_or(100);
        if !(1..=ALERTS_MAX_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(
                "bad_parameter",
                format!("limit: must be between 1 and {ALERTS_MAX_LIMIT}"),
            ));
        }
        Ok(s.store.alerts(&states, device.as_deref(), limit).await?)
    }
    .await;
    match result {
        Ok(rows) => {
            let out: Vec<_> = rows
                .iter()
                .filter(|a| who.sees(&a.device))
                .map(|a| a.to_json())
                .collect();
            res.render(Json(json!({ "alerts": out })));
        }
        Err(e) => e.render(res),
    }
}

/// `POST /api/alerts/{id}/ack`: an operator acknowledges a firing alert (again: no change).
#[endpoint(tags("alerts"), parameters(("id" = i64, Path, description = "the alert id")), responses((status_code = 200, body = crate::openapi::AlertAcked), (status_code = 400, description = "a bad or unknown parameter; the message starts with its name", body = crate::openapi::ErrorBody), (status_code = 401, description = "auth is on and no valid token or session came", body = crate::openapi::ErrorBody), (status_code = 403, description = "outside the token's scope, or a viewer where an operator is needed", body = crate::openapi::ErrorBody), (status_code = 404, description = "no such device, command or alert", body = crate::openapi::ErrorBody), (status_code = 409, description = "the alert is resolved", body = crate::openapi::ErrorBody), (status_code = 503, description = "storage cannot answer now", body = crate::openapi::ErrorBody)))]
pub async fn ack_alert(req: &mut Request, depot: &mut Depot, res: &mut Response) {
    use crate::store::alert::{AlertOutcome, AlertState};
    let who = principal(depot);
    let s = shared(depot).clone();
    let result = async {
        known_params(req, &[])?;
        let raw = req.param::<String>("id").unwrap_or_default();
        let id = raw.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::bad_request("bad_parameter", format!("id: {raw:?} is not an alert id"))
        })?;
        require_operator(&s, &who, "acknowledging alerts needs")?;
        let not_found =
            || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no alert {id}"));
        let alert = s.store.alert(id).await?.ok_or_else(not_found)?;
        if !who.sees(&alert.device) {
            return Err(forbidden(
                &s,
                format!("device {:?} is outside this token's scope", alert.device),
            ));
        }
        let outcome =
            crate::alerts::acknowledge(&s.store, &s.webhooks, &s.metrics, id, &who.name).await?;
        match outcome {
            AlertOutcome::Changed(a) => Ok(a),
            AlertOutcome::Unchanged(Some(a)) if a.state == AlertState::Acknowledged.as_str() => {
                Ok(a)
            }
            AlertOutcome::Unchanged(Some(_)) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "resolved",
                format!("alert {id} is already resolved"),
            )),
            AlertOutcome::Unchanged(None) => Err(not_found()),
        }
    }
    .await;
    match result {
        Ok(a) => res.render(Json(json!({ "alert": a.to_json() }))),
        Err(e) => e.render(res),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_absolute_or_relative_to_now() {
        let now = domain::now_ms();
        let hour_ago = parse_time("-1h").expect("-1h");
        assert!((now - 3_600_000 - hour_ago).abs() < 5_000, "{hour_ago}");
        let mixed = parse_time("-1h 30m").expect("-1h 30m");
        assert!((now - 5_400_000 - mixed).abs() < 5_000);
        assert!((parse_time("now").expect("now") - now).abs() < 5_000);
        assert_eq!(parse_time("-5"), Some(-5), "a negative number is Unix ms");
        assert_eq!(parse_time("1700000000000"), Some(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        for bad in ["-1x", "-h", "yesterday", "-1 fortnight"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
