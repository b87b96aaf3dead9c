// Alerts on the dashboard, live: the panel, the device list's marker, the chart's threshold and
// band, acknowledging, and the alert resolving, all through the live feed without a reload.
//
//   node alerts.mjs --url http://127.0.0.1:PORT/ --artifacts DIR --device ID --other ID
//
// Opens the page on --other (a device without alerts) and prints {"event":"ready"}; the Rust test
// then makes --device run hot. The page must show the alert as it fires, mark the device, draw
// the threshold and the firing span on its temperature chart once it is selected from the panel,
// show the error of a refused acknowledgement (a 403 the script answers itself), acknowledge it
// for real ({"event":"acked"}), and, when the Rust test has cooled the device down, drop it from
// the open alerts. Screenshots: alerts-firing, alerts-acknowledged, alerts-resolved, alerts-phone.

import { emit, newPage, parseArgs, run, screenshotPath } from "./lib.mjs";

const args = parseArgs();
const url = args.url;
const dir = args.artifacts;
const device = args.device;
const other = args.other;

const snap = (page) => page.evaluate(() => globalThis.telebridge.snapshot());
const text = (page, selector) => page.$eval(selector, (e) => e.innerText.replace(/\s+/g, " ").trim());
const row = `#alert-list .alert[data-device="${device}"]`;
const chart = 'figure.chart[data-metric="temperature"]';

/** The device list's rows: id, the alert marker and its label. */
const deviceRows = (page) =>
  page.$$eval("#device-list .device", (rows) =>
    rows.map((r) => {
      const mark = r.querySelector(".dev-alert");
      return {
        id: r.dataset.id,
        alert: r.dataset.alert || null,
        alertState: r.dataset.alertState || null,
        label: mark && !mark.hidden ? mark.getAttribute("aria-label") : null,
        shown: !!(mark && mark.offsetParent),
      };
    }),
  );

const chartMarks = (page) =>
  page.$eval(chart, (c) => ({ threshold: c.dataset.threshold || null, bands: Number(c.dataset.alertBands || 0) }));

run(90000, async ({ context }) => {
  const { page, log } = await newPage(context, { width: 1440, height: 900 });
  await page.goto(url, { waitUntil: "load" });
  // Gone after a reload: proves that everything below arrives live.
  await page.evaluate(() => { globalThis.__sameDocument = true; });
  await page.waitForFunction(
    (ids) => ids.every((id) => document.querySelector(`#device-list .device[data-id="${id}"]`)),
    [device, other],
  );
  await page.waitForFunction(() => globalThis.telebridge.snapshot().sse === "connected");
  await page.click(`#device-list .device[data-id="${other}"]`);
  await page.waitForFunction((d) => {
    const s = globalThis.telebridge.snapshot();
    return s.chart && s.chart.device === d && s.chart.historyLoaded;
  }, other);
  const before = {
    empty: await page.isVisible("#alerts-empty") ? await text(page, "#alerts-empty") : null,
    count: await text(page, "#alert-count"),
    rows: await page.$$eval("#alert-list .alert", (r) => r.length),
  };
  emit({ event: "ready" });

  // The alert fires: the panel shows it.
  await page.waitForSelector(`${row}[data-state="firing"]`, { timeout: 30000 });
  const firing = await page.$eval(row, (li) => {
    const t = (s) => li.querySelector(s).innerText.replace(/\s+/g, " ").trim();
    const ack = li.querySelector(".alert-ack");
    return {
      id: Number(li.dataset.id),
      severity: li.dataset.severity,
      severityText: li.querySelector(".sev").textContent,
      rule: t(".alert-rule"),
      device: t(".alert-device"),
      message: t(".alert-msg"),
      when: t(".alert-ago"),
      state: t(".alert-state"),
      ackButton: !!(ack && !ack.hidden && ack.offsetParent),
      background: getComputedStyle(li).backgroundColor,
      border: getComputedStyle(li).borderLeftColor,
    };
  });
  firing.count = await text(page, "#alert-count");
  firing.emptyShown = await page.isVisible("#alerts-empty");
  firing.title = await page.title();
  await page.waitForFunction((d) => document.querySelector(`#device-list .device[data-id="${d}"]`).dataset.alert, device);
  firing.rows = await deviceRows(page);

  // The device, picked from the panel: its temperature chart has the threshold and the band.
  await page.click(`${row} .alert-device`);
  await page.waitForFunction((d) => {
    const s = globalThis.telebridge.snapshot();
    return s.selected === d && s.chart && s.chart.device === d && s.chart.historyLoaded && s.chart.metrics.includes("temperature");
  }, device);
  await page.waitForFunction((sel) => {
    const c = document.querySelector(sel);
    return c && c.dataset.threshold && Number(c.dataset.alertBands) >= 1;
  }, chart);
  firing.chart = await chartMarks(page);
  firing.selected = (await snap(page)).selected;
  firing.hash = await page.evaluate(() => location.hash);
  await page.mouse.move(0, 0);
  await page.screenshot({ path: screenshotPath(dir, "alerts-firing") });

  // A refused acknowledgement (answered here, as a viewer's would be): its message on the row.
  await page.route("**/api/alerts/*/ack", (route) =>
    route.fulfill({
      status: 403,
      contentType: "application/json",
      body: JSON.stringify({ error: { code: "forbidden", message: "token \"guest\" is a viewer; acknowledging alerts needs an operator token" } }),
    }),
  );
  const errorsBefore = log.consoleErrors.length;
  await page.click(`${row} .alert-ack`);
  await page.waitForSelector(`${row} .alert-error:not([hidden])`);
  const refused = {
    error: await text(page, `${row} .alert-error`),
    state: await page.$eval(row, (li) => li.dataset.state),
    ackButton: await page.isVisible(`${row} .alert-ack`),
    // Chromium logs the refused request's 403 itself; keep it apart.
    consoleErrors: log.consoleErrors.splice(errorsBefore),
  };
  await page.unroute("**/api/alerts/*/ack");

  // Acknowledged for real.
  await page.click(`${row} .alert-ack`);
  await page.waitForSelector(`${row}[data-state="acknowledged"]`);
  const acked = {
    state: await text(page, `${row} .alert-state`),
    ackButton: await page.isVisible(`${row} .alert-ack`),
    errorShown: await page.isVisible(`${row} .alert-error`),
    count: await text(page, "#alert-count"),
    title: await page.title(),
  };
  await page.waitForFunction(
    (d) => document.querySelector(`#device-list .device[data-id="${d}"]`).dataset.alertState === "acknowledged",
    device,
  );
  acked.rows = await deviceRows(page);
  await page.screenshot({ path: screenshotPath(dir, "alerts-acknowledged") });
  emit({ event: "acked", id: firing.id });

  // The Rust test cools the device down: the alert resolves, live.
  await page.waitForFunction(
    (id) => {
      const open = document.querySelectorAll("#alert-list .alert").length;
      const done = document.querySelector(`#alerts-resolved .alert[data-id="${id}"]`);
      return open === 0 && done && done.dataset.state === "resolved";
    },
    firing.id,
    { timeout: 40000 },
  );
  await page.waitForFunction(
    (d) => !document.querySelector(`#device-list .device[data-id="${d}"]`).dataset.alert,
    device,
  );
  const resolved = {
    openRows: await page.$$eval("#alert-list .alert", (r) => r.length),
    empty: await page.isVisible("#alerts-empty") ? await text(page, "#alerts-empty") : null,
    count: await text(page, "#alert-count"),
    resolvedRow: await text(page, `#alerts-resolved .alert[data-id="${firing.id}"]`),
    rows: await deviceRows(page),
    chart: await chartMarks(page),
    title: await page.title(),
    sameDocument: await page.evaluate(() => globalThis.__sameDocument === true),
    snapshot: (await snap(page)).alerts,
  };
  await page.screenshot({ path: screenshotPath(dir, "alerts-resolved") });

  // The Rust test then stops publishing: both devices, which sent every 200 ms, turn stale
  // (amber) a couple of seconds later, while still online.
  await page.waitForFunction(
    (ids) => ids.every((id) => document.querySelector(`#device-list .device[data-id="${id}"]`).dataset.presence === "stale"),
    [device, other],
    { timeout: 30000 },
  );
  const stale = {
    at: Date.now(),
    detail: await text(page, "#detail-presence"),
    detailPresence: await page.$eval("#detail-presence", (e) => e.dataset.presence),
    count: await text(page, "#device-count"),
    dot: await page.$eval(`#device-list .device[data-id="${other}"] .dot`, (e) => getComputedStyle(e).backgroundColor),
    onlineDot: await page.$eval(".link .dot", (e) => getComputedStyle(e).backgroundColor),
  };
  await page.screenshot({ path: screenshotPath(dir, "alerts-stale") });

  // A phone: the alerts card fits.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: screenshotPath(dir, "alerts-phone") });
  const phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);

  return {
    before,
    firing,
    refused,
    acked,
    resolved,
    stale,
    phoneOverflow,
    consoleErrors: log.consoleErrors,
    pageErrors: log.pageErrors,
    failedRequests: log.failedRequests,
  };
});
