// Issue #3: a plain EventSource in headless Chromium survives a server-side disconnect (the
// daemon restarting on the same port) and resumes by itself, by Last-Event-ID, with no gap.
//
//   node eventsource.mjs --url http://127.0.0.1:PORT [--before N] [--after N]
//
// Opens /events?type=reading from a page of the daemon's own origin, collects the ids of
// `reading` events, prints {"event":"ready"} after N of them, and finishes once the stream has
// reopened by itself and N more readings arrived. Nothing in the page reconnects by hand.

import { emit, newPage, parseArgs, run } from "./lib.mjs";

const args = parseArgs();
const base = args.url.replace(/\/$/, "");
const before = Number(args.before || 20);
const after = Number(args.after || 20);

run(45000, async ({ context }) => {
  const { page, log } = await newPage(context);
  // Any page of the daemon gives the origin; /healthz is the smallest.
  await page.goto(`${base}/healthz`);
  await page.evaluate(() => {
    const w = globalThis;
    w.seen = { ids: [], opens: 0, errors: 0, shutdowns: 0, closedByBrowser: false, states: [] };
    const es = new EventSource("/events?type=reading");
    w.es = es;
    es.onopen = () => { w.seen.opens++; w.seen.states.push("open"); };
    es.onerror = () => {
      w.seen.errors++;
      w.seen.states.push(es.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
      if (es.readyState === EventSource.CLOSED) w.seen.closedByBrowser = true;
    };
    es.addEventListener("reading", (e) => {
      const data = JSON.parse(e.data);
      if (String(data.seq) !== e.lastEventId) throw new Error(`id ${e.lastEventId} is not seq ${data.seq}`);
      w.seen.ids.push(data.seq);
    });
    es.addEventListener("shutdown", () => { w.seen.shutdowns++; w.seen.states.push("shutdown"); });
  });
  const seen = () => page.evaluate(() => globalThis.seen);
  await page.waitForFunction((n) => globalThis.seen.ids.length >= n, before, { timeout: 20000 });
  const first = await seen();
  emit({ event: "ready", lastId: first.ids[first.ids.length - 1] });
  // The Rust test restarts the daemon; the browser reconnects by itself.
  await page.waitForFunction(() => globalThis.seen.errors >= 1, null, { timeout: 20000 });
  await page.waitForFunction(() => globalThis.seen.opens >= 2 || globalThis.seen.closedByBrowser, null, { timeout: 30000 });
  const reopened = await seen();
  if (reopened.closedByBrowser) throw new Error(`the browser closed the EventSource: ${reopened.states.join(", ")}`);
  const mark = reopened.ids.length;
  await page.waitForFunction(([m, n]) => globalThis.seen.ids.length >= m + n, [mark, after], { timeout: 20000 });
  const done = await seen();
  const readyState = await page.evaluate(() => globalThis.es.readyState);
  await page.evaluate(() => globalThis.es.close());
  return {
    ids: done.ids,
    opens: done.opens,
    errors: done.errors,
    shutdowns: done.shutdowns,
    states: done.states,
    readyState,
    readyAt: first.ids.length,
    consoleErrors: log.consoleErrors,
    pageErrors: log.pageErrors,
  };
});
