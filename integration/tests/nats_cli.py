"""A tiny stand-in for the standard `nats` CLI, on nats-py (an independent client).

Supports what docs/nats.md uses:
    nats [-s URL] pub SUBJECT [BODY] [--force-stdin]
    nats [-s URL] req SUBJECT [BODY] [--force-stdin] [--timeout 5s] [--raw]
    nats [-s URL] sub SUBJECT [--count N] [--raw]
Bodies are sent verbatim; with --force-stdin (or no BODY) the body is read from stdin,
which is how binary images are sent (`nats req mnist.predict --force-stdin < digit.png`).
Replies and received messages are printed one per line.
"""

import argparse
import asyncio
import os
import sys

import nats
from nats.errors import NoRespondersError, TimeoutError


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
        body = sys.stdin.buffer.read() if (a.force_stdin or a.body is None) else a.body.encode()
        if a.cmd in ("pub", "publish"):
            await nc.publish(a.subject, body)
            await nc.flush()
            print(f"Published {len(body)} bytes to {a.subject}", file=sys.stderr)
            return 0
        try:
            reply = await nc.request(a.subject, body, timeout=seconds(a.timeout))
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
