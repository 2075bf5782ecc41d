// Checks that the published Flagsmith JavaScript SDK (@flagsmith/flagsmith) sees a flag change
// within 1 s of a `queue-change` POST, streaming from this service through the `eventsource`
// package (the EventSource Node users install; browsers bring their own). Nothing is published
// before the SDK's stream is open, so that stream starts with the keep-alive comment the
// service writes when no update is known, and the SDK's EventSource must read past it.
//
// A fake Flagsmith API serves the flags. Usage:
//   node realtime_sdk_check.mjs --sse-url http://127.0.0.1:PORT/ --token TOKEN
// Prints one JSON line on stdout and exits 0 on success, 1 on failure; diagnostics on stderr.

import http from 'node:http';
import { parseArgs } from 'node:util';

import { EventSource } from 'eventsource';

const KEY = 'js-sdk-environment';
const FEATURE = 'demo_feature';
const FLAGS_PATH = '/api/v1/flags/';
const DEADLINE_SECONDS = 1.0;
const WATCHDOG_SECONDS = 20;

// The SDK takes the global EventSource when it is loaded, and streams only where there is a
// `window`, as in a browser.
globalThis.EventSource = EventSource;
globalThis.window = globalThis;
const { createFlagsmithInstance } = await import('@flagsmith/flagsmith');

const { values: args } = parseArgs({
  options: { 'sse-url': { type: 'string' }, token: { type: 'string' } },
});
if (!args['sse-url'] || !args.token) {
  console.error('usage: node realtime_sdk_check.mjs --sse-url URL --token TOKEN');
  process.exit(2);
}
const sseUrl = args['sse-url'];

setTimeout(() => {
  console.error(`watchdog: still running after ${WATCHDOG_SECONDS} s`);
  process.exit(2);
}, WATCHDOG_SECONDS * 1000).unref();

/** The fake Flagsmith API: the flags, with the time of the document they come from. */
function fakeApi() {
  const api = { enabled: false, updatedAt: '100.5', fetches: 0 };
  api.server = http.createServer((request, response) => {
    if (
      request.method === 'GET' &&
      request.url === FLAGS_PATH &&
      request.headers['x-environment-key'] === KEY
    ) {
      api.fetches += 1;
      const flags = [
        {
          id: 1,
          feature: { id: 1, name: FEATURE, type: 'STANDARD' },
          enabled: api.enabled,
          feature_state_value: null,
        },
      ];
      response.writeHead(200, {
        'content-type': 'application/json',
        'x-flagsmith-document-updated-at': api.updatedAt,
      });
      response.end(JSON.stringify(flags));
    } else {
      console.error(`fake API: unexpected ${request.method} ${request.url}`);
      response.writeHead(404, { 'content-type': 'application/json' });
      response.end('{"detail": "Not found."}');
    }
  });
  return api;
}

/** The samples of the service's `/metricsz`, by series. */
async function metricSamples() {
  const text = await (await fetch(new URL('metricsz', sseUrl))).text();
  const samples = new Map();
  for (const line of text.split('\n')) {
    if (line && !line.startsWith('#')) {
      const at = line.lastIndexOf(' ');
      samples.set(line.slice(0, at), Number(line.slice(at + 1)));
    }
  }
  return samples;
}

/** Whether, within `timeout` seconds, the SDK's stream opened with the comment alone: one
 * subscriber, a keep-alive comment written and no event. */
async function waitForOpenedStream(timeout) {
  const deadline = performance.now() + timeout * 1000;
  while (performance.now() < deadline) {
    const samples = await metricSamples();
    if (
      samples.get('flagsmith_sse_subscribers') === 1 &&
      (samples.get('flagsmith_sse_http_writes_total{message="keepalive"}') ?? 0) >= 1 &&
      samples.get('flagsmith_sse_http_writes_total{message="data"}') === 0
    ) {
      return true;
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return false;
}

async function queueChange(updatedAt) {
  const response = await fetch(new URL(`sse/environments/${KEY}/queue-change`, sseUrl), {
    method: 'POST',
    headers: { authorization: `Token ${args.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ updated_at: updatedAt }),
  });
  if (response.status !== 200) {
    throw new Error(`queue-change answered ${response.status}`);
  }
}

async function check() {
  const api = fakeApi();
  await new Promise((resolve) => api.server.listen(0, '127.0.0.1', resolve));
  const flagsmith = createFlagsmithInstance();
  await flagsmith.init({
    environmentID: KEY,
    api: `http://127.0.0.1:${api.server.address().port}/api/v1/`,
    realtime: true,
    eventSourceUrl: sseUrl,
    // The SDK's own fetch is XMLHttpRequest's, which Node lacks.
    fetch: globalThis.fetch,
  });
  if (flagsmith.hasFeature(FEATURE)) {
    return { ok: false, error: `${FEATURE} enabled before the change` };
  }
  if (!(await waitForOpenedStream(10))) {
    return { ok: false, error: "the SDK's stream did not open with a comment alone" };
  }
  const fetchesBefore = api.fetches;
  api.enabled = true;
  api.updatedAt = '200.5';
  const sent = performance.now();
  await queueChange(200.5);
  while (!flagsmith.hasFeature(FEATURE)) {
    const seconds = (performance.now() - sent) / 1000;
    if (seconds > DEADLINE_SECONDS) {
      return {
        ok: false,
        error: `${FEATURE} still disabled ${DEADLINE_SECONDS} s after the POST`,
        flag_fetches_after_the_post: api.fetches - fetchesBefore,
      };
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  const seconds = (performance.now() - sent) / 1000;
  return {
    ok: api.fetches === fetchesBefore + 1,
    seconds: Math.round(seconds * 10000) / 10000,
    flag_fetches: api.fetches,
  };
}

let result;
try {
  result = await check();
} catch (error) {
  console.error(error);
  result = { ok: false, error: String(error) };
}
console.log(JSON.stringify(result));
// The SDK's EventSource would keep the process alive.
process.exit(result.ok ? 0 : 1);
