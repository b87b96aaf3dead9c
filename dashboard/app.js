// telebridge dashboard: one plain ES module, no build step, no CDN.
//
// Data flow:
//   GET api/devices            -> the device list, and the highest reading seq so far (M)
//   EventSource events?last_event_id=M
//                              -> every event after M exactly once, of every kind (readings,
//                                 presence, command changes share one id sequence; the daemon
//                                 replays them from storage after a reconnect: the browser sends
//                                 Last-Event-ID, or we reopen with our own last id)
//   GET api/devices/{id}/readings?from=  -> a chart's history, merged with the live points by seq
//   GET api/devices/{id}/series?from=    -> the long ranges: buckets with min, max and average; the
//                                 newest bucket is counted in the page from readings and the feed
//   WebSocket ws               -> commands out, accepted / ack / timeout / error back
//   GET api/commands           -> the command log
//   GET api/alerts?state=open  -> the alerts panel, then `alert` events of the live feed; the
//                                 selected device's alerts (GET api/alerts?device=) on its charts
// Rendering is batched into one requestAnimationFrame; the device list redraws at most 4x/s.

const $ = (id) => document.getElementById(id);
const uPlot = globalThis.uPlot;

const LIST_EVERY_MS = 250;
const MAX_POINTS = 20000;
const MAX_METRICS = 12;
const HISTORY_PAGE = 10000;
const HISTORY_MAX_PAGES = 5;
const LOG_LIMIT = 25;
const RESULTS_KEEP = 30;
const ALERTS_LIMIT = 200;
const RESOLVED_KEEP = 3;
const DEVICE_ALERTS_LIMIT = 50;
const SEVERITY_RANK = { info: 1, warning: 2, critical: 3 };
// An alert's life only goes forward: firing, then perhaps acknowledged, then resolved.
const STATE_RANK = { firing: 1, acknowledged: 2, resolved: 3 };

const state = {
  started: false,
  viewer: false, // a viewer token may not send commands
  auth: { on: false, name: null, role: null },
  devices: new Map(), // id -> Device
  order: [], // device ids, in the list's order
  orderDirty: false,
  sortedAt: 0, // when the list was last sorted by a key that moves (last seen, problems)
  list: { q: "", show: "", sort: "name" }, // the device list's filter and sort, kept in the URL
  filterDirty: false,
  rowHeight: 0, // a drawn device row's height, for the rows not drawn yet
  tabRow: null, // the device whose row is the list's one Tab stop (roving tabindex)
  templates: new Map(), // command name -> default params, from GET api/commands/templates
  templateText: "{}", // the params a template put in the console
  paramsEdited: false, // the operator changed them since
  selected: null,
  range: { key: "live" }, // see parseRange
  units: {}, // field -> unit, from GET api/devices
  chart: null,
  lastSeq: 0, // the last reading's seq
  lastId: 0, // the last event id of any kind (readings' seq are event ids too)
  sse: { es: null, state: "connecting", opens: 0, errors: 0, timer: null, retries: 0, down: false, downAt: 0, resumedAfter: 0, shutdown: false },
  ws: { sock: null, state: "connecting", opens: 0, timer: null, retries: 0, down: false },
  results: new Map(), // ref -> entry
  resultsById: new Map(), // command id -> entry
  refCounter: 0,
  frameQueued: false,
  listRenderedAt: 0,
  listTimer: null,
  bannerTimer: null,
  logTimer: null,
  readings: 0,
  alerts: new Map(), // id -> Alert: the open ones and the few latest resolved
  alertsTruncated: false, // more open alerts than one request returns
  alertsByDevice: new Map(), // device -> { severity, firing, acked } of its open alerts
  alertRows: new Map(), // id -> the panel's row
  alertsDirty: false,
  deviceAlerts: { device: null, map: new Map() }, // the selected device's alerts, for its charts
};

// ---------------------------------------------------------------- helpers

class AuthRequired extends Error {}

async function api(path, options = {}) {
  const res = await fetch(path, {
    credentials: "same-origin",
    cache: "no-store",
    ...options,
    headers: { accept: "application/json", ...(options.headers || {}) },
  });
  if (res.status === 401) {
    requireLogin();
    throw new AuthRequired("sign-in needed");
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    const err = new Error(message);
    err.status = res.status;
    throw err;
  }
  if (res.status === 204) return null;
  return res.json();
}

const ms = (s) => (s ? Date.parse(s) : 0);
const timeFormat = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const fmtTime = (t) => (t ? timeFormat.format(t) : "–");
const intFormat = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const fmtInt = (n) => (Math.abs(n) < 1000 ? String(n) : intFormat.format(n));
const plural = (n, word) => `${fmtInt(n)} ${word}${n === 1 ? "" : "s"}`;

function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 2) return "just now";
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ago`;
  return `${Math.floor(h / 24)} d ago`;
}

function fmtValue(v) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "–";
  if (Number.isInteger(v)) return fmtInt(v);
  const a = Math.abs(v);
  return v.toFixed(a >= 100 ? 1 : a >= 1 ? 2 : 3);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/**
 * Numeric fields of a payload, nested ones by their dotted path (`gps.speed`), as the series
 * API names them; without the device's own `ts`.
 */
function numericFields(payload) {
  const out = [];
  const walk = (obj, prefix, depth) => {
    for (const [k, v] of Object.entries(obj)) {
      if (!prefix && k === "ts") continue;
      const name = prefix + k;
      if (typeof v === "number" && Number.isFinite(v)) out.push([name, v]);
      else if (v && typeof v === "object" && !Array.isArray(v) && depth < 3) walk(v, `${name}.`, depth + 1);
    }
  };
  if (payload && typeof payload === "object" && !Array.isArray(payload)) walk(payload, "", 0);
  return out;
}

function cssVar(name, fallback) {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

// ---------------------------------------------------------------- rendering loop

function schedule() {
  if (state.frameQueued) return;
  state.frameQueued = true;
  requestAnimationFrame(frame);
}

function frame() {
  state.frameQueued = false;
  const now = performance.now();
  if (now - state.listRenderedAt >= LIST_EVERY_MS) {
    state.listRenderedAt = now;
    renderDevices();
    if (!state.alertsDirty) renderAlertTimes();
  } else if (!state.listTimer) {
    state.listTimer = setTimeout(() => {
      state.listTimer = null;
      schedule();
    }, LIST_EVERY_MS - (now - state.listRenderedAt));
  }
  if (state.alertsDirty) renderAlerts();
  if (state.chart) state.chart.render();
  renderDetailHead();
}

// ---------------------------------------------------------------- connection state

function setLink(which, linkState, text) {
  const link = state[which];
  if (which === "sse" && link.state !== linkState) {
    // Presence reads "unknown" while the feed is down, and the daemon's word again after.
    for (const d of state.devices.values()) d.dirty = true;
    schedule();
  }
  link.state = linkState;
  const node = $(which === "sse" ? "sse-state" : "ws-state");
  node.dataset.state = linkState;
  setText(node.querySelector(".link-text"), text || linkState);
  updateBanner();
}

function updateBanner() {
  const b = $("banner");
  const down = [];
  if (state.sse.down) down.push("live feed");
  if (state.ws.down) down.push("commands");
  if (down.length) {
    clearTimeout(state.bannerTimer);
    state.bannerTimer = null;
    b.dataset.kind = "warn";
    const why = state.sse.shutdown ? "The daemon is restarting" : "Lost the connection to telebridge";
    const resume = state.sse.down && state.lastSeq
      ? ` Readings will resume after #${state.sse.downAt || state.lastSeq}, with nothing missed.`
      : "";
    setText(b, `${why}: reconnecting the ${down.join(" and ")} automatically…${resume}`);
    b.hidden = false;
  } else if (b.dataset.kind === "warn") {
    b.dataset.kind = "ok";
    const after = state.sse.resumedAfter;
    setText(b, after
      ? `Reconnected. The live feed resumed after reading #${after}; nothing was missed.`
      : "Reconnected.");
    b.hidden = false;
    clearTimeout(state.bannerTimer);
    state.bannerTimer = setTimeout(() => { b.hidden = true; b.dataset.kind = ""; }, 6000);
  }
}

// ---------------------------------------------------------------- devices

function ensureDevice(id) {
  let d = state.devices.get(id);
  if (!d) {
    d = { id, online: false, stale: false, statusAt: 0, firstSeen: 0, lastSeen: 0, latest: null, units: {}, row: null, dirty: true };
    state.devices.set(id, d);
    state.orderDirty = true;
  }
  return d;
}

function applyDeviceList(list) {
  for (const x of list) {
    const d = ensureDevice(x.id);
    // The daemon's word on presence as of `last_seen`; only later readings or status
    // changes override it (readings replayed after a reconnect are older).
    d.online = !!x.online;
    d.stale = !!x.stale;
    d.statusAt = Math.max(d.statusAt, ms(x.last_seen));
    d.firstSeen = ms(x.first_seen);
    d.lastSeen = Math.max(d.lastSeen, ms(x.last_seen));
    if (x.latest && (!d.latest || x.latest.seq > d.latest.seq)) d.latest = x.latest;
    if (x.units && typeof x.units === "object") d.units = { ...d.units, ...x.units };
    d.dirty = true;
  }
}

async function loadDevices() {
  const body = await api("api/devices");
  applyDeviceList(body.devices || []);
  if (body.units && typeof body.units === "object") state.units = body.units;
  if (body.publish && body.publish.topic) {
    // The first run teaches: the topic to publish to, and a line to copy.
    setText($("empty-topic"), body.publish.topic);
    $("empty-topic-box").hidden = false;
    setText($("empty-cmd"), body.publish.example || "");
    $("empty-cmd").hidden = !body.publish.example;
  }
  // The log position the list reflects: the feed starts there (readings, presence and
  // command changes alike), so a page on a fleet without readings replays nothing old.
  let max = Number(body.last_event_id) || 0;
  for (const x of body.devices || []) if (x.latest && x.latest.seq > max) max = x.latest.seq;
  schedule();
  return max;
}

const byName = (a, b) => a.localeCompare(b, "en", { numeric: true });

/** How much a device needs a look: its most severe open alert, then offline, then stale. */
function problemRank(d) {
  const a = state.alertsByDevice.get(d.id);
  return (a ? 10 * (SEVERITY_RANK[a.severity] || 0) + (a.firing ? 5 : 0) : 0) + (!d.online ? 2 : d.stale ? 1 : 0);
}

/** The device ids in the chosen order; name breaks ties, so the order is stable. */
function sortedIds() {
  const ids = [...state.devices.keys()];
  const sort = state.list.sort;
  if (sort === "seen") {
    return ids.sort((a, b) => state.devices.get(b).lastSeen - state.devices.get(a).lastSeen || byName(a, b));
  }
  if (sort === "problem") {
    const rank = new Map(ids.map((id) => [id, problemRank(state.devices.get(id))]));
    return ids.sort((a, b) => rank.get(b) - rank.get(a) || byName(a, b));
  }
  return ids.sort(byName);
}

/** Puts the rows in `state.order`, touching the DOM only when the order changed. */
function reorderRows() {
  const order = sortedIds();
  const same = order.length === state.order.length && order.every((id, i) => id === state.order[i]);
  const added = order.some((id) => !state.devices.get(id).row);
  if (same && !added) return false;
  state.order = order;
  const frag = document.createDocumentFragment();
  for (const id of order) {
    const d = state.devices.get(id);
    if (!d.row) d.row = makeRow(d);
    frag.appendChild(d.row.li);
  }
  $("device-list").replaceChildren(frag);
  return true;
}

function renderDevices() {
  // Last seen and problems move all the time: re-sort by them at most once a second.
  const moving = state.list.sort !== "name" && performance.now() - state.sortedAt > 1000;
  if (state.orderDirty || moving) {
    const added = state.orderDirty;
    state.orderDirty = false;
    state.sortedAt = performance.now();
    if (reorderRows() || added) {
      if (added) syncCommandDevices();
      state.filterDirty = true;
    }
    if (!state.selected && state.order.length) {
      const first = state.order.find((id) => state.devices.get(id).online) || state.order[0];
      select(first, { auto: true });
    }
  }
  if (state.filterDirty) applyFilter();
  let online = 0;
  let stale = 0;
  for (const id of state.order) {
    const d = state.devices.get(id);
    if (d.online) online++;
    if (d.online && d.stale) stale++;
    const r = d.row;
    // Rows out of view keep their changes until they scroll in (see `rowObserver`).
    if (!r.visible) continue;
    if (d.dirty) {
      d.dirty = false;
      const presence = presenceOf(d);
      if (state.list.show && r.li.dataset.presence !== presence) state.filterDirty = true;
      r.li.classList.toggle("online", presence === "online");
      r.li.classList.toggle("unknown", presence === "unknown");
      r.li.classList.toggle("stale", presence === "stale");
      r.li.dataset.presence = presence;
      r.dot.title = presence === "stale" ? "stale: it missed its usual readings" : presence;
      setText(r.state, presence);
      markAlerts(r, state.alertsByDevice.get(d.id));
      if (d.latest) {
        const fields = numericFields(d.latest.payload).slice(0, 3);
        setText(r.summary, fields.length
          ? fields.map(([k, v]) => `${k} ${fmtValue(v)}`).join(" · ")
          : d.latest.raw ? "raw payload" : "no numeric fields");
      }
    }
    setText(r.seen, ago(d.lastSeen));
  }
  setText($("device-count"), !state.order.length ? ""
    : state.sse.down ? `${state.order.length} devices, presence unknown while the feed is down`
      : `${online} of ${state.order.length} online${stale ? `, ${stale} stale` : ""}`);
  $("devices-empty").hidden = state.order.length > 0;
}

/** Tracks which rows are in view, so that only those are redrawn. */
let rowObserver = null;

function observeRow(row) {
  if (!rowObserver) {
    rowObserver = new IntersectionObserver((entries) => {
      for (const e of entries) {
        const d = state.devices.get(e.target.dataset.id);
        if (d && d.row) d.row.visible = e.isIntersecting;
        // Rows not drawn yet take a drawn row's height, so that none moves when drawn (a
        // click aimed at a row must not land on its neighbour).
        if (e.isIntersecting && !state.rowHeight && e.boundingClientRect.height > 0) {
          state.rowHeight = Math.round(e.boundingClientRect.height);
          $("device-list").style.setProperty("--row-h", `${state.rowHeight}px`);
        }
      }
      state.listRenderedAt = 0;
      schedule();
    }, { root: $("device-list"), rootMargin: "200px 0px" });
  }
  rowObserver.observe(row.li);
}

function makeRow(d) {
  const li = el("li", "device");
  li.setAttribute("role", "option");
  li.tabIndex = -1; // the list has one Tab stop; arrows move within it
  li.dataset.id = d.id;
  li.setAttribute("aria-selected", String(d.id === state.selected));
  const dot = el("span", "dot");
  const name = el("span", "dev-id", d.id);
  const stateText = el("span", "visually-hidden", "offline");
  const seen = el("span", "dev-seen", "");
  const summary = el("span", "dev-summary", "");
  const alert = el("span", "dev-alert");
  alert.setAttribute("role", "img");
  alert.hidden = true;
  li.append(dot, name, alert, stateText, seen, summary);
  li.addEventListener("click", () => {
    setTabRow(d.id);
    select(d.id);
  });
  const row = { li, dot, state: stateText, seen, summary, alert, alertKey: "", visible: false };
  observeRow(row);
  return row;
}

/** Whether a device passes the list's filter: its id contains the text, its presence is the one shown. */
function shown(d) {
  const q = state.list.q.toLowerCase();
  if (q && !d.id.toLowerCase().includes(q)) return false;
  const show = state.list.show;
  if (!show) return true;
  // While the feed is down presence is unknown here: filter by the last word on it.
  const p = !d.online ? "offline" : d.stale ? "stale" : "online";
  return p === show;
}

function applyFilter() {
  state.filterDirty = false;
  let visible = 0;
  for (const id of state.order) {
    const d = state.devices.get(id);
    const show = shown(d);
    if (d.row.li.hidden === show) d.row.li.hidden = !show;
    if (show) visible++;
  }
  $("devices-none").hidden = visible > 0 || !state.order.length;
  const tab = state.tabRow && state.devices.get(state.tabRow);
  if (!tab || !tab.row || tab.row.li.hidden) {
    const sel = state.selected && state.devices.get(state.selected);
    setTabRow(sel && sel.row && !sel.row.li.hidden ? sel.id : state.order.find((id) => !state.devices.get(id).row.li.hidden) || null);
  }
}

/** Makes one row the list's Tab stop. */
function setTabRow(id) {
  if (state.tabRow === id) return;
  const old = state.tabRow && state.devices.get(state.tabRow);
  if (old && old.row) old.row.li.tabIndex = -1;
  state.tabRow = id;
  const d = id && state.devices.get(id);
  if (d && d.row) d.row.li.tabIndex = 0;
}

/** Arrow keys, Home and End move through the shown rows; the selection follows the focus. */
function onListKey(e) {
  const keys = ["ArrowDown", "ArrowUp", "Home", "End", "PageDown", "PageUp", "Enter", " "];
  if (!keys.includes(e.key)) return;
  const li = e.target.closest(".device");
  if (!li) return;
  e.preventDefault();
  if (e.key === "Enter" || e.key === " ") return select(li.dataset.id);
  const rows = state.order.filter((id) => !state.devices.get(id).row.li.hidden);
  if (!rows.length) return;
  const at = rows.indexOf(li.dataset.id);
  const page = Math.max(1, Math.floor($("device-list").clientHeight / Math.max(1, li.offsetHeight)) - 1);
  const to = {
    ArrowDown: Math.min(rows.length - 1, at + 1),
    ArrowUp: Math.max(0, at - 1),
    Home: 0,
    End: rows.length - 1,
    PageDown: Math.min(rows.length - 1, at + page),
    PageUp: Math.max(0, at - page),
  }[e.key];
  const id = rows[to];
  setTabRow(id);
  state.devices.get(id).row.li.focus({ preventScroll: true });
  select(id);
  revealSelected();
}

/** The list's filter and sort from the URL (`q`, `show`, `sort`), into the controls. */
function readListParams(params) {
  const show = params.get("show") || "";
  const sort = params.get("sort") || "name";
  state.list = {
    q: params.get("q") || "",
    show: ["online", "stale", "offline"].includes(show) ? show : "",
    sort: ["name", "seen", "problem"].includes(sort) ? sort : "name",
  };
  $("device-filter").value = state.list.q;
  $("presence-filter").value = state.list.show;
  $("device-sort").value = state.list.sort;
}

function listChanged() {
  state.list = { q: $("device-filter").value.trim(), show: $("presence-filter").value, sort: $("device-sort").value };
  // At once, not on the next frame: the list answers the control it was given.
  state.sortedAt = performance.now();
  reorderRows();
  applyFilter();
  writeUrl();
  schedule();
  revealSelected();
}

/** Scrolls the device list (only the list, never the page) to the selected device. */
function revealSelected() {
  const d = state.selected && state.devices.get(state.selected);
  if (!d || !d.row || d.row.li.hidden) return;
  const list = $("device-list");
  const top = d.row.li.offsetTop - list.offsetTop;
  const bottom = top + d.row.li.offsetHeight;
  if (top < list.scrollTop) list.scrollTop = top;
  else if (bottom > list.scrollTop + list.clientHeight) list.scrollTop = bottom - list.clientHeight;
}

function select(id, { auto = false } = {}) {
  if (state.selected === id && state.chart) return;
  const old = state.selected && state.devices.get(state.selected);
  if (old && old.row) old.row.li.setAttribute("aria-selected", "false");
  state.selected = id;
  const d = state.devices.get(id);
  if (d && d.row) {
    d.row.li.setAttribute("aria-selected", "true");
    if (!d.row.li.hidden) setTabRow(id);
  }
  // A device picked for the user leaves a link's device (one not listed yet) in the URL.
  if (!auto || !urlParams().has("device")) writeUrl();
  openChart(id);
  const sel = $("cmd-device");
  if ([...sel.options].some((o) => o.value === id)) sel.value = id;
  schedule();
}

/**
 * `online`, `stale` (online, but it missed its usual readings) or `offline`; `unknown` while
 * the page's own live feed is down, since then nobody here can know.
 */
function presenceOf(d) {
  if (state.sse.down) return "unknown";
  if (!d.online) return "offline";
  return d.stale ? "stale" : "online";
}

function renderDetailHead() {
  const id = state.selected;
  if (!id) return;
  const d = state.devices.get(id);
  setText($("detail-title"), id);
  const p = $("detail-presence");
  p.hidden = !d;
  if (!d) return;
  const presence = presenceOf(d);
  setText(p, presence);
  p.dataset.online = String(d.online);
  p.dataset.presence = presence;
  p.title = presence === "stale" ? "online, but it missed its usual readings" : "";
  setText($("detail-seen"), `last seen ${ago(d.lastSeen)}`);
  const latest = d.latest;
  $("payload-box").hidden = !latest;
  if (latest && state.chart && state.chart.shownPayloadSeq !== latest.seq) {
    state.chart.shownPayloadSeq = latest.seq;
    setText($("payload"), typeof latest.payload === "string" ? latest.payload : JSON.stringify(latest.payload, null, 2));
    setText($("payload-meta"), `#${latest.seq} · ${latest.topic} · device time ${fmtTime(ms(latest.ts))} · received ${fmtTime(ms(latest.received_at))}`);
  }
}

// ---------------------------------------------------------------- time ranges

/**
 * The range picker's presets. Each ends at the device's latest time and follows the live feed;
 * `series` ones are drawn from GET api/devices/{id}/series (per field a min–max band and the
 * average), the others from raw readings.
 */
const RANGES = {
  live: { span: "5 min", sec: 300 },
  "15m": { span: "15 min", sec: 900 },
  "1h": { span: "1 h", sec: 3600 },
  "24h": { span: "24 h", sec: 86400, series: true },
  "7d": { span: "7 days", sec: 7 * 86400, series: true },
  "30d": { span: "30 days", sec: 30 * 86400, series: true },
};
/** A custom range longer than this is drawn aggregated: its raw points would be too many. */
const RAW_MAX_MS = 2 * 3600 * 1000;

/** Unix ms from an RFC 3339 time or a Unix ms number; NaN when it is neither. */
function parseTime(s) {
  return /^-?\d+$/.test(s) ? Number(s) : Date.parse(s);
}

/**
 * The range a URL fragment names: `range=24h`, or `from=..&to=..` (RFC 3339 or Unix ms; no `to`:
 * until now). Anything unreadable is the live view.
 */
function parseRange(params) {
  if (params.has("from")) {
    const from = parseTime(params.get("from"));
    const to = params.get("to") ? parseTime(params.get("to")) : null;
    if (Number.isFinite(from) && (to === null || to > from)) return { key: "custom", from, to };
  }
  const key = params.get("range");
  return { key: Object.hasOwn(RANGES, key) ? key : "live" };
}

/** The fragment's part for a range; none for the live view, so that old links stay as they were. */
function rangeParams(range) {
  if (range.key === "custom") {
    const from = `from=${new Date(range.from).toISOString()}`;
    return range.to === null ? from : `${from}&to=${new Date(range.to).toISOString()}`;
  }
  return range.key === "live" ? "" : `range=${range.key}`;
}

const urlParams = () => new URLSearchParams(location.hash.slice(1));

/** Keeps the selected device and range in the URL, so that a reload or a shared link restores them. */
function writeUrl() {
  const parts = [];
  if (state.selected) parts.push(`device=${encodeURIComponent(state.selected)}`);
  const r = rangeParams(state.range);
  if (r) parts.push(r);
  if (state.list.q) parts.push(`q=${encodeURIComponent(state.list.q)}`);
  if (state.list.show) parts.push(`show=${state.list.show}`);
  if (state.list.sort !== "name") parts.push(`sort=${state.list.sort}`);
  const hash = parts.length ? `#${parts.join("&")}` : "";
  if (location.hash !== hash) history.replaceState(null, "", hash || location.pathname + location.search);
}

function aggregated(range) {
  if (range.key !== "custom") return !!RANGES[range.key].series;
  return (range.to === null ? Date.now() : range.to) - range.from > RAW_MAX_MS;
}

const dateTimeFormat = new Intl.DateTimeFormat([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
const yearTimeFormat = new Intl.DateTimeFormat([], { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
/** A date and time to the minute; with the year when it is not this year's. */
const fmtDateTime = (t) =>
  (new Date(t).getFullYear() === new Date().getFullYear() ? dateTimeFormat : yearTimeFormat).format(t);

function rangeText(range) {
  if (range.key !== "custom") return `the last ${RANGES[range.key].span}`;
  return `${fmtDateTime(range.from)} – ${range.to === null ? "now" : fmtDateTime(range.to)}`;
}

/** "2m", "1h", "90s" as the series API writes a step, from milliseconds. */
function fmtStep(stepMs) {
  const s = stepMs / 1000;
  for (const [unit, n] of [["d", 86400], ["h", 3600], ["m", 60]]) if (s >= n && s % n === 0) return `${s / n}${unit}`;
  return `${s}s`;
}

const RESOLUTION_TEXT = { raw: "from raw readings", "1m": "from 1-minute rollups", "1h": "from 1-hour rollups" };

function setRange(range) {
  state.range = range;
  renderRangePicker();
  writeUrl();
  if (state.selected) openChart(state.selected);
}

function renderRangePicker() {
  for (const b of $("range").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", String(b.dataset.range === state.range.key));
  }
  const custom = state.range.key === "custom";
  $("range-custom").setAttribute("aria-expanded", String(!$("custom-range").hidden));
  if (custom) {
    $("range-from").value = localInput(state.range.from);
    $("range-to").value = state.range.to === null ? "" : localInput(state.range.to);
  }
}

/** A time as a datetime-local input's value (local time, to the minute). */
function localInput(t) {
  const d = new Date(t);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

function openCustom() {
  const form = $("custom-range");
  form.hidden = !form.hidden;
  if (!form.hidden && state.range.key !== "custom") {
    // Start from what is shown now.
    const { from } = state.chart ? state.chart.bounds() : { from: Date.now() - 86400000 };
    $("range-from").value = localInput(from);
    $("range-to").value = "";
  }
  $("range-error").hidden = true;
  renderRangePicker();
  if (!form.hidden) $("range-from").focus();
}

function applyCustom(ev) {
  ev.preventDefault();
  const err = $("range-error");
  // A datetime-local value has no offset: Date.parse reads it as local time.
  const from = Date.parse($("range-from").value);
  const to = $("range-to").value ? Date.parse($("range-to").value) : null;
  let problem = null;
  if (!Number.isFinite(from)) problem = "Pick the start of the range.";
  else if (to !== null && !(to > from)) problem = "The end of the range must be after its start.";
  else if (from > Date.now()) problem = "The start of the range is in the future.";
  if (problem) {
    setText(err, problem);
    err.hidden = false;
    return;
  }
  err.hidden = true;
  setRange({ key: "custom", from, to });
}

// ---------------------------------------------------------------- charts

function setStatus(text, kind = "") {
  const s = $("detail-status");
  setText(s, text);
  s.dataset.kind = kind;
}

function openChart(id) {
  if (state.chart) state.chart.destroy();
  state.chart = aggregated(state.range) ? new SeriesChart(id, state.range) : new RawChart(id, state.range);
  $("chart-csv").hidden = false;
  state.chart.loadHistory();
  loadDeviceAlerts(id);
  schedule();
}

/** What the charts of one device share: one card and one uPlot per numeric field, resizing, the readout. */
class Chart {
  constructor(device, range, mode) {
    this.device = device;
    this.range = range;
    this.mode = mode;
    this.plots = new Map(); // metric -> { plot, card, name, value, at }
    this.units = {};
    this.historyLoaded = false;
    this.historyFailed = false;
    this.error = null;
    this.dirty = true;
    this.destroyed = false;
    this.shownPayloadSeq = -1;
    this.generation = 0;
    this.container = $("charts");
    this.container.replaceChildren();
    this.container.dataset.mode = mode;
    this.container.dataset.points = "0";
    this.resizer = new ResizeObserver(() => { this.resized = true; schedule(); });
    this.resizer.observe(this.container);
    setStatus("Loading history…");
  }

  destroy() {
    this.destroyed = true;
    this.resizer.disconnect();
    for (const p of this.plots.values()) p.plot.destroy();
    this.plots.clear();
    this.container.replaceChildren();
  }

  stale(gen) {
    return this.destroyed || gen !== this.generation;
  }

  /**
   * The range in Unix ms; `to` null while it follows the live feed. A preset ends at the
   * device's latest time, so a device with a skewed clock still shows.
   */
  bounds() {
    const r = this.range;
    if (r.key === "custom") return { from: r.from, to: r.to };
    const d = state.devices.get(this.device);
    const end = d && d.latest ? ms(d.latest.ts) : Date.now();
    return { from: Math.min(end, Date.now()) - RANGES[r.key].sec * 1000, to: null };
  }

  /** Whether live readings still extend the range. */
  following() {
    return this.range.key !== "custom" || this.range.to === null || this.range.to > Date.now();
  }

  /**
   * Stored readings from `from` (device time) on, oldest first, paged by seq; null when the
   * chart went away meanwhile. `complete` is false when there were more than the pages hold.
   */
  async readings(from, to, gen) {
    let after = 0;
    const rows = [];
    for (let page = 0; page < HISTORY_MAX_PAGES; page++) {
      const q = new URLSearchParams({ from: String(from), limit: String(HISTORY_PAGE) });
      if (to !== null) q.set("to", String(to));
      if (after) q.set("after", String(after));
      const body = await api(`api/devices/${encodeURIComponent(this.device)}/readings?${q}`);
      if (this.stale(gen)) return null;
      rows.push(...body.readings);
      if (body.next_after == null) return { rows, complete: true };
      after = body.next_after;
    }
    return { rows, complete: false };
  }

  /** The series answer's unit, else the device's (payload `units`, device glob), else the fleet's. */
  unit(name) {
    const d = state.devices.get(this.device);
    return this.units[name] || (d && d.units[name]) || state.units[name] || "";
  }

  withUnit(text, name) {
    const u = this.unit(name);
    return u && text !== "–" ? `${text} ${u}` : text;
  }

  render() {
    if (this.destroyed) return;
    if (this.resized) {
      this.resized = false;
      for (const p of this.plots.values()) p.plot.setSize(this.size(p.card));
    }
    if (!this.dirty) return;
    this.dirty = false;
    this.draw();
    for (const name of this.plots.keys()) this.readout(name);
  }

  /** The card's header: the hovered point (uPlot's cursor, synced over the cards), else the latest. */
  readout(name) {
    const p = this.plots.get(name);
    if (!p) return;
    const u = this.unit(name);
    setText(p.name, u ? `${name} (${u})` : name);
    const idx = p.plot.cursor.idx;
    const [value, at] = idx == null ? this.latestText(name) : this.pointText(name, idx);
    setText(p.value, value);
    setText(p.at, at);
    p.card.dataset.hover = String(idx != null);
    this.tooltip(p, idx, value, at);
  }

  /** A tooltip by the hovered point: its value with the unit, and its time. */
  tooltip(p, idx, value, at) {
    const tip = p.tip;
    const plot = p.plot;
    const x = idx == null ? null : plot.data[0][idx];
    if (x == null || value === "–" || plot.cursor.left == null || plot.cursor.left < 0) {
      tip.hidden = true;
      return;
    }
    setText(tip.firstChild, value);
    setText(tip.lastChild, at);
    tip.hidden = false;
    const over = plot.over.getBoundingClientRect();
    const box = p.body.getBoundingClientRect();
    const left = over.left - box.left + plot.valToPos(x, "x");
    const top = over.top - box.top + Math.max(0, plot.cursor.top || 0);
    // On the side of the point with more room, so it never leaves the card.
    const right = left > over.left - box.left + over.width / 2;
    tip.style.left = right ? "" : `${left + 10}px`;
    tip.style.right = right ? `${p.body.clientWidth - left + 10}px` : "";
    tip.style.top = `${Math.min(top, p.body.clientHeight - 40)}px`;
  }

  size(card) {
    const w = Math.max(200, Math.floor(card.clientWidth - 2));
    return { width: w, height: 130 };
  }

  /** A card with a uPlot of `series` (after x) and `bands`, kept in order by name. */
  addPlot(name, data, series, bands) {
    const card = el("figure", "chart");
    card.dataset.metric = name;
    const head = el("figcaption", "chart-head");
    const nameNode = el("span", "chart-name", name);
    const value = el("span", "chart-value", "–");
    const at = el("span", "chart-at muted", "");
    head.append(nameNode, value, at);
    const body = el("div", "chart-body");
    // A canvas says nothing to a screen reader: the chart is an image labelled with its summary.
    body.setAttribute("role", "img");
    const tip = el("div", "chart-tip");
    tip.append(el("strong", "tip-value"), el("span", "tip-at"));
    tip.hidden = true;
    tip.setAttribute("aria-hidden", "true");
    const summary = el("p", "chart-summary muted", "");
    card.append(head, body, summary);
    const after = [...this.container.children].find((c) => c.dataset.metric > name);
    this.container.insertBefore(card, after || null);
    const axis = cssVar("--muted", "#6b7280");
    const grid = cssVar("--grid", "#e5e7eb");
    const font = "11px system-ui, sans-serif";
    // Breaks where the data has an outage, and points where a reading stands alone.
    const gaps = (u, _si, _i0, _i1, nullGaps) => this.gapsOf(u, nullGaps);
    const lone = (u, si) => this.lonePoints(u, si);
    for (const s of series) {
      s.gaps = gaps;
      s.points = { ...(s.points || {}), show: false, size: 6, filter: lone };
    }
    const opts = {
      ...this.size(card),
      // Room on the right for the last time label, which centres on its tick.
      padding: [8, 28, 0, 0],
      legend: { show: false },
      cursor: { drag: { x: false, y: false }, points: { size: 5 }, sync: { key: "telebridge" } },
      // uPlot's own y range, widened to the thresholds of the alerts drawn on it.
      scales: {
        // A single reading (or readings at one time) gets a minute around it, not an empty axis.
        // (uPlot widens one point to a day before asking, so the data decides.)
        x: { time: true, range: (u, min, max) => Chart.xRange(u.data[0], min, max) },
        y: { range: (u, min, max) => this.yRange(u, name, min, max) },
      },
      axes: [
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1, size: 4 }, font, size: 26, values: timeTicks },
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { show: false }, font, size: 48, gap: 4 },
      ],
      series: [{}, ...series],
      bands,
      hooks: {
        setCursor: [() => this.readout(name)],
        // Alert bands under the series, their thresholds over them.
        drawClear: [(u) => this.drawAlerts(u, name, card, "bands")],
        draw: [(u) => this.drawAlerts(u, name, card, "lines")],
      },
    };
    const plot = new uPlot(opts, data, body);
    body.append(tip);
    card.dataset.series = series.map((s) => s.label).join(",");
    card.dataset.bands = String(bands.length);
    const p = { plot, card, body, tip, summary, name: nameNode, value, at, breaks: [] };
    this.plots.set(name, p);
    return p;
  }

  /**
   * Indices i where the line breaks between point i-1 and i: the time between them is well
   * above the usual (over 3× the median interval, and over `minGap` s).
   */
  static breaksOf(xs, minGap = 0) {
    const n = xs.length;
    if (n < 3) return [];
    const d = [];
    for (let i = 1; i < n; i++) if (xs[i] > xs[i - 1]) d.push(xs[i] - xs[i - 1]);
    if (!d.length) return [];
    d.sort((a, b) => a - b);
    const limit = Math.max(3 * d[d.length >> 1], minGap);
    const out = [];
    for (let i = 1; i < n; i++) if (xs[i] - xs[i - 1] > limit) out.push(i);
    return out;
  }

  /** The x range: the data's, or a minute around it when it has one time only. */
  static xRange(xs, min, max) {
    if (!xs || !xs.length) return [min, max];
    const first = xs[0];
    const last = xs[xs.length - 1];
    return first === last ? [first - 30, last + 30] : [min, max];
  }

  /** uPlot's gaps (canvas px, sorted, apart) for the nulls it found plus the plot's breaks. */
  gapsOf(u, nullGaps) {
    const p = this.plotOf(u);
    const xs = u.data[0];
    const all = (nullGaps || []).slice();
    if (p) {
      for (const i of p.breaks) {
        const a = Math.round(u.valToPos(xs[i - 1], "x", true));
        const b = Math.round(u.valToPos(xs[i], "x", true));
        if (b > a) all.push([a, b]);
      }
    }
    all.sort((x, y) => x[0] - y[0]);
    const merged = [];
    for (const g of all) {
      const last = merged[merged.length - 1];
      if (last && g[0] <= last[1]) last[1] = Math.max(last[1], g[1]);
      else merged.push([g[0], g[1]]);
    }
    return merged;
  }

  /** The points of series `si` with no line to either side (a null or a break): drawn as dots. */
  lonePoints(u, si) {
    const p = this.plotOf(u);
    const col = u.data[si];
    const n = col.length;
    const broken = new Set(p ? p.breaks : []);
    const out = [];
    for (let i = 0; i < n; i++) {
      if (col[i] == null) continue;
      const leftOpen = i === 0 || col[i - 1] == null || broken.has(i);
      const rightOpen = i === n - 1 || col[i + 1] == null || broken.has(i + 1);
      if (leftOpen && rightOpen) out.push(i);
    }
    return out.length ? out : null;
  }

  plotOf(u) {
    for (const p of this.plots.values()) if (p.plot === u) return p;
    return null;
  }

  /** Sets a card's data and its breaks; the text summary (min, max, latest) follows. */
  setPlotData(p, data, minGap) {
    p.breaks = Chart.breaksOf(data[0], minGap);
    p.card.dataset.gaps = String(p.breaks.length);
    p.plot.setData(data);
  }

  /** The card's text summary and the chart's label: min and max in the range, and the latest. */
  summarize(name, lo, hi, count) {
    const p = this.plots.get(name);
    if (!p) return;
    let min = Infinity;
    let max = -Infinity;
    for (const v of lo) if (v != null && v < min) min = v;
    for (const v of hi) if (v != null && v > max) max = v;
    const [latest, at] = this.latestText(name);
    const text = Number.isFinite(min)
      ? `min ${this.withUnit(fmtValue(min), name)} · max ${this.withUnit(fmtValue(max), name)} · latest ${latest}${at ? ` (${at})` : ""} · ${count}`
      : "no values in this range";
    setText(p.summary, text);
    p.summary.dataset.min = Number.isFinite(min) ? String(min) : "";
    p.summary.dataset.max = Number.isFinite(max) ? String(max) : "";
    const u = this.unit(name);
    const label = `${u ? `${name} (${u})` : name} over ${rangeText(this.range)}: ${text}`;
    if (p.body.getAttribute("aria-label") !== label) p.body.setAttribute("aria-label", label);
  }

  /** The alerts to draw on the chart of `name`: its field's with a threshold, open or overlapping `from`–`to` (s). */
  overlays(name, from, to) {
    const out = [];
    if (state.deviceAlerts.device !== this.device) return out;
    const now = Date.now();
    for (const a of state.deviceAlerts.map.values()) {
      if (a.field !== name || typeof a.threshold !== "number" || !Number.isFinite(a.threshold)) continue;
      const end = (a.resolvedAt || now) / 1000;
      if (isOpen(a) || (from != null && end >= from && a.firedAt / 1000 <= to)) out.push(a);
    }
    return out;
  }

  yRange(u, name, min, max) {
    const xs = u.data[0];
    const ths = xs && xs.length ? this.overlays(name, xs[0], xs[xs.length - 1]).map((a) => a.threshold) : [];
    if (ths.length) {
      min = Math.min(min ?? Infinity, ...ths);
      max = Math.max(max ?? -Infinity, ...ths);
    }
    return min == null ? [null, null] : uPlot.rangeNum(min, max, 0.1, true);
  }

  /**
   * uPlot's hooks: each alert's firing span (to now while open) as a band in the severity's color
   * (`layer` "bands", before the series), its threshold as a dashed line ("lines", after them),
   * in canvas pixels of the current scales.
   */
  drawAlerts(u, name, card, layer) {
    const { min: xMin, max: xMax } = u.scales.x;
    const list = this.overlays(name, xMin, xMax);
    const thresholds = new Map(); // threshold -> the most severe alert at it
    let bands = 0;
    const bandsLayer = layer === "bands";
    if (list.length && xMin != null && xMax != null) {
      const ctx = u.ctx;
      const { left, top, width, height } = u.bbox;
      const dpr = globalThis.devicePixelRatio || 1;
      const now = Date.now();
      ctx.save();
      ctx.beginPath();
      ctx.rect(left, top, width, height);
      ctx.clip();
      for (const a of list) {
        const from = a.firedAt / 1000;
        const to = (a.resolvedAt || now) / 1000;
        const shown = thresholds.get(a.threshold);
        if (!shown || SEVERITY_RANK[a.severity] > SEVERITY_RANK[shown.severity]) thresholds.set(a.threshold, a);
        if (!bandsLayer || to < xMin || from > xMax) continue;
        const x0 = Math.max(left, u.valToPos(from, "x", true));
        const x1 = Math.min(left + width, u.valToPos(to, "x", true));
        ctx.globalAlpha = isOpen(a) ? 0.18 : 0.1;
        ctx.fillStyle = severityColor(a.severity);
        ctx.fillRect(x0, top, Math.max(x1 - x0, 2 * dpr), height);
        bands++;
      }
      if (bandsLayer) thresholds.clear();
      ctx.globalAlpha = 0.95;
      ctx.lineWidth = 1.5 * dpr;
      ctx.setLineDash([6 * dpr, 4 * dpr]);
      ctx.font = `${Math.round(10 * dpr)}px system-ui, sans-serif`;
      ctx.textAlign = "left";
      ctx.textBaseline = "bottom";
      for (const [th, a] of thresholds) {
        const y = Math.round(u.valToPos(th, "y", true)) + 0.5;
        const color = severityColor(a.severity);
        ctx.strokeStyle = color;
        ctx.beginPath();
        ctx.moveTo(left, y);
        ctx.lineTo(left + width, y);
        ctx.stroke();
        ctx.fillStyle = color;
        // Above the line, or below it when it runs along the top.
        const ly = y - top < 13 * dpr ? y + 12 * dpr : y - 2 * dpr;
        ctx.fillText(`${a.rule} · ${fmtValue(th)}`, left + 4 * dpr, ly);
      }
      ctx.restore();
    }
    if (bandsLayer) {
      if (card.dataset.alertBands !== String(bands)) card.dataset.alertBands = String(bands);
      return;
    }
    const th = [...thresholds.keys()].sort((x, y) => x - y).join(",");
    if (th) {
      if (card.dataset.threshold !== th) card.dataset.threshold = th;
    } else if ("threshold" in card.dataset) delete card.dataset.threshold;
  }

  /** The device's alerts changed: redraw (and rescale) the charts. */
  alertsChanged() {
    if (state.deviceAlerts.device === this.device) this.dirty = true;
  }

  /** Whether a band grows with the clock (an open alert on a chart). */
  hasOpenBand() {
    if (state.deviceAlerts.device !== this.device) return false;
    for (const a of state.deviceAlerts.map.values()) {
      if (isOpen(a) && typeof a.threshold === "number" && this.plots.has(a.field)) return true;
    }
    return false;
  }

  color() {
    const palette = ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"];
    return cssVar(palette[this.plots.size % palette.length], "#2563eb");
  }
}

/** Raw points for the short ranges: columnar data sorted by seq. */
class RawChart extends Chart {
  constructor(device, range) {
    super(device, range, "raw");
    this.seqs = [];
    this.xs = []; // seconds (device time)
    this.cols = new Map(); // metric -> values aligned with xs
  }

  /** History for the range, oldest first, paged; merged with whatever arrived live meanwhile. */
  async loadHistory() {
    const gen = ++this.generation;
    const { from, to } = this.bounds();
    let got;
    try {
      got = await this.readings(from, to, gen);
    } catch (e) {
      if (this.stale(gen) || e instanceof AuthRequired) return;
      this.historyFailed = e.status !== 404;
      if (e.status === 404) {
        setStatus("No readings stored for this device yet.");
      } else {
        setStatus(`Could not load history: ${e.message}. Live points still arrive.`, "error");
      }
      this.historyLoaded = true;
      return;
    }
    if (!got) return;
    this.merge(got.rows.filter((r) => this.accepts(ms(r.ts))));
    this.historyLoaded = true;
    this.historyFailed = false;
    this.dirty = true;
    schedule();
  }

  /** The range's readings as CSV (one page: a raw range is at most 2 h). */
  csvHref() {
    const { from, to } = this.bounds();
    const q = new URLSearchParams({ from: String(from), limit: String(HISTORY_PAGE), format: "csv" });
    if (to !== null) q.set("to", String(to));
    return `api/devices/${encodeURIComponent(this.device)}/readings?${q}`;
  }

  /** A custom range takes only the readings inside it; a preset trims by time instead. */
  accepts(t) {
    const r = this.range;
    return r.key !== "custom" || (t >= r.from && (r.to === null || t <= r.to));
  }

  /** Adds rows (any order, possibly already present) keeping seq order without duplicates. */
  merge(rows) {
    if (!rows.length) return;
    const points = new Map(); // seq -> [x, [[metric, value], ...]]
    for (let i = 0; i < this.seqs.length; i++) {
      const vals = [];
      for (const [k, col] of this.cols) if (col[i] != null) vals.push([k, col[i]]);
      points.set(this.seqs[i], [this.xs[i], vals]);
    }
    for (const r of rows) {
      if (!points.has(r.seq)) points.set(r.seq, [ms(r.ts) / 1000, numericFields(r.payload)]);
    }
    const seqs = [...points.keys()].sort((a, b) => a - b);
    const names = [...this.cols.keys()];
    this.seqs = [];
    this.xs = [];
    this.cols = new Map(names.map((k) => [k, []]));
    for (const seq of seqs) {
      const [x, vals] = points.get(seq);
      this.pushPoint(seq, x, vals);
    }
  }

  pushPoint(seq, x, fields) {
    const n = this.xs.length;
    this.seqs.push(seq);
    this.xs.push(x);
    for (const [k, v] of fields) {
      let col = this.cols.get(k);
      if (!col) {
        if (this.cols.size >= MAX_METRICS) continue;
        col = new Array(n).fill(null);
        this.cols.set(k, col);
      }
      col.push(v);
    }
    for (const col of this.cols.values()) if (col.length === n) col.push(null);
  }

  /** A live reading of this device. */
  live(r) {
    if (!this.accepts(ms(r.ts))) return;
    const last = this.seqs.length ? this.seqs[this.seqs.length - 1] : 0;
    if (r.seq > last) this.pushPoint(r.seq, ms(r.ts) / 1000, numericFields(r.payload));
    else this.merge([r]);
    if (this.xs.length > MAX_POINTS * 1.25) this.trim();
    this.dirty = true;
  }

  trim() {
    const n = this.xs.length;
    if (!n) return;
    let cut = 0;
    if (this.range.key !== "custom") {
      const oldest = this.xs[n - 1] - RANGES[this.range.key].sec;
      while (cut < n && this.xs[cut] < oldest) cut++;
    }
    cut = Math.max(cut, n - MAX_POINTS);
    if (cut <= 0) return;
    this.seqs.splice(0, cut);
    this.xs.splice(0, cut);
    for (const col of this.cols.values()) col.splice(0, cut);
  }

  draw() {
    this.trim();
    for (const [name, col] of this.cols) {
      const p = this.plots.get(name) || this.addRawPlot(name);
      this.setPlotData(p, [this.xs, col], 0);
      this.summarize(name, col, col, plural(col.reduce((k, v) => k + (v == null ? 0 : 1), 0), "reading"));
    }
    const n = this.seqs.length;
    if (this.historyLoaded && !this.historyFailed) {
      const live = this.following() ? " · live" : "";
      let text = n
        ? `${plural(n, "reading")} in ${rangeText(this.range)}${live}`
        : `No readings in ${rangeText(this.range)}${this.following() ? "; waiting for live data…" : "."}`;
      if (n && !this.cols.size) text += " · no numeric fields to chart (see the payload below)";
      setStatus(text);
    }
    this.container.dataset.points = String(n);
  }

  addRawPlot(name) {
    const color = this.color();
    return this.addPlot(name, [this.xs, this.cols.get(name)], [
      { label: name, stroke: color, width: 1.5, fill: color + "22", fillTo: (u) => u.scales.y.min, points: { show: false } },
    ], []);
  }

  latestText(name) {
    const col = this.cols.get(name);
    for (let i = col.length - 1; i >= 0 && i >= col.length - 50; i--) {
      if (col[i] != null) return [this.withUnit(fmtValue(col[i]), name), fmtTime(this.xs[i] * 1000)];
    }
    return ["–", ""];
  }

  pointText(name, idx) {
    const v = this.cols.get(name)[idx];
    const x = this.xs[idx];
    return [this.withUnit(fmtValue(v), name), x == null ? "" : this.pointTime(x * 1000)];
  }

  /** A point's time: with the date when the range spans more than today. */
  pointTime(t) {
    const first = this.xs.length ? this.xs[0] * 1000 : t;
    return new Date(first).toDateString() === new Date(t).toDateString() && new Date(t).toDateString() === new Date().toDateString()
      ? fmtTime(t)
      : `${fmtDateTime(t)}:${String(new Date(t).getSeconds()).padStart(2, "0")}`;
  }
}

/**
 * The long ranges: per numeric field a min–max band and the average line, one point per
 * bucket of GET api/devices/{id}/series. The newest bucket and those after it are counted here
 * from raw readings and the live feed instead; raw readings carry seqs, so a reading that both
 * bring is counted once.
 */
class SeriesChart extends Chart {
  constructor(device, range) {
    super(device, range, "series");
    this.step = 0; // ms
    this.resolution = null;
    this.fields = []; // metric names, at most MAX_METRICS
    this.request = null; // the series request drawn, relative to the page
    this.answered = 0; // points in its answer
    // By start time; per metric {avg, min, max} from the daemon, or {sum, n, min, max} counted here.
    this.buckets = [];
    this.cut = Infinity; // readings from here on (device time) are counted here
    this.seen = new Set(); // seqs of the stored readings counted here
    this.seenUpTo = 0; // live readings above this seq are new (the feed gives each seq once)
    this.pending = null; // live readings that arrived while loading
    this.counted = 0;
    this.lastSeq = 0;
    this.newest = -Infinity; // device time of the newest reading counted here
    this.latest = new Map(); // metric -> [value, device time] of the newest reading
  }

  async loadHistory() {
    const gen = ++this.generation;
    this.pending = [];
    const { from, to } = this.bounds();
    // Under a minute the API counts raw readings, at most 200,000 a request; a minute, which its
    // rollups answer, is fine enough for a range of a few hours, and auto is a minute or more
    // beyond 1,000 minutes.
    const span = (to === null ? Date.now() : to) - from;
    const q = new URLSearchParams({ from: String(from), step: span <= 1000 * 60000 ? "1m" : "auto", agg: "avg,min,max" });
    if (to !== null) q.set("to", String(to));
    const request = `api/devices/${encodeURIComponent(this.device)}/series?${q}`;
    this.request = request;
    let body;
    let tail;
    try {
      body = await api(request);
      if (this.stale(gen)) return;
      const points = body.points || [];
      const step = Number(body.step_ms);
      if (!(step > 0)) throw new Error(`the series answer has no step_ms (${JSON.stringify(body.step_ms)})`);
      const last = points.length ? ms(points[points.length - 1].t) : Math.floor(from / step) * step;
      // To the end of the last bucket, not `to`: buckets are whole, as the daemon's are.
      tail = await this.readings(last, to === null ? null : last + step - 1, gen);
      if (!tail) return;
      this.step = step;
      this.cut = last;
      let server = points.length ? points.slice(0, -1) : points;
      if (!tail.complete) {
        // Too many raw readings to count the newest bucket here: keep the daemon's, and count
        // only the buckets after it (live readings late into it are left out).
        server = points;
        this.cut = points.length ? last + step : last;
      }
      this.answered = points.length;
      this.resolution = body.resolution || null;
      this.units = body.units || {};
      this.fields = (body.fields || []).slice(0, MAX_METRICS);
      this.buckets = server.map((p) => {
        const f = new Map();
        for (const [k, v] of Object.entries(p)) if (k !== "t" && v && typeof v === "object") f.set(k, { avg: v.avg, min: v.min, max: v.max });
        return { t: ms(p.t), f };
      });
    } catch (e) {
      if (this.stale(gen) || e instanceof AuthRequired) return;
      this.pending = null;
      this.historyLoaded = true;
      this.historyFailed = e.status !== 404;
      if (e.status === 404) {
        setStatus("No readings stored for this device yet.");
      } else {
        this.error = `Could not load the series for ${rangeText(this.range)}: ${e.message}`;
        setStatus(this.error, "error");
      }
      return;
    }
    for (const r of tail.rows) {
      this.add(r);
      this.seen.add(r.seq);
      if (r.seq > this.seenUpTo) this.seenUpTo = r.seq;
    }
    for (const r of this.pending) this.live(r);
    this.pending = null;
    this.error = null;
    this.historyLoaded = true;
    this.historyFailed = false;
    this.dirty = true;
    schedule();
  }

  /** The buckets drawn, as CSV: the same request (its bounds as of now), all aggregates. */
  csvHref() {
    const { from, to } = this.bounds();
    const q = new URLSearchParams({ from: String(from), step: this.step ? fmtStep(this.step) : "auto", agg: "avg,min,max,first,last,count", format: "csv" });
    if (to !== null) q.set("to", String(to));
    return `api/devices/${encodeURIComponent(this.device)}/series?${q}`;
  }

  live(r) {
    if (this.pending) {
      this.pending.push(r);
      if (this.pending.length > MAX_POINTS) this.pending.shift();
      return;
    }
    if (!this.step || (r.seq <= this.seenUpTo && this.seen.has(r.seq))) return;
    if (this.add(r)) this.dirty = true;
  }

  /** Counts one reading into its bucket; false when it is not this chart's to count. */
  add(r) {
    const t = ms(r.ts);
    const start = Math.floor(t / this.step) * this.step;
    // Before the cut the daemon's buckets hold it already, unless it came in late.
    if (t < this.cut) return false;
    if (this.range.key === "custom" && this.range.to !== null && start > this.range.to) return false;
    const fields = numericFields(r.payload);
    this.counted++;
    if (r.seq > this.lastSeq) {
      this.lastSeq = r.seq;
      for (const [k, v] of fields) this.latest.set(k, [v, t]);
    }
    if (t > this.newest) this.newest = t;
    if (!fields.length) return false;
    let i = this.buckets.length;
    while (i > 0 && this.buckets[i - 1].t > start) i--;
    let b = this.buckets[i - 1];
    if (!b || b.t !== start) {
      b = { t: start, f: new Map() };
      this.buckets.splice(i, 0, b);
    }
    for (const [k, v] of fields) {
      if (!this.fields.includes(k)) {
        if (this.fields.length >= MAX_METRICS) continue;
        this.fields.push(k);
      }
      const a = b.f.get(k);
      if (!a) b.f.set(k, { sum: v, n: 1, min: v, max: v });
      else {
        a.sum += v;
        a.n++;
        a.min = Math.min(a.min, v);
        a.max = Math.max(a.max, v);
      }
    }
    return true;
  }

  /** A preset drops the buckets that fell out of it, keeping one bucket to spare at its start. */
  trim() {
    if (this.range.key === "custom" || !this.buckets.length) return;
    const edge = this.newest - RANGES[this.range.key].sec * 1000 - this.step;
    let cut = 0;
    while (cut < this.buckets.length && this.buckets[cut].t + this.step <= edge) cut++;
    if (cut) this.buckets.splice(0, cut);
  }

  draw() {
    if (!this.historyLoaded || this.error) return;
    this.trim();
    const xs = this.buckets.map((b) => b.t / 1000);
    for (const name of this.fields) {
      const lo = [];
      const hi = [];
      const avg = [];
      let any = false;
      for (const b of this.buckets) {
        const a = b.f.get(name);
        if (a) any = true;
        lo.push(a ? a.min : null);
        hi.push(a ? a.max : null);
        avg.push(a ? avgOf(a) : null);
      }
      let p = this.plots.get(name);
      if (!p && !any) continue;
      const data = [xs, lo, hi, avg];
      if (!p) p = this.addSeriesPlot(name, data);
      // A missing bucket is a break only when it is well past the device's usual spacing.
      this.setPlotData(p, data, 1.5 * this.step / 1000);
      p.data = data;
      this.summarize(name, lo, hi, plural(avg.reduce((k, v) => k + (v == null ? 0 : 1), 0), "bucket"));
    }
    const n = xs.length;
    const from = RESOLUTION_TEXT[this.resolution] ? ` ${RESOLUTION_TEXT[this.resolution]}` : "";
    const live = this.following() ? " · live" : "";
    setStatus(n
      ? `${fmtInt(n)} buckets of ${fmtStep(this.step)}${from}: min–max band and average, ${rangeText(this.range)}${live}`
      : `No numeric readings in ${rangeText(this.range)}${this.following() ? "; waiting for live data…" : "."}`);
    this.container.dataset.points = String(n);
    this.container.dataset.step = String(this.step);
  }

  addSeriesPlot(name, data) {
    const color = this.color();
    const edge = { stroke: color + "66", width: 1, points: { show: false } };
    return this.addPlot(name, data, [
      { label: "min", ...edge },
      { label: "max", ...edge },
      { label: "avg", stroke: color, width: 1.5 },
    ], [{ series: [2, 1], fill: color + "2e" }]);
  }

  latestText(name) {
    const l = this.latest.get(name);
    if (l) return [this.withUnit(fmtValue(l[0]), name), `latest · ${fmtTime(l[1])}`];
    for (let i = this.buckets.length - 1; i >= 0; i--) {
      const a = this.buckets[i].f.get(name);
      if (a) return [this.withUnit(fmtValue(avgOf(a)), name), `avg · ${fmtDateTime(this.buckets[i].t)}`];
    }
    return ["–", ""];
  }

  pointText(name, idx) {
    const b = this.buckets[idx];
    const a = b && b.f.get(name);
    if (!a) return ["–", b ? fmtDateTime(b.t) : ""];
    const band = a.min === a.max ? "" : ` · ${fmtValue(a.min)}–${fmtValue(a.max)}`;
    return [this.withUnit(fmtValue(avgOf(a)), name), `avg${band} · ${fmtDateTime(b.t)}, ${fmtStep(this.step)}`];
  }

  /** The buckets as the series API writes them, for tests and the console. */
  points() {
    return this.buckets.map((b) => {
      const p = { t: new Date(b.t).toISOString() };
      for (const [k, a] of b.f) p[k] = { avg: avgOf(a), min: a.min, max: a.max };
      return p;
    });
  }
}

const avgOf = (a) => (a.n ? a.sum / a.n : a.avg);

/** One-line time labels: seconds when the ticks are less than a minute apart. */
const tickFormats = {
  day: new Intl.DateTimeFormat([], { month: "short", day: "numeric" }),
  minute: new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" }),
  second: new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" }),
};

function timeTicks(u, splits, _axis, _space, incr) {
  const f = incr >= 86400 ? tickFormats.day : incr >= 60 ? tickFormats.minute : tickFormats.second;
  return splits.map((s) => f.format(s * 1000));
}

// ---------------------------------------------------------------- live feed (SSE)

function connectSse() {
  clearTimeout(state.sse.timer);
  state.sse.timer = null;
  if (state.sse.es) state.sse.es.close();
  const from = Math.max(state.lastId, state.lastSeq);
  const q = new URLSearchParams({ type: "reading,status,command,alert", last_event_id: String(from) });
  const es = new EventSource(`events?${q}`);
  state.sse.es = es;
  es.onopen = () => {
    if (es !== state.sse.es) return;
    const wasDown = state.sse.down;
    state.sse.opens++;
    state.sse.retries = 0;
    state.sse.shutdown = false;
    if (wasDown) {
      state.sse.resumedAfter = state.sse.downAt;
      state.sse.down = false;
      // Every kind resumes from the log: only a chart whose history failed needs a retry.
      if (state.chart && state.chart.historyFailed) state.chart.loadHistory();
      // Alert events resume from the log too; the lists are re-read in case they went too far back.
      loadAlerts();
      if (state.selected) loadDeviceAlerts(state.selected);
    }
    setLink("sse", "connected", "live");
    if (state.ws.timer) connectWs(); // the daemon is back: do not wait for the backoff
  };
  es.onerror = () => {
    if (es !== state.sse.es) return;
    state.sse.errors++;
    if (!state.sse.down) {
      state.sse.down = true;
      state.sse.downAt = state.lastSeq;
    }
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (an HTTP error such as 401 or 503): retry ourselves, resuming
      // from the last seq we have.
      es.close();
      const delay = Math.min(1000 * 2 ** state.sse.retries, 5000);
      state.sse.retries++;
      setLink("sse", "reconnecting", "reconnecting");
      state.sse.timer = setTimeout(async () => {
        if (state.auth.on && !(await sessionValid())) return;
        connectSse();
      }, delay);
    } else {
      setLink("sse", "reconnecting", "reconnecting");
    }
  };
  es.addEventListener("reading", onReading);
  es.addEventListener("status", onStatus);
  es.addEventListener("command", onCommandEvent);
  es.addEventListener("alert", onAlertEvent);
  es.addEventListener("gap", onGap);
  es.addEventListener("shutdown", () => {
    state.sse.shutdown = true;
    if (!state.sse.down) {
      state.sse.down = true;
      state.sse.downAt = state.lastSeq;
    }
    setLink("sse", "reconnecting", "daemon restarting");
  });
}

function onReading(e) {
  if (!fresh(e)) return;
  let r;
  try {
    r = JSON.parse(e.data);
  } catch (_) {
    return;
  }
  if (!(r.seq > state.lastSeq)) return; // already seen (the feed is in seq order)
  state.lastSeq = r.seq;
  state.readings++;
  const d = ensureDevice(r.device);
  const received = ms(r.received_at);
  // A device that sends telemetry is online, unless a later presence change says otherwise.
  if (received > d.statusAt) {
    d.online = true;
    d.stale = false; // it just sent: fresh (the daemon's own event follows)
  }
  if (received > d.lastSeen) d.lastSeen = received;
  if (!d.latest || r.seq > d.latest.seq) d.latest = r;
  // A reading may name its units (see README, Units); the newest word wins.
  const u = r.payload && r.payload.units;
  if (u && typeof u === "object" && !Array.isArray(u)) {
    for (const [k, v] of Object.entries(u)) if (typeof v === "string" && v) d.units[k] = v;
  }
  d.dirty = true;
  if (state.chart && state.chart.device === r.device) state.chart.live(r);
  schedule();
}

function onStatus(e) {
  if (!fresh(e)) return;
  const s = JSON.parse(e.data);
  const d = ensureDevice(s.device);
  const at = ms(s.at);
  if (at >= d.statusAt) {
    d.online = !!s.online;
    d.stale = !!s.stale;
    d.statusAt = at;
  }
  if (at > d.lastSeen && s.online) d.lastSeen = at;
  d.dirty = true;
  schedule();
}

function onGap(e) {
  const g = JSON.parse(e.data);
  const b = $("banner");
  clearTimeout(state.bannerTimer);
  state.bannerTimer = null;
  b.dataset.kind = "info";
  if (g.reason === "unknown_id") {
    // The daemon's database is not the one this page read before: start over from its state.
    setText(b, "The daemon's data was reset; reloading…");
    b.hidden = false;
    stopLinks();
    setTimeout(() => location.reload(), 1500);
    return;
  } else {
    setText(b, `Events up to #${g.first_available - 1} are no longer stored (retention); the feed continues from #${g.first_available}.`);
    // What was missed cannot be replayed: take presence and the command log as they are now.
    loadDevices().catch(() => {});
    loadCommandLog();
    loadAlerts();
    if (state.selected) loadDeviceAlerts(state.selected);
  }
  b.hidden = false;
}

/** Whether an event is new (ids rise over every kind); remembers its id. */
function fresh(e) {
  const id = Number(e.lastEventId);
  if (!(id > 0)) return true;
  if (id <= state.lastId) return false;
  state.lastId = id;
  return true;
}

// ---------------------------------------------------------------- commands (WebSocket)

function connectWs() {
  clearTimeout(state.ws.timer);
  state.ws.timer = null;
  if (state.ws.sock) {
    state.ws.sock.onclose = null;
    state.ws.sock.close();
  }
  const url = new URL("ws", location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const sock = new WebSocket(url);
  state.ws.sock = sock;
  let opened = false;
  sock.onopen = () => {
    opened = true;
    state.ws.opens++;
    state.ws.retries = 0;
    state.ws.down = false;
    setLink("ws", "connected", "ready");
    syncSend();
    if (state.sse.timer) connectSse();
  };
  sock.onmessage = (e) => {
    let m;
    try {
      m = JSON.parse(e.data);
    } catch (_) {
      return;
    }
    onWsMessage(m);
  };
  sock.onclose = async () => {
    if (sock !== state.ws.sock) return;
    state.ws.down = true;
    syncSend();
    for (const entry of state.results.values()) {
      if (entry.status === "sending") {
        entry.status = "unknown";
        entry.detail = "connection lost before the daemon confirmed it; see Recent commands";
        renderResult(entry);
      }
    }
    const delay = Math.min(500 * 2 ** state.ws.retries, 4000) + Math.random() * 250;
    state.ws.retries++;
    setLink("ws", "reconnecting", "reconnecting");
    if (!opened && state.auth.on && !(await sessionValid())) return;
    state.ws.timer = setTimeout(connectWs, delay);
  };
}

function onWsMessage(m) {
  if (m.type === "accepted") {
    const entry = state.results.get(m.ref);
    if (!entry) return;
    entry.id = m.id;
    state.resultsById.set(m.id, entry);
    if (entry.status === "sending") entry.status = m.status || "sent";
    entry.acceptedAt = performance.now();
    renderResult(entry);
    scheduleLogRefresh();
  } else if (m.type === "error") {
    const entry = state.results.get(m.ref);
    if (!entry) {
      showCommandError(`${m.code}: ${m.message}`);
      return;
    }
    entry.status = "rejected";
    entry.detail = `${m.code}: ${m.message}`;
    renderResult(entry);
  } else if (m.id) {
    const entry = state.resultsById.get(m.id);
    if (!entry) return;
    finish(entry, m.type === "ack" ? (m.ok ? "acked" : "failed") : m.type, m);
  }
}

/** A command's final state, from the WebSocket or from a `command` event of the live feed. */
function finish(entry, status, m) {
  if (FINAL.includes(entry.status)) return;
  entry.status = status;
  if (typeof m.rtt_ms === "number") entry.rtt = m.rtt_ms;
  entry.total = performance.now() - entry.sentAt;
  if (status === "acked") entry.detail = m.result === undefined || m.result === null ? "" : JSON.stringify(m.result);
  else if (status === "failed") entry.detail = m.error || "the device reported a failure";
  else if (status === "timeout") entry.detail = "the device did not answer in time";
  else if (status === "expired") entry.detail = "the device stayed offline until the command expired";
  else if (status === "cancelled") entry.detail = m.by ? `cancelled by ${m.by}` : "cancelled while queued";
  renderResult(entry);
}

function onCommandEvent(e) {
  if (!fresh(e)) return;
  const c = JSON.parse(e.data);
  const entry = state.resultsById.get(c.id);
  if (entry && FINAL.includes(c.status)) finish(entry, c.status, c);
  scheduleLogRefresh();
}

function sendCommand(ev) {
  ev.preventDefault();
  const device = $("cmd-device").value;
  const name = $("cmd-name").value.trim();
  const text = $("cmd-params").value.trim() || "{}";
  let params;
  try {
    params = JSON.parse(text);
  } catch (e) {
    return showCommandError(`Params are not valid JSON: ${e.message}`);
  }
  if (!params || typeof params !== "object" || Array.isArray(params)) {
    return showCommandError("Params must be a JSON object, such as {\"seconds\": 5}.");
  }
  if (!device) return showCommandError("Pick a device.");
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(name)) {
    return showCommandError("A command name is 1–64 letters, digits, '.', '_' or '-'.");
  }
  const sock = state.ws.sock;
  if (!sock || sock.readyState !== WebSocket.OPEN) {
    return showCommandError("The command channel is reconnecting; try again in a moment.");
  }
  $("cmd-error").hidden = true;
  const ref = `c${++state.refCounter}-${Date.now().toString(36)}`;
  const entry = { ref, device, name, params, status: "sending", sentAt: performance.now(), at: Date.now(), id: null, detail: "", rtt: null, total: null, node: null };
  state.results.set(ref, entry);
  sock.send(JSON.stringify({ type: "command", device, name, params, ref }));
  state.paramsEdited = false; // the next command's template may replace these params
  renderResult(entry);
  while (state.results.size > RESULTS_KEEP) {
    const [oldRef, old] = state.results.entries().next().value;
    state.results.delete(oldRef);
    if (old.id) state.resultsById.delete(old.id);
    if (old.node) old.node.remove();
  }
}

/** A Cancel button for a queued command (DELETE api/commands/{id}); `id()` gives its id. */
function cancelButton(id) {
  const b = el("button", "small ghost cancel", "Cancel");
  b.type = "button";
  b.addEventListener("click", async () => {
    const cid = id();
    if (!cid) return;
    b.disabled = true;
    try {
      const c = await api(`api/commands/${encodeURIComponent(cid)}`, { method: "DELETE" });
      const entry = state.resultsById.get(cid);
      if (entry) finish(entry, "cancelled", c || {});
    } catch (e) {
      if (e instanceof AuthRequired) return;
      // 409: it was sent or finished meanwhile; the list shows what it became.
      showCommandError(e.status === 409 ? "Too late to cancel: the command was already sent or finished." : `Could not cancel: ${e.message}`);
    } finally {
      b.disabled = false;
      scheduleLogRefresh();
    }
  });
  return b;
}

function showCommandError(text) {
  const e = $("cmd-error");
  setText(e, text);
  e.hidden = false;
}

/** One wording for a command's status, in this session's list and the command log alike. */
const STATUS_TEXT = {
  sending: "sending…",
  queued: "queued",
  sent: "sent",
  acked: "acked",
  failed: "failed",
  timeout: "timeout",
  expired: "expired",
  cancelled: "cancelled",
  rejected: "rejected",
  unknown: "unknown",
};
/** What a status means, for its badge's title. */
const STATUS_TITLE = {
  queued: "stored; waiting for the device to come online",
  sent: "published to the device; waiting for its answer",
  acked: "the device answered ok",
  failed: "the device answered with an error",
  timeout: "the device did not answer in time",
  expired: "the device stayed offline until the command's ttl ran out",
  cancelled: "an operator cancelled it while it was queued",
};
const FINAL = ["acked", "failed", "timeout", "expired", "cancelled"];

function renderResult(entry) {
  if (!entry.node) {
    const li = el("li", "result");
    li.dataset.ref = entry.ref;
    const head = el("div", "result-head");
    entry.nodeCmd = el("span", "result-cmd", `${entry.name} → ${entry.device}`);
    entry.nodeStatus = el("span", "badge");
    entry.nodeCancel = cancelButton(() => entry.id);
    head.append(entry.nodeCmd, entry.nodeStatus, entry.nodeCancel);
    const meta = el("div", "result-meta muted");
    entry.nodeMeta = meta;
    entry.nodeDetail = el("div", "result-detail");
    li.append(head, meta, entry.nodeDetail);
    entry.node = li;
    $("results").prepend(li);
    $("results-empty").hidden = true;
  }
  entry.node.dataset.status = entry.status;
  entry.nodeStatus.dataset.status = entry.status;
  setText(entry.nodeStatus, STATUS_TEXT[entry.status] || entry.status);
  entry.nodeStatus.title = STATUS_TITLE[entry.status] || "";
  entry.nodeCancel.hidden = entry.status !== "queued" || !entry.id || state.viewer;
  const parts = [fmtTime(entry.at)];
  if (Object.keys(entry.params).length) parts.push(JSON.stringify(entry.params));
  if (entry.rtt != null) parts.push(`round trip ${entry.rtt.toFixed(1)} ms`);
  if (entry.total != null) parts.push(`${Math.round(entry.total)} ms in the browser`);
  setText(entry.nodeMeta, parts.join(" · "));
  setText(entry.nodeDetail, entry.detail || "");
  entry.nodeDetail.hidden = !entry.detail;
}

function syncCommandDevices() {
  const sel = $("cmd-device");
  const current = sel.value || state.selected;
  const frag = document.createDocumentFragment();
  // By name, whatever order the list is in.
  for (const id of [...state.order].sort(byName)) {
    const o = el("option", null, id);
    o.value = id;
    frag.appendChild(o);
  }
  sel.replaceChildren(frag);
  if (current && state.devices.has(current)) sel.value = current;
  syncSend();
}

/** Why Send cannot send now, or null: it is disabled with the reason shown beside it. */
function sendBlocker() {
  if (state.viewer) return "Your token is a viewer's: sending commands needs an operator token.";
  if (!state.order.length) return "No device to send to yet: devices appear here once they publish telemetry.";
  const sock = state.ws.sock;
  if (!sock || sock.readyState !== WebSocket.OPEN) {
    return state.ws.down ? "The command channel is reconnecting…" : "The command channel is connecting…";
  }
  return null;
}

function syncSend() {
  const why = sendBlocker();
  $("cmd-send").disabled = why !== null;
  setText($("cmd-why"), why || "");
  $("cmd-why").hidden = why === null;
}

/** The console's params per command name, from the daemon's `[commands.templates]`. */
const BUILT_IN_TEMPLATES = [
  { name: "ping", params: {} },
  { name: "reboot", params: {} },
  { name: "set_interval", params: { seconds: 5 } },
];

async function loadTemplates() {
  let list;
  try {
    const body = await api("api/commands/templates");
    list = Array.isArray(body.templates) ? body.templates : BUILT_IN_TEMPLATES;
  } catch (e) {
    if (e instanceof AuthRequired) return;
    list = BUILT_IN_TEMPLATES; // an older daemon: what `telebridge simulate` answers
  }
  state.templates = new Map(list.map((t) => [t.name, t.params || {}]));
  const frag = document.createDocumentFragment();
  for (const t of list) {
    const o = el("option");
    o.value = t.name;
    o.label = Object.keys(t.params || {}).length ? `${t.name} ${JSON.stringify(t.params)}` : t.name;
    frag.appendChild(o);
  }
  $("cmd-names").replaceChildren(frag);
  applyTemplate();
}

/** A known command's template fills the params, unless the operator has edited them. */
function applyTemplate() {
  const params = state.templates.get($("cmd-name").value.trim());
  if (params === undefined || state.paramsEdited) return;
  state.templateText = JSON.stringify(params);
  $("cmd-params").value = state.templateText;
}

// ---------------------------------------------------------------- command log

function scheduleLogRefresh() {
  if (state.logTimer) return;
  state.logTimer = setTimeout(() => {
    state.logTimer = null;
    loadCommandLog();
  }, 400);
}

async function loadCommandLog() {
  let body;
  try {
    body = await api(`api/commands?limit=${LOG_LIMIT}`);
  } catch (_) {
    return;
  }
  const rows = document.createDocumentFragment();
  for (const c of body.commands || []) {
    const li = el("li", "log-row");
    li.dataset.id = c.id;
    const head = el("div", "log-head");
    const cmd = el("span", "log-cmd");
    cmd.append(el("span", "log-name", c.name), el("span", "muted", ` → ${c.device}`));
    const badge = el("span", "badge", STATUS_TEXT[c.status] || c.status);
    badge.dataset.status = c.status;
    badge.title = STATUS_TITLE[c.status] || "";
    head.append(cmd, badge);
    if (c.status === "queued" && !state.viewer) head.append(cancelButton(() => c.id));
    const parts = [fmtTime(ms(c.created_at))];
    if (c.params && Object.keys(c.params).length) parts.push(JSON.stringify(c.params));
    if (c.sent_at && c.finished_at && (c.status === "acked" || c.status === "failed")) {
      parts.push(`${ms(c.finished_at) - ms(c.sent_at)} ms`);
    }
    if (c.error) parts.push(c.error);
    else if (c.result !== null && c.result !== undefined) parts.push(JSON.stringify(c.result));
    const meta = el("div", "log-meta muted", parts.join(" · "));
    meta.title = meta.textContent;
    li.append(head, meta);
    rows.appendChild(li);
  }
  if (!body.commands || !body.commands.length) rows.appendChild(el("li", "log-row muted", "No commands yet."));
  $("log").replaceChildren(rows);
}

// ---------------------------------------------------------------- alerts

const isOpen = (a) => a.state === "firing" || a.state === "acknowledged";

/** An alert as the API or the feed writes it, with its times in Unix ms; `mark` is the event id it came with. */
function normAlert(x, mark = 0) {
  return { ...x, firedAt: ms(x.fired_at), ackedAt: ms(x.acked_at), resolvedAt: ms(x.resolved_at), mark };
}

/** The later of two versions of one alert (either may be missing). */
function later(a, b) {
  if (!a) return b;
  if (!b) return a;
  return (STATE_RANK[b.state] || 0) >= (STATE_RANK[a.state] || 0) ? b : a;
}

function severityColor(severity) {
  const fallback = { info: "#2563eb", warning: "#d97706", critical: "#dc2626" };
  return cssVar(`--sev-${severity}`, fallback[severity] || fallback.info);
}

/** One alert's new state, from the feed or an acknowledgement. */
function putAlert(a) {
  const merged = later(state.alerts.get(a.id), a);
  state.alerts.set(merged.id, merged);
  const mine = state.deviceAlerts;
  if (mine.device === merged.device) mine.map.set(merged.id, later(mine.map.get(merged.id), merged));
  alertsChanged();
  return merged;
}

/** Keeps the open alerts and the latest few resolved ones; redraws what shows them. */
function alertsChanged() {
  const resolved = [...state.alerts.values()].filter((a) => !isOpen(a)).sort((a, b) => b.resolvedAt - a.resolvedAt || b.id - a.id);
  for (const a of resolved.slice(RESOLVED_KEEP)) state.alerts.delete(a.id);
  // Per device: the most severe open alert and the counts, for the device list.
  const by = new Map();
  for (const a of state.alerts.values()) {
    if (!isOpen(a)) continue;
    let s = by.get(a.device);
    if (!s) by.set(a.device, (s = { severity: a.severity, firing: 0, acked: 0 }));
    if ((SEVERITY_RANK[a.severity] || 0) > (SEVERITY_RANK[s.severity] || 0)) s.severity = a.severity;
    if (a.state === "firing") s.firing++;
    else s.acked++;
  }
  for (const id of new Set([...by.keys(), ...state.alertsByDevice.keys()])) {
    const d = state.devices.get(id);
    if (d) d.dirty = true;
  }
  state.alertsByDevice = by;
  state.listRenderedAt = 0;
  state.alertsDirty = true;
  if (state.chart) state.chart.alertsChanged();
  schedule();
}

/** The open alerts (all of them up to ALERTS_LIMIT) and the latest resolved ones, as they are now. */
async function loadAlerts() {
  const mark = state.lastId;
  let open;
  let resolved;
  try {
    [open, resolved] = await Promise.all([
      api(`api/alerts?state=open&limit=${ALERTS_LIMIT}`),
      api(`api/alerts?state=resolved&limit=${RESOLVED_KEEP}`),
    ]);
  } catch (e) {
    if (e instanceof AuthRequired) return;
    const err = $("alerts-error");
    setText(err, `Could not load the alerts: ${e.message}`);
    err.hidden = false;
    return;
  }
  $("alerts-error").hidden = true;
  const next = new Map();
  for (const x of [...(open.alerts || []), ...(resolved.alerts || [])]) next.set(x.id, normAlert(x));
  // What the feed brought while the request was out is as new as the answer, or newer.
  for (const a of state.alerts.values()) if (a.mark > mark) next.set(a.id, later(next.get(a.id), a));
  state.alerts = next;
  state.alertsTruncated = (open.alerts || []).length >= ALERTS_LIMIT;
  const mine = state.deviceAlerts;
  for (const a of next.values()) if (a.device === mine.device) mine.map.set(a.id, later(mine.map.get(a.id), a));
  alertsChanged();
}

/** The alerts of the device whose charts show, resolved ones too, for their bands and thresholds. */
async function loadDeviceAlerts(device) {
  const map = new Map();
  for (const a of state.alerts.values()) if (a.device === device) map.set(a.id, a);
  state.deviceAlerts = { device, map };
  let body;
  try {
    body = await api(`api/alerts?device=${encodeURIComponent(device)}&limit=${DEVICE_ALERTS_LIMIT}`);
  } catch (_) {
    return; // the charts go on without their alerts
  }
  if (state.deviceAlerts.map !== map) return; // another device (or a reload) meanwhile
  for (const x of body.alerts || []) {
    const a = normAlert(x);
    map.set(a.id, later(map.get(a.id), a));
  }
  if (state.chart) state.chart.alertsChanged();
  schedule();
}

function onAlertEvent(e) {
  if (!fresh(e)) return;
  let x;
  try {
    x = JSON.parse(e.data);
  } catch (_) {
    return;
  }
  if (!x || typeof x.id !== "number") return;
  putAlert(normAlert(x, Number(e.lastEventId) || state.lastId));
}

async function acknowledge(id) {
  const row = state.alertRows.get(id);
  if (!row || row.busy) return;
  row.busy = true;
  row.err.hidden = true;
  renderAlertRow(state.alerts.get(id) || row.alert);
  try {
    const body = await api(`api/alerts/${encodeURIComponent(id)}/ack`, { method: "POST" });
    if (body && body.alert) putAlert(normAlert(body.alert));
  } catch (e) {
    if (e instanceof AuthRequired) return;
    setText(row.err, `Could not acknowledge: ${e.message}`);
    row.err.hidden = false;
    // Resolved or gone meanwhile: take the list as it is now.
    if (e.status === 404 || e.status === 409) loadAlerts();
  } finally {
    row.busy = false;
    state.alertsDirty = true;
    schedule();
  }
}

function alertStateText(a) {
  if (a.state === "acknowledged") {
    return `acknowledged by ${a.acked_by || "someone"}${a.ackedAt ? ` · ${ago(a.ackedAt)}` : ""}`;
  }
  if (a.state === "resolved") {
    const lasted = a.resolvedAt && a.firedAt ? ` after ${duration(a.resolvedAt - a.firedAt)}` : "";
    return `resolved ${ago(a.resolvedAt)}${lasted}`;
  }
  return "firing";
}

/** "45 s", "12 min", "3 h 5 min". */
function duration(msLong) {
  const s = Math.max(0, Math.round(msLong / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min`;
  const h = Math.floor(m / 60);
  return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
}

function renderAlertRow(a) {
  let r = state.alertRows.get(a.id);
  if (!r) {
    const li = el("li", "alert");
    li.dataset.id = String(a.id);
    const head = el("div", "alert-head");
    const sev = el("span", "sev");
    const rule = el("span", "alert-rule");
    const device = el("button", "alert-device");
    device.type = "button";
    device.addEventListener("click", () => {
      select(r.alert.device);
      revealSelected();
    });
    const when = el("span", "alert-ago muted");
    head.append(sev, rule, device, when);
    const msg = el("div", "alert-msg");
    const foot = el("div", "alert-foot");
    const st = el("span", "alert-state muted");
    const ack = el("button", "small alert-ack", "Acknowledge");
    ack.type = "button";
    ack.addEventListener("click", () => acknowledge(r.alert.id));
    foot.append(st, ack);
    const err = el("p", "form-error alert-error");
    err.setAttribute("role", "alert");
    err.hidden = true;
    li.append(head, msg, foot, err);
    r = { li, sev, rule, device, when, msg, st, ack, err, busy: false, alert: a };
    state.alertRows.set(a.id, r);
  }
  r.alert = a;
  const li = r.li;
  li.dataset.severity = a.severity;
  li.dataset.state = a.state;
  li.dataset.device = a.device;
  li.dataset.rule = a.rule;
  setText(r.sev, a.severity);
  setText(r.rule, a.rule);
  setText(r.device, a.device);
  r.device.title = `Show ${a.device}`;
  setText(r.msg, a.message || "");
  r.ack.hidden = a.state !== "firing" || state.viewer;
  r.ack.disabled = r.busy;
  setText(r.ack, r.busy ? "Acknowledging…" : "Acknowledge");
  r.ack.setAttribute("aria-label", `Acknowledge ${a.rule} on ${a.device}`);
  renderAlertTime(r);
}

function renderAlertTime(r) {
  const a = r.alert;
  setText(r.when, `fired ${ago(a.firedAt)}`);
  r.when.title = a.firedAt ? new Date(a.firedAt).toLocaleString() : "";
  setText(r.st, alertStateText(a));
}

/** Puts the rows of `alerts` into `list` in that order, moving only those out of place. */
function syncAlertList(list, alerts) {
  let at = list.firstChild;
  for (const a of alerts) {
    renderAlertRow(a);
    const li = state.alertRows.get(a.id).li;
    if (li === at) at = at.nextSibling;
    else list.insertBefore(li, at);
  }
  while (at) {
    const next = at.nextSibling;
    at.remove();
    at = next;
  }
}

function renderAlerts() {
  state.alertsDirty = false;
  const all = [...state.alerts.values()];
  const open = all.filter(isOpen).sort((a, b) => b.firedAt - a.firedAt || b.id - a.id);
  const resolved = all.filter((a) => !isOpen(a)).sort((a, b) => b.resolvedAt - a.resolvedAt || b.id - a.id);
  syncAlertList($("alert-list"), open);
  syncAlertList($("alerts-resolved"), resolved);
  for (const [id, r] of state.alertRows) {
    if (!state.alerts.has(id)) {
      r.li.remove();
      state.alertRows.delete(id);
    }
  }
  const firing = open.filter((a) => a.state === "firing");
  const acked = open.length - firing.length;
  const more = state.alertsTruncated ? "+" : "";
  const count = $("alert-count");
  setText(count, [firing.length && `${firing.length}${more} firing`, acked && `${acked} acknowledged`].filter(Boolean).join(" · "));
  count.dataset.count = String(open.length);
  let worst = null;
  for (const a of firing) if (!worst || SEVERITY_RANK[a.severity] > SEVERITY_RANK[worst]) worst = a.severity;
  if (worst) count.dataset.severity = worst;
  else delete count.dataset.severity;
  $("alerts-empty").hidden = open.length > 0;
  $("alerts-resolved-box").hidden = resolved.length === 0;
  const title = firing.length ? `(${firing.length}${more}) telebridge` : "telebridge";
  if (document.title !== title) document.title = title;
}

/** The relative times of the alerts panel move on. */
function renderAlertTimes() {
  for (const r of state.alertRows.values()) renderAlertTime(r);
}

/** A device row's alert marker: the count of its open alerts in the most severe one's color. */
function markAlerts(row, s) {
  const key = s ? `${s.severity}/${s.firing}/${s.acked}` : "";
  if (row.alertKey === key) return;
  row.alertKey = key;
  const li = row.li;
  if (!s) {
    delete li.dataset.alert;
    delete li.dataset.alertState;
    row.alert.hidden = true;
    return;
  }
  li.dataset.alert = s.severity;
  li.dataset.alertState = s.firing ? "firing" : "acknowledged";
  setText(row.alert, String(s.firing + s.acked));
  let text;
  if (s.firing && s.acked) text = `${plural(s.firing + s.acked, "alert")} open: ${s.firing} firing, ${s.acked} acknowledged`;
  else if (s.firing) text = `${plural(s.firing, "alert")} firing`;
  else text = `${plural(s.acked, "alert")} acknowledged`;
  text += ` (${s.severity})`;
  row.alert.title = text;
  row.alert.setAttribute("aria-label", text);
  row.alert.hidden = false;
}

// ---------------------------------------------------------------- authentication

/** GET api/session: `{auth, name?, role?}`; a 404 means a daemon without sessions (auth off). */
async function readSession() {
  const res = await fetch("api/session", { credentials: "same-origin", cache: "no-store", headers: { accept: "application/json" } });
  if (res.status === 404) return { auth: false, signedIn: true };
  if (res.status === 401) return { auth: true, signedIn: false };
  if (!res.ok) throw new Error(`GET api/session: ${res.status}`);
  const s = await res.json();
  return { auth: !!s.auth, signedIn: !s.auth || !!(s.name || s.role), name: s.name || null, role: s.role || null };
}

async function sessionValid() {
  try {
    const s = await readSession();
    if (s.auth && !s.signedIn) {
      requireLogin();
      return false;
    }
  } catch (_) { /* the daemon is away: keep retrying */ }
  return true;
}

function requireLogin() {
  if (!$("login").hidden) return;
  stopLinks();
  $("app").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  setLink("sse", "offline", "sign-in needed");
  setLink("ws", "offline", "sign-in needed");
  state.sse.down = false;
  state.ws.down = false;
  $("banner").hidden = true;
  $("token").focus();
}

function stopLinks() {
  clearTimeout(state.sse.timer);
  clearTimeout(state.ws.timer);
  state.sse.timer = null;
  state.ws.timer = null;
  if (state.sse.es) state.sse.es.close();
  state.sse.es = null;
  if (state.ws.sock) {
    state.ws.sock.onclose = null;
    state.ws.sock.close();
  }
  state.ws.sock = null;
}

async function login(ev) {
  ev.preventDefault();
  const token = $("token").value.trim();
  const err = $("login-error");
  err.hidden = true;
  $("login-submit").disabled = true;
  try {
    const res = await fetch("api/session", {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify({ token }),
    });
    if (!res.ok) {
      let msg = res.status === 401 || res.status === 403 ? "That token was not accepted." : `Sign-in failed (${res.status}).`;
      try {
        const b = await res.json();
        if (b && b.error && b.error.message && res.status !== 401) msg = b.error.message;
      } catch (_) { /* no body */ }
      setText(err, msg);
      err.hidden = false;
      return;
    }
    $("token").value = "";
    $("login").hidden = true;
    await boot();
  } catch (e) {
    setText(err, `Cannot reach telebridge: ${e.message}`);
    err.hidden = false;
  } finally {
    $("login-submit").disabled = false;
  }
}

async function logout() {
  try {
    await fetch("api/session", { method: "DELETE", credentials: "same-origin" });
  } catch (_) { /* signed out locally anyway */ }
  requireLogin();
}

// ---------------------------------------------------------------- start

async function boot() {
  let s;
  try {
    s = await readSession();
  } catch (e) {
    const b = $("banner");
    b.dataset.kind = "warn";
    setText(b, `Cannot reach telebridge (${e.message}); retrying…`);
    b.hidden = false;
    setTimeout(boot, 2000);
    return;
  }
  state.auth = { on: s.auth, name: s.name, role: s.role };
  if (s.auth && !s.signedIn) return requireLogin();
  $("login").hidden = true;
  $("app").hidden = false;
  $("who").hidden = !s.auth;
  setText($("who-name"), s.auth ? [s.name, s.role].filter(Boolean).join(" · ") : "");
  state.viewer = s.role === "viewer";
  for (const id of ["cmd-device", "cmd-name", "cmd-params"]) $(id).disabled = state.viewer;
  syncSend();
  loadTemplates();
  if (!$("banner").dataset.kind) $("banner").hidden = true;
  let max;
  try {
    max = await loadDevices();
  } catch (e) {
    if (e instanceof AuthRequired) return;
    max = state.lastSeq;
  }
  // Live readings start right after what the device list showed: no gap, no duplicate.
  if (!state.started) {
    state.lastSeq = max;
    state.lastId = max;
  }
  state.started = true;
  const wanted = urlParams().get("device");
  if (wanted && state.devices.has(wanted)) select(wanted, { auto: true });
  state.alertsDirty = true; // the Acknowledge buttons follow the role
  connectSse();
  connectWs();
  loadCommandLog();
  loadAlerts();
  schedule();
}

function wire() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("command-form").addEventListener("submit", sendCommand);
  readListParams(urlParams());
  $("device-filter").addEventListener("input", listChanged);
  $("presence-filter").addEventListener("change", listChanged);
  $("device-sort").addEventListener("change", listChanged);
  $("device-list").addEventListener("keydown", onListKey);
  $("log-refresh").addEventListener("click", loadCommandLog);
  // The link follows the range as it moves: its address is made at the click.
  $("chart-csv").addEventListener("click", (e) => {
    const c = state.chart;
    if (!c) return e.preventDefault();
    const a = e.currentTarget;
    a.href = c.csvHref();
    a.download = `${c.device}-${state.range.key === "custom" ? "custom" : state.range.key}.csv`;
  });
  state.range = parseRange(urlParams());
  $("custom-range").hidden = state.range.key !== "custom";
  renderRangePicker();
  $("range").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-range]");
    if (!b) return;
    if (b.dataset.range === "custom") return openCustom();
    $("custom-range").hidden = true;
    setRange({ key: b.dataset.range });
  });
  $("custom-range").addEventListener("submit", applyCustom);
  syncSend();
  $("cmd-name").addEventListener("input", applyTemplate);
  $("cmd-params").addEventListener("input", () => {
    state.paramsEdited = $("cmd-params").value.trim() !== state.templateText;
  });
  // A link edited or pasted into the address bar of an open page.
  window.addEventListener("hashchange", () => {
    const params = urlParams();
    const range = parseRange(params);
    const rangeChanged = rangeParams(range) !== rangeParams(state.range);
    if (rangeChanged) {
      state.range = range;
      $("custom-range").hidden = range.key !== "custom";
      renderRangePicker();
    }
    const list = { ...state.list };
    readListParams(params);
    if (JSON.stringify(list) !== JSON.stringify(state.list)) {
      state.orderDirty = true;
      state.filterDirty = true;
      schedule();
    }
    const id = params.get("device");
    if (id && id !== state.selected && state.devices.has(id)) select(id);
    else if (rangeChanged && state.selected) openChart(state.selected);
  });
  // The charts take their colours when drawn first: draw them again when the scheme changes.
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    if (state.selected) openChart(state.selected);
  });
  // Relative times ("3 s ago") move on even when no data arrives.
  setInterval(() => {
    state.listRenderedAt = 0;
    // The band of an open alert reaches to now.
    if (state.chart && state.chart.hasOpenBand()) state.chart.dirty = true;
    schedule();
  }, 1000);
}

/** A read-only view for tests and for debugging from the console. */
globalThis.telebridge = Object.freeze({
  snapshot() {
    const c = state.chart;
    return {
      sse: state.sse.state,
      ws: state.ws.state,
      sseOpens: state.sse.opens,
      wsOpens: state.ws.opens,
      lastSeq: state.lastSeq,
      readings: state.readings,
      devices: state.order.map((id) => {
        const d = state.devices.get(id);
        return { id, online: d.online, lastSeq: d.latest ? d.latest.seq : null };
      }),
      selected: state.selected,
      range: { ...state.range },
      alerts: [...state.alerts.values()].map((a) => ({ id: a.id, rule: a.rule, device: a.device, severity: a.severity, state: a.state, acked_by: a.acked_by })),
      chart: c ? {
        device: c.device,
        mode: c.mode,
        historyLoaded: c.historyLoaded,
        error: c.error,
        seqs: c.mode === "raw" ? c.seqs.slice() : [],
        metrics: [...c.plots.keys()],
        units: Object.fromEntries([...c.plots.keys()].map((k) => [k, c.unit(k)])),
        points: Number(c.container.dataset.points),
        lastSeq: c.mode === "raw" ? c.seqs[c.seqs.length - 1] || 0 : c.lastSeq,
      } : null,
    };
  },
  /**
   * Per chart card, what uPlot drew: the breaks (as times) and the gaps it clipped, the lone
   * points, the summary and label, and the last x label's right edge against the plot's width.
   */
  plots() {
    const c = state.chart;
    if (!c) return null;
    const out = {};
    for (const [name, p] of c.plots) {
      const u = p.plot;
      const xs = u.data[0];
      const dpr = globalThis.devicePixelRatio || 1;
      const paths = u.series[u.series.length - 1]._paths;
      const axis = u.axes[0];
      const splits = axis._splits || [];
      const labels = axis._values || [];
      let lastLabel = null;
      if (splits.length) {
        const ctx = u.ctx;
        ctx.save();
        ctx.font = `${Math.round(11 * dpr)}px system-ui, sans-serif`;
        const text = String(labels[labels.length - 1]);
        const half = ctx.measureText(text).width / dpr / 2;
        ctx.restore();
        lastLabel = { text, right: u.bbox.left / dpr + u.valToPos(splits[splits.length - 1], "x") + half, width: u.width };
      }
      out[name] = {
        points: xs.length,
        breaks: p.breaks.map((i) => [xs[i - 1], xs[i]]),
        gaps: paths && paths.gaps ? paths.gaps.map(([a, b]) => [u.posToVal(a / dpr - u.bbox.left / dpr, "x"), u.posToVal(b / dpr - u.bbox.left / dpr, "x")]) : [],
        lone: c.lonePoints(u, 1) || [],
        xRange: [u.scales.x.min, u.scales.x.max],
        labels: labels.map(String),
        lastLabel,
        name: p.name.textContent,
        summary: p.summary.textContent,
        role: p.body.getAttribute("role"),
        label: p.body.getAttribute("aria-label"),
        stroke: typeof u.series[1].stroke === "function" ? u.series[1].stroke(u, 1) : u.series[1].stroke,
      };
    }
    return out;
  },
  /** The uPlot of one chart card, for a test to read its scales. */
  plotOf(name) {
    const p = state.chart && state.chart.plots.get(name);
    return p ? p.plot : null;
  },
  /** The aggregated chart: its request, its buckets (as the API writes them) and what uPlot draws. */
  series() {
    const c = state.chart;
    if (!c || c.mode !== "series") return null;
    const drawn = {};
    for (const [name, p] of c.plots) {
      drawn[name] = {
        series: p.plot.series.slice(1).map((s) => s.label),
        bands: p.plot.bands ? p.plot.bands.length : 0,
        points: p.plot.data[0].length,
        filled: p.plot.data.slice(1).map((col) => col.filter((v) => v != null).length),
        head: p.card.querySelector(".chart-head").innerText.replace(/\s+/g, " ").trim(),
      };
    }
    return {
      request: c.request,
      answered: c.answered,
      step_ms: c.step,
      resolution: c.resolution,
      cut: c.cut === Infinity ? null : new Date(c.cut).toISOString(),
      counted: c.counted,
      lastSeq: c.lastSeq,
      points: c.points(),
      drawn,
    };
  },
});

if (!uPlot) {
  document.body.textContent = "The chart library did not load (assets/vendor/uPlot.iife.min.js).";
} else {
  wire();
  boot();
}
