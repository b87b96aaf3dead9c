// Reading the charts, finding devices and the console, in a real browser against a real daemon
// whose devices the Rust test prepared (see tests/it/browser.rs).
//
//   node monitor.mjs --url http://127.0.0.1:PORT/ --artifacts DIR --truck ID --lonely ID
//                    --offline ID --outage FROM_S,TO_S
//
// On the truck's charts (an outage between FROM_S and TO_S, Unix seconds): the units, the gap
// (in what uPlot clipped and in the canvas pixels), the tooltip by a hovered point, the text
// summary, the last time label inside the card, and the CSV of the range. On the lonely device
// (one reading): a visible point and a readable axis. Then the device list's filter, sort and
// URL, and its keys; the console's templates, a queued command cancelled, and Send disabled
// with its reason while the command channel is down. Prints {"result": ...}.

import fs from "node:fs";
import { emit, newPage, parseArgs, run, screenshotPath } from "./lib.mjs";

const args = parseArgs();
const dir = args.artifacts;
const [outageFrom, outageTo] = String(args.outage).split(",").map(Number);

const snap = (page) => page.evaluate(() => globalThis.telebridge.snapshot());
const plots = (page) => page.evaluate(() => globalThis.telebridge.plots());

async function chartOf(page, device, metrics) {
  await page.click(`#device-list .device[data-id="${device}"]`);
  try {
    await page.waitForFunction(([d, n]) => {
      const c = globalThis.telebridge.snapshot().chart;
      return c && c.device === d && c.historyLoaded && c.metrics.length >= n;
    }, [device, metrics]);
  } catch (e) {
    throw new Error(`no chart of ${device}: ${e.message}; ${JSON.stringify(await snap(page))}`);
  }
  // One frame for the draw; then each card holds its uPlot, for the pixel checks.
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.evaluate(() => {
    for (const card of document.querySelectorAll(".chart")) card.__plot = globalThis.telebridge.plotOf(card.dataset.metric);
  });
}

/**
 * Pixels of the chart's canvas in the series' stroke color: in the column at time `t`
 * (seconds), over the plot's height, or in a box around the point (t, y).
 */
function strokePixels(page, metric, t, y = null) {
  return page.evaluate(([m, t, y]) => {
    const card = document.querySelector(`.chart[data-metric="${m}"]`);
    const canvas = card.querySelector("canvas");
    const ctx = canvas.getContext("2d");
    const p = globalThis.telebridge.plots()[m];
    // The stroke as RGB, whatever CSS form it takes.
    const probe = document.createElement("canvas").getContext("2d");
    probe.fillStyle = p.stroke;
    probe.fillRect(0, 0, 1, 1);
    const [sr, sg, sb] = probe.getImageData(0, 0, 1, 1).data;
    const u = {};
    const dpr = globalThis.devicePixelRatio || 1;
    const over = card.querySelector(".u-over");
    u.left = over.offsetLeft * dpr;
    u.top = over.offsetTop * dpr;
    const plot = card.__plot;
    const x = Math.round(u.left + plot.valToPos(t, "x") * dpr);
    let x0 = x - 1;
    let x1 = x + 1;
    let y0 = u.top;
    let y1 = u.top + over.offsetHeight * dpr;
    if (y !== null) {
      const py = Math.round(u.top + plot.valToPos(y, "y") * dpr);
      x0 = x - 5 * dpr;
      x1 = x + 5 * dpr;
      y0 = py - 5 * dpr;
      y1 = py + 5 * dpr;
    }
    const img = ctx.getImageData(x0, y0, x1 - x0 + 1, y1 - y0 + 1).data;
    let n = 0;
    for (let i = 0; i < img.length; i += 4) {
      const close = Math.abs(img[i] - sr) < 40 && Math.abs(img[i + 1] - sg) < 40 && Math.abs(img[i + 2] - sb) < 40;
      if (close && img[i + 3] > 200) n++;
    }
    return n;
  }, [metric, t, y]);
}

run(80000, async ({ context }) => {
  const { page, log } = await newPage(context, { width: 1440, height: 900 });
  await page.goto(args.url, { waitUntil: "load" });
  await page.waitForFunction((n) => document.querySelectorAll("#device-list .device").length >= n, 5);

  // ---- the truck: units, gap, tooltip, summary, last label, CSV
  await chartOf(page, args.truck, 3);
  const truck = { snapshot: (await snap(page)).chart, plots: await plots(page) };
  const mid = (outageFrom + outageTo) / 2;
  truck.pixels = {
    outage: await strokePixels(page, "speed", mid),
    before: await strokePixels(page, "speed", outageFrom - 8),
    after: await strokePixels(page, "speed", outageTo + 8),
  };
  // Hover the last reading of speed.
  const hover = await page.evaluate(() => {
    const card = document.querySelector('.chart[data-metric="speed"]');
    const plot = card.__plot;
    const xs = plot.data[0];
    const over = card.querySelector(".u-over").getBoundingClientRect();
    const i = xs.length - 3;
    return { x: over.left + plot.valToPos(xs[i], "x"), y: over.top + plot.valToPos(plot.data[1][i], "y"), value: plot.data[1][i], t: xs[i] };
  });
  await page.mouse.move(hover.x, hover.y);
  await page.waitForSelector('.chart[data-metric="speed"] .chart-tip:not([hidden])');
  truck.tooltip = await page.evaluate(() => {
    const card = document.querySelector('.chart[data-metric="speed"]');
    const tip = card.querySelector(".chart-tip");
    const r = tip.getBoundingClientRect();
    const c = card.getBoundingClientRect();
    return { text: tip.innerText.replace(/\s+/g, " ").trim(), inside: r.left >= c.left && r.right <= c.right };
  });
  truck.hovered = hover;
  await page.screenshot({ path: screenshotPath(dir, "monitor-tooltip-gap") });
  await page.mouse.move(5, 5);
  await page.waitForSelector('.chart[data-metric="speed"] .chart-tip', { state: "hidden" });
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#chart-csv")]);
  const csv = fs.readFileSync(await download.path(), "utf8").trim().split("\n");
  truck.csv = { name: download.suggestedFilename(), header: csv[0], rows: csv.length - 1 };

  // ---- one reading: a visible point, a readable axis
  await chartOf(page, args.lonely, 1);
  const lonely = { plots: await plots(page), status: (await page.textContent("#detail-status")).trim() };
  const lp = await page.evaluate(() => {
    const plot = document.querySelector('.chart[data-metric="temperature"]').__plot;
    return [plot.data[0][0], plot.data[1][0]];
  });
  lonely.pointPixels = await strokePixels(page, "temperature", lp[0], lp[1]);
  await page.screenshot({ path: screenshotPath(dir, "monitor-single-reading") });

  // ---- the device list: filter, sort, URL, keys
  const rows = () => page.$$eval("#device-list .device:not([hidden])", (ls) => ls.map((l) => l.dataset.id));
  const list = { all: await rows() };
  await page.selectOption("#presence-filter", "offline");
  list.offline = await rows();
  list.offlineHash = await page.evaluate(() => location.hash);
  await page.selectOption("#presence-filter", "online");
  list.online = await rows();
  await page.selectOption("#presence-filter", "");
  await page.selectOption("#device-sort", "problem");
  await page.waitForFunction(() => location.hash.includes("sort=problem"));
  list.problem = await rows();
  await page.selectOption("#device-sort", "seen");
  list.seen = await rows();
  await page.fill("#device-filter", "dev-");
  list.filtered = await rows();
  list.hash = await page.evaluate(() => location.hash);
  await page.reload({ waitUntil: "load" });
  await page.waitForFunction((n) => document.querySelectorAll("#device-list .device").length >= n, 5);
  list.restored = {
    q: await page.inputValue("#device-filter"),
    sort: await page.inputValue("#device-sort"),
    rows: await rows(),
  };
  // Keys: one Tab stop; arrows move it and the selection.
  const first = list.restored.rows[0];
  await page.click(`#device-list .device[data-id="${first}"]`);
  const keys = { stops: await page.$$eval("#device-list .device[tabindex='0']", (ls) => ls.map((l) => l.dataset.id)) };
  await page.keyboard.press("ArrowDown");
  keys.down = await page.evaluate(() => [document.activeElement.dataset.id, globalThis.telebridge.snapshot().selected, document.querySelectorAll("#device-list .device[tabindex='0']").length]);
  await page.keyboard.press("End");
  keys.end = await page.evaluate(() => [document.activeElement.dataset.id, globalThis.telebridge.snapshot().selected]);
  await page.keyboard.press("Home");
  keys.home = await page.evaluate(() => document.activeElement.dataset.id);
  await page.keyboard.press("Tab");
  keys.tabbedTo = await page.evaluate(() => document.activeElement.id || document.activeElement.tagName);
  list.keys = keys;
  await page.fill("#device-filter", "");
  await page.screenshot({ path: screenshotPath(dir, "monitor-device-list") });

  // ---- the console: templates, a queued command cancelled
  await page.waitForFunction(() => !document.getElementById("cmd-send").disabled);
  const console_ = {
    templates: await page.$$eval("#cmd-names option", (os) => os.map((o) => o.value)),
    why: await page.isHidden("#cmd-why"),
  };
  await page.fill("#cmd-name", "set_interval");
  console_.params = await page.inputValue("#cmd-params");
  await page.fill("#cmd-name", "ping");
  console_.pingParams = await page.inputValue("#cmd-params");
  await page.selectOption("#cmd-device", args.offline);
  await page.click("#cmd-send");
  await page.waitForFunction(() => {
    const li = document.querySelector("#results .result");
    return li && li.dataset.status === "queued" && !li.querySelector(".cancel").hidden;
  });
  console_.queued = await page.$eval("#results .result .badge", (b) => [b.textContent, b.title]);
  await page.click("#results .result .cancel");
  await page.waitForFunction(() => document.querySelector("#results .result").dataset.status === "cancelled");
  console_.cancelled = await page.$eval("#results .result", (li) => li.innerText.replace(/\s+/g, " ").trim());
  await page.click("#log-refresh");
  await page.waitForFunction(() => {
    const b = document.querySelector("#log .log-row .badge");
    return b && b.textContent === "cancelled";
  });
  console_.log = await page.$eval("#log .log-row", (li) => li.innerText.replace(/\s+/g, " ").trim());
  await page.screenshot({ path: screenshotPath(dir, "monitor-console-cancelled") });

  // ---- Send, while the command channel is down: disabled, with the reason beside it.
  const { page: down } = await newPage(context, { width: 1440, height: 900 });
  await down.routeWebSocket(/\/ws$/, (ws) => ws.close());
  await down.goto(args.url, { waitUntil: "load" });
  await down.waitForFunction(() => document.querySelectorAll("#device-list .device").length > 0);
  await down.waitForFunction(() => document.getElementById("cmd-send").disabled && !document.getElementById("cmd-why").hidden);
  console_.down = {
    disabled: await down.$eval("#cmd-send", (b) => b.disabled),
    why: (await down.textContent("#cmd-why")).trim(),
  };
  await down.close();

  emit({ event: "done" });
  return { truck, lonely, list, console: console_, errors: [...log.consoleErrors, ...log.pageErrors] };
});
