// Shared helpers of the browser tests: Debian's Chromium through playwright-core, a fresh
// profile per run, console capture, JSON-lines output and a hard time limit.
//
// Every script prints JSON lines on stdout: progress events ({"event": ...}) that the Rust test
// may react to, and one final {"result": ...} or {"error": ...}. Exit code 0 only with a result.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.TELEBRIDGE_CHROMIUM || "/usr/bin/chromium";

const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** `--name value` pairs and `--flag` switches. */
export function parseArgs(argv = process.argv.slice(2)) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--")) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2);
    if (i + 1 < argv.length && !argv[i + 1].startsWith("--")) out[key] = argv[++i];
    else out[key] = true;
  }
  return out;
}

export function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

let cleanup = async () => {};

/**
 * Runs `main(ctx)` with a browser; prints its return value as {"result": ...}. Ends the
 * browser and the process after `limitMs` whatever happens.
 */
export async function run(limitMs, main) {
  const timer = setTimeout(async () => {
    emit({ error: `time limit of ${limitMs} ms reached` });
    await cleanup().catch(() => {});
    process.exit(3);
  }, limitMs);
  timer.unref();
  let code = 0;
  try {
    const ctx = await launch();
    const result = await main(ctx);
    emit({ result });
  } catch (e) {
    emit({ error: String(e && e.stack ? e.stack : e) });
    code = 1;
  } finally {
    await cleanup().catch(() => {});
    clearTimeout(timer);
  }
  process.exit(code);
}

async function launch() {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: run scripts/test (it installs it)`);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "telebridge-chromium-"));
  // A persistent context is how Playwright takes a --user-data-dir: a fresh, empty profile.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 1440, height: 900 },
    timeout: 20000,
  });
  cleanup = async () => {
    cleanup = async () => {};
    await context.close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  };
  for (const sig of ["SIGTERM", "SIGINT"]) {
    process.on(sig, async () => {
      await cleanup().catch(() => {});
      process.exit(130);
    });
  }
  return { context };
}

/** A page that records console errors, uncaught exceptions and failed requests. */
export async function newPage(context, viewport) {
  const page = context.pages()[0] && !context.pages()[0].__used ? context.pages()[0] : await context.newPage();
  page.__used = true;
  if (viewport) await page.setViewportSize(viewport);
  const log = { consoleErrors: [], pageErrors: [], failedRequests: [] };
  page.on("console", (m) => {
    if (m.type() === "error") log.consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => log.pageErrors.push(String(e)));
  page.on("requestfailed", (r) => log.failedRequests.push(`${r.method()} ${r.url()}: ${r.failure() && r.failure().errorText}`));
  page.setDefaultTimeout(15000);
  return { page, log };
}

export function screenshotPath(dir, name) {
  fs.mkdirSync(dir, { recursive: true });
  return path.join(dir, `${name}.png`);
}

/** Waits for one line on stdin (the Rust test's go-ahead), with a limit. */
export function readLine(limitMs) {
  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: process.stdin });
    const t = setTimeout(() => {
      rl.close();
      reject(new Error(`no line on stdin within ${limitMs} ms`));
    }, limitMs);
    rl.once("line", (line) => {
      clearTimeout(t);
      rl.close();
      resolve(line.trim());
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` (in node) until it returns a truthy value. */
export async function until(what, limitMs, fn, everyMs = 50) {
  const deadline = Date.now() + limitMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${limitMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}
