"""Pacing: each sender number sends at most its rate of segments per second, across every process.

The state lives in one Redis hash per number and changes only inside Lua scripts that read the
Redis server's clock, so every worker process and dyno shares one clock and one schedule:

* `next` is the first free slot. A reply reserves its slot once (`reserve`), which spreads the
  replies of many conversations on one number over time, each `segments / rate` apart; a
  reply whose slot is now is sent at once, its reservation doubling as its claim.
* `free_at` is when the number may actually send again, from the last send that happened
  (`claim`, just before the HTTP call) and from when Twilio answered it (`confirm`). A reply
  that ran late, or stalled on its way out, must not end up too close to the one after it;
  these two checks are what guarantee the spacing.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from shared import keys
from shared.redis import script

# Added to every interval: two sends claimed exactly 1/rate apart can reach Twilio a few
# milliseconds closer together than that, because the HTTP calls take different times.
MARGIN = 0.05
# Pace state outlives the last reservation by this much, then disappears with nothing queued.
IDLE_TTL_SECONDS = 3600

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# A claimed send is marked as under way before it is made (worker.outbound): mark(hash, field)
# sets field = now on Redis's clock, in the step that claims the slot; '' '' marks nothing.
# `along`: more (field, value)s of the same hash, written by the same HSET.
_MARK_FUNCTION = """
local function mark(hash, field, now, along)
  if hash ~= '' then redis.call('HSET', hash, field, string.format('%.6f', now), unpack(along or {})) end
end
"""

# write(pace hash, state read (next, free_at, expires), fields to set, the latest time they speak
# of, ttl): one HSET; the key's expiry is pushed on (EXPIREAT, and `expires` in the hash) only when
# less than half the ttl would be left past that time, so a busy number pays for it every half
# hour rather than on every send, and an idle one still disappears within the ttl.
_WRITE_FUNCTION = """
local function write(key, state, fields, horizon, ttl)
  ttl = tonumber(ttl)
  if tonumber(state[3] or '0') < horizon + ttl / 2 then
    local at = math.ceil(horizon + ttl)
    fields[#fields + 1] = 'expires'
    fields[#fields + 1] = tostring(at)
    redis.call('HSET', key, unpack(fields))
    redis.call('EXPIREAT', key, at)
  else
    redis.call('HSET', key, unpack(fields))
  end
end
"""

# reserve(pace hash, interval (seconds the reply occupies), ttl, mark hash, mark field, along) returns
# "slot wait", and whether the send is claimed; a wait of 0 means the number was free and the send
# is claimed (and marked) as well (one round trip when idle). `along` (or nil): (field, value)s the mark hash gets either way, in
# the mark's HSET when there is one (the reply's own record, worker.outbound.QUEUE_AND_TAKE_LUA). A
# function, so the step that queues a conversation's replies can reserve the first one's slot.
RESERVE_FUNCTION = _MARK_FUNCTION + _WRITE_FUNCTION + """
local function reserve(key, interval, ttl, mark_hash, mark_field, along)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  interval = tonumber(interval)
  local state = redis.call('HMGET', key, 'next', 'free_at', 'expires')
  local slot = math.max(now, tonumber(state[1] or '0'))
  local wait = math.max(slot, tonumber(state[2] or '0')) - now
  local fields = {'next', string.format('%.6f', slot + interval)}
  if wait <= 0 then
    fields[3], fields[4] = 'free_at', string.format('%.6f', now + interval)
    mark(mark_hash, mark_field, now, along)
    wait = 0
  elseif along then
    redis.call('HSET', mark_hash, unpack(along))
  end
  write(key, state, fields, slot + interval, ttl)
  return string.format('%.6f %.6f', slot, wait), wait == 0
end
"""
# KEYS: pace hash, mark hash (or the pace hash, unused). ARGV: interval, ttl, mark field ('': none).
RESERVE_LUA = RESERVE_FUNCTION + """
return (reserve(KEYS[1], ARGV[1], ARGV[2], ARGV[3] ~= '' and KEYS[2] or '', ARGV[3]))
"""

# KEYS: pace hash, mark hash (or the pace hash, unused). ARGV: interval, reserved slot, ttl, mark
# field ('': none). Returns the seconds to wait, "0" once the send is claimed and marked (the
# caller must then send at once).
CLAIM_LUA = _NOW + _MARK_FUNCTION + _WRITE_FUNCTION + """
local state = redis.call('HMGET', KEYS[1], 'next', 'free_at', 'expires')
local wait = math.max(tonumber(ARGV[2]) - now, tonumber(state[2] or '0') - now)
if wait > 0 then return string.format('%.6f', wait) end
local interval = tonumber(ARGV[1])
local free_at = string.format('%.6f', now + interval)
local fields = {'free_at', free_at}
-- A send that happened late pushes the schedule on, so later reservations stay spaced.
if tonumber(state[1] or '0') < now + interval then fields[3], fields[4] = 'next', free_at end
write(KEYS[1], state, fields, now + interval, ARGV[3])
if ARGV[4] ~= '' then mark(KEYS[2], ARGV[4], now) end
return '0'
"""


# confirm(pace hash, bare interval (no margin), ttl), called once Twilio answered; a function,
# so a sender's script that finishes the reply confirms the pace in the same step.
CONFIRM_FUNCTION = _WRITE_FUNCTION + """
local function confirm(key, bare_interval, ttl)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(bare_interval)
  local state = redis.call('HMGET', key, 'next', 'free_at', 'expires')
  if tonumber(state[2] or '0') < floor then
    local at = string.format('%.6f', floor)
    local fields = {'free_at', at}
    if tonumber(state[1] or '0') < floor then fields[3], fields[4] = 'next', at end
    write(key, state, fields, floor, ttl)
  end
end
"""
# KEYS: pace hash. ARGV: the bare interval, ttl.
CONFIRM_LUA = CONFIRM_FUNCTION + "confirm(KEYS[1], ARGV[1], ARGV[2])\n"


def interval(segments: int, rate: float) -> float:
    """Seconds a message of `segments` occupies its sender at `rate` segments per second."""
    return max(segments, 1) / rate * (1 + MARGIN)


# Where a claimed send is marked: (hash, field), or None.
Mark = tuple[str, str] | None


def reserve(redis: Any, number: str, segments: int, rate: float, mark: Mark = None) -> tuple[float, float]:
    """Reserve the next free slot on `number`: returns (slot time on Redis's clock, seconds to
    wait). A wait of 0.0 means the slot is now and the send is already claimed (and `mark`ed): go at once."""
    raw = script(redis, RESERVE_LUA)(keys=[keys.pace(number), mark[0] if mark else keys.pace(number)],
                                     args=[interval(segments, rate), IDLE_TTL_SECONDS, mark[1] if mark else ""])
    slot, wait = (float(part) for part in raw.split())
    return slot, wait


def reserve_args(segments: int, rate: float) -> list[Any]:
    """RESERVE_FUNCTION's interval and ttl (its key and mark go around them)."""
    return [interval(segments, rate), IDLE_TTL_SECONDS]


def claim(redis: Any, number: str, segments: int, rate: float, slot_at: float, mark: Mark = None) -> float:
    """Seconds to wait before this reply may go; 0.0 means go now (the send is already claimed and `mark`ed)."""
    raw = script(redis, CLAIM_LUA)(keys=[keys.pace(number), mark[0] if mark else keys.pace(number)],
                                   args=[interval(segments, rate), repr(slot_at), IDLE_TTL_SECONDS,
                                         mark[1] if mark else ""])
    return float(raw)


def request_turn(pipeline: Any, number: str, segments: int, rate: float, slot_at: float | None,
                 mark: Mark = None) -> None:
    """Queue on `pipeline` a reply's first look at its number: `reserve` while it has no slot,
    else `claim` of the slot it reserved; `turn` reads the result. Lets a sender batch it with
    its other reads (EVAL: a registered script would cost a SCRIPT EXISTS round trip)."""
    pace_key, mark_key, field = keys.pace(number), mark[0] if mark else keys.pace(number), mark[1] if mark else ""
    if slot_at is None:
        pipeline.eval(RESERVE_LUA, 2, pace_key, mark_key, *reserve_args(segments, rate), field)
    else:
        pipeline.eval(CLAIM_LUA, 2, pace_key, mark_key, interval(segments, rate), repr(slot_at), IDLE_TTL_SECONDS,
                      field)


def turn(raw: str, slot_at: float | None) -> tuple[float, float]:
    """(slot, seconds to wait) from the result of `request_turn`; 0.0 means the send is claimed."""
    if slot_at is None:
        slot, wait = (float(part) for part in raw.split())
        return slot, wait
    return slot_at, float(raw)


def confirm(redis: Any, number: str, segments: int, rate: float) -> None:
    """Once Twilio answered: the message reached it at the latest now, so the next may go a full
    interval later at the earliest. A send stalled between its claim and the wire (a busy CPU)
    would otherwise arrive closer to the next one than the rate allows."""
    script(redis, CONFIRM_LUA)(keys=[keys.pace(number)], args=confirm_args(segments, rate))


def confirm_args(segments: int, rate: float) -> list[Any]:
    """CONFIRM_FUNCTION's arguments after the key: the bare interval and the ttl."""
    return [max(segments, 1) / rate, IDLE_TTL_SECONDS]


# Dramatiq polls an idle queue, and checks its delay queue, up to worker_timeout apart: 1 s by
# default (only the `dramatiq_worker_timeout` variable changes it; the CLI has no flag), which
# makes a scheduled send up to 2 s late, so a chain of paced replies would fall behind its rate.
POLL_MS = 100


class PromptDelayedMessages(Middleware):
    """Make the worker's consumers poll Redis every POLL_MS: scheduled sends then arrive within
    ~0.2 s of their time.

    Its threads keep the default: they wait on an in-process queue that wakes them as soon as a
    message is handed over, and their timeout only bounds how soon they notice a pause or a stop.
    At POLL_MS, forty idle threads a process would wake 400 times a second for nothing (an idle
    worker of 2 x 40 threads burned ~5% of a core that way; ~0.6% without).
    """

    def __init__(self) -> None:
        self._thread_timeout_ms = POLL_MS

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._thread_timeout_ms = worker.worker_timeout
        worker.worker_timeout = min(worker.worker_timeout, POLL_MS)  # read as the consumers start

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        for thread in worker.workers:
            thread.timeout = self._thread_timeout_ms / 1000  # dramatiq's WorkerThread reads it each wait
