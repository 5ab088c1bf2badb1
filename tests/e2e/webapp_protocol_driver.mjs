// Drives headless Chromium through the conferencing web app behind confedge's proxy, for
// tests/e2e/test_webapp_h2.py: which HTTP version did each of the app's loads use?
//
// What a user does: open /webapp/, join "meet" with the host PIN (token request, the app's own
// EventSource on the conference's event stream, the call POST with a fake camera), wait until the
// roster shows "(you)" (it is filled only from that event stream), then leave (disconnect and
// release_token; leaving closes the EventSource, which is when its resource timing entry appears).
// Then the browser's own Resource Timing: the navigation entry and every resource entry, each
// with its nextHopProtocol ("h2" or "http/1.1").
//
// Usage: node webapp_protocol_driver.mjs '<json>' with json = {url, name, pin, chromium,
// timeoutMs}. Prints one JSON line: {ok, status, roster, state, nav: {name, nextHopProtocol},
// resources: [{name, initiatorType, nextHopProtocol}], console, error}.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launchChromium, resourceProtocols } from './driver_common.mjs';

const cfg = JSON.parse(process.argv[2]);
const timeout = cfg.timeoutMs || 20000;
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'confedge-webapp-h2-'));
let context;
const out = { ok: false };
const consoleLines = [];
try {
  context = await launchChromium(cfg.chromium, userDataDir, [
    '--ignore-certificate-errors',
    '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  ], { ignoreHTTPSErrors: true });
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => consoleLines.push(m.type() + ': ' + m.text()));
  page.on('pageerror', (e) => consoleLines.push('pageerror: ' + String(e)));
  const resp = await page.goto(cfg.url, { timeout });
  out.status = resp ? resp.status() : null;
  await page.fill('#name', cfg.name);
  await page.fill('#pin', cfg.pin);
  await page.click('#join');
  // The roster comes only from the event stream (participant_create): the EventSource works.
  await page.waitForFunction(() => [...document.querySelectorAll('#participants li')]
    .some((li) => li.textContent.includes('(you)')), null, { timeout });
  // The call POST answered (the node's SDP answer): the app's API calls all went through.
  await page.waitForFunction(() => window.confedgeCall.callUuid !== '', null, { timeout });
  out.roster = await page.$$eval('#participants li', (lis) => lis.map((li) => li.textContent));
  await page.click('#leave');
  await page.waitForFunction(() => document.getElementById('state').textContent === 'idle',
    null, { timeout });
  out.state = await page.textContent('#state');
  // Leaving closed the EventSource: its entry is there once its fetch has ended.
  Object.assign(out, await resourceProtocols(page, '/events?', timeout));
  out.ok = true;
} catch (err) {
  out.error = String((err && err.stack) || err);
} finally {
  out.console = consoleLines.slice(-20);
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(out) + '\n');
