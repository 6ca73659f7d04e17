"""What the message log costs the database per message: one answered message (its inbound row, one
reply row, the conversation's latest, the reply's outcome) written as the worker's log drain writes
it, in transactions of 1, 5, 20 and 100 messages.

Prints, per message: the database server's CPU (the backend process's own time, from /proc), this
process's CPU (SQLAlchemy and psycopg), and the wall time.

    python bench/log_cost.py [--messages 2000]

The database is BENCH_DATABASE_URL, else the local PostgreSQL's mammut_sms_bench, else SQLite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402

BOT_NUMBER = "+15005550006"


def records(n: int) -> list[dict[str, object]]:
    from worker.logdrain import exchange_record, outcome_record

    made: list[dict[str, object]] = []
    for _ in range(n):
        sid = f"SM{uuid.uuid4().hex}"
        person = f"+1555{uuid.uuid4().int % 10**7:07d}"
        message = {"sid": sid, "bot_id": 1, "sender": person, "to": BOT_NUMBER, "body": "hola", "media": [],
                   "received_at": time.time()}
        reply = {"id": f"{sid}-0", "bot_id": 1, "to": person, "text": "echo: hola", "media_url": None,
                 "in_reply_to": sid, "created_at": time.time()}
        made.append(json.loads(exchange_record(message, [reply], BOT_NUMBER)))
        made.append(json.loads(outcome_record(reply["id"], "queued", sid=f"SM{uuid.uuid4().hex}")))
    return made


def server_cpu(engine: Engine, pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()

    from bench.database import bench_database_url, describe, empty
    from shared import db
    from worker.logdrain import write

    url = bench_database_url()
    empty(url)
    engine = db.make_engine(url, size=1)  # one connection: its backend is the one measured
    pid = None
    if url.startswith("postgresql"):
        with engine.connect() as connection:
            pid = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
    write(engine, records(10))  # warm up: statements built, connection open
    print(f"command: {sys.executable} bench/log_cost.py --messages {args.messages}")
    print(f"database: {describe(url)}")
    print(f"{'messages per transaction':>25} {'server CPU ms/msg':>18} {'client CPU ms/msg':>18} {'wall ms/msg':>12}")
    for size in (1, 5, 20, 100):
        batches = [records(size) for _ in range(max(args.messages // size, 1))]
        count = len(batches) * size
        server, client, wall = server_cpu(engine, pid), time.process_time(), time.perf_counter()
        for batch in batches:
            write(engine, batch)
        print(f"{size:>25} {(server_cpu(engine, pid) - server) / count * 1000:>18.3f} "
              f"{(time.process_time() - client) / count * 1000:>18.3f} {(time.perf_counter() - wall) / count * 1000:>12.3f}")
    engine.dispose()


if __name__ == "__main__":
    main()
