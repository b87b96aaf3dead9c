// The dashboard under load: many devices at a high rate (the Rust tests run 100 devices at
// 10 readings/s each, and 1,000 at 1 reading/s). Measures, inside the page, how smoothly it renders and how quickly it
// answers input while the feed pours in.
//
//   node load.mjs --url http://127.0.0.1:PORT/ --devices 100 --artifacts DIR [--seconds 5]

import { newPage, parseArgs, run, screenshotPath } from "./lib.mjs";

const args = parseArgs();
const want = Number(args.devices || 100);
const seconds = Number(args.seconds || 5);

run(40000, async ({ context }) => {
  const { page, log } = await newPage(context, { width: 1440, height: 900 });
  const t0 = Date.now();
  await page.goto(args.url, { waitUntil: "load" });
  // Rows out of view are not redrawn, so count from the page's state, not the DOM.
  await page.waitForFunction(
    (n) => globalThis.telebridge.snapshot().devices.filter((d) => d.online).length >= n,
    want,
    { timeout: 25000 },
  );
  await page.waitForFunction((n) => document.querySelectorAll("#device-list .device").length >= n, want);
  const listedMs = Date.now() - t0;
  await page.waitForFunction(() => {
    const s = globalThis.telebridge.snapshot();
    return s.chart && s.chart.historyLoaded && s.chart.metrics.length >= 5;
  });

  // Frame pacing, timer lag, long tasks and feed rate over a few seconds.
  const perf = await page.evaluate(async (secs) => {
    const out = { frames: 0, maxFrameGapMs: 0, maxLagMs: 0, longTasks: 0, longTaskMs: 0 };
    const obs = new PerformanceObserver((list) => {
      for (const e of list.getEntries()) {
        out.longTasks++;
        out.longTaskMs += e.duration;
      }
    });
    obs.observe({ entryTypes: ["longtask"] });
    const readings0 = globalThis.telebridge.snapshot().readings;
    const start = performance.now();
    let last = start;
    let running = true;
    const raf = (t) => {
      out.frames++;
      out.maxFrameGapMs = Math.max(out.maxFrameGapMs, t - last);
      last = t;
      if (running) requestAnimationFrame(raf);
    };
    requestAnimationFrame(raf);
    let expected = performance.now() + 50;
    const timer = setInterval(() => {
      const now = performance.now();
      out.maxLagMs = Math.max(out.maxLagMs, now - expected);
      expected = now + 50;
    }, 50);
    await new Promise((r) => setTimeout(r, secs * 1000));
    running = false;
    clearInterval(timer);
    obs.disconnect();
    const elapsed = (performance.now() - start) / 1000;
    out.fps = out.frames / elapsed;
    out.readingsPerSec = (globalThis.telebridge.snapshot().readings - readings0) / elapsed;
    return out;
  }, seconds);

  // Input while the feed pours in: pick another device, filter the list.
  const other = await page.evaluate(() => {
    const s = globalThis.telebridge.snapshot();
    return s.devices[Math.floor(s.devices.length / 2)].id;
  });
  let t = Date.now();
  await page.click(`#device-list .device[data-id="${other}"]`);
  try {
    await page.waitForFunction((d) => {
      const s = globalThis.telebridge.snapshot();
      return s.chart && s.chart.device === d && s.chart.historyLoaded && s.chart.metrics.length >= 5;
    }, other);
  } catch (e) {
    const seen = await page.evaluate(() => {
      const s = globalThis.telebridge.snapshot();
      return { selected: s.selected, chart: s.chart && { ...s.chart, seqs: s.chart.seqs.length }, status: document.getElementById("detail-status").textContent };
    });
    throw new Error(`picked ${other}; the page shows ${JSON.stringify(seen)}: ${e.message}`);
  }
  const selectMs = Date.now() - t;
  t = Date.now();
  await page.fill("#device-filter", other);
  await page.waitForFunction(
    () => document.querySelectorAll("#device-list .device:not([hidden])").length === 1,
  );
  const filterMs = Date.now() - t;
  await page.fill("#device-filter", "");
  // The presence filter and each sort, timed from the input to the list's new state.
  t = Date.now();
  await page.selectOption("#presence-filter", "offline");
  await page.waitForFunction(() => document.querySelectorAll("#device-list .device:not([hidden])").length === 0);
  const presenceMs = Date.now() - t;
  await page.selectOption("#presence-filter", "");
  const sortMs = {};
  for (const sort of ["seen", "problem", "name"]) {
    t = Date.now();
    await page.selectOption("#device-sort", sort);
    await page.waitForFunction((s) => location.hash.includes(`sort=${s}`) || s === "name", sort);
    sortMs[sort] = Date.now() - t;
  }
  // Sorted by last seen, the list keeps re-sorting as readings arrive: frames keep coming.
  await page.selectOption("#device-sort", "seen");
  const sorted = await page.evaluate(async () => {
    let frames = 0;
    let worst = 0;
    let last = performance.now();
    const end = last + 2000;
    await new Promise((resolve) => {
      const raf = (t) => {
        frames++;
        worst = Math.max(worst, t - last);
        last = t;
        if (t < end) requestAnimationFrame(raf);
        else resolve();
      };
      requestAnimationFrame(raf);
    });
    return { fps: frames / 2, maxFrameGapMs: worst };
  });
  await page.selectOption("#device-sort", "name");
  await page.waitForTimeout(300);
  await page.screenshot({ path: screenshotPath(args.artifacts, `load-${want}-devices`) });
  const s = await page.evaluate(() => globalThis.telebridge.snapshot());
  return {
    listedMs,
    ...perf,
    selectMs,
    filterMs,
    presenceMs,
    sortMs,
    sorted,
    devices: s.devices.length,
    chartPoints: s.chart.seqs.length,
    consoleErrors: log.consoleErrors,
    pageErrors: log.pageErrors,
  };
});
