// Drives pxed's dashboard in Debian's headless Chromium for tests/integration/http.rs.
//
// Usage: node dashboard.mjs <base-url> <mac> <screenshot.png>
// Protocol on stdout, one line each, for the Rust test that runs it:
//   READY            the page is loaded and its event stream is live
//   SEEN <stage>     the machine's row shows <stage> as its last stage (after an event)
//   CHIPS <stages>   the event chips of the machine's row
//   SPANS <k>=<what>|...  the segments of the row's boot timeline bar, once it has one of each
//                    kind in WANT_KINDS (pxed cuts them; the page only draws them)
//   DONE             screenshot written
// The Rust side makes the events (curl) after READY and after each SEEN; this script waits for
// each stage named in WAIT_FOR below, in order, never reloading the page.

import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [base, mac, shot] = process.argv.slice(2);
if (!base || !mac || !shot) {
  console.error("usage: node dashboard.mjs <base-url> <mac> <screenshot.png>");
  process.exit(2);
}
// Each wait: what the row's last-stage cell must show (stage, and a word of the detail).
const WAIT_FOR = [
  ["http.script", "profile install"],
  ["os.userspace", "from"],
  ["os.custom", "os.installed"],
];
// Span kinds the boot timeline must show once the last event is in.
const WANT_KINDS = ["transfer", "kernel-boot", "userspace"];
const STEP_TIMEOUT_MS = 20000;

const profile = mkdtempSync(join(tmpdir(), "pxed-chromium-"));
// A fresh user-data-dir (playwright passes it as --user-data-dir).
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1100, height: 420 },
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
let failed = false;
try {
  const page = await browser.newPage();
  page.on("pageerror", e => { console.error("page error:", e.message); failed = true; });
  await page.goto(base + "/");
  await page.waitForFunction(
    () => document.getElementById("status").textContent === "live",
    null, { timeout: STEP_TIMEOUT_MS });
  // The machine must not be there yet: what follows arrives over the event stream.
  const rows = await page.evaluate(() => document.getElementById("rows").innerText);
  if (rows.includes(mac)) throw new Error(`machine ${mac} shown before any event: ${rows}`);
  console.log("READY");
  for (const [stage, word] of WAIT_FOR) {
    await page.waitForFunction(([mac, stage, word]) => {
      for (const tr of document.querySelectorAll("#rows tr")) {
        const cells = tr.querySelectorAll("td");
        if (cells.length < 2 || cells[0].textContent !== mac) continue;
        const last = cells[1].textContent;
        return last.startsWith(stage) && last.includes(word);
      }
      return false;
    }, [mac, stage, word], { timeout: STEP_TIMEOUT_MS });
    console.log(`SEEN ${stage}`);
  }
  const navigations = await page.evaluate(() => performance.getEntriesByType("navigation").length);
  if (navigations !== 1) throw new Error(`page navigated ${navigations} times`);
  const chips = await page.locator("#rows tr", { hasText: mac }).locator(".chip").allTextContents();
  console.log(`CHIPS ${chips.join(" ")}`);
  const row = page.locator("#rows tr", { hasText: mac });
  await page.waitForFunction(([mac, kinds]) => {
    for (const tr of document.querySelectorAll("#rows tr")) {
      if (tr.querySelector("td")?.textContent !== mac) continue;
      const have = [...tr.querySelectorAll(".seg")].map(s => s.dataset.kind);
      return kinds.every(k => have.includes(k));
    }
    return false;
  }, [mac, WANT_KINDS], { timeout: STEP_TIMEOUT_MS });
  const spans = await row.locator(".seg").evaluateAll(
    segs => segs.map(s => `${s.dataset.kind}=${s.dataset.what}`));
  console.log(`SPANS ${spans.join("|")}`);
  await page.screenshot({ path: shot });
  console.log("DONE");
} catch (e) {
  console.error(String(e));
  failed = true;
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
