// The dashboard's time ranges in a real browser against a real daemon whose device has readings
// spread over the last 24 hours.
//
//   node ranges.mjs --url http://127.0.0.1:PORT/ --artifacts DIR --device ID --live-value V
//
// Opens ID's charts (live, raw points), picks "24 h" and waits for the aggregated charts, hovers
// the temperature chart, then prints {"event":"drawn", ...} with what the page drew and the series
// request it made, so that the Rust test can ask the API the same and publish a live reading
// whose temperature is V. Waits until a bucket's max is V, reloads the page (the range comes back
// from the URL), then picks a custom range of 5 h (aggregated) and one of 90 min (raw), and
// opens a link to a range that the API refuses.

import { emit, newPage, parseArgs, run, screenshotPath } from "./lib.mjs";

const args = parseArgs();
const dir = args.artifacts;
const device = args.device;
const liveValue = Number(args["live-value"]);

const snap = (page) => page.evaluate(() => globalThis.telebridge.snapshot());
const series = (page) => page.evaluate(() => globalThis.telebridge.series());

/** Waits until the chart of `device` is in `mode` with its history loaded (and, for series, drawn). */
async function loaded(page, mode) {
  try {
    await page.waitForFunction(([d, m]) => {
      const c = globalThis.telebridge.snapshot().chart;
      return c && c.device === d && c.mode === m && c.historyLoaded && (m === "raw" || c.points > 0);
    }, [device, mode]);
  } catch (e) {
    const shown = await page.evaluate(() => [document.getElementById("detail-status").textContent, globalThis.telebridge.snapshot().chart]);
    throw new Error(`no ${mode} chart of ${device} (${e.message}); the page shows ${JSON.stringify(shown)}`);
  }
}

const pressed = (page) =>
  page.$$eval("#range button[aria-pressed=true]", (bs) => bs.map((b) => b.dataset.range));

/** Fills the custom range (local times, minutes ago from now) and shows it. */
async function custom(page, fromMinAgo, toMinAgo) {
  const [from, to] = await page.evaluate(([a, b]) => {
    const local = (t) => {
      const d = new Date(t);
      const p = (n) => String(n).padStart(2, "0");
      return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
    };
    const now = Date.now();
    return [local(now - a * 60000), b === null ? "" : local(now - b * 60000)];
  }, [fromMinAgo, toMinAgo]);
  if (await page.isHidden("#custom-range")) await page.click("#range-custom");
  await page.fill("#range-from", from);
  await page.fill("#range-to", to);
  await page.click("#range-apply");
  return { from, to };
}

run(50000, async ({ context }) => {
  const { page, log } = await newPage(context, { width: 1440, height: 900 });
  await page.goto(`${args.url}#device=${device}`, { waitUntil: "load" });
  await loaded(page, "raw");
  const live = await snap(page);

  // 24 h: aggregated.
  await page.click('#range button[data-range="24h"]');
  await loaded(page, "series");
  const hash = await page.evaluate(() => location.hash);
  const pressed24 = await pressed(page);
  const status = (await page.textContent("#detail-status")).trim();
  const drawn = await series(page);

  // Hovering a chart shows the bucket under the cursor.
  const body = await page.$('.chart[data-metric="temperature"] .chart-body');
  const box = await body.boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.waitForSelector('.chart[data-metric="temperature"][data-hover="true"]');
  const hover = (await page.innerText('.chart[data-metric="temperature"] .chart-head')).replace(/\s+/g, " ").trim();
  await page.screenshot({ path: screenshotPath(dir, "ranges-24h-hover") });
  await page.mouse.move(0, 0);
  await page.waitForSelector('.chart[data-metric="temperature"][data-hover="false"]');
  emit({ event: "drawn", series: drawn, hash });

  // A live reading extends the band.
  await page.waitForFunction(
    (v) => globalThis.telebridge.series().points.some((p) => p.temperature && p.temperature.max === v),
    liveValue,
  );
  const extended = await series(page);
  await page.screenshot({ path: screenshotPath(dir, "ranges-24h") });

  // The URL keeps the range: a reload comes back to it.
  await page.reload({ waitUntil: "load" });
  await loaded(page, "series");
  const reloaded = {
    hash: await page.evaluate(() => location.hash),
    pressed: await pressed(page),
    range: (await snap(page)).range,
    series: await series(page),
  };

  // Custom ranges: 5 h ending an hour ago is aggregated, 90 min to now is raw.
  const long = await custom(page, 360, 60);
  await loaded(page, "series");
  const customLong = {
    ...long,
    hash: await page.evaluate(() => location.hash),
    pressed: await pressed(page),
    series: await series(page),
  };
  await page.screenshot({ path: screenshotPath(dir, "ranges-custom") });
  const short = await custom(page, 90, null);
  await loaded(page, "raw");
  const customShort = { ...short, hash: await page.evaluate(() => location.hash), chart: (await snap(page)).chart };

  // A range the API refuses (too many buckets): the page says why, in the API's words.
  const errorsBefore = log.consoleErrors.length;
  await page.evaluate((d) => {
    location.hash = `#device=${d}&from=1970-01-01T00:00:00.000Z&to=9999-12-31T00:00:00.000Z`;
  }, device);
  await page.waitForFunction(() => {
    const c = globalThis.telebridge.snapshot().chart;
    return c && c.mode === "series" && c.historyLoaded && c.error;
  });
  await page.screenshot({ path: screenshotPath(dir, "ranges-refused") });
  const refused = {
    request: (await series(page)).request,
    status: (await page.textContent("#detail-status")).trim(),
    kind: await page.getAttribute("#detail-status", "data-kind"),
    // Chromium's own note of the 400 response.
    consoleErrors: log.consoleErrors.splice(errorsBefore),
  };

  return {
    live: live.chart,
    pressed24,
    status,
    hover,
    extended,
    reloaded,
    customLong,
    customShort,
    refused,
    consoleErrors: log.consoleErrors,
    pageErrors: log.pageErrors,
    failedRequests: log.failedRequests,
  };
});
