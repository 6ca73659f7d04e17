"""The bounded per-conversation message log and the delivery status of each outbound message."""

from __future__ import annotations

import json
import time
from typing import Any

from shared import keys
from shared.redis import script

LOG_LIMIT = 200
STATUS_TTL = 7 * 24 * 3600

# Twilio's lifecycle; callbacks arrive out of order, and a status never moves backwards.
STATUS_RANK = {
    "pending": 0, "accepted": 1, "queued": 1, "sending": 2, "sent": 3,
    "failed": 4, "undelivered": 4, "delivered": 4, "read": 5,
}

# Append an entry (once: a resumed message may have been logged before its worker died) and drop
# the oldest past the limit, in one step.
APPEND_LUA = """
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
local excess = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[3])
if excess > 0 then
  local old = redis.call('LPOP', KEYS[1], excess)
  redis.call('HDEL', KEYS[2], unpack(old))
end
"""

UPDATE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""

# Record a status for a MessageSid: the time of every status is kept, the current one only advances.
STATUS_LUA = """
local rank = tonumber(ARGV[2])
redis.call('HSETNX', KEYS[1], 'at:' .. ARGV[1], ARGV[4])
local current = tonumber(redis.call('HGET', KEYS[1], 'rank') or '-1')
if rank >= current then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'rank', rank)
  if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error-code', ARGV[3]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return redis.call('HGET', KEYS[1], 'status')
"""


def new_entry(entry_id: str, direction: str, text: str, media: list[dict[str, Any]] | None = None,
              sid: str | None = None, status: str = "pending", at: float | None = None) -> dict[str, Any]:
    at = time.time() if at is None else at
    return {
        "id": entry_id, "direction": direction, "text": text, "media": media or [], "sid": sid,
        "status": status, "error-code": None, "statuses": {status: at}, "at": at,
    }


def append(redis: Any, conversation: str, entry: dict[str, Any]) -> None:
    """Add `entry` to the end of the log, unless an entry with its id is there already."""
    script(redis, APPEND_LUA)(keys=[keys.message_log(conversation), keys.message_log_entries(conversation)],
                              args=[entry["id"], json.dumps(entry), LOG_LIMIT])


# update and record_status take a client or a pipeline (a sender batches them with its other
# writes), so they EVAL: a registered script would cost a pipeline a SCRIPT EXISTS round trip.


def update(redis: Any, conversation: str, entry: dict[str, Any]) -> None:
    """Rewrite an entry in place; one already trimmed from the log stays gone."""
    redis.eval(UPDATE_LUA, 1, keys.message_log_entries(conversation), entry["id"], json.dumps(entry))


def record_status(redis: Any, message_sid: str, status: str, error_code: int | str | None = None,
                  at: float | None = None) -> str | None:
    """Record `status` for a Twilio message; returns the status now current (from a client)."""
    rank = STATUS_RANK.get(status, 0)
    at = time.time() if at is None else at
    code = "" if error_code in (None, "") else str(error_code)
    return redis.eval(STATUS_LUA, 1, keys.delivery_status(message_sid), status, rank, code, repr(at), STATUS_TTL)


def read(redis: Any, conversation: str) -> list[dict[str, Any]]:
    """The log, oldest first, each outbound entry merged with its latest delivery status."""
    ids = redis.lrange(keys.message_log(conversation), 0, -1)
    if not ids:
        return []
    raw = redis.hmget(keys.message_log_entries(conversation), ids)
    entries = [json.loads(item) for item in raw if item]
    pipe = redis.pipeline(transaction=False)
    with_sid = [entry for entry in entries if entry.get("sid") and entry["direction"] == "out"]
    for entry in with_sid:
        pipe.hgetall(keys.delivery_status(entry["sid"]))
    for entry, status in zip(with_sid, pipe.execute()):
        _merge_status(entry, status)
    return entries


def _merge_status(entry: dict[str, Any], status: dict[str, str]) -> None:
    for name, value in status.items():
        if name.startswith("at:"):
            entry["statuses"].setdefault(name[3:], float(value))
    current = status.get("status")
    if current and STATUS_RANK.get(current, 0) >= STATUS_RANK.get(entry["status"], 0):
        entry["status"] = current
    if status.get("error-code"):
        entry["error-code"] = int(status["error-code"])
