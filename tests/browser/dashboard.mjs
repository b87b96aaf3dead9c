// The dashboard in a real browser against a real daemon with simulated devices.
//
//   node dashboard.mjs --url http://127.0.0.1:PORT/ --artifacts DIR --device ID --devices N
//                      [--token TOKEN] [--phone] [--restart] [--prefix NAME]
//
// Loads the page (signing in first when --token is given), waits for the N devices, opens ID's
// charts and waits for live points, sends `ping` (acked) and `selfdestruct` (failed) from the
// console, and saves screenshots (desktop; with --phone a phone too). With --restart it then prints
// {"event":"ready"}, lets the Rust test restart the daemon, and follows the page through the
// outage and the reconnect until the chart has live points again.

import { emit, newPage, parseArgs, run, screenshotPath } from "./lib.mjs";

const args = parseArgs();
const url = args.url;
const dir = args.artifacts;
const device = args.device;
const want = Number(args.devices || 1);
const prefix = args.prefix || "dashboard";

const snap = (page) => page.evaluate(() => globalThis.telebridge.snapshot());

/** Signs in: first with a wrong token (refused), then with the right one. */
async function signIn(page, log, token) {
  await page.waitForSelector("#login:not([hidden])");
  await page.waitForSelector("#app", { state: "hidden" });
  await page.fill("#token", "not-the-token");
  const errorsBefore = log.consoleErrors.length;
  await page.click("#login-submit");
  await page.waitForSelector("#login-error:not([hidden])");
  const refused = (await page.textContent("#login-error")).trim();
  // Chromium logs the refused attempt's 401 response itself; keep it apart.
  log.refusedErrors = log.consoleErrors.splice(errorsBefore);
  await page.screenshot({ path: screenshotPath(dir, `${prefix}-sign-in`) });
  await page.fill("#token", token);
  await page.click("#login-submit");
  await page.waitForSelector("#login", { state: "hidden" });
  return refused;
}

async function waitForDevices(page) {
  await page.waitForFunction(
    (n) => document.querySelectorAll("#device-list .device.online").length >= n,
    want,
  );
}

async function openChart(page) {
  await page.click(`#device-list .device[data-id="${device}"]`);
  await page.waitForFunction((d) => {
    const s = globalThis.telebridge.snapshot();
    return s.chart && s.chart.device === d && s.chart.historyLoaded && s.chart.metrics.length >= 5;
  }, device);
  const before = (await snap(page)).chart.seqs.length;
  // Live points reach the chart.
  await page.waitForFunction(
    (n) => globalThis.telebridge.snapshot().chart.seqs.length >= n + 5,
    before,
  );
  return before;
}

/** Sends a command from the console; waits for the newest result to reach `status`. */
async function command(page, name, params, status) {
  await page.selectOption("#cmd-device", device);
  await page.fill("#cmd-name", name);
  await page.fill("#cmd-params", params);
  const count = await page.$$eval("#results .result", (r) => r.length);
  await page.click("#cmd-send");
  await page.waitForFunction(
    ([n, want, label]) => {
      const all = document.querySelectorAll("#results .result");
      const li = all[0];
      return all.length === n + 1 && li.dataset.status === want && li.querySelector(".result-cmd").textContent === label;
    },
    [count, status, `${name} → ${device}`],
  );
  return (await page.$eval("#results .result", (li) => li.innerText)).replace(/\s+/g, " ").trim();
}

run(args.restart ? 55000 : 28000, async ({ context }) => {
  const { page, log } = await newPage(context, { width: 1440, height: 900 });
  const started = Date.now();
  await page.goto(url, { waitUntil: "load" });
  const refused = args.token ? await signIn(page, log, args.token) : null;
  await waitForDevices(page);
  const listedMs = Date.now() - started;
  await page.waitForFunction(() => {
    const s = globalThis.telebridge.snapshot();
    return s.sse === "connected" && s.ws === "connected";
  });
  const historyPoints = await openChart(page);

  const ack = await command(page, "ping", "{}", "acked");
  const failed = await command(page, "selfdestruct", "{\"now\": true}", "failed");
  await page.waitForFunction(() => document.querySelectorAll("#log li[data-id]").length >= 2);
  const logRows = await page.$$eval("#log li[data-id]", (rows) =>
    rows.map((r) => ({ id: r.dataset.id, text: r.innerText.replace(/\s+/g, " ").trim() })),
  );
  await page.mouse.move(0, 0);
  await page.screenshot({ path: screenshotPath(dir, `${prefix}-desktop`) });
  emit({ event: "desktop" });

  // A phone.
  let phone = { log: { consoleErrors: [], pageErrors: [], failedRequests: [] } };
  let phoneOverflow = null;
  if (args.phone) {
    phone = await newPage(context, { width: 390, height: 844 });
    await phone.page.goto(`${url}#device=${device}`, { waitUntil: "load" });
    await waitForDevices(phone.page);
    await phone.page.waitForFunction(() => {
      const s = globalThis.telebridge.snapshot();
      return s.chart && s.chart.historyLoaded && s.chart.metrics.length >= 5 && s.ws === "connected";
    });
    await phone.page.waitForTimeout(300);
    await phone.page.screenshot({ path: screenshotPath(dir, `${prefix}-phone`) });
    await phone.page.screenshot({ path: screenshotPath(dir, `${prefix}-phone-full`), fullPage: true });
    phoneOverflow = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    await phone.page.close();
  }

  const result = {
    listedMs,
    refused,
    refusedErrors: log.refusedErrors || [],
    historyPoints,
    ack,
    failed,
    logRows,
    phoneOverflow,
  };

  if (args.restart) {
    const before = await snap(page);
    emit({ event: "ready", lastSeq: before.lastSeq });
    await page.waitForFunction(
      () => document.getElementById("sse-state").dataset.state === "reconnecting",
      null,
      { timeout: 20000 },
    );
    const outageAt = Date.now();
    await page.waitForSelector("#banner[data-kind=warn]:not([hidden])");
    result.outageBanner = (await page.textContent("#banner")).trim();
    result.outageLinks = await page.$$eval(".link", (ls) => ls.map((l) => l.textContent.replace(/\s+/g, " ").trim()));
    await page.waitForFunction(() => [...document.querySelectorAll("#device-list .device")].every((r) => r.dataset.presence === "unknown"));
    result.outagePresence = await page.$$eval("#device-list .device", (rs) => rs.map((r) => r.dataset.presence));
    result.outageCount = (await page.textContent("#device-count")).trim();
    await page.screenshot({ path: screenshotPath(dir, `${prefix}-outage`) });
    emit({ event: "outage" });
    await page.waitForFunction(() => {
      const s = globalThis.telebridge.snapshot();
      return s.sse === "connected" && s.ws === "connected";
    }, null, { timeout: 30000 });
    result.reconnectMs = Date.now() - outageAt;
    const resumed = await snap(page);
    // The chart goes on: live points after the reconnect.
    await page.waitForFunction(
      (n) => globalThis.telebridge.snapshot().chart.seqs.filter((s) => s > n).length >= 5,
      resumed.lastSeq,
    );
    result.reconnectBanner = (await page.textContent("#banner")).trim();
    result.backPresence = await page.$$eval("#device-list .device", (rs) => rs.map((r) => r.dataset.presence));
    await page.screenshot({ path: screenshotPath(dir, `${prefix}-reconnected`) });
    result.afterRestart = await command(page, "ping", "{}", "acked");
    result.sseOpens = resumed.sseOpens;
    result.wsOpens = resumed.wsOpens;
    result.seqBeforeRestart = before.lastSeq;
  }

  const s = await snap(page);
  if (args.token) {
    // Log out: the page asks for the token again, also after a reload.
    await page.click("#logout");
    await page.waitForSelector("#login:not([hidden])");
    await page.reload({ waitUntil: "load" });
    await page.waitForSelector("#login:not([hidden])");
    result.loggedOut = await page.evaluate(() => document.getElementById("app").hidden);
  }
  return {
    ...result,
    devices: s.devices,
    chartDevice: s.chart.device,
    chartSeqs: s.chart.seqs,
    chartMetrics: s.chart.metrics,
    lastSeq: s.lastSeq,
    consoleErrors: [...log.consoleErrors, ...phone.log.consoleErrors],
    pageErrors: [...log.pageErrors, ...phone.log.pageErrors],
    failedRequests: [...log.failedRequests, ...phone.log.failedRequests],
  };
});
