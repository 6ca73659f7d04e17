"""What the web worker's main loop spends per request to learn where its body ends.

BufferingThreadWorker (webhook/slowclient.py) reads every request whole on gunicorn's main loop, one
thread per process, before a thread gets it. It used to build gunicorn's full Request for that; it
now scans the three headers that frame a body (webhook.slowclient._framing). This prints the CPU
microseconds of each on a Twilio webhook's head:

    python bench/head_scan.py [--heads 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gunicorn.config import Config  # noqa: E402
from gunicorn.http.message import Request  # noqa: E402
from gunicorn.http.unreader import IterUnreader  # noqa: E402

from webhook.slowclient import _framing  # noqa: E402

# A head as Twilio's webhook arrives through Heroku's router.
HEAD = (b"POST /channels/sms/ HTTP/1.1\r\nHost: bot.example.com\r\nUser-Agent: TwilioProxy/1.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 412\r\nAccept: */*\r\n"
        b"X-Twilio-Signature: 0Ob9WQZ5gPqJcYiHOMkB4v0sYLQ=\r\nI-Twilio-Idempotency-Token: 9b6bd4f0-8f6a-4c8b\r\n"
        b"X-Forwarded-Proto: https\r\nX-Forwarded-For: 54.172.60.1\r\nX-Request-Start: 1796616960123\r\n"
        b"Connection: keep-alive\r\n\r\n")


def microseconds(work: object, heads: int) -> float:
    started = time.process_time()
    for _ in range(heads):
        work()  # type: ignore[operator]
    return (time.process_time() - started) / heads * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=20_000)
    args = parser.parse_args()
    config = Config()
    full = microseconds(lambda: Request(config, IterUnreader([HEAD]), ("127.0.0.1", 1)), args.heads)
    scan = microseconds(lambda: _framing(HEAD[:-4]), args.heads)
    print(f"gunicorn's Request parse: {full:6.1f} CPU us per head")
    print(f"the framing scan:         {scan:6.1f} CPU us per head ({full / scan:.0f}x less on the main loop)")
    print(f"command: {sys.executable} bench/head_scan.py --heads {args.heads}")


if __name__ == "__main__":
    main()
