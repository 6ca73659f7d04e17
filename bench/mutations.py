"""Mutation check: does the test suite notice when a promise of the service is broken?

Each mutation below is a one-line breakage of one promise (a file, the exact text to replace, its
replacement) and the tests that should fail without that promise. The script copies the working
tree (tracked and untracked, not ignored, files) to a scratch directory, runs the named tests once
unmutated, then for each mutation applies it alone, runs its tests, and reports:

  killed      the tests failed: the suite holds the promise
  survived    the tests passed: nothing notices losing it
  n/a         the text is gone from the file (the code moved on): update the mutation
  unreliable  its tests already fail unmutated, so a failure proves nothing
  error       pytest could not run them (a usage or collection error)

It exits 1 when a mutation survived.

Usage (from the repo root, with the project's venv):

    python bench/mutations.py                 # every mutation
    python bench/mutations.py head sweeper    # those whose name contains a word given
    python bench/mutations.py --list

The tests run against a private redis-server started for the run (else TEST_REDIS_URL, else db 14
of the local Redis) and a temporary SQLite database (TEST_DATABASE_URL=sqlite), so a `pytest`
running at the same time neither disturbs nor is disturbed. The working tree is never modified.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
TIMEOUT_SECONDS = 600
# A line of pytest's short summary (-rfE): "FAILED tests/x.py::test[param] - AssertionError: ...".
_SUMMARY = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


CLASSIFY_TESTS = tuple(f"tests/test_optout.py::{name}" for name in (
    "test_each_opt_out_keyword_alone_is_an_opt_out", "test_each_opt_in_keyword_alone_is_an_opt_in",
    "test_anything_else_is_an_ordinary_message", "test_twilios_opt_out_type_wins_over_the_body"))

MUTATIONS: list[Mutation] = [
    # The four promises of issue 15.
    Mutation("outbox head check skipped", "worker/outbound.py",
             "    if head != reply_id:\n        return None\n", "    if False:\n        return None\n",
             ("tests/test_outbound.py::TestOutboxHead", "tests/test_outbound.py::TestOptOut")),
    Mutation("sweeper thread never sweeps", "worker/sweeper.py",
             "    def turn(self) -> float:\n", "    def turn(self) -> float:\n        return self._interval\n",
             ("tests/test_crash_recovery.py::"
              "test_replies_a_dead_worker_queued_but_never_kicked_are_sent_by_a_workers_sweeper",)),
    Mutation("LOG_PHONE_NUMBERS defaults to full (environment)", "shared/settings.py",
             '("masked", "full"), "masked")', '("masked", "full"), "full")',
             ("tests/test_logging.py", "tests/test_inbound.py::TestAcknowledgement")),
    Mutation("LOG_PHONE_NUMBERS defaults to full (Settings)", "shared/settings.py",
             '    log_phone_numbers: str = "masked"\n', '    log_phone_numbers: str = "full"\n',
             ("tests/test_logging.py", "tests/test_inbound.py::TestAcknowledgement")),
    Mutation("opt-out keywords QUIT, REVOKE, OPTOUT dropped", "shared/optout.py",
             '"END", "QUIT", "REVOKE", "OPTOUT"})', '"END"})',
             (*CLASSIFY_TESTS, "tests/test_inbound.py::TestOptOut")),
    Mutation("opt-in keyword YES dropped", "shared/optout.py",
             '{"START", "YES", "UNSTOP"}', '{"START", "UNSTOP"}',
             (*CLASSIFY_TESTS, "tests/test_inbound.py::TestOptOut")),
    # Receiving.
    Mutation("signature not checked", "webhook/twilio_auth.py",
             "    if not is_signed(bot.auth_token,", "    if False and not is_signed(bot.auth_token,",
             ("tests/test_signature.py",)),
    Mutation("AccountSid not checked", "webhook/twilio_auth.py",
             '    if request.form.get("AccountSid") != bot.account_sid:', "    if False:",
             ("tests/test_signature.py",)),
    Mutation("dedupe disabled", "shared/conversations.py",
             "if not redis.call('SET', KEYS[2]", "if false and not redis.call('SET', KEYS[2]",
             ("tests/test_inbound.py::TestDuplicates",)),
    Mutation("dedupe disabled (the wake-up test alone)", "shared/conversations.py",
             "if not redis.call('SET', KEYS[2]", "if false and not redis.call('SET', KEYS[2]",
             ("tests/test_inbound.py::TestDuplicates::test_a_duplicate_wakes_no_worker",)),
    Mutation("dedupe remembers 1 hour, not 48", "shared/conversations.py",
             "DEDUPE_TTL = 48 * 3600", "DEDUPE_TTL = 3600",
             ("tests/test_inbound.py::TestDuplicates",)),
    Mutation("body limit gone", "webhook/__init__.py",
             '    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES\n', "",
             ("tests/test_inbound.py::TestBadInput", "tests/test_registry.py::TestBadInput")),
    Mutation("a malformed NumMedia crashes the webhook", "webhook/inbound.py",
             "    except ValueError:\n        return default", "    except TypeError:\n        return default",
             ("tests/test_hostile_input.py::test_a_count_that_is_not_a_whole_number_is_read_as_its_default",
              "tests/test_hostile_input.py::test_signed_forms_at_the_webhook_and_status_callback")),
    # Sending.
    Mutation("pacing ignores segments", "worker/pacing.py",
             "    return max(segments, 1) / rate * (1 + MARGIN)", "    return 1 / rate * (1 + MARGIN)",
             ("tests/test_pacing.py",)),
    Mutation("GSM-7 concatenated segment holds 160", "shared/segments.py",
             "GSM7_MULTI_SEGMENT_SEPTETS: Final = 153", "GSM7_MULTI_SEGMENT_SEPTETS: Final = 160",
             ("tests/test_segments.py",)),
    Mutation("UCS-2 concatenated segment holds 70", "shared/segments.py",
             "UCS2_MULTI_SEGMENT_UNITS: Final = 67", "UCS2_MULTI_SEGMENT_UNITS: Final = 70",
             ("tests/test_segments.py",)),
    Mutation("text split at 1700 characters", "shared/segments.py",
             "MAX_MESSAGE_CHARS: Final = 1600", "MAX_MESSAGE_CHARS: Final = 1700",
             ("tests/test_segments.py", "tests/test_outbound.py::TestContent")),
    Mutation("21610 treated as permanent", "shared/twilio_errors.py",
             "    21610: Action.OPTED_OUT,", "    21610: Action.PERMANENT,",
             ("tests/test_twilio_errors.py",)),
    Mutation("5xx not retried", "shared/twilio_errors.py",
             "http_status == 429 or http_status >= 500:", "http_status == 429:",
             ("tests/test_twilio_errors.py",)),
    Mutation("no fallback message", "worker/engine.py",
             "return [Answer(text=bot.fallback_message)] if bot.fallback_message else []", "return []",
             ("tests/test_engine.py",)),
    Mutation("a late status moves the status back", "shared/messagelog.py",
             "    forwards = new.rank >= old.rank\n", "    forwards = new.rank >= 0\n",
             ("tests/test_status_callbacks.py::TestRecording",)),
    # The system of record (issue 9).
    Mutation("the opt-out copy is not rebuilt after a flush", "shared/optout.py",
             "    if loaded is None:\n        load_copy(engine, redis, bot_number)\n",
             "    if False:\n        load_copy(engine, redis, bot_number)\n",
             ("tests/test_optout.py::TestSurvivesRedis",)),
    Mutation("the exchange's log record is not queued with its replies", "shared/conversations.py",
             "  if record ~= '' then redis.call('RPUSH', log, record) end",
             "  if false then redis.call('RPUSH', log, record) end",
             ("tests/test_message_log.py::TestDurability",)),
    Mutation("a failed log batch is dropped instead of retried", "worker/logdrain.py",
             "    if not written and refused:\n        raise refused[0][1]\n",
             "    if not written and refused:\n        pass\n",
             ("tests/test_logdrain.py::test_records_wait_in_redis_while_the_database_is_down_and_are_written_once_it_is_back",)),
    Mutation("another process's registry change never reaches the cache", "shared/bots.py",
             "                elif message is not None and message[\"type\"] == \"message\":\n                    cache.clear()\n",
             "                elif message is not None and message[\"type\"] == \"message\":\n                    pass\n",
             ("tests/test_bot_store.py::TestCache::test_a_change_made_by_another_process_arrives_through_redis",)),
    Mutation("retention deletes nothing", "shared/retention.py",
             "    oldest = select(*key).where(age < cutoff).limit(batch)\n",
             "    oldest = select(*key).where(age < 0).limit(batch)\n",
             ("tests/test_retention.py",)),
    # Fencing (issue 10).
    Mutation("a stale conversation lease still queues replies", "shared/conversations.py",
             "  if token ~= '' and redis.call('GET', lock) ~= token then return -1 end",
             "  if false then return -1 end",
             ("tests/test_fencing.py::test_a_stale_holder_queues_no_replies_and_leaves_the_message_to_the_new_one",)),
    Mutation("a stale outbox lease still sends", "worker/outbound.py",
             "    if not ours:\n        return _lease_lost(conversation, reply)\n", "",
             ("tests/test_fencing.py::test_a_sender_whose_outbox_lease_passed_on_sends_nothing",)),
    # Trust (issue 14).
    Mutation("an engine answer is not capped", "worker/conversation.py",
             "    replies = cut.replies\n", "",
             ("tests/test_answer_caps.py::test_an_answer_of_many_items_sends_ten",)),
    # Logs.
    Mutation("secret fields logged", "shared/logging.py",
             "            if is_secret(key):\n", "            if False:\n",
             ("tests/test_logging.py", "tests/test_registry.py::TestReadingAndDeleting")),
    Mutation("a lost answer counts as a refusal (sent twice)", "worker/twilio_client.py",
             "    return refused.http_status is None or (refused.http_status >= 500 and refused.code is None)",
             "    return False",
             ("tests/test_twilio_errors.py::TestRetried",)),
    Mutation("a claimed send is not marked", "worker/pacing.py",
             "  if hash ~= '' then redis.call('HSET', hash, field, string.format('%.6f', now)) end",
             "  return",
             ("tests/test_twilio_errors.py::TestRetried",)),
    Mutation("a bot answers another bot", "worker/conversation.py",
             '    if get_bots().is_bot_number(message["sender"]):', "    if False:",
             ("tests/test_bot_limits.py::TestLoops",)),
    Mutation("a bot's own caps ignored", "worker/conversation.py",
             "    cut = capped(replies, limits.max_replies, limits.max_segments)", "    cut = capped(replies)",
             ("tests/test_bot_limits.py::TestPerAnswer",)),
    Mutation("no daily budget", "worker/outbound.py",
             "    if DAILY_SENDS.exhausted(bot):", "    if False:",
             ("tests/test_bot_limits.py::TestDailyBudget",)),
    Mutation("no engine slots", "worker/conversation.py",
             "        if not taken:\n            log.info(\"conversation.engine_busy\"",
             "        if False:\n            log.info(\"conversation.engine_busy\"",
             ("tests/test_bot_limits.py::TestEngineSlots",)),
    Mutation("any engine token opens any callback", "webhook/replies.py",
             "    if bot is not None and bot.accepts_engine_token(token):", '    if token.startswith("mset_"):',
             ("tests/test_engine_callback.py::TestTrust",)),
    Mutation("cold pushes allowed", "webhook/replies.py",
             "    if bot.limits.allow_cold_push:", "    if True:",
             ("tests/test_engine_callback.py::TestTrust",)),
    Mutation("erased records come back", "worker/logdrain.py",
             "    records, raw = _without_erased(redis, [json.loads(item) for item in raw], raw)",
             "    records = [json.loads(item) for item in raw]",
             ("tests/test_erasure.py",)),
    Mutation("the last reply's step lets go with a message waiting", "worker/outbound.py",
             "elseif held[2] == ARGV[9] and redis.call('LLEN', KEYS[5]) == 0 then",
             "elseif held[2] == ARGV[9] then",
             ("tests/test_conversation.py::test_a_message_landing_while_the_last_reply_is_sent_is_woken_for",)),
    Mutation("the last reply's step lets go of a conversation another worker took", "worker/outbound.py",
             "elseif held[2] == ARGV[9] and redis.call('LLEN', KEYS[5]) == 0 then",
             "elseif redis.call('LLEN', KEYS[5]) == 0 then",
             ("tests/test_conversation.py", "tests/test_fencing.py")),
    Mutation("the last reply's step keeps the outbox lease", "worker/outbound.py",
             "if ARGV[8] ~= '' and held[1] == ARGV[8] then released[1] = KEYS[8] end",
             "",
             ("tests/test_conversation.py", "tests/test_outbound.py")),
    Mutation("replies joining a busy outbox are sent at once as well", "shared/conversations.py",
             "  if queued == (#ARGV - first + 1) / 2 then return ARGV[first] end",
             "  if queued > 0 then return ARGV[first] end",
             ("tests/test_outbound.py", "tests/test_conversation.py", "tests/test_exactly_once.py")),
    Mutation("a text wakes a worker while its conversation is held", "shared/conversations.py",
             "if redis.call('RPUSH', KEYS[3], ARGV[1]) == 1 and redis.call('EXISTS', KEYS[9]) == 0 then",
             "if redis.call('RPUSH', KEYS[3], ARGV[1]) == 1 then",
             ("tests/test_conversation.py::test_a_message_landing_while_the_last_reply_is_sent_is_woken_for",)),
    Mutation("a failed handoff forward is not tried again", "worker/handoff.py",
             "            forward_later.send_with_options(args=(bot.id, payload), delay=LATER_FIRST_DELAY_MS)",
             "            pass",
             ("tests/test_handoff.py::test_a_forward_the_handoff_url_did_not_take_is_tried_again_later",)),
    Mutation("a refused handoff address is tried again", "worker/handoff.py",
             "            return False, outcome.retryable",
             "            return False, True",
             ("tests/test_handoff.py::test_a_handoff_url_inside_the_network_is_never_reached",)),
    Mutation("dlq reads every dead message as a reply", "worker/dlq.py",
             "    if message.actor_name != SEND_REPLY:", "    if False:",
             ("tests/test_handoff.py::test_a_forward_that_never_got_through_is_a_dead_letter_that_replays",)),
    Mutation("a bot's engine goes through the operator's proxy", "worker/http.py",
             "        proxy = None if policy is not None else get_environ_proxies(url).get(parts.scheme)",
             "        proxy = get_environ_proxies(url).get(parts.scheme)",
             ("tests/test_engine_boundary.py::TestTheEnvironment",)),
    Mutation("the CLI drops the service's path prefix", "cli/bots.py",
             '    return f"{parts.scheme}://{parts.netloc}{path}"', '    return f"{parts.scheme}://{parts.netloc}"',
             ("tests/test_simulate.py::TestUrl::test_the_registry_behind_a_path_prefix_is_reached_there",)),
    Mutation("a worker takes wake-ups past its prefetch", "shared/wakeups.py",
             "            wanted = self._prefetch - self._working", "            wanted = self._prefetch",
             ("tests/test_wakeups.py::TestTheConsumer::test_it_takes_no_more_than_its_prefetch_less_what_is_being_worked_on",)),
    Mutation("a stopping worker keeps the wake-ups it never started", "shared/wakeups.py",
             "        self._push_back(bodies + taken)", "        self._push_back(taken)",
             ("tests/test_wakeups.py::test_a_stopping_worker_puts_back_the_wake_ups_it_took_and_never_started",)),
    Mutation("wake-ups put back out of order", "shared/wakeups.py",
             "        self._push_back(bodies + taken)", "        self._push_back(taken + bodies)",
             ("tests/test_wakeups.py::TestTheConsumer::test_a_stop_puts_back_what_was_taken_and_not_started_in_order",)),
    Mutation("a closed consumer drops what it popped", "shared/wakeups.py",
             "        bodies, self._taken = list(self._taken), deque()\n        self._push_back(bodies)",
             "        bodies, self._taken = [], deque()\n        self._push_back(bodies)",
             ("tests/test_wakeups.py::TestTheConsumer::test_a_consumer_closed_after_a_lost_connection_puts_back_what_it_had_popped",)),
    Mutation("wake-ups of an earlier release are left where nobody reads them", "shared/wakeups.py",
             "        self._adopt_legacy()\n", "",
             ("tests/test_wakeups.py::test_wake_ups_an_earlier_release_queued_are_adopted_and_answered",)),
    Mutation("join ignores the wake-ups a worker holds", "shared/wakeups.py",
             "not any(c.in_hand for c in list(self._consumers))", "True",
             ("tests/test_wakeups.py::TestTheConsumer::test_join_waits_for_the_wake_ups_a_worker_holds",)),
    # Scoped API keys and the operator console (issue 23).
    Mutation("an operator key reaches every bot", "shared/access.py",
             "return self.is_admin or not self.bots or bot_id in self.bots", "return True",
             ("tests/test_api_keys.py::test_each_role_reaches_only_its_endpoints_and_bots",)),
    Mutation("an operator key may take an admin's action", "shared/access.py",
             "        if action not in OPERATOR_ACTIONS:\n            return False\n", "",
             ("tests/test_api_keys.py::test_each_role_reaches_only_its_endpoints_and_bots",)),
    Mutation("an operator key reads /metrics", "webhook/metrics.py",
             "    if not principal.is_admin:", "    if False:",
             ("tests/test_api_keys.py::test_each_role_reaches_only_its_endpoints_and_bots[read /metrics]",)),
    Mutation("a revoked key keeps working", "shared/apikeys.py",
             "    return connection.execute(delete(api_keys).where(api_keys.c.id == key_id)).rowcount == 1",
             "    return True",
             ("tests/test_api_keys.py::test_a_revoked_key_is_refused_with_its_next_request",)),
    Mutation("the bot list shows an operator every bot", "webhook/registry.py",
             "if principal.reaches(bot.id)]", "]",
             ("tests/test_api_keys.py::test_an_operator_lists_only_the_bots_it_may_reach",)),
    Mutation("a bot's dead-letter replay replays another bot's", "webhook/deadletters.py",
             "            if entry[\"bot_id\"] == bot_id]", "]",
             ("tests/test_api_keys.py::test_an_operator_lists_and_replays_only_its_bots_dead_letters",)),
    Mutation("console streams are not bounded", "webhook/console/live.py",
             "return self._free is not None and self._free.acquire(blocking=False)", "return self._free is not None",
             ("tests/test_console_live.py::test_fifty_open_console_streams_leave_the_webhook_answering",)),
    Mutation("the log drain tells open console pages nothing", "worker/logdrain.py",
             "    _announce(redis, records)\n", "",
             ("tests/test_console_live.py::test_the_log_drain_announces_the_conversations_it_wrote",)),
    Mutation("a delivery status tells open console pages nothing", "webhook/status.py",
             "    news.publish(deps.get_redis(), bot.id, recipient)\n", "",
             ("tests/test_console_live.py::test_a_status_callback_a_handoff_and_an_operators_send_are_announced_to_open_pages",)),
    Mutation("a handoff tells open console pages nothing", "webhook/handoffs.py",
             "event=\"paused\", by=handoff.BY_OPERATOR)\n    news.publish(deps.get_redis(), bot.id, person)\n",
             "event=\"paused\", by=handoff.BY_OPERATOR)\n",
             ("tests/test_console_live.py::test_a_status_callback_a_handoff_and_an_operators_send_are_announced_to_open_pages",)),
    Mutation("an operator's send tells open console pages nothing", "webhook/operator.py",
             "    news.publish(redis, bot.id, to)\n", "",
             ("tests/test_console_live.py::test_a_status_callback_a_handoff_and_an_operators_send_are_announced_to_open_pages",)),
    Mutation("the console checks no CSRF token", "webhook/console/auth.py",
             "    return hmac.compare_digest(given.encode(), expected.encode())", "    return True",
             ("tests/test_console.py::TestCsrf::test_a_post_without_the_token_or_from_another_origin_is_refused",)),
    Mutation("a console sign-out ends no other session", "webhook/console/auth.py",
             "    ended = sessions.end_all(get_redis(), g.console_operator.id)", "    ended = 0",
             ("tests/test_console.py::TestSignIn::test_signing_out_ends_the_session_on_every_device",)),
    Mutation("console sign-ins are not rate-limited", "webhook/console/auth.py",
             "    if sessions.sign_in_blocked(redis, email, address):", "    if False:",
             ("tests/test_console.py::TestSignIn::test_a_wrong_password_is_refused_and_repeated_failures_lock_the_account_for_a_while",)),
    Mutation("the console session cookie is readable by scripts", "webhook/console/auth.py",
             "secure=request.is_secure, httponly=True, samesite=\"Lax\")",
             "secure=request.is_secure, httponly=False, samesite=\"Lax\")",
             ("tests/test_console.py::TestSignIn::test_pages_need_a_session_and_the_sign_in_sets_a_locked_down_cookie",)),
    Mutation("a console operator reaches every bot", "webhook/console/pages.py",
             "    if bot is None or not auth.principal().reaches(bot_id):", "    if bot is None:",
             ("tests/test_console.py::TestScope::test_another_bots_conversation_cannot_be_reached_by_url",)),
    Mutation("a double click in the console sends twice", "webhook/console/pages.py",
             "idempotency_key=request.form.get(\"idempotency\", \"\")", "idempotency_key=\"\"",
             ("tests/test_console.py::TestConversation::test_a_reply_sent_from_the_console_is_queued_once_and_logged_as_the_operators",)),
    Mutation("the composer counts messages, not segments", "webhook/console/pages.py",
             "segments=sum(count_segments(p) for p in parts)", "segments=len(parts)",
             ("tests/test_console.py::TestConversation::test_the_segment_count_is_the_senders",)),
    Mutation("an opted-out person's composer stays enabled", "webhook/console/pages.py",
             "    _, _, opted_out = operator.sending_from(bot, get_redis(), number)", "    opted_out = False",
             ("tests/test_console.py::TestConversation::test_an_opted_out_persons_composer_is_disabled_with_a_banner",)),
    Mutation("the console never speaks Spanish", "webhook/console/__init__.py",
             "    return request.accept_languages.best_match(LANGUAGES) or LANGUAGES[0]", "    return LANGUAGES[0]",
             ("tests/test_console.py::TestPages::test_spanish_is_chosen_by_the_browsers_language",)),
    Mutation("the console allows inline scripts", "webhook/console/__init__.py",
             "script-src 'self';", "script-src 'self' 'unsafe-inline';",
             ("tests/test_console.py::TestPages::test_pages_carry_a_strict_content_security_policy",)),
    Mutation("the inbox's needs-a-human filter shows everyone", "shared/inbox.py",
             "        query = query.where(paused)\n", "        pass\n",
             ("tests/test_console.py::TestInbox::test_filters_and_search_pick_the_conversations_meant",)),
    Mutation("the inbox marks nothing as changed", "webhook/console/pages.py",
             "        item[\"unseen\"] = item[\"last_at\"] > seen.get(", "        item[\"unseen\"] = False and seen.get(",
             ("tests/test_console.py::TestInbox::test_a_conversation_that_changed_since_it_was_opened_stands_out",)),
    Mutation("the console's bot form stores a masked engine URL", "webhook/console/pages.py",
             "if (value := request.form.get(name, \"\").strip()) and value != _as_shown(shown.get(name))}",
             "if (value := request.form.get(name, \"\").strip())}",
             ("tests/test_console.py::TestPages::test_saving_settings_leaves_a_masked_engine_url_as_stored",)),
]


@dataclass(frozen=True)
class Outcome:
    verdict: str
    seconds: float = 0.0
    detail: str = ""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(word.lower() in m.name.lower() for word in args.only)]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {mutation.path} -> {' '.join(mutation.tests)}")
        return 0
    with _redis(args.redis_url) as redis_url, tempfile.TemporaryDirectory(prefix="mammut-mutations-") as scratch:
        env = {**os.environ, "TEST_REDIS_URL": redis_url, "TEST_DATABASE_URL": "sqlite", "PYTHONDONTWRITEBYTECODE": "1"}
        copy = _copy_tree(Path(scratch) / "repo")
        env["PYTHONPATH"] = str(copy)  # the copy's packages, not the editable install's, here and in subprocesses
        broken = set() if args.no_baseline else _baseline(copy, chosen, env)
        outcomes = [(m, _run(copy, m, env, broken)) for m in chosen]
    survived = _report(outcomes)
    return 1 if survived else 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="run only mutations whose name contains one of these words")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--redis-url", help="the tests' Redis (default: a private redis-server)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _redis(wanted: str | None) -> Iterator[str]:
    """`wanted`, else a redis-server of our own on a free port, else TEST_REDIS_URL or db 14 of the local one."""
    server = shutil.which("redis-server")
    if wanted or not server:
        yield wanted or os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _copy_tree(target: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _pytest(copy: Path, tests: Sequence[str], env: dict[str, str], stop_at_first: bool) -> tuple[int, str, float]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
               *(["-x"] if stop_at_first else []), *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as expired:
        return -1, str(expired.stdout or ""), time.monotonic() - started
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def _baseline(copy: Path, chosen: list[Mutation], env: dict[str, str]) -> set[str]:
    """The node ids that fail with nothing mutated."""
    tests = sorted({test for mutation in chosen for test in mutation.tests})
    print(f"baseline: {len(tests)} test targets, unmutated ...", flush=True)
    code, output, seconds = _pytest(copy, tests, env, stop_at_first=False)
    failing = set(_SUMMARY.findall(output))
    print(f"baseline: exit {code}, {len(failing)} failing, {seconds:.0f}s", flush=True)
    for node in sorted(failing):
        print(f"  fails unmutated: {node}")
    return failing


def _covers(target: str, node: str) -> bool:
    return node == target or node.startswith((target + "::", target + "["))


def _run(copy: Path, mutation: Mutation, env: dict[str, str], broken: set[str]) -> Outcome:
    if any(_covers(target, node) for target in mutation.tests for node in broken):
        return Outcome("unreliable", detail="its tests fail unmutated")
    path = copy / mutation.path
    original = path.read_text() if path.is_file() else ""
    found = original.count(mutation.old)
    if found != 1:
        return Outcome("n/a", detail=f"old text found {found} times in {mutation.path}")
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        code, output, seconds = _pytest(copy, mutation.tests, env, stop_at_first=True)
    finally:
        path.write_text(original)
    if code == 0:
        return Outcome("survived", seconds)
    if code in (1, -1):
        first = next(iter(_SUMMARY.findall(output)), "timeout" if code < 0 else "")
        return Outcome("killed", seconds, first)
    last = (output.strip().splitlines() or [""])[-1]
    return Outcome("error", seconds, f"pytest exit {code}: {last}")


def _report(outcomes: list[tuple[Mutation, Outcome]]) -> int:
    """Print one line per mutation and the totals; returns how many survived."""
    print()
    width = max(len(mutation.name) for mutation, _ in outcomes)
    for mutation, outcome in outcomes:
        detail = f"  ({outcome.detail})" if outcome.detail else ""
        print(f"{outcome.verdict:<10} {mutation.name:<{width}} {outcome.seconds:5.0f}s{detail}")
    counts = {verdict: sum(o.verdict == verdict for _, o in outcomes)
              for verdict in ("killed", "survived", "n/a", "unreliable", "error")}
    applicable = counts["killed"] + counts["survived"]
    print(f"\n{counts['killed']} of {applicable} applicable mutations killed, {counts['survived']} survived"
          + "".join(f", {n} {verdict}" for verdict, n in counts.items() if n and verdict not in ("killed", "survived")))
    return counts["survived"]


if __name__ == "__main__":
    sys.exit(main())
