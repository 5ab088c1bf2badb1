// Drives headless Chromium through the simulated node's web page (tests/e2e/test_nodesim_chromium.py).
//
// What a user does: open /webapp/, type a wrong PIN (the error must show), then the right PIN;
// the page requests a token, opens the event stream, calls with the (fake) camera and shows the
// node's echo. We then read what the browser itself reports: getStats() framesDecoded on the
// inbound video, and the selected candidate pair's remote candidate (it must be the TURN relay).
//
// Usage: node nodesim_chromium_driver.mjs '<json>' with json = {url, alias, name, pin, wrongPin,
// chromium, screenshot, timeoutMs, ignoreHttpsErrors}. Prints one JSON line.
// Optional keys (tests/e2e/test_demo_call.py): wrongPin null/absent skips the wrong-PIN step;
// pin "" joins as a guest; args (extra Chromium flags); minFrames (default 30); guessPin +
// guessMax: after leaving, guess that PIN until the page says the address is blocked (the
// edge's guard, HTTP 429) or guessMax attempts were made. The output always has tokenNodes:
// the status and X-Confedge-Node header of each request_token answer (which node served it).
// rtcConfig (tests/e2e/test_turns_on_https_port.py): merged over the page's own RTCPeerConnection
// configuration, e.g. {iceServers: [{urls: 'turns:...'}], iceTransportPolicy: 'relay'}, as a
// web app configured with a TURN server would pass it.
// The output also has nav and resources (after leaving): the navigation entry and the resource
// entries of Resource Timing, each {name, initiatorType, nextHopProtocol}.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { launchChromium, resourceProtocols } from './driver_common.mjs';

const cfg = JSON.parse(process.argv[2]);
const deadline = Date.now() + (cfg.timeoutMs || 30000);
const left = () => Math.max(1000, deadline - Date.now());

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'confedge-nodesim-chromium-'));
let context;
const out = { ok: false, steps: [] };
const consoleLines = [];
try {
  context = await launchChromium(cfg.chromium, userDataDir, [
    '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
    '--autoplay-policy=no-user-gesture-required',
    ...(cfg.args || []),
  ], { ignoreHTTPSErrors: !!cfg.ignoreHttpsErrors, viewport: { width: 1100, height: 760 } });
  if (cfg.rtcConfig) {
    await context.addInitScript((conf) => {
      const Native = window.RTCPeerConnection;
      window.RTCPeerConnection = class extends Native {
        constructor(c) { super({ ...(c || {}), ...conf }); }
      };
    }, cfg.rtcConfig);
  }
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => consoleLines.push(m.type() + ': ' + m.text()));
  page.on('pageerror', (e) => consoleLines.push('pageerror: ' + String(e)));
  out.tokenNodes = [];
  page.on('response', (r) => {
    if (r.url().endsWith('/request_token')) {
      out.tokenNodes.push({ status: r.status(), node: r.headers()['x-confedge-node'] || null });
    }
  });
  await page.goto(cfg.url, { timeout: left() });
  out.steps.push('loaded');

  // 1. Wrong PIN: the node answers 403 "Invalid PIN" and the page shows it.
  await page.fill('#alias', cfg.alias);
  await page.fill('#name', cfg.name);
  if (cfg.wrongPin != null) {
    await page.fill('#pin', cfg.wrongPin);
    await page.click('#join');
    await page.waitForSelector('#error:not([hidden])', { timeout: left() });
    out.wrongPinError = await page.textContent('#error');
    out.wrongPinVisible = await page.isVisible('#error');
    out.wrongPinState = await page.textContent('#state');
    out.steps.push('wrong-pin');
  }

  // 2. Right PIN: join, call, wait for "connected".
  await page.fill('#pin', cfg.pin);
  await page.click('#join');
  await page.waitForFunction(() => document.getElementById('state').textContent === 'connected',
    null, { timeout: left() });
  out.errorHiddenAfterJoin = !(await page.isVisible('#error'));
  out.steps.push('connected');

  // 3. What the browser measures: decoded inbound video frames, and the selected pair.
  const measure = () => page.evaluate(async () => {
    const pc = window.confedgeCall.pc;
    const stats = await pc.getStats();
    let frames = 0; let pair = null;
    stats.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') frames = s.framesDecoded || 0;
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    const pick = (c) => c && { candidateType: c.candidateType, address: c.address, port: c.port,
      protocol: c.protocol, relayProtocol: c.relayProtocol, url: c.url };
    const remoteSdp = pc.remoteDescription ? pc.remoteDescription.sdp : '';
    return {
      framesDecoded: frames,
      pair: pair && { state: pair.state, local: pick(stats.get(pair.localCandidateId)),
        remote: pick(stats.get(pair.remoteCandidateId)) },
      answerCandidates: remoteSdp.split(/\r?\n/).filter((l) => l.startsWith('a=candidate:')),
      remoteVideo: (() => { const v = document.getElementById('remote');
        return { width: v.videoWidth, height: v.videoHeight, time: v.currentTime }; })(),
    };
  });
  let m = await measure();
  const minFrames = cfg.minFrames == null ? 30 : cfg.minFrames;
  // The selected pair can carry media while the browser's own check on it is still unanswered
  // (getStats says "in-progress" for that moment, seen under CI load): wait for its final state
  // too, within the same deadline.
  const settled = (r) => r.framesDecoded >= minFrames && r.remoteVideo.width > 0
    && r.pair !== null && r.pair.state === 'succeeded';
  while (!settled(m) && Date.now() < deadline) {
    await page.waitForTimeout(250);
    m = await measure();
  }
  Object.assign(out, m);
  out.participants = await page.$$eval('#participants li', (lis) => lis.map((li) => li.textContent));
  out.state = await page.textContent('#state');
  out.role = await page.textContent('#role');
  out.stats = await page.textContent('#stats');
  if (cfg.screenshot) {
    await page.waitForTimeout(1200); // let the stats line and video settle
    await page.screenshot({ path: cfg.screenshot, fullPage: true });
  }
  out.steps.push('measured');

  // 4. Leave: the node forgets the participant.
  await page.click('#leave');
  await page.waitForFunction(() => document.getElementById('state').textContent === 'idle',
    null, { timeout: left() });
  out.steps.push('left');
  // 4b. Which protocol each load used ("h2" or "http/1.1"), from Resource Timing: the page's
  // navigation entry and every resource entry (script, style sheet, API calls, and the event
  // stream, whose entry appears once leaving has closed the EventSource).
  Object.assign(out, await resourceProtocols(page, '/events?', left()));

  // 5. Optional: keep guessing a wrong PIN, as an attacker would, until the edge blocks us.
  if (cfg.guessPin != null) {
    out.guesses = [];
    for (let i = 0; i < (cfg.guessMax || 15); i++) {
      await page.fill('#pin', cfg.guessPin);
      await page.evaluate(() => { const e = document.getElementById('error');
        e.textContent = ''; e.hidden = true; });
      await page.click('#join');
      await page.waitForSelector('#error:not([hidden])', { timeout: left() });
      const text = await page.textContent('#error');
      out.guesses.push(text);
      if (text.startsWith('Too many attempts')) break;
    }
    out.steps.push('guessed');
  }
  out.ok = true;
} catch (err) {
  out.error = String((err && err.stack) || err);
} finally {
  out.console = consoleLines.slice(-40);
  if (context) await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(out) + '\n');
