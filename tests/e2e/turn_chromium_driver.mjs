// Drives headless Chromium for tests/e2e/test_turn_chromium.py.
//
// Why a page with two RTCPeerConnections: it is the smallest real WebRTC session. Both sides
// use iceTransportPolicy "relay" with the TURN server under test as their only ICE server, so the
// DataChannel message can only cross through two allocations on that server (relay <-> relay),
// exactly the path a browser behind a restrictive firewall takes in a conference.
//
// Usage: node turn_chromium_driver.mjs '<json>' where json = {url, username, credential,
// timeoutMs, chromium, followUps?}. Prints one JSON line: {ok, message, pair, candidates, error,
// followUps}. followUps (default 0): after the first message, send that many more, 50 ms apart,
// and count those that arrive -- traffic that keeps flowing after Chromium has bound its TURN
// channels (its first packets go as Send indications), for the kernel-offload test.

import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const cfg = JSON.parse(process.argv[2]);

// The page is served over http://127.0.0.1 (a real origin, like the web app) by this process.
const PAGE = `<!doctype html><meta charset="utf-8"><title>confedge TURN relay test</title>
<script>
async function relayTest(cfg) {
  const iceServers = [{ urls: [cfg.url], username: cfg.username, credential: cfg.credential }];
  const conf = { iceServers, iceTransportPolicy: 'relay' };
  const pc1 = new RTCPeerConnection(conf);
  const pc2 = new RTCPeerConnection(conf);
  const candidates = { pc1: [], pc2: [] };
  const errors = [];
  for (const [me, other, name] of [[pc1, pc2, 'pc1'], [pc2, pc1, 'pc2']]) {
    me.onicecandidate = (e) => {
      if (e.candidate && e.candidate.candidate) {
        candidates[name].push(e.candidate.candidate);
        other.addIceCandidate(e.candidate).catch((err) => errors.push(String(err)));
      }
    };
    me.onicecandidateerror = (e) =>
      errors.push(name + ' icecandidateerror ' + e.errorCode + ' ' + e.errorText + ' ' + e.url);
  }
  let later = 0;
  const got = new Promise((resolve) => {
    pc2.ondatachannel = (e) => {
      e.channel.onmessage = (m) => {
        if (m.data.startsWith('follow-up ')) later++;
        else resolve(m.data);
      };
    };
  });
  const dc = pc1.createDataChannel('confedge');
  dc.onopen = () => dc.send('hello through confedge TURN');
  await pc1.setLocalDescription(await pc1.createOffer());
  await pc2.setRemoteDescription(pc1.localDescription);
  await pc2.setLocalDescription(await pc2.createAnswer());
  await pc1.setRemoteDescription(pc2.localDescription);
  const timeout = new Promise((resolve) => setTimeout(() => resolve(null), cfg.timeoutMs));
  const message = await Promise.race([got, timeout]);
  const followUps = cfg.followUps || 0;
  for (let i = 0; message !== null && i < followUps; i++) {
    dc.send('follow-up ' + i);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  for (let i = 0; message !== null && later < followUps && i < 40; i++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }

  // The selected pair, as getStats reports it (transport.selectedCandidatePairId).
  async function selected(pc) {
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    if (!pair) {
      stats.forEach((s) => { if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s; });
    }
    if (!pair) return null;
    const pick = (c) => c && {
      candidateType: c.candidateType, protocol: c.protocol, relayProtocol: c.relayProtocol,
      address: c.address, port: c.port, url: c.url,
    };
    return {
      state: pair.state, nominated: pair.nominated, bytesSent: pair.bytesSent,
      bytesReceived: pair.bytesReceived,
      local: pick(stats.get(pair.localCandidateId)), remote: pick(stats.get(pair.remoteCandidateId)),
    };
  }
  // The controlled side can use its nominated pair (and the message cross it) before its own
  // check on that pair has been answered, so getStats may still say "in-progress" for a few
  // hundred milliseconds: give each side up to 3 s to report the pair's final state.
  async function settled(pc) {
    for (let i = 0; message !== null && i < 30; i++) {
      const p = await selected(pc);
      if (p && p.state === 'succeeded') return p;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    return selected(pc);
  }
  const result = {
    message, candidates, errors, followUps: later,
    iceState: [pc1.iceConnectionState, pc2.iceConnectionState],
    pair: await settled(pc1), pair2: await settled(pc2),
  };
  pc1.close();
  pc2.close();
  return result;
}
</script>`;

const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
  res.end(PAGE);
});
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const pageUrl = `http://127.0.0.1:${server.address().port}/`;

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'confedge-chromium-'));
let browser;
let out;
try {
  browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: cfg.chromium,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-quic',
      ...(cfg.extraArgs || []),
    ],
  });
  const page = browser.pages()[0] || (await browser.newPage());
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(m.text()));
  await page.goto(pageUrl);
  const r = await page.evaluate((c) => relayTest(c), cfg);
  out = { ok: r.message !== null, ...r, console: consoleLines };
} catch (err) {
  out = { ok: false, error: String(err && err.stack || err) };
} finally {
  if (browser) await browser.close().catch(() => {});
  server.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(out) + '\n');
