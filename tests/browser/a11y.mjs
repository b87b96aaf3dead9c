// An automated accessibility check of the dashboard: axe-core (from the npm registry) on the
// page with live devices, charts and command results, at 1440×900 and 390×844, in the light and
// the dark colour scheme.
//
//   node a11y.mjs --url http://127.0.0.1:PORT/ --artifacts DIR --device ID
//
// Prints {"result": {"runs": [{scheme, width, height, violations, scrollWidth, clientWidth}]}};
// `violations` are axe's serious and critical findings (WCAG 2.x A and AA rules).

import fs from "node:fs";
import { createRequire } from "node:module";
import { newPage, parseArgs, run, screenshotPath } from "./lib.mjs";

const args = parseArgs();
const dir = args.artifacts;
const axeSource = fs.readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

const VIEWPORTS = [
  { width: 1440, height: 900, name: "desktop" },
  { width: 390, height: 844, name: "phone" },
];

run(90000, async ({ context }) => {
  const { page, log } = await newPage(context, VIEWPORTS[0]);
  const runs = [];
  let sent = false;
  for (const scheme of ["light", "dark"]) {
    for (const vp of VIEWPORTS) {
      await page.emulateMedia({ colorScheme: scheme });
      await page.setViewportSize({ width: vp.width, height: vp.height });
      if (!runs.length) await page.goto(`${args.url}#device=${args.device}`, { waitUntil: "load" });
      // A drawn chart in the scheme's colours (the page redraws them when the scheme changes).
      await page.waitForFunction((d) => {
        const c = globalThis.telebridge.snapshot().chart;
        if (!(c && c.device === d && c.historyLoaded && c.metrics.length > 0)) return false;
        const u = globalThis.telebridge.plotOf(c.metrics[0]);
        return u && u.axes[0].grid.stroke(u, 0) === getComputedStyle(document.documentElement).getPropertyValue("--grid").trim();
      }, args.device);
      await page.waitForFunction(() => !document.getElementById("cmd-send").disabled);
      if (!sent) {
        sent = true;
        // Command results and the log in the check too: an acked and a failed one.
        for (const name of ["ping", "selfdestruct"]) {
          await page.fill("#cmd-name", name);
          await page.fill("#cmd-params", "{}");
          await page.click("#cmd-send");
          await page.waitForFunction((n) => {
            const li = document.querySelector("#results .result");
            return li && li.querySelector(".result-cmd").textContent.startsWith(n) && ["acked", "failed"].includes(li.dataset.status);
          }, name);
        }
      }
      // A hovered chart shows its tooltip.
      const box = await page.locator(".chart .u-over").first().boundingBox();
      if (box) await page.mouse.move(box.x + box.width * 0.8, box.y + box.height / 2);
      // axe-core runs in the page (evaluate is not bound by the page's script policy).
      await page.evaluate(axeSource);
      const found = await page.evaluate(async () => {
        const r = await globalThis.axe.run(document, {
          runOnly: { type: "tag", values: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"] },
          resultTypes: ["violations"],
        });
        return r.violations.map((v) => ({
          id: v.id,
          impact: v.impact,
          help: v.help,
          nodes: v.nodes.slice(0, 5).map((n) => ({ target: n.target.join(" "), summary: n.failureSummary })),
        }));
      });
      // The page stays loaded from one run to the next (only the viewport and scheme change),
      // so the charts must follow a scheme change: their grid is the scheme's.
      const widths = await page.evaluate(() => {
        const u = globalThis.telebridge.plotOf(globalThis.telebridge.snapshot().chart.metrics[0]);
        const g = u.axes[0].grid.stroke;
        // Controls cut off by their card's edge (the card clips what overflows it).
        const clipped = [];
        for (const c of document.querySelectorAll("main button, main a, main input, main select, main h2")) {
          const card = c.closest(".card");
          const r = c.getBoundingClientRect();
          if (!card || !r.width) continue;
          const box = card.getBoundingClientRect();
          if (r.right > box.right + 0.5 || r.left < box.left - 0.5) clipped.push(c.id || c.textContent.trim() || c.tagName);
        }
        return {
          clipped,
          scrollWidth: document.documentElement.scrollWidth,
          clientWidth: document.documentElement.clientWidth,
          grid: getComputedStyle(document.documentElement).getPropertyValue("--grid").trim(),
          chartGrid: typeof g === "function" ? g(u, 0) : g,
        };
      });
      await page.screenshot({ path: screenshotPath(dir, `a11y-${vp.name}-${scheme}`), fullPage: vp.name === "phone" });
      runs.push({
        scheme,
        width: vp.width,
        height: vp.height,
        violations: found.filter((v) => v.impact === "serious" || v.impact === "critical"),
        minor: found.filter((v) => v.impact !== "serious" && v.impact !== "critical").map((v) => v.id),
        ...widths,
      });
    }
  }
  return { runs, errors: [...log.consoleErrors, ...log.pageErrors] };
});
