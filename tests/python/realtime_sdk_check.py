"""Checks that the published Flagsmith Python SDK sees a flag change within 1 s of a
`queue-change` POST, end to end through this service.

A fake Flagsmith API serves the environment document; the SDK evaluates flags locally and
streams from the service. The POST is shaped as Flagsmith's task processor sends it. Nothing is
published before the SDK's stream is open, so that stream starts with the keep-alive comment
the service writes when no update is known, and the SDK must read past it.

Prints one JSON line on stdout (`{"ok": true, "seconds": ...}`) and exits 0 on success, 1 on
failure. Diagnostics go to stderr.
"""

import argparse
import http.server
import json
import logging
import os
import queue
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from urllib.parse import urljoin

from flagsmith import Flagsmith

SERVER_KEY = "ser.TestServerKey000000000000"
# The SDK streams with the client-side key found in the document, not with the server key.
CLIENT_KEY = "n9fbf9h3v4fFgH3U3ngWhb"
FEATURE = "demo_feature"
DOCUMENT_PATH = "/api/v1/environment-document/"
DEADLINE_SECONDS = 1.0
WATCHDOG_SECONDS = 20


def environment_document(enabled, updated_at):
    return {
        "id": 1,
        "api_key": CLIENT_KEY,
        "name": "Test",
        "updated_at": updated_at,
        "project": {"id": 1, "name": "Test project", "segments": []},
        "feature_states": [
            {
                "django_id": 1,
                "featurestate_uuid": "a5c5e0a2-0f5c-4b6a-9d3e-2f2f0a3c0b71",
                "feature": {"id": 1, "name": FEATURE, "type": "STANDARD"},
                "enabled": enabled,
                "feature_state_value": None,
                "multivariate_feature_state_values": [],
            }
        ],
        "identity_overrides": [],
    }


class FakeApi(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, document):
        self.document = document
        self.fetches = []
        super().__init__(("127.0.0.1", 0), ApiHandler)

    @property
    def api_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/api/v1/"


class ApiHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if (
            self.path == DOCUMENT_PATH
            and self.headers.get("X-Environment-Key") == SERVER_KEY
        ):
            self.server.fetches.append(time.monotonic())
            self.reply(200, self.server.document)
        else:
            self.unexpected()

    def do_POST(self):
        self.unexpected()

    def unexpected(self):
        print(
            f"fake API: unexpected {self.command} {self.path} "
            f"headers={dict(self.headers)}",
            file=sys.stderr,
        )
        self.reply(404, {"detail": "Not found."})

    def reply(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format, *args):
        # Expected requests are counted in `fetches`; only the unexpected ones are worth a line.
        pass


class ObservedFlagsmith(Flagsmith):
    """Reports each stream event once the SDK has fully handled it.

    The SDK exposes no "stream connected" signal; a handled event is the deterministic one.
    Reporting after handling (not on arrival) means any refetch the event caused is over.
    """

    def __init__(self, **kwargs):
        # Set before the base constructor, which starts the stream thread.
        self.handled_events = queue.Queue()
        super().__init__(**kwargs)

    def handle_stream_event(self, event):
        received = time.monotonic()
        super().handle_stream_event(event)
        self.handled_events.put((received, event["updated_at"]))


def queue_change(url, token, updated_at):
    request = urllib.request.Request(
        url,
        data=json.dumps({"updated_at": updated_at}).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=2) as response:
        if response.status != 200:
            raise RuntimeError(f"queue-change answered {response.status}")


def metric_samples(sse_url):
    """The samples of the service's `/metricsz`, by series."""
    with urllib.request.urlopen(urljoin(sse_url, "metricsz"), timeout=2) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def wait_for_opened_stream(sse_url, timeout):
    """Whether, within `timeout`, the SDK's stream opened with the comment alone: one
    subscriber, a keep-alive comment written and no event."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = metric_samples(sse_url)
        if (
            samples.get("flagsmith_sse_subscribers") == 1
            and samples.get('flagsmith_sse_http_writes_total{message="keepalive"}', 0) >= 1
            and samples.get('flagsmith_sse_http_writes_total{message="data"}') == 0
        ):
            return True
        time.sleep(0.02)
    return False


def flag_enabled(client):
    return client.get_environment_flags().is_feature_enabled(FEATURE)


def start_watchdog():
    def expire():
        print(f"watchdog: still running after {WATCHDOG_SECONDS} s", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)

    timer = threading.Timer(WATCHDOG_SECONDS, expire)
    timer.daemon = True
    timer.start()


def wait_for_event(client, newer_than, timeout):
    """When the SDK received the first handled event newer than `newer_than`, or None."""
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            received, updated_at = client.handled_events.get(timeout=remaining)
        except queue.Empty:
            return None
        if newer_than is None or updated_at > newer_than:
            return received
    return None


def check(sse_url, token):
    publish_url = urljoin(sse_url, f"sse/environments/{CLIENT_KEY}/queue-change")
    # Flagsmith posts `environment.updated_at.isoformat()`, and the document carries the same
    # value; version 1 is older than version 2 so only the second event triggers a refetch.
    v1_updated_at = datetime.now(timezone.utc) - timedelta(minutes=5)
    api = FakeApi(environment_document(False, v1_updated_at.isoformat()))
    threading.Thread(target=api.serve_forever, daemon=True).start()
    client = None
    try:
        client = ObservedFlagsmith(
            environment_key=SERVER_KEY,
            api_url=api.api_url,
            realtime_api_url=sse_url,
            enable_local_evaluation=True,
            enable_realtime_updates=True,
            # Realtime replaces polling in this SDK; the long interval keeps a future version
            # that polls alongside the stream from being what picks the change up.
            environment_refresh_interval_seconds=600,
        )
        if flag_enabled(client):
            return {"ok": False, "error": f"{FEATURE} enabled in version 1"}
        if not wait_for_opened_stream(sse_url, 10):
            return {"ok": False, "error": "the SDK's stream did not open with a comment alone"}

        # Re-announcing version 1 proves the stream is connected and delivering; its
        # timestamp equals the document's, which the SDK must not treat as newer.
        queue_change(publish_url, token, v1_updated_at.isoformat())
        if wait_for_event(client, None, 10) is None:
            return {"ok": False, "error": "the SDK handled no stream event within 10 s"}
        fetches_before = len(api.fetches)

        v2_updated_at = datetime.now(timezone.utc).isoformat()
        api.document = environment_document(True, v2_updated_at)
        sent = time.monotonic()
        queue_change(publish_url, token, v2_updated_at)
        post_seconds = time.monotonic() - sent
        while not flag_enabled(client):
            if time.monotonic() - sent > DEADLINE_SECONDS:
                return {
                    "ok": False,
                    "error": f"{FEATURE} still disabled {DEADLINE_SECONDS} s after the POST "
                    f"(document fetches after the POST: {len(api.fetches) - fetches_before})",
                    "post_seconds": round(post_seconds, 4),
                }
            time.sleep(0.01)
        seconds = time.monotonic() - sent
        received = wait_for_event(client, v1_updated_at, 1)
        if received is None:
            return {"ok": False, "error": f"{FEATURE} changed without a stream event"}
        return {
            "ok": seconds < DEADLINE_SECONDS,
            "seconds": round(seconds, 4),
            "post_seconds": round(post_seconds, 4),
            "event_seconds": round(received - sent, 4),
            "document_fetches": len(api.fetches),
        }
    finally:
        # `stop()` only ends the thread once its stream ends; being a daemon thread is what
        # lets the process exit while it is still blocked reading.
        if client is not None:
            client.event_stream_thread.stop()
        api.shutdown()
        api.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sse-url", required=True, help="base URL of the service")
    parser.add_argument("--token", required=True, help="queue-change token")
    args = parser.parse_args()
    start_watchdog()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        result = check(args.sse_url, args.token)
    except Exception as error:
        logging.exception("check failed")
        result = {"ok": False, "error": repr(error)}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
