// Shared by the Playwright drivers (webapp_protocol_driver.mjs, nodesim_chromium_driver.mjs,
// proxy_chromium_driver.mjs).

import { chromium } from 'playwright-core';

// Chromium's flags for every driver (the project brief's list; each driver adds its own after
// these, and a fresh --user-data-dir is the persistent context's directory).
export const CHROMIUM_ARGS = [
  '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--no-first-run', '--disable-quic',
];

// Headless Debian Chromium in a persistent context on the fresh profile `userDataDir`, with
// CHROMIUM_ARGS then `extraArgs`; `options` are more launchPersistentContext options.
export function launchChromium(executablePath, userDataDir, extraArgs, options = {}) {
  return chromium.launchPersistentContext(userDataDir, {
    executablePath, headless: true, ...options, args: [...CHROMIUM_ARGS, ...extraArgs],
  });
}

// Which protocol each of a page's loads used, from the browser's Resource Timing.
//
// nextHopProtocol is the ALPN protocol of the connection a load used: "h2" over HTTP/2,
// "http/1.1" otherwise. A resource entry is added when its fetch ends, so an EventSource's
// stream shows only after the page closed it: we wait for the entry whose URL contains
// `waitFor` (e.g. '/events?') before reading.

export async function resourceProtocols(page, waitFor, timeout) {
  await page.waitForFunction((w) => performance.getEntriesByType('resource')
    .some((e) => e.name.includes(w)), waitFor, { timeout });
  return page.evaluate(() => {
    const pick = (e) => ({ name: e.name, initiatorType: e.initiatorType,
      nextHopProtocol: e.nextHopProtocol });
    return { nav: pick(performance.getEntriesByType('navigation')[0]),
      resources: performance.getEntriesByType('resource').map(pick) };
  });
}
