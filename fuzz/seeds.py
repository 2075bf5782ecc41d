#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target to fuzz/seeds/<target>/, deterministically.

    fuzz/seeds.py          # (re)writes fuzz/seeds/
    fuzz/seeds.py --check  # fails if fuzz/seeds/ is not what this script writes

The seeds are committed, so a run starts from them without this script; `.ci/fuzz` checks that
they are still what it writes. Each is what real clients send, in the input format of its
target (fuzz/src/lib.rs): libFuzzer mutates them into what clients could send.
"""

import struct
import sys
from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds"
KEY = "n9fbf9h3v4fFgH3U3ngWhb"  # the shape of Flagsmith's environment keys


def head(*lines):
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def stream(*headers, path=f"/sse/environments/{KEY}/stream", version="1.1"):
    return head(f"GET {path} HTTP/{version}", *headers)


# Request heads as SDKs, browsers and tools send them (the Python and JS SDKs' headers, as
# tests/sse.rs and SPEC §1 have them), and the requests the reader leaves to hyper.
REQUESTS = {
    "python-sdk": stream(
        "Host: realtime.flagsmith.com",
        "User-Agent: python-requests/2.32.3",
        "Accept-Encoding: gzip, deflate",
        "Accept: application/json, text/event-stream",
        "Connection: keep-alive",
        "Cache-Control: no-cache",
    ),
    "js-sdk-node": stream(
        "Host: realtime.flagsmith.com",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
        "Connection: keep-alive",
    ),
    "browser-eventsource": stream(
        "Host: realtime.flagsmith.com",
        "Connection: keep-alive",
        "Accept: text/event-stream",
        "Cache-Control: no-cache",
        "Origin: https://app.example.com",
        "Referer: https://app.example.com/",
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/131.0.0.0 Safari/537.36",
        "Accept-Encoding: gzip, deflate, br, zstd",
        "Accept-Language: en-GB,en;q=0.9",
        "Cookie: session=" + "c" * 200,
    ),
    "curl": stream("Host: localhost:8088", "User-Agent: curl/8.11.1", "Accept: */*"),
    "doubled-slash": stream("Host: sse", path=f"//sse/environments/{KEY}/stream"),
    "absolute-form": stream(
        "Host: sse:8088", path=f"http://sse:8088//sse/environments/{KEY}/stream?x=1"
    ),
    "percent-encoded": stream("Host: x", path="/sse/environments/%61bc/stream/"),
    "connection-close": stream("Host: x", "Connection: keep-alive, close"),
    "content-length-0": stream("Host: x", "Content-Length: 0"),
    "no-host": stream(),
    "two-hosts": stream("Host: x", "host: y"),
    "http10": stream(version="1.0"),
    "invalid-key": stream("Host: x", path="/sse/environments/a.b/stream"),
    "chunked": stream("Host: x", "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "upgrade-h2c": stream("Host: x", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c"),
    "pipelined": stream("Host: x") + stream("Host: x"),
    "bare-lf": f"GET /sse/environments/{KEY}/stream HTTP/1.1\nHost: x\n\n".encode(),
    "livez": head("GET /livez HTTP/1.1", "Host: x"),
    "queue-change": head(
        f"POST /sse/environments/{KEY}/queue-change HTTP/1.1",
        "Host: sse:8088",
        "Authorization: Token secret",
        "Content-Type: application/json",
        "Content-Length: 50",
    )
    + b'{"updated_at": "2024-12-26T17:27:07.123456+00:00"}',
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


def h1_request():
    """`h1_input`: a count of split points, the points as little-endian u16s, the bytes."""
    for name, request in REQUESTS.items():
        yield name, b"\x00" + request
    # The Python SDK's head in three reads, and a byte at a time up to its request line.
    request = REQUESTS["python-sdk"]
    thirds = [len(request) // 3, 2 * len(request) // 3]
    yield "python-sdk-in-thirds", bytes([2]) + struct.pack("<2H", *thirds) + request
    points = list(range(1, 17))
    yield "python-sdk-bytewise", bytes([16]) + struct.pack("<16H", *points) + request


def queue_change_body():
    """Raw bodies: what Flagsmith's API and task processor send, and what docs show."""
    bodies = {
        "flagsmith-api": '{"updated_at": "2024-12-26T17:27:07.123456+00:00"}',
        "flagsmith-api-no-micros": '{"updated_at": "2024-12-26T17:27:07+00:00"}',
        "naive": '{"updated_at": "2023-01-12T18:06:42.028060"}',
        "naive-no-micros": '{"updated_at": "2023-01-12T18:06:42"}',
        "zulu": '{"updated_at": "2024-12-26T17:27:07.123456Z"}',
        "offset": '{"updated_at": "2024-12-26T18:27:07.5+01:00"}',
        "nanos": '{"updated_at": "2024-12-26T17:27:07.123456789-05:30"}',
        "number": '{"updated_at": 1735229888.76}',
        "integer": '{"updated_at": 1735229888}',
        "exponent": '{"updated_at": 1.73522988876e9}',
        "roundtrip": '{"updated_at": 126830942915.10681}',
        "extra-members": '{"updated_at": 1735229888, "environment": "abc"}',
        "negative": '{"updated_at": -1}',
        "huge": '{"updated_at": 1e300}',
        "string-number": '{"updated_at": "1735229888.76"}',
        "null": '{"updated_at": null}',
        "empty-object": "{}",
        "array": "[1]",
    }
    for name, body in bodies.items():
        yield name, body.encode()


def tls_op(op, a=0, b=0, c=0):
    return bytes([op, a, b, c])


def tls_script(client, writes, close_notify=True, read_size=3, ops=()):
    """`TlsScript`: client, writes, flags, then 4-byte operations."""
    flags = int(close_notify) | read_size << 1
    data = bytes([client, len(writes) - 1]) + b"".join(struct.pack("<H", w) for w in writes)
    return data + bytes([flags]) + b"".join(ops)


def tls_stream():
    yield "tls13-request", tls_script(0, [300])
    yield "tls13-aes", tls_script(1, [300, 40])
    yield "tls12", tls_script(2, [300, 40, 5000])
    yield "no-close-notify", tls_script(0, [300], close_notify=False)
    yield "large-records", tls_script(0, [19_999, 19_999], read_size=5)
    yield "byte-reads", tls_script(0, [200], read_size=0)
    yield "dropped", tls_script(0, [100, 100, 100], ops=[tls_op(0, 1)])
    yield "duplicated", tls_script(2, [100, 100], ops=[tls_op(1, 0)])
    yield "swapped", tls_script(0, [100, 100], ops=[tls_op(2, 0, 1)])
    yield "flipped", tls_script(1, [100], ops=[tls_op(3, 0, 20, 0x40)])
    yield "truncated", tls_script(0, [100, 100], ops=[tls_op(4, 0, 30)])
    yield "garbage", tls_script(2, [100], ops=[tls_op(5, 0, 9, 0x17)])
    yield "huge-header", tls_script(0, [100], ops=[tls_op(6, 3, 0xFF, 0xFF)])
    yield "cut", tls_script(0, [5000], ops=[tls_op(7, 0, 0x01, 0x00)])
    yield "trickle-and-write", tls_script(
        0, [3000], ops=[tls_op(8, 0, 1, 2), tls_op(8, 0, 200, 0)]
    )
    yield "writes-then-flip", tls_script(
        2, [3000, 3000], read_size=2, ops=[tls_op(8, 4, 0, 4), tls_op(3, 1, 7, 1)]
    )


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# The token fuzzing::h2_serve's service accepts.
H2_TOKEN = "fuzz-token"


def h2_frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def h2_settings(*values):
    return h2_frame(0x4, 0, 0, b"".join(i.to_bytes(2, "big") + v.to_bytes(4, "big") for i, v in values))


def hpack_integer(first, prefix, value):
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 | 0x80)
        value //= 128
    return bytes(out + [value])


def hpack_literal(name, value, first=0x00):
    name, value = name.encode(), value.encode()
    return bytes([first]) + hpack_integer(0, 7, len(name)) + name + hpack_integer(0, 7, len(value)) + value


def request_block(method, path, *headers, indexed=False):
    # :method GET and :scheme http from the static table (RFC 7541 appendix A), as clients send them.
    block = b"\x82" if method == "GET" else b"\x83"
    block += b"\x86" + hpack_literal(":authority", "localhost") + hpack_literal(":path", path)
    for name, value in headers:
        block += hpack_literal(name, value, 0x40 if indexed else 0x00)
    return block


STREAM_PATH = f"/sse/environments/{KEY}/stream"
PUBLISH_PATH = f"/sse/environments/{KEY}/queue-change"
BROWSER = (("accept", "text/event-stream"), ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
           ("accept-language", "en"), ("origin", "https://app.example.com"))


def h2_connection():
    end, headers_end = 0x1, 0x4
    opening = H2_PREFACE + h2_settings((0x3, 100), (0x4, 10485760), (0x2, 0))
    opening += h2_frame(0x8, 0, 0, (1073676289).to_bytes(4, "big"))
    subscribe = h2_frame(0x1, end | headers_end, 1, request_block("GET", STREAM_PATH, *BROWSER, indexed=True))
    yield "curl-subscribe", opening + subscribe
    # A browser's: priority flag (weight 256, exclusive on 0), its cookie and tabs.
    priority = b"\x80\x00\x00\x00\xff"
    tabs = b"".join(
        h2_frame(0x1, end | headers_end | 0x20, stream, priority + request_block("GET", STREAM_PATH, *BROWSER, indexed=True))
        for stream in (1, 3, 5)
    )
    yield "browser-tabs", H2_PREFACE + h2_settings((0x1, 65536), (0x4, 6291456), (0x6, 262144)) + tabs
    yield "livez", opening + h2_frame(0x1, end | headers_end, 1, request_block("GET", "/livez"))
    body = b'{"updated_at": "2024-12-26T17:27:07.123456+00:00"}'
    publish = request_block("POST", PUBLISH_PATH, ("authorization", f"Token {H2_TOKEN}"),
                            ("content-type", "application/json"), ("content-length", str(len(body))))
    yield "publish", opening + h2_frame(0x1, headers_end, 1, publish) + h2_frame(0x0, end, 1, body)
    yield "publish-trailers", (opening + h2_frame(0x1, headers_end, 1, publish) + h2_frame(0x0, 0, 1, body)
                               + h2_frame(0x1, end | headers_end, 1, hpack_literal("x-checksum", "1")))
    yield "publish-then-subscribe", (opening + h2_frame(0x1, headers_end, 1, publish) + h2_frame(0x0, end, 1, body)
                                     + h2_frame(0x1, end | headers_end, 3, request_block("GET", STREAM_PATH)))
    yield "reset-and-reopen", (opening + subscribe + h2_frame(0x3, 0, 1, (8).to_bytes(4, "big"))
                               + h2_frame(0x1, end | headers_end, 3, request_block("GET", STREAM_PATH)))
    yield "zero-window", (H2_PREFACE + h2_settings((0x4, 0)) + subscribe
                          + h2_frame(0x8, 0, 1, (3).to_bytes(4, "big")) + h2_settings((0x4, 10)))
    block = request_block("GET", STREAM_PATH, *BROWSER)
    yield "continuation", (opening + h2_frame(0x1, end, 1, block[:20]) + h2_frame(0x9, 0, 1, block[20:40])
                           + h2_frame(0x9, headers_end, 1, block[40:]))
    yield "ping-goaway", (opening + subscribe + h2_frame(0x6, 0, 0, b"12345678")
                          + h2_frame(0x7, 0, 0, (1).to_bytes(4, "big") + (0).to_bytes(4, "big")))


def hpack_blocks(*blocks):
    return b"\x00" + b"".join(len(block).to_bytes(2, "big") + block for block in blocks)


def hpack():
    first = request_block("GET", STREAM_PATH, *BROWSER, indexed=True)
    # The same fields again, from the dynamic table (indices 62 on, newest first).
    again = b"\x82\x86" + hpack_literal(":authority", "localhost") + hpack_literal(":path", STREAM_PATH)
    again += bytes([0x80 | (62 + len(BROWSER) - 1 - index) for index in range(len(BROWSER))])
    yield "browser-twice", hpack_blocks(first, again)
    yield "size-update", hpack_blocks(hpack_integer(0x20, 5, 4096) + first, hpack_integer(0x20, 5, 0) + again)
    yield "size-update-too-large", hpack_blocks(hpack_integer(0x20, 5, 1 << 27) + first)
    yield "publish", hpack_blocks(request_block("POST", PUBLISH_PATH, ("authorization", "Token x"),
                                                ("content-length", "22")))
    yield "malformed", hpack_blocks(
        request_block("GET", STREAM_PATH, ("Accept", "*/*")),
        request_block("GET", STREAM_PATH, ("connection", "keep-alive")),
        request_block("GET", STREAM_PATH, ("te", "gzip")),
        b"\x82" + hpack_literal("accept", "*/*") + b"\x86",
    )


TARGETS = {
    "h2_connection": h2_connection,
    "hpack": hpack,
    "h1_request": h1_request,
    "queue_change_body": queue_change_body,
    "tls_stream": tls_stream,
}


def main():
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] not in ([], ["--check"]):
        sys.exit(__doc__)
    stale = []
    for target, seeds in TARGETS.items():
        directory = SEEDS / target
        wanted = dict(seeds())
        present = {path.name for path in directory.glob("*")} if directory.is_dir() else set()
        for name in sorted(present - set(wanted)):
            stale.append(f"{target}/{name}: not written by this script")
            if not check:
                (directory / name).unlink()
        for name, data in wanted.items():
            path = directory / name
            if path.exists() and path.read_bytes() == data:
                continue
            stale.append(f"{target}/{name}: not what this script writes")
            if not check:
                directory.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    if check and stale:
        sys.exit("fuzz/seeds/ is stale; run fuzz/seeds.py:\n  " + "\n  ".join(stale))


if __name__ == "__main__":
    main()
