"""A tiny stand-in for the standard `nats` CLI, on nats-py (an independent client).

The real CLI (natscli, a Go binary from GitHub releases) cannot be installed where the
tests run; this implements the part of it that docs/nats.md uses, as natscli does it:
    nats [-s URL] pub SUBJECT [BODY] [-J|--jetstream] [-H K:V]... [--force-stdin]
    nats [-s URL] req SUBJECT [BODY] [-H K:V]... [--force-stdin] [--timeout 5s] [--raw]
    nats [-s URL] sub SUBJECT [--count N] [--raw]
Bodies are sent verbatim. Without BODY the body is read from stdin when --force-stdin
is given or stdout is a terminal (natscli's rule; otherwise the body is empty), which
is how binary images are sent (`nats req mnist.predict --force-stdin < digit.png`).
`pub -J` publishes through JetStream and waits for the stream's acknowledgement
("Stored in Stream: S Sequence: N", plus " Duplicate: true" for a repeated
Nats-Msg-Id); without a stream on the subject it fails. Replies and received
messages are printed one per line. Any other flag is an error (exit 2).
"""

import argparse
import asyncio
import os
import sys

import nats
from nats.errors import NoRespondersError, TimeoutError
from nats.js.errors import NoStreamResponseError


def seconds(text):
    text = text.strip()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    if text.endswith("s"):
        return float(text[:-1])
    return float(text)


async def main(argv):
    p = argparse.ArgumentParser(prog="nats")
    p.add_argument("-s", "--server", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("pub", "req", "request", "publish"):
        c = sub.add_parser(name)
        c.add_argument("subject")
        c.add_argument("body", nargs="?")
        c.add_argument("--force-stdin", action="store_true")
        c.add_argument("--timeout", default="5s")
        c.add_argument("--raw", action="store_true")
        c.add_argument("-H", "--header", action="append", default=[])
        if name in ("pub", "publish"):
            c.add_argument("-J", "--jetstream", action="store_true")
    s = sub.add_parser("sub")
    s.add_argument("subject")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--raw", action="store_true")
    a = p.parse_args(argv)

    nc = await nats.connect(a.server)
    try:
        if a.cmd == "sub":
            got = 0
            fut = asyncio.get_running_loop().create_future()

            async def on(msg):
                nonlocal got
                print(msg.data.decode(errors="replace"), flush=True)
                got += 1
                if got >= a.count and not fut.done():
                    fut.set_result(None)

            await nc.subscribe(a.subject, cb=on)
            await nc.flush()
            print("subscribed", file=sys.stderr, flush=True)
            await asyncio.wait_for(fut, 60)
            return 0
        if a.body is not None:
            body = a.body.encode()
        elif a.force_stdin or sys.stdout.isatty():
            body = sys.stdin.buffer.read()
        else:
            body = b""
        headers = {}
        for h in a.header:
            key, sep, value = h.partition(":")
            if not sep:
                print(f"nats: error: invalid header {h!r}: use K:V", file=sys.stderr)
                return 2
            headers[key.strip()] = value.strip()
        if a.cmd in ("pub", "publish"):
            print(f"Published {len(body)} bytes to {a.subject!r}", file=sys.stderr)
            if a.jetstream:
                try:
                    ack = await nc.jetstream().publish(a.subject, body, timeout=seconds(a.timeout), headers=headers or None)
                except (NoStreamResponseError, NoRespondersError, TimeoutError):
                    print("nats: error: nats: no response from stream", file=sys.stderr)
                    return 1
                dup = " Duplicate: true" if ack.duplicate else ""
                print(f"Stored in Stream: {ack.stream} Sequence: {ack.seq}{dup}", file=sys.stderr)
                return 0
            await nc.publish(a.subject, body, headers=headers or None)
            await nc.flush()
            return 0
        try:
            reply = await nc.request(a.subject, body, timeout=seconds(a.timeout), headers=headers or None)
        except NoRespondersError:
            print("nats: error: no responders available for request", file=sys.stderr)
            return 1
        except TimeoutError:
            print("nats: error: nats: timeout", file=sys.stderr)
            return 1
        print(reply.data.decode(errors="replace"))
        return 0
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
