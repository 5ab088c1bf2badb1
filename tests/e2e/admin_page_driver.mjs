// Loads the management status page in headless Debian Chromium as an operator would, and prints
// one JSON line of what the browser made of it (tests/integration/test_qa_admin_hostile.py).
//
// argv[2]: JSON {chromium, userDataDir, url, bypassCSP}. With bypassCSP the page's
// Content-Security-Policy is ignored, so that markup smuggled in by hostile input would run:
// the escaping is then the only defence, and that is what is checked.
//
// Output: {status, csp, dialogs, pageErrors, consoleErrors, elements, text, title}
//   elements: count of each element name in the document (scripts, images, frames...);
//   text: document.body.innerText (what the operator reads).

import { launchChromium } from './driver_common.mjs';

const cfg = JSON.parse(process.argv[2]);
const ctx = await launchChromium(cfg.chromium, cfg.userDataDir, [], { bypassCSP: !!cfg.bypassCSP });
const out = { dialogs: [], pageErrors: [], consoleErrors: [] };
try {
  const page = ctx.pages()[0] || await ctx.newPage();
  page.on('dialog', async (d) => { out.dialogs.push(d.message()); await d.dismiss(); });
  page.on('pageerror', (e) => out.pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') out.consoleErrors.push(m.text()); });
  const resp = await page.goto(cfg.url, { waitUntil: 'load', timeout: 20000 });
  out.status = resp.status();
  out.csp = (await resp.allHeaders())['content-security-policy'] || null;
  await page.waitForTimeout(300); // let any injected onerror/onload handler fire
  Object.assign(out, await page.evaluate(() => {
    const elements = {};
    for (const el of document.querySelectorAll('*')) {
      const n = el.localName;
      elements[n] = (elements[n] || 0) + 1;
    }
    const hrefs = [...document.querySelectorAll('[href],[src],[action]')].map(
      (el) => el.getAttribute('href') || el.getAttribute('src') || el.getAttribute('action'));
    const handlers = [...document.querySelectorAll('*')].flatMap(
      (el) => [...el.attributes].filter((a) => a.name.startsWith('on')).map((a) => a.name));
    return { elements, hrefs, handlers, text: document.body.innerText, title: document.title,
      pwned: window.__pwned || null };
  }));
} finally {
  await ctx.close();
}
// U+2028/U+2029 escaped: JSON.stringify leaves them raw, and Python's splitlines() (run_driver)
// breaks the one line there.
console.log(JSON.stringify(out).replace(/\u2028/g, '\\u2028').replace(/\u2029/g, '\\u2029'));
