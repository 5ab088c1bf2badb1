// Drives headless Chromium for tests/e2e/test_proxy_chromium.py.
//
// Loads a page *through the proxy* (https, the proxy's self-signed certificate accepted with
// --ignore-certificate-errors), then lets the page's real EventSource read the node's SSE stream
// through the proxy. Each event carries the node's send time; the page notes its arrival time.
//
// Usage: node proxy_chromium_driver.mjs '<json>' where json = {url, count, timeoutMs, chromium}.
// Prints one JSON line: {ok, status, title, protocols: {nav, sse}, why,
// got: [{seq, sent, recv}], error}.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launchChromium } from './driver_common.mjs';

const cfg = JSON.parse(process.argv[2]);
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'confedge-chromium-'));
let browser;
let out;
try {
  browser = await launchChromium(cfg.chromium, userDataDir, ['--ignore-certificate-errors'],
    { ignoreHTTPSErrors: true });
  const page = browser.pages()[0] || (await browser.newPage());
  const resp = await page.goto(cfg.url + '/page.html');
  const title = await page.title();
  const r = await page.evaluate(([n, t]) => collect(n, t), [cfg.count, cfg.timeoutMs]);
  // The protocol each load used ("h2" over HTTP/2, "http/1.1"): the page's navigation, and
  // the EventSource's stream once it has ended (a resource entry appears when a fetch ends).
  const protocols = await page.evaluate(() => ({
    nav: performance.getEntriesByType('navigation')[0].nextHopProtocol,
    sse: performance.getEntriesByType('resource')
      .filter((e) => e.name.includes('/events')).map((e) => e.nextHopProtocol),
  }));
  out = { ok: r.why === 'ok', status: resp ? resp.status() : null, title, protocols, ...r };
} catch (err) {
  out = { ok: false, error: String((err && err.stack) || err) };
} finally {
  if (browser) await browser.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(out) + '\n');
