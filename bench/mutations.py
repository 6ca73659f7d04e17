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

_M = "tests/test_migrate_from_redis.py::"

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
    Mutation("opt-out keywords QUIT, REVOKE, OPTOUT dropped", "shared/keywords.py",
             '"END", "QUIT", "REVOKE", "OPTOUT")', '"END")',
             (*CLASSIFY_TESTS, "tests/test_inbound.py::TestOptOut")),
    Mutation("opt-in keyword YES dropped", "shared/keywords.py",
             '("START", "YES", "UNSTOP")', '("START", "UNSTOP")',
             (*CLASSIFY_TESTS, "tests/test_inbound.py::TestOptOut")),
    # Receiving.
    Mutation("signature not checked", "webhook/twilio_auth.py",
             "    if not is_signed(bot.auth_token,", "    if False and not is_signed(bot.auth_token,",
             ("tests/test_signature.py",)),
    Mutation("AccountSid not checked", "webhook/twilio_auth.py",
             '    if (form.get("AccountSid") or "").lower() != bot.account_sid.lower():', "    if False:",
             ("tests/test_signature.py",)),
    Mutation("dedupe disabled", "shared/conversations.py",
             "if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 or", "if false and",
             ("tests/test_inbound.py::TestDuplicates",)),
    Mutation("dedupe disabled (the wake-up test alone)", "shared/conversations.py",
             "if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 or", "if false and",
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
             ('    if get_bots().is_bot_number(message["sender"]) or POOL_NUMBERS.owner(redis, message["sender"])'
              " is not None:"), "    if False:",
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
             "    unmarked = [] if bot.limits.allow_cold_push else", "    unmarked = [] if True else",
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
    Mutation("dlq reads every dead message as a reply", "shared/dlq.py",
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
    # Upgrading from the Redis-only release (issue 25).
    Mutation("a finished copy runs again", "cli/from_redis.py",
             "        done = redis.get(MIGRATED_KEY)\n", "        done = None\n",
             (_M + "TestReleasePhase::test_what_the_new_release_deleted_never_comes_back",
              _M + "TestCopy::test_a_second_run_copies_nothing_and_says_when_the_copy_was_made")),
    Mutation("the release phase does not copy", "cli/migrate.py",
             "if args.from_redis or _waiting(settings):", "if args.from_redis:",
             (_M + "TestReleasePhase::test_the_release_phase_copies_an_old_layout_not_yet_copied",
              _M + "TestReleasePhase::test_numbers_answer_as_soon_as_the_new_processes_start")),
    Mutation("the release phase ignores the migrated mark", "cli/from_redis.py",
             "return not redis.exists(MIGRATED_KEY) and bool(", "return bool(",
             (_M + "TestReleasePhase::test_a_later_release_phase_says_nothing_of_redis",)),
    Mutation("a bot re-created under an old id is merged", "cli/from_redis.py",
             "        if there is not None and (", "        if False and (",
             (_M + "TestRefused::test_a_bot_recreated_under_an_old_bots_id_is_a_conflict",)),
    Mutation("another account under an old id is merged", "cli/from_redis.py",
             "(there.main_phone_number, there.account_sid) != (number, account)",
             "there.main_phone_number != number",
             (_M + "TestRefused::test_a_bot_of_another_account_under_an_old_bots_id_is_a_conflict",)),
    Mutation("an old number taken by another bot is not a conflict", "cli/from_redis.py",
             "        elif owners.get(number, bot_id) != bot_id:", "        elif False:",
             (_M + "TestRefused::test_an_old_bots_number_taken_by_another_id_is_a_conflict",)),
    Mutation("undecryptable tokens are copied", "cli/from_redis.py",
             "    if unreadable:\n", "    if False:\n",
             (_M + "TestRefused::test_a_credentials_key_that_cannot_decrypt_the_tokens_stops_the_copy",)),
    Mutation("engine URLs copied in plain text", "cli/from_redis.py",
             '"engine_url": vault.encrypt(engine_url) if engine_url else None,', '"engine_url": engine_url,',
             (_M + "TestCopy::test_engine_urls_are_stored_encrypted_and_read_back_by_the_registry",)),
    Mutation("old dedupe marks not carried over", "cli/from_redis.py",
             "            if ttl > 0 and accounts:\n", "            if False:\n",
             (_M + "TestReleasePhase::test_a_twilio_retry_of_a_text_the_old_release_accepted_is_a_duplicate",)),
    Mutation("carried dedupe marks live 48 hours again", "cli/from_redis.py",
             '"1", nx=True, px=ttl)', '"1", nx=True, ex=48 * 3600)',
             (_M + "TestReleasePhase::test_a_twilio_retry_of_a_text_the_old_release_accepted_is_a_duplicate",)),
    Mutation("copied dead letters left in Dramatiq's dead-letter queue", "cli/from_redis.py",
             "        if reply_id in copied:\n", "        if False:\n",
             (_M + "TestReleasePhase::test_what_the_new_release_deleted_never_comes_back",
              _M + "TestReleasePhase::test_old_dead_letter_ids_are_printed_with_their_new_ones")),
    Mutation("private engines not listed", "cli/from_redis.py",
             "    return refused\n", "    return []\n",
             (_M + "TestReleasePhase::test_bots_whose_engine_is_on_a_private_address_are_listed",)),
    Mutation("opt-outs dated by the copy", "cli/from_redis.py",
             '"at": stopped.get((number, person), now)}', '"at": now}',
             (_M + "TestCopy::test_an_opt_out_keeps_the_time_of_its_stop_when_the_log_has_it",)),
    Mutation("purge deletes the carried dedupe marks", "cli/from_redis.py",
             "if not key.startswith(SEEN_KEY) or _old_mark(key)", "if True",
             (_M + "test_purge_deletes_the_old_keys_once_copied",)),
    Mutation("an unreachable Redis passes the release phase", "cli/migrate.py",
             "        if not settings.development:\n            raise\n", "",
             (_M + "test_an_unreachable_redis_stops_the_release_phase_outside_development",)),
    # Issue 27: thirteen promises the suite did not notice losing.
    Mutation("issue 27: reconciliation takes a message another reply of the log owns", "worker/twilio_client.py",
             "    others = exclude(candidates) if candidates else set()\n", "    others = set()\n",
             ("tests/test_twilio_errors.py::TestRetried::"
              "test_an_unknown_send_is_not_settled_by_another_reply_of_the_log_with_the_same_text",)),
    Mutation("issue 27: a reconciled send does not count toward the daily budget", "worker/outbound.py",
             "    DAILY_SENDS.sent(bot.id, count_segments(reply[\"text\"]))\n"
             "    _log_reconciled(bot.id, conversation, reply[\"id\"], sid, how)\n",
             "    _log_reconciled(bot.id, conversation, reply[\"id\"], sid, how)\n",
             ("tests/test_twilio_errors.py::TestRetried::test_a_send_settled_by_the_list_lookup_counts_toward_the_daily_budget",
              "tests/test_messaging_services.py::TestStatusCallbacks::"
              "test_a_send_settled_by_its_status_callback_counts_toward_the_daily_budget")),
    Mutation("issue 27: a late status callback leaves a field in Redis", "shared/conversations.py",
             "if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end\n", "",
             ("tests/test_messaging_services.py::TestStatusCallbacks::"
              "test_callbacks_for_finished_replies_leave_nothing_in_redis",)),
    Mutation("issue 27: a 30001 resend per callback, not per MessageSid", "webhook/status.py",
             '    if not redis.set(keys.seen(bot.account_sid, "resend-"',
             '    if False and not redis.set(keys.seen(bot.account_sid, "resend-"',
             ("tests/test_messaging_services.py::TestStatusCallbacks::"
              "test_a_queue_overflow_called_back_several_times_sends_the_reply_again_once",)),
    Mutation("issue 27: a push goes from a number the bot gave away", "worker/outbound.py",
             '    chosen = reply.get("from_number") or (texted if texted in bot.numbers else None)\n',
             '    chosen = reply.get("from_number") or texted\n',
             ("tests/test_messaging_services.py::TestOutbound::test_a_push_never_goes_from_a_number_the_bot_gave_away",)),
    Mutation("issue 27: pausing a paused conversation moves its since", "shared/handoff.py",
             "        since = old.since if old is not None and old.active(now) else now\n", "        since = now\n",
             ("tests/test_handoff.py::TestPausedByTheOperator::"
              "test_pausing_a_paused_conversation_keeps_its_since_takes_the_note_and_restarts_the_timeout",)),
    Mutation("issue 27: a START leading a burst is merged with it", "worker/conversation.py",
             '    if bot.controls.merge_window_ms and message["event"] == optout.MESSAGE:',
             "    if bot.controls.merge_window_ms:",
             ("tests/test_merge_window.py::test_a_start_at_the_head_of_a_burst_is_its_own_turn",)),
    Mutation("issue 27: a bot's default engine calls take every thread", "worker/slots.py",
             "    return max(1, process_threads() // DEFAULT_SHARE)", "    return process_threads()",
             ("tests/test_bot_limits.py::TestEngineSlots::"
              "test_a_bot_that_never_set_the_limit_holds_a_quarter_of_the_workers_threads",)),
    Mutation("issue 27: erasure leaves the processing list", "shared/erasure.py",
             "    pipe.delete(keys.inbox(conversation), keys.processing(conversation), keys.outbox(conversation),",
             "    pipe.delete(keys.inbox(conversation), keys.outbox(conversation),",
             ("tests/test_erasure.py::test_a_text_a_dead_worker_left_in_processing_is_not_answered_after_the_erase",)),
    Mutation("issue 27: the retention job ignores LOG_RETENTION_DAYS", "worker/middleware.py",
             "Retention(get_redis(), get_engine(), get_settings().log_retention_days)",
             "Retention(get_redis(), get_engine(), 90)",
             ("tests/test_retention.py::test_a_running_worker_purges_by_log_retention_days",)),
    Mutation("issue 27: a refused operator send keeps its Idempotency-Key", "webhook/operator.py",
             "            redis.delete(remembered_key)  # a refusal queued nothing; a corrected retry may use the key",
             "            pass",
             ("tests/test_operator_send.py::test_a_refused_request_frees_its_idempotency_key_for_the_corrected_retry",)),
    Mutation("issue 27: only the first DNS answer of an engine's host is checked", "shared/netguard.py",
             "        for address in addresses:\n            self._check(host, ip_address(address))\n",
             "        for address in addresses[:1]:\n            self._check(host, ip_address(address))\n",
             ("tests/test_engine_boundary.py::TestAddresses::"
              "test_a_name_with_one_refused_address_among_its_answers_is_refused",)),
    Mutation("issue 27: a slow client past the deadline is closed without its 408", "webhook/slowclient.py",
             '                self._drop(conn, REQUEST_TIMEOUT if arrival.data else b"")',
             '                self._drop(conn, b"")',
             ("tests/test_slow_clients.py::test_a_request_past_the_deadline_is_told_408_before_it_is_closed",)),
    Mutation("issue 27: a head over 64 KiB is closed without its 431", "webhook/slowclient.py",
             "            self._drop(conn, HEAD_TOO_LARGE)", '            self._drop(conn, b"")',
             ("tests/test_slow_clients.py::test_a_head_over_64_kib_is_told_431_before_it_is_closed",)),
    # Issue 22, promises that leak (opt-outs across registry changes, erasure, NUL, pool loops, ownership, retention)
    Mutation("opt-outs stay under a bot's old number when it moves onto a service", "shared/bots.py",
             "                gone = optout.carry_over(connection, before, _opt_out_keys(merged))",
             "                gone = []",
             ("tests/test_messaging_services.py::TestOptOutsFollowTheBot",)),
    Mutation("the opt-out copy stays under a bot's old number when it moves onto a service", "shared/optout.py",
             "        redis.eval(CARRY_OVER_LUA, len(copies), *copies, len(gone))", "        pass",
             ("tests/test_messaging_services.py::TestOptOutsFollowTheBot",)),
    Mutation("an answer to a message erased meanwhile is queued", "shared/conversations.py",
             "  if done ~= '' and redis.call('LREM', processing, 1, done) == 0 then return -2 end",
             "  if done ~= '' then redis.call('LREM', processing, 1, done) end",
             ("tests/test_erasure.py::test_an_answer_the_engine_gives_after_the_erase_is_neither_sent_nor_logged",)),
    Mutation("an engine's handoff is recorded after the erase", "worker/conversation.py",
             "    if asked is not None and not _erased_since_received(redis, conversation, message):",
             "    if asked is not None:",
             ("tests/test_erasure.py::test_an_answer_the_engine_gives_after_the_erase_is_neither_sent_nor_logged",)),
    Mutation("a forward held for later ignores the erase", "worker/handoff.py",
             "    if _erased_after(bot_id, payload):", "    if False:",
             ("tests/test_handoff.py::test_erasing_a_conversation_drops_its_forwards_waiting_for_later_and_its_dead_lettered_ones",)),
    Mutation("erasure leaves dead-lettered forwards", "shared/erasure.py",
             'OUTBOUND_QUEUE + ".DQ", OUTBOUND_QUEUE + ".XQ"):', 'OUTBOUND_QUEUE + ".DQ"):',
             ("tests/test_handoff.py::test_erasing_a_conversation_drops_its_forwards_waiting_for_later_and_its_dead_lettered_ones",)),
    Mutation("erasure leaves the refused log records", "shared/erasure.py",
             "    _drop_refused_records(redis, conversation)\n", "",
             ("tests/test_erasure.py::test_the_persons_records_the_database_refused_are_erased_and_others_kept",)),
    Mutation("API texts keep their control characters", "shared/text.py",
             "        return plain(given)\n",
             "        return given\n",
             ("tests/test_control_characters.py::test_registry_text_fields_lose_their_control_characters",
              "tests/test_control_characters.py::test_an_operator_send_and_an_engine_callback_are_sent_and_logged_without_them")),
    Mutation("extra user fields keep their control characters", "shared/schemas.py",
             "plain(value) if isinstance(value, str) else value\n", "value\n",
             ("tests/test_control_characters.py::test_registry_text_fields_lose_their_control_characters",)),
    Mutation("a handoff note keeps its control characters", "webhook/handoffs.py",
             "    return (plain(note) or None) if note else None, None\n", "    return note or None, None\n",
             ("tests/test_control_characters.py::test_a_handoff_note_loses_its_control_characters",)),
    Mutation("an engine answer keeps its control characters", "worker/engine.py",
             "        text = plain(text) if isinstance(text, str) else None",
             "        text = text if isinstance(text, str) else None",
             ("tests/test_control_characters.py::test_an_engine_answer_with_a_nul_is_sent_and_logged_whole_without_it",)),
    Mutation("an engine's handoff note keeps its control characters", "worker/engine.py",
             'note = plain(custom["note"]) if', 'note = custom["note"] if',
             ("tests/test_control_characters.py::test_an_engine_answer_with_a_nul_is_sent_and_logged_whole_without_it",)),
    Mutation("the loop guard ignores pool numbers", "worker/conversation.py",
             ' or POOL_NUMBERS.owner(redis, message["sender"]) is not None:', ":",
             ("tests/test_messaging_services.py::TestLoopsThroughPoolNumbers",)),
    Mutation("a service's sends teach nothing of its pool numbers", "worker/outbound.py",
             "        POOL_NUMBERS.learn(redis, accepted.from_ or sender.from_, bot.id)", "        pass",
             ("tests/test_messaging_services.py::TestLoopsThroughPoolNumbers",)),
    Mutation("a status callback teaches nothing of a service's pool numbers", "webhook/status.py",
             '        POOL_NUMBERS.learn(redis, form.get("From"), bot.id)', "        pass",
             ("tests/test_messaging_services.py::TestStatusCallbackRouting::test_the_number_a_service_sent_from_is_a_bot_number_and_cannot_be_claimed",)),
    Mutation("a bot may claim another service's pool number", "shared/bots.py",
             "                owner = pool_number_owner(self._redis, number)", "                pass",
             ("tests/test_messaging_services.py::TestStatusCallbackRouting::test_the_number_a_service_sent_from_is_a_bot_number_and_cannot_be_claimed",)),
    Mutation("messaging service SIDs compared with their case", "shared/bots.py",
             "func.lower(bots.c.messaging_service_sid) == service.lower()", "bots.c.messaging_service_sid == service",
             ("tests/test_messaging_services.py::TestRegistry::test_a_messaging_service_sid_differing_only_in_case_is_the_same_service",)),
    Mutation("AccountSid compared with its case", "webhook/twilio_auth.py",
             '(form.get("AccountSid") or "").lower() != bot.account_sid.lower()',
             'form.get("AccountSid") != bot.account_sid',
             ("tests/test_messaging_services.py::TestInbound::test_an_account_sid_differing_only_in_case_is_the_bots",)),
    Mutation("retention keeps ended handoffs", "shared/retention.py",
             "    (handoffs, handoffs.c.until, (handoffs.c.bot_id, handoffs.c.person)),", "",
             ("tests/test_retention.py::test_rows_older_than_the_retention_period_are_deleted_and_newer_ones_kept",)),
    Mutation("retention keeps refused log records", "worker/retention.py",
             "        refused = forget_refused_before(redis, time.time() - days * DAY_SECONDS)", "        refused = 0",
             ("tests/test_retention.py::test_records_the_database_refused_are_forgotten_after_the_retention_period",)),
    # Issue 22, one tenant against all of them: the engine callback's bounds, Redis refusing writes.
    Mutation("a callback ignores max-replies and max-segments", "webhook/replies.py",
             "        cut = capped(replies, bot.limits.max_replies, bot.limits.max_segments)",
             "        cut = capped(replies, 10**6, 10**6)",
             ("tests/test_tenant_bounds.py::TestPushesObeyTheBotsLimits::test_a_callback_is_cut_to_max_replies_and_max_segments_per_person",)),
    Mutation("pushes ignore max-replies-per-minute", "shared/conversations.py",
             "  if ARGV[4] ~= '0' and tonumber(redis.call('GET', KEYS[3 * i + 3]) or '0') >= tonumber(ARGV[4]) then",
             "  if false then",
             ("tests/test_tenant_bounds.py::TestPushesObeyTheBotsLimits::test_a_person_who_had_max_replies_per_minute_gets_no_push_until_the_minute_ends",)),
    Mutation("pushes fill an outbox without bound", "shared/conversations.py",
             "  if waiting + n > tonumber(ARGV[3]) then return {0, i, 'queued', waiting} end",
             "  if false then return {0, i, 'queued', waiting} end",
             ("tests/test_tenant_bounds.py::TestPushesObeyTheBotsLimits::test_a_push_that_would_overfill_a_persons_outbox_is_refused_whole_with_retry_after",)),
    Mutation("a callback flood is not checked at all", "shared/conversations.py",
             "for i = 1, recipients do\n  local n, waiting",
             "for i = 1, 0 do\n  local n, waiting",
             ("tests/test_tenant_bounds.py::test_a_flood_of_callbacks_with_one_bots_token_leaves_redis_bounded_and_other_bots_answered",)),
    Mutation("pushes ignore the bot's max-messages-per-day", "shared/conversations.py",
             "if per_day > 0 and tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0') + total > per_day then",
             "if false then",
             ("tests/test_tenant_bounds.py::TestPushesObeyTheBotsLimits::test_a_bots_pushes_stop_for_the_day_at_max_messages_per_day",)),
    Mutation("readiness only pings a Redis that refuses writes", "webhook/health.py",
             '        get_redis().set(keys.READY_PROBE, "1", px=READY_PROBE_MS)', "        get_redis().ping()",
             ("tests/test_tenant_bounds.py::test_a_redis_that_refuses_writes_refuses_callbacks_and_readiness_and_leaves_no_log_rows",)),
    Mutation("a callback commits its log rows before Redis takes them", "webhook/replies.py",
             "    grouped, cut = _capped(bot, now)\n",
             "    grouped, cut = _capped(bot, now)\n"
             "    with __import__('shared.db', fromlist=['db']).transaction(deps.get_engine()) as connection:\n"
             "        messagelog.record_replies(connection, [r for rs in grouped.values() for r in rs], bot.number)\n",
             ("tests/test_tenant_bounds.py::test_a_redis_that_refuses_writes_refuses_callbacks_and_readiness_and_leaves_no_log_rows",)),
    Mutation("the daily budget counts messages, not segments", "worker/budget.py",
             "                  (_segments_field(bot.id), bot.limits.max_segments_per_day))",
             "                  (_segments_field(bot.id), 0))",
             ("tests/test_tenant_bounds.py::test_max_segments_per_day_bounds_what_a_day_of_long_unicode_answers_costs",)),
    Mutation("a handoff forward takes threads past its bot's slots", "worker/conversation.py",
             "            if not taken and bot.handoff_url:", "            if False:",
             ("tests/test_tenant_bounds.py::test_a_dripping_handoff_url_holds_its_own_bots_slots_not_other_bots_threads",)),
    Mutation("a background forward ignores its bot's slots", "worker/handoff.py",
             "        if not slot:", "        if False:",
             ("tests/test_tenant_bounds.py::test_a_background_forward_waits_for_its_bots_slots_without_spending_a_try",)),
    Mutation("unfinished requests are never shed for their bytes", "webhook/slowclient.py",
             "(self.buffered > self.max_buffered or len(self.arrivals) > self.max_unfinished)",
             "(len(self.arrivals) > self.max_unfinished)",
             ("tests/test_slow_clients.py::test_unfinished_requests_past_the_processs_byte_bound_are_shed_oldest_first",)),
    Mutation("unfinished requests are never shed for their number", "webhook/slowclient.py",
             "(self.buffered > self.max_buffered or len(self.arrivals) > self.max_unfinished)",
             "(self.buffered > self.max_buffered)",
             ("tests/test_slow_clients.py::test_a_flood_of_request_lines_never_stops_the_process_accepting_webhooks",)),
    Mutation("the newest unfinished request is shed first", "webhook/slowclient.py",
             "            deadline, conn = self.deadlines.popleft()\n            arrival = self.arrivals.get(conn)\n            if arrival is not None and arrival.deadline == deadline:\n                self.log",
             "            deadline, conn = self.deadlines.pop()\n            arrival = self.arrivals.get(conn)\n            if arrival is not None and arrival.deadline == deadline:\n                self.log",
             ("tests/test_slow_clients.py::test_unfinished_requests_past_the_processs_byte_bound_are_shed_oldest_first",)),
    Mutation("an erased person's push comes back from the log outbox", "shared/erasure.py",
             "    if record.get(\"kind\") == messagelog.PUSHED and record.get(\"replies\"):",
             "    if False:",
             ("tests/test_tenant_bounds.py::test_a_push_erased_before_the_log_wrote_it_is_not_brought_back",)),
    Mutation("an operator's send commits its log rows before Redis takes them", "webhook/operator.py",
             "    reply_id = queue_replies(redis, conversation, replies,\n",
             "    with __import__('shared.db', fromlist=['db']).transaction(deps.get_engine()) as connection:\n"
             "        messagelog.record_replies(connection, replies, sender, origin=messagelog.OPERATOR)\n"
             "    reply_id = queue_replies(redis, conversation, replies,\n",
             ("tests/test_tenant_bounds.py::test_a_redis_that_refuses_writes_refuses_callbacks_and_readiness_and_leaves_no_log_rows",)),
    Mutation("a push to someone who just wrote needs the database", "webhook/replies.py",
             "    if not unmarked and loaded and not any(listed):", "    if False:",
             ("tests/test_tenant_bounds.py::test_an_engine_answering_someone_who_just_wrote_is_served_while_the_database_is_down",)),
    Mutation("the push window waits for the log's writer", "webhook/replies.py",
             "    return [person for person, mark in zip(recipients, marks) if mark is None or float(mark) < since]",
             "    return list(recipients)",
             ("tests/test_tenant_bounds.py::test_an_engine_that_pushes_the_moment_it_is_asked_is_inside_the_push_window",)),
    # Issue 22, the API's own contract: path ids bounded, 405 with Allow, unsigned refused first, the spec's constraints.
    Mutation("a callback's bot id is not bounded", "webhook/replies.py",
             '<int(min=1, max={MAX_BOT_ID}):bot_id>', '<int:bot_id>',
             ("tests/test_api_contract.py::test_a_callback_to_an_id_past_a_database_integer_is_404_not_500",)),
    Mutation("a registry bot id is not bounded", "webhook/registry.py",
             "not 1 <= int(raw) <= MAX_BOT_ID", "int(raw) < 1",
             ("tests/test_api_contract.py::test_registry_ids_past_a_database_integer_are_404",)),
    Mutation("405 without Allow", "webhook/errors.py",
             "response.headers.extend((name, value) for name, value in error.get_headers() if name != \"Content-Type\")",
             "pass", ("tests/test_api_contract.py::test_an_undeclared_method_is_405_with_the_allowed_ones",)),
    Mutation("an unsigned webhook's number is looked up", "webhook/twilio_auth.py",
             "if not request.headers.get(SIGNATURE_HEADER):", "if False:",
             ("tests/test_api_contract.py::test_an_unsigned_webhook_is_refused_before_its_number_is_looked_up",)),
    Mutation("the spec lets Twilio's required fields be empty", "webhook/openapi.py",
             "_FILLED = validate.Length(min=1)", "_FILLED = validate.Length(min=0)",
             ("tests/test_api_contract.py::test_schemathesis_finds_no_contradiction_with_every_check_on",)),
    # Issue 22, secrets: extra fields named like secrets encrypted and never shown, null removes, keys in URL paths.
    Mutation("secret-named user fields shown", "shared/bots.py",
             "REDACTED if is_secret_name(name) else value", "value",
             ("tests/test_input_validation.py::TestExtraFields::test_secret_looking_extra_fields_are_stored_encrypted_and_shown_redacted",)),
    Mutation("secret-named user fields stored in plain text", "shared/bots.py",
             "self._sealed(v) if is_secret_name(k) else v", "v",
             ("tests/test_input_validation.py::TestExtraFields::test_secret_looking_extra_fields_are_stored_encrypted_and_shown_redacted",)),
    Mutation("a user field set to null is kept", "shared/schemas.py",
             "or key in _NULLABLE or key not in _DATA_KEYS.values()", "or key in _NULLABLE",
             ("tests/test_input_validation.py::TestExtraFields::test_a_secret_field_set_to_null_is_removed",)),
    Mutation("field names judged only by the old pattern", "shared/logging.py",
             '_SECRET_LETTERS.search(re.sub(r"[^a-z]", "", name.lower())) is not None', "False",
             ("tests/test_logging.py::test_fields_whose_letters_spell_a_secret_are_redacted",)),
    Mutation("a key in a URL's path is shown", "shared/bots.py",
             "redact_path(parts.path)", "parts.path",
             ("tests/test_input_validation.py::TestExtraFields::test_a_key_in_a_handoff_or_engine_urls_path_is_not_shown",)),
    Mutation("a key in a handoff-url's path is logged on each forward", "shared/bots.py",
             "redact_path(parts.path)", "parts.path",
             ("tests/test_handoff.py::TestSignatures::test_a_key_in_the_handoff_urls_path_never_reaches_the_log",)),
    Mutation("a key in a URL's path is logged", "shared/logging.py",
             "            text = redact_path(text)\n", "            pass\n",
             ("tests/test_logging.py::test_a_key_in_a_url_path_is_redacted_inside_text",)),
    Mutation("a flag takes 0 as false", "shared/schemas.py",
             "if isinstance(value, (int, float)) and not isinstance(value, bool):", "if False:",
             ("tests/test_api_contract.py::test_a_flag_is_a_boolean_not_a_number",)),
    # Issue 22, handoff signatures: the time signed with the body, both secrets during a rotation, 401/403 mean later.
    Mutation("a forward's signature leaves out its time", "worker/handoff.py",
             'signed = f"{now}.".encode() + body', "signed = body",
             ("tests/test_handoff.py::TestSignatures::test_a_forward_signs_its_time_so_a_captured_one_is_refused_later",)),
    Mutation("a rotated secret stops signing at once", "shared/bots.py",
             "if self.handoff_previous_secret and now < self.handoff_previous_until:", "if False:",
             ("tests/test_handoff.py::TestSignatures::test_after_a_rotation_forwards_carry_both_signatures_for_the_grace_period",)),
    Mutation("a receiver's 401 drops the forward", "worker/handoff.py",
             "LATER_STATUSES = frozenset({401, 403, 408, 425, 429})", "LATER_STATUSES = frozenset({429})",
             ("tests/test_handoff.py::TestSignatures::test_a_receiver_refusing_the_signature_or_asking_for_time_gets_the_forward_later",)),
    # Issue 22, the CLI: the Twilio token from the environment, a content-derived Idempotency-Key, plain-http warning.
    Mutation("the CLI ignores $TWILIO_AUTH_TOKEN", "cli/bots.py",
             "    if os.environ.get(AUTH_TOKEN_VARIABLE):\n", "    if False:\n",
             ("tests/test_cli.py::TestBots::test_create_reads_the_auth_token_from_the_environment",)),
    Mutation("send makes a new Idempotency-Key every run", "cli/send.py",
             'return "cli-" + hashlib.sha256(content).hexdigest()[:40]', 'return "cli-" + __import__("uuid").uuid4().hex',
             ("tests/test_operator_send.py::test_running_the_same_send_again_texts_once",)),
    Mutation("no warning for a bearer token over plain http", "cli/bots.py",
             'if parts.scheme == "http" and not is_loopback(parts.hostname):', "if False:",
             ("tests/test_cli.py::TestBots::test_a_bearer_token_over_plain_http_to_another_host_is_warned_about",)),
    # Issue 22, mammut-sms dev: loopback unless --host, and the project's own Procfile.
    Mutation("dev listens on every interface", "cli/dev.py",
             'LOOPBACK = "127.0.0.1"', 'LOOPBACK = "::"',
             ("tests/test_dev.py::test_dev_listens_on_loopback_and_runs_the_projects_procfile_not_the_current_directorys",)),
    Mutation("dev runs the current directory's Procfile", "cli/dev.py",
             '    return PROJECT_ROOT / "Procfile"',
             '    return Path.cwd() / "Procfile" if (Path.cwd() / "Procfile").is_file() else PROJECT_ROOT / "Procfile"',
             ("tests/test_dev.py::test_dev_listens_on_loopback_and_runs_the_projects_procfile_not_the_current_directorys",)),
    # Issue 26, a database outage loses no text (with issue 28's single-flight loads and issue 22's unknown numbers)
    Mutation("a registry change is not written into the registry's copy", "shared/bots.py",
             "            self.copy.put(bot_id, stored)\n", "            pass\n",
             ("tests/test_bot_store.py::TestRegistryCopy::test_each_change_is_in_the_copy_and_a_flushed_copy_is_rebuilt_from_the_database",)),
    Mutation("every bot lookup rebuilds the registry's copy from the database", "shared/bots.py",
             "        if row is None and not loaded:\n", "        if True:\n",
             ("tests/test_inbound.py::TestDatabaseOutage::test_a_number_this_process_never_looked_up_is_answered_from_the_registry_copy",)),
    Mutation("an unknown number costs a database rebuild each time", "shared/bots.py",
             "        if row is None and not loaded:\n", "        if row is None:\n",
             ("tests/test_bot_store.py::TestCache::test_unknown_numbers_are_remembered_too",)),
    Mutation("every caller loads an expired bot itself", "shared/bots.py",
             "            return self._loads.run(route, lambda: self._load(route))\n", "            return self._load(route)\n",
             ("tests/test_bot_store.py::TestSingleFlight::test_an_expired_bot_is_loaded_once_for_hundreds_of_callers",
              "tests/test_bot_store.py::TestSingleFlight::test_a_thousand_greenlets_asking_for_an_expired_bot_cost_one_query_and_no_error")),
    Mutation("every caller rebuilds a flushed registry copy itself", "shared/bots.py",
             "            self._rebuilds.run(keys.REGISTRY, lambda: self.copy.rebuild(self._engine))\n",
             "            self.copy.rebuild(self._engine)\n",
             ("tests/test_bot_store.py::TestSingleFlight::test_a_flushed_copy_is_rebuilt_once_for_hundreds_of_callers",)),
    Mutation("every caller rebuilds a flushed opt-out copy itself", "shared/optout.py",
             "    _LOADS.run(bot_number, lambda: _load_copy(engine, redis, bot_number))\n",
             "    _load_copy(engine, redis, bot_number)\n",
             ("tests/test_bot_store.py::test_a_missing_copy_is_rebuilt_once_for_hundreds_of_callers[opt-out]",)),
    Mutation("every caller rebuilds a flushed handoff copy itself", "shared/handoff.py",
             "    _LOADS.run(bot_id, lambda: _load_copy(engine, redis, bot_id))\n", "    _load_copy(engine, redis, bot_id)\n",
             ("tests/test_bot_store.py::test_a_missing_copy_is_rebuilt_once_for_hundreds_of_callers[handoff]",)),
    Mutation("a bot's entry is not refreshed ahead of its expiry", "shared/bots.py",
             "            if hit[0] - now < self._ttl * REFRESH_AHEAD_FRACTION:\n", "            if False:\n",
             ("tests/test_bot_store.py::TestSingleFlight::test_a_bot_asked_for_near_its_expiry_is_refreshed_ahead",)),
    Mutation("a bot that cannot be loaded again is not served as last known", "shared/bots.py",
             "            return self._stale(route, hit, error)\n", "            raise\n",
             ("tests/test_inbound.py::TestDatabaseOutage::test_an_expired_entry_is_served_when_it_cannot_be_loaded_again",)),
    Mutation("unknown numbers take the bots' room in the cache", "shared/bots.py",
             "                _bounded(self._unknown, route, self._unknown_limit)[route] = now + self._negative_ttl\n",
             "                _bounded(self._entries, route, self._limit)[route] = (now + self._negative_ttl, None)\n",
             ("tests/test_bot_store.py::TestCache::test_unknown_numbers_never_evict_a_bot",)),
    Mutation("a database found down a moment ago is waited on again by every request", "shared/db.py",
             "        if not state.may_try():\n", "        if False:\n",
             ("tests/test_database_outage.py::TestRefusedAtOnce::test_the_registry_api_answers_503_with_a_reason_and_tries_the_database_once_meanwhile",)),
    Mutation("an unreachable database is a 500 without a reason", "webhook/errors.py",
             "    @app.errorhandler(DatabaseUnavailable)\n    @app.errorhandler(OperationalError)\n", "",
             ("tests/test_database_outage.py::TestRefusedAtOnce::test_the_registry_api_answers_503_with_a_reason_and_tries_the_database_once_meanwhile",)),
    Mutation("a process does not start while the database is unreachable", "shared/db.py",
             "        log.warning(\"database.schema_unchecked\", reason=\"the database is unreachable\", error=error.__class__.__name__)\n        return\n",
             "        raise\n",
             ("tests/test_database_outage.py::TestRefusedAtOnce::test_a_process_starts_while_the_database_is_unreachable",)),
    Mutation("a copied opt-out falls with the database", "shared/optout.py",
             "        log.warning(\"optout.unconfirmed\", reason=\"the database is unreachable\", error=error.__class__.__name__)\n        return True\n",
             "        raise\n",
             ("tests/test_database_outage.py::TestCopiesStand::test_an_opt_out_taken_from_the_database_still_suppresses_a_send",)),
    Mutation("a copied handoff falls with the database", "shared/handoff.py",
             "        return hinted if hinted.active() else None\n", "        raise\n",
             ("tests/test_database_outage.py::TestCopiesStand::test_a_handed_off_conversation_stays_with_the_human_until_its_copied_timeout",)),
    Mutation("bots copied from an earlier release's Redis are missing from a registry copy built before", "cli/from_redis.py",
             "        RegistryCopy(redis).forget()  # rebuilt from the database, copied bots included, when next read\n", "",
             ("tests/test_migrate_from_redis.py::test_bots_copied_after_the_registry_copy_was_built_are_routed",)),
    # Issue 28: dedupe marks in hashes per 6 hours, a third of the memory, the same 48 hours (now the
    # conversations' marks, below, that these were retargeted to).
    Mutation("dedupe recognises marks up to 46 hours old", "shared/conversations.py",
             "hour - math.floor(wrote / 3600) <= __HOURS__", "hour - math.floor(wrote / 3600) <= 46",
             ("tests/test_inbound.py::TestDuplicates::test_a_retry_is_recognised_within_48_hours_and_not_after_49",)),
    Mutation("dedupe recognises marks up to 50 hours old", "shared/conversations.py",
             "hour - math.floor(wrote / 3600) <= __HOURS__", "hour - math.floor(wrote / 3600) <= 50",
             ("tests/test_inbound.py::TestDuplicates::test_a_retry_is_recognised_within_48_hours_and_not_after_49",)),
    Mutation("dedupe marks of the earlier shape ignored", "shared/conversations.py",
             "if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 or marked()", "if marked()",
             ("tests/test_inbound.py::TestDuplicates::test_a_mark_of_the_earlier_shape_is_still_a_duplicate",)),
    Mutation("a bucket of marks expires before its last hour's are 48 h old", "shared/conversations.py",
             "(bucket(hour) + __BUCKET__ + __HOURS__) * 3600)", "(hour + 1 + __HOURS__) * 3600)",
             ("tests/test_inbound.py::TestDuplicates::test_a_message_is_remembered_for_48_hours",)),
    Mutation("the idempotency token not marked", "shared/conversations.py",
             "local digests = ARGV[12] .. (ARGV[13] ~= ARGV[12] and ARGV[13] or '')", "local digests = ARGV[12]",
             ("tests/test_inbound.py::TestDuplicates::test_a_retry_is_recognised_within_48_hours_and_not_after_49",)),
    Mutation("dedupe looks in one bucket of marks", "shared/conversations.py",
             "bucket(hour - __HOURS__), -__BUCKET__ do", "bucket(hour), -__BUCKET__ do",
             ("tests/test_inbound.py::TestDuplicates::test_a_retry_is_recognised_within_48_hours_and_not_after_49",)),
    # Issue 28: at most TWILIO_MAX_CONCURRENT_REQUESTS requests in flight per Twilio account and process.
    Mutation("ten times the requests in flight per Twilio account", "worker/twilio_client.py",
             "threading.BoundedSemaphore(limit))", "threading.BoundedSemaphore(limit * 10))",
             ("tests/test_twilio_concurrency.py::test_a_burst_of_2000_replies_never_holds_more_requests_open_than_the_setting",)),
    Mutation("a send that found no slot is an unknown outcome", "worker/twilio_client.py",
             "raise NoSlot(method, url, limit)", "raise TimeoutError('no slot')",
             ("tests/test_twilio_concurrency.py::test_a_send_that_finds_no_slot_in_time_is_later_and_never_reaches_twilio",)),
    Mutation("the wait for a slot counts against the read timeout", "worker/twilio_client.py",
             "slots.acquire(timeout=SLOT_WAIT_SECONDS)", "slots.acquire(timeout=READ_TIMEOUT)",
             ("tests/test_twilio_concurrency.py::test_waiting_for_a_slot_does_not_count_against_the_requests_timeout",)),
    # Issue 24: keywords per bot, quiet hours, scheduled sends.
    Mutation("keywords compared with their accents", "shared/keywords.py",
             "if not unicodedata.combining(char)", "",
             ("tests/test_keywords.py::test_the_spanish_set_matches_whole_texts_whatever_their_case_accents_and_punctuation",)),
    Mutation("keywords compared with the punctuation around them", "shared/keywords.py",
             'unicodedata.category(char)[0] in "PZC"', 'False',
             ("tests/test_keywords.py::test_the_spanish_set_matches_whole_texts_whatever_their_case_accents_and_punctuation",)),
    Mutation("the webhook ignores the bot's keywords", "webhook/inbound.py",
             "classify(body, opt_out_type, bot.keywords.event_of)", "classify(body, opt_out_type)",
             ("tests/test_keywords.py::test_spanish_keywords_opt_out_confirm_once_and_answer_help_without_the_engine",)),
    Mutation("a keyword in two lists is accepted", "shared/bots.py",
             "                if other != name:\n", "                if False:\n",
             ("tests/test_keywords.py::test_a_keyword_in_two_lists_is_a_409_naming_the_field",
              "tests/test_keywords.py::test_a_keyword_another_list_has_is_refused_against_the_bots_stored_lists")),
    Mutation("the opt-out confirmation is suppressed like any reply", "worker/outbound.py",
             'if opted_out and not reply.get("confirms_opt_out"):', "if opted_out:",
             ("tests/test_keywords.py::test_spanish_keywords_opt_out_confirm_once_and_answer_help_without_the_engine",)),
    Mutation("a help keyword goes to the engine", "worker/conversation.py",
             'if message["event"] == optout.HELP and bot.keywords.help_message:', "if False:",
             ("tests/test_keywords.py::test_spanish_keywords_opt_out_confirm_once_and_answer_help_without_the_engine",)),
    Mutation("the opt-out confirmation is not marked as one", "worker/conversation.py",
             '        replies[0]["confirms_opt_out"] = True\n', "        pass\n",
             ("tests/test_keywords.py::test_spanish_keywords_opt_out_confirm_once_and_answer_help_without_the_engine",)),
    Mutation("no opt-in confirmation", "worker/conversation.py",
             "optout.OPT_IN: bot.keywords.opt_in_message}", "optout.OPT_IN: None}",
             ("tests/test_keywords.py::test_spanish_keywords_opt_out_confirm_once_and_answer_help_without_the_engine",)),
    Mutation("a scheduled push ignores the push window as it stands then", "worker/scheduler.py",
             "    if item.origin == messagelog.CALLBACK and not bot.limits.allow_cold_push and not",
             "    if False and not bot.limits.allow_cold_push and not",
             ("tests/test_schedule.py::test_a_scheduled_push_to_a_person_who_went_quiet_meanwhile_is_dropped_at_its_time",)),
    Mutation("scheduled messages done with are kept for good", "shared/retention.py",
             "    (scheduled, scheduled.c.done_at, (scheduled.c.seq,)),\n", "",
             ("tests/test_retention.py::test_rows_older_than_the_retention_period_are_deleted_and_newer_ones_kept",)),
    Mutation("an erasure leaves the person's scheduled messages", "shared/erasure.py",
             "delete(scheduled).where(scheduled.c.bot_id == bot_id, scheduled.c.person == person)",
             "delete(scheduled).where(scheduled.c.bot_id == -1)",
             ("tests/test_erasure.py::test_a_message_scheduled_for_the_person_is_erased_and_never_sent",)),
    Mutation("quiet hours never wrap past midnight", "shared/schedule.py",
             "if start < end else (minute >= start or minute < end)", "",
             ("tests/test_schedule.py::test_quiet_hours_across_midnight_in_the_recipients_zone",)),
    Mutation("quiet hours read in UTC, not the recipient's zone", "shared/schedule.py",
             "return zone(bot.hours.time_zone) or number_zone(person) or number_zone(bot.number) or UTC",
             "return zone(bot.hours.time_zone) or UTC",
             ("tests/test_schedule.py::test_the_same_moment_is_night_for_one_recipient_and_day_for_another",)),
    Mutation("pushes and operator sends are not held at night", "shared/schedule.py",
             "    until = quiet_until(bot, person, now)\n    return (until, QUIET)",
             "    until = None\n    return (until, QUIET)",
             ("tests/test_schedule.py::test_at_night_pushes_and_operator_sends_wait_in_order_while_replies_go_and_all_survive_a_flush",)),
    Mutation("a scheduled send due at night goes anyway", "worker/scheduler.py",
             "    until = schedule.quiet_until(bot, item.person, now)\n", "    until = None\n",
             ("tests/test_schedule.py::test_a_scheduled_send_due_inside_quiet_hours_waits_for_their_end",)),
    Mutation("a message no longer waiting is taken again (sent, or cancelled twice)", "shared/schedule.py",
             "    condition = (scheduled.c.id == scheduled_id) & (scheduled.c.state == WAITING)\n",
             "    condition = scheduled.c.id == scheduled_id\n",
             ("tests/test_schedule.py::test_scheduled_sends_survive_a_killed_worker_and_a_flushed_redis_and_go_once_cancelled_and_opted_out_never",)),
    Mutation("a scheduled send ignores an opt-out made meanwhile", "worker/scheduler.py",
             "    if state is not None and state.opted_out:", "    if False:",
             ("tests/test_schedule.py::test_scheduled_sends_survive_a_killed_worker_and_a_flushed_redis_and_go_once_cancelled_and_opted_out_never",)),
    Mutation("a scheduled message is queued again after a pass died before its commit", "worker/scheduler.py",
             "if not redis.call('SET', KEYS[7], '1', 'NX', 'EX', {MARK_SECONDS}) then return false end",
             "redis.call('SET', KEYS[7], '1', 'EX', {MARK_SECONDS})",
             ("tests/test_schedule.py::test_a_pass_that_dies_before_its_database_commit_leaves_it_waiting_and_the_next_queues_nothing_twice",)),
    Mutation("no worker runs the scheduler", "worker/middleware.py",
             "        self._scheduler = Scheduler(get_redis(), get_engine(), get_bots().by_id).start()\n", "",
             ("tests/test_schedule.py::test_scheduled_sends_survive_a_killed_worker_and_a_flushed_redis_and_go_once_cancelled_and_opted_out_never",)),
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
             "and (value := request.form[name].strip()) != _as_shown(shown.get(name))}",
             "and (value := request.form[name].strip()) is not None}",
             ("tests/test_console.py::TestPages::test_saving_settings_leaves_a_masked_engine_url_as_stored",)),
    # Issue 22, the leaking promises through the Procfile's processes (tests/test_leaks_through_processes.py).
    Mutation("through processes: opt-outs stay under a bot's old number on a service change", "shared/bots.py",
             "                gone = optout.carry_over(connection, before, _opt_out_keys(merged))",
             "                gone = []",
             ("tests/test_leaks_through_processes.py::test_a_stop_holds_through_the_processes_when_the_bot_moves_onto_a_service_and_off_it",)),
    Mutation("through processes: an answer to a message erased meanwhile is queued", "shared/conversations.py",
             "  if done ~= '' and redis.call('LREM', processing, 1, done) == 0 then return -2 end",
             "  if done ~= '' then redis.call('LREM', processing, 1, done) end",
             ("tests/test_leaks_through_processes.py::test_an_erase_during_a_slow_engine_call_and_a_forward_held_for_later_leaves_nothing_sent_or_kept",)),
    Mutation("through processes: an engine's handoff is recorded after the erase", "worker/conversation.py",
             "    if asked is not None and not _erased_since_received(redis, conversation, message):",
             "    if asked is not None:",
             ("tests/test_leaks_through_processes.py::test_an_erase_during_a_slow_engine_call_and_a_forward_held_for_later_leaves_nothing_sent_or_kept",)),
    Mutation("through processes: a forward held for later ignores the erase", "worker/handoff.py",
             "    if _erased_after(bot_id, payload):", "    if False:",
             ("tests/test_leaks_through_processes.py::test_an_erase_during_a_slow_engine_call_and_a_forward_held_for_later_leaves_nothing_sent_or_kept",)),
    Mutation("through processes: API texts keep their control characters", "shared/text.py",
             "        return plain(given)\n",
             "        return given\n",
             ("tests/test_leaks_through_processes.py::test_a_nul_in_every_field_is_no_5xx_and_every_exchange_reaches_the_database",)),
    Mutation("through processes: a handoff note keeps its control characters", "webhook/handoffs.py",
             "    return (plain(note) or None) if note else None, None\n", "    return note or None, None\n",
             ("tests/test_leaks_through_processes.py::test_a_nul_in_every_field_is_no_5xx_and_every_exchange_reaches_the_database",)),
    Mutation("through processes: an engine answer keeps its control characters", "worker/engine.py",
             "        text = plain(text) if isinstance(text, str) else None",
             "        text = text if isinstance(text, str) else None",
             ("tests/test_leaks_through_processes.py::test_a_nul_in_every_field_is_no_5xx_and_every_exchange_reaches_the_database",)),
    Mutation("through processes: an engine's handoff note keeps its control characters", "worker/engine.py",
             'note = plain(custom["note"]) if', 'note = custom["note"] if',
             ("tests/test_leaks_through_processes.py::test_a_nul_in_every_field_is_no_5xx_and_every_exchange_reaches_the_database",)),
    Mutation("through processes: the loop guard ignores pool numbers", "worker/conversation.py",
             ' or POOL_NUMBERS.owner(redis, message["sender"]) is not None:', ":",
             ("tests/test_leaks_through_processes.py::test_two_service_bots_texting_each_other_through_unlisted_pool_numbers_stop_at_once",)),
    Mutation("through processes: a service's sends teach nothing of its pool numbers", "worker/outbound.py",
             "        POOL_NUMBERS.learn(redis, accepted.from_ or sender.from_, bot.id)", "        pass",
             ("tests/test_leaks_through_processes.py::test_two_service_bots_texting_each_other_through_unlisted_pool_numbers_stop_at_once",)),
    # issue 23's gaps closed (h23fix): Spanish error words, per-bot latency, emptied settings, paging
    Mutation("a Twilio error's explanation stays English on Spanish pages", "webhook/console/pages.py",
             "return _(HINTS[code]) if code in HINTS", "return HINTS[code] if code in HINTS",
             ("tests/test_console.py::TestTwilioErrorsInSpanish",)),
    Mutation("an engine's answer time is not recorded per bot", "worker/engine.py",
             "        TALLY.engine_answered(bot.id, time.monotonic() - started)\n", "",
             ("tests/test_console.py::TestPages::test_the_overview_shows_each_bots_engine_latency_over_the_last_day",)),
    Mutation("the overview's engine latency counts answers older than a day", "shared/metrics.py",
             "for sample in raw) if float(at) >= since)", "for sample in raw))",
             ("tests/test_console.py::TestPages::test_the_overview_shows_each_bots_engine_latency_over_the_last_day",)),
    Mutation("a bot's engine answer times grow without bound", "shared/metrics.py",
             "            pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)\n", "",
             ("tests/test_metrics.py::TestTally::test_a_bots_engine_answer_times_are_kept_to_the_latest_thousand",)),
    Mutation("an emptied console setting is not unset", "webhook/console/pages.py",
             "changes = {name: value or None for name in EDITABLE", "changes = {name: value for name in EDITABLE",
             ("tests/test_console.py::TestPages::test_an_emptied_setting_is_unset_as_the_apis_null",)),
    Mutation("the conversation page cannot show older messages", "webhook/console/pages.py",
             "older=page.next, before=before,", "older=None, before=before,",
             ("tests/test_console.py::TestConversation::test_older_messages_are_paged_with_the_logs_cursor",)),
    Mutation("the web process reads dead letters through the worker package", "webhook/deadletters.py",
             "from shared import dlq\n", "from worker import dlq\n",
             ("tests/test_architecture.py",)),
    Mutation("browser test runs rewrite the tracked screenshots", "tests/test_console_browser.py",
             "return DOCS if env.get(\"UPDATE_SCREENSHOTS\") == \"1\" else tmp_path", "return DOCS",
             ("tests/test_console_browser.py::test_screenshots_go_to_docs_only_when_asked",)),
    # Independent audit: promises of the last merges broken one line at a time, by someone who did not write their tests.
    Mutation("audit: a status callback naming another bot's SID is recorded for the caller", "webhook/status.py",
             "        owner = messagelog.sender_of(connection, message_sid)\n", "        owner = bot.id\n",
             ("tests/test_input_validation.py::TestStatusCallbackOwnership::test_a_callback_for_another_bots_sid_is_ignored",)),
    Mutation("audit: a 21610 status callback opts nobody out", "webhook/status.py",
             "is Action.OPTED_OUT and (sender or bot.messaging_service_sid):",
             "is Action.OPTED_OUT and False:",
             ("tests/test_status_callbacks.py::TestRecording::test_21610_opts_the_recipient_out_for_that_bot_number",)),
    Mutation("audit: dedupe marks shared by every Twilio account", "shared/conversations.py",
             "    account = account_sid or f\"bot-{message['bot_id']}\"\n", "    account = \"twilio\"\n",
             ("tests/test_inbound.py::TestDuplicates",)),
    Mutation("audit: a push trusts a handoff copy that was never loaded", "webhook/replies.py",
             "    if not unmarked and loaded and not any(listed):", "    if not unmarked and not any(listed):",
             ("tests/test_tenant_bounds.py::test_a_push_to_a_person_a_human_has_is_refused_though_redis_lost_the_handoff_copy",)),
    Mutation("audit: a push window shorter than the mark's 48 hours is not applied", "webhook/replies.py",
             "if mark is None or float(mark) < since]", "if mark is None]",
             ("tests/test_tenant_bounds.py::test_a_push_window_of_one_day_refuses_a_person_whose_last_text_is_30_hours_old",)),
    Mutation("audit: a push to a handed-off person is queued", "webhook/replies.py",
             "    if paused:\n", "    if False:\n",
             ("tests/test_handoff.py::TestWhoMayWriteWhilePaused",)),
    Mutation("audit: a callback takes ten times the items", "webhook/replies.py",
             "MAX_REPLIES_PER_REQUEST = 100\n", "MAX_REPLIES_PER_REQUEST = 1000\n",
             ("tests/test_engine_callback.py::TestTrust::test_a_list_of_more_than_a_hundred_replies_is_refused",)),
    Mutation("audit: a scheduled push to a handed-off person goes", "worker/scheduler.py",
             "    if item.origin == messagelog.CALLBACK and handoff.active_of(", "    if False and handoff.active_of(",
             ("tests/test_schedule.py::test_at_its_time_an_engines_push_to_a_handed_off_person_is_dropped_and_an_operators_send_goes",)),
    Mutation("audit: a scheduled operator send to a handed-off person is dropped", "worker/scheduler.py",
             "    if item.origin == messagelog.CALLBACK and handoff.active_of(", "    if handoff.active_of(",
             ("tests/test_schedule.py::test_at_its_time_an_engines_push_to_a_handed_off_person_is_dropped_and_an_operators_send_goes",)),
    Mutation("audit: a scheduled send reads the opt-out of the bot's main number", "worker/scheduler.py",
             "optout.read(connection, bot.opt_out_key(sender), item.person)", "optout.read(connection, bot.opt_out_key(), item.person)",
             ("tests/test_schedule.py::test_a_scheduled_send_obeys_an_opt_out_of_the_pool_number_the_person_texted",)),
    Mutation("audit: quiet hours last through their last minute (a push held a day)", "shared/schedule.py",
             "(minute >= start or minute < end)", "(minute >= start or minute <= end)",
             ("tests/test_schedule.py::test_quiet_hours_across_midnight_in_the_recipients_zone",)),
    Mutation("audit: the recipient's number outranks the bot's quiet-hours-time-zone", "shared/schedule.py",
             "return zone(bot.hours.time_zone) or number_zone(person) or", "return number_zone(person) or zone(bot.hours.time_zone) or",
             ("tests/test_schedule.py::test_a_number_spanning_several_zones_takes_the_bots_and_a_set_zone_wins",)),
    Mutation("audit: a number of several zones takes the first", "shared/schedule.py",
             "if len(names) == 1 and names[0]", "if len(names) >= 1 and names[0]",
             ("tests/test_schedule.py::test_a_number_spanning_several_zones_takes_the_bots_and_a_set_zone_wins",)),
    Mutation("audit: messages due at the same moment go newest first", "shared/schedule.py",
             "        scheduled.c.send_at, scheduled.c.seq).limit(limit)", "        scheduled.c.send_at, scheduled.c.seq.desc()).limit(limit)",
             ("tests/test_schedule.py::test_at_night_pushes_and_operator_sends_wait_in_order_while_replies_go_and_all_survive_a_flush",)),
    Mutation("audit: an operator send checks the opt-out of the bot's main number", "webhook/operator.py",
             "    scope = bot.opt_out_key(sender)\n", "    scope = bot.opt_out_key()\n",
             ("tests/test_operator_send.py::test_a_person_who_opted_out_of_the_pool_number_they_texted_is_refused",)),
    Mutation("audit: a send_at a day past is taken as now", "shared/schemas.py",
             "    PAST_TOLERANCE_SECONDS = 300\n", "    PAST_TOLERANCE_SECONDS = 86400\n",
             ("tests/test_schedule.py::test_a_send_at_a_few_minutes_past_is_now_and_an_hour_past_is_a_400",)),
    Mutation("audit: a handoff-timeout of 0 ends the pause at once", "shared/handoff.py",
             "    until = now + timeout if timeout else None\n", "    until = now + timeout if timeout else now\n",
             ("tests/test_handoff.py::TestTimeout::test_a_timeout_of_zero_never_resumes",)),
    Mutation("audit: sign-ins from one address are limited at 200 failures", "shared/sessions.py",
             "MAX_FAILURES_PER_ADDRESS = 20\n", "MAX_FAILURES_PER_ADDRESS = 200\n",
             ("tests/test_console.py::TestSignIn::test_failures_from_one_address_across_accounts_are_limited",)),
    Mutation("audit: a console POST from another site's Origin is taken", "webhook/console/auth.py",
             "        return False  # a browser says which site sent the form: only ours may", "        pass",
             ("tests/test_console.py::TestCsrf::test_a_post_without_the_token_or_from_another_origin_is_refused",)),
    Mutation("audit: CONSOLE_STREAMS defaults to 4", "shared/settings.py",
             "    console_streams: int = 1\n", "    console_streams: int = 4\n",
             ("tests/test_settings.py::test_defaults_match_the_documentation",)),
    Mutation("audit: TWILIO_MAX_CONCURRENT_REQUESTS may be 0 (no send ever gets a slot)", "shared/settings.py",
             "cls.twilio_max_concurrent_requests, 1, 10_000)", "cls.twilio_max_concurrent_requests, 0, 10_000)",
             ("tests/test_settings.py::test_a_malformed_variable_is_named",)),
    Mutation("audit: WEB_MAX_BUFFERED_BYTES defaults to 160 MiB", "webhook/slowclient.py",
             "DEFAULT_MAX_BUFFERED_BYTES = 16 * 1024 * 1024\n", "DEFAULT_MAX_BUFFERED_BYTES = 160 * 1024 * 1024\n",
             ("tests/test_settings.py::test_the_web_process_holds_16_mib_of_unfinished_requests_by_default",)),
    Mutation("audit: a console session lives a month", "shared/sessions.py",
             "SESSION_SECONDS = 12 * 3600  # a working day", "SESSION_SECONDS = 30 * 86400  # a working day",
             ("tests/test_console.py::TestSignIn::test_a_session_ends_after_12_hours_and_a_lock_after_15_minutes",)),
    Mutation("audit: a locked sign-in is free again after 15 seconds", "shared/sessions.py",
             "SIGN_IN_WINDOW_SECONDS = 15 * 60\n", "SIGN_IN_WINDOW_SECONDS = 15\n",
             ("tests/test_console.py::TestSignIn::test_a_session_ends_after_12_hours_and_a_lock_after_15_minutes",)),
    Mutation("audit: a keyword with a zero-width character around it is an ordinary message", "shared/keywords.py",
             'unicodedata.category(char)[0] in "PZC"', 'unicodedata.category(char)[0] in "PZ"',
             ("tests/test_keywords.py::test_invisible_format_characters_around_a_keyword_do_not_hide_it",)),
    Mutation("a keyword twice in one list is taken", "shared/bots.py",
             "                if compared in listed:\n", "                if False:\n",
             ("tests/test_keywords.py::test_a_keyword_in_two_lists_is_a_409_naming_the_field",)),
    Mutation("a new bot's keyword conflict is a 400 (schemathesis: schema-valid data refused)", "webhook/registry.py",
             'return failed(f"conflicting user fields: {conflict}", 409,', 'return failed(f"conflicting user fields: {conflict}", 400,',
             ("tests/test_keywords.py::test_a_new_bot_whose_keyword_is_in_two_lists_is_a_409_too",)),
    Mutation("console: a change during a refresh is dropped", "webhook/console/static/console.js",
             "if (busy) { again = true; return; }", "if (busy) { return; }",
             ("tests/test_console_browser.py::test_a_change_while_the_page_is_refreshing_is_not_lost",)),
    # What schemathesis found on 2026-12-07: the schema and the server disagreeing.
    Mutation("contract: a text padded with control characters passes its length bound", "shared/text.py",
             "                rule(given)  # raises its own message\n", "                pass\n",
             ("tests/test_openapi.py::test_a_length_bound_holds_for_the_text_as_sent",)),
    Mutation("contract: a handoff note's bound counts the cleaned note", "webhook/handoffs.py",
             "    if note and len(note) > handoff.MAX_NOTE:", "    if note and len(plain(note)) > handoff.MAX_NOTE:",
             ("tests/test_openapi.py::test_a_length_bound_holds_for_the_text_as_sent",)),
    Mutation("contract: a callback text of control characters is schema-valid", "webhook/openapi.py",
             '{"text": {"type": "string", "pattern": _KEPT}}', '{"text": {"type": "string", "minLength": 1}}',
             ("tests/test_openapi.py::test_a_callback_text_of_only_control_characters_is_nothing_to_send_by_the_schema_too",)),
    Mutation("contract: an operator's send_at may not be null by the schema", "webhook/openapi.py",
             '"send_at": {"anyOf": [{"$ref": "#/components/schemas/SendAt"}, {"type": "null"}]}',
             '"send_at": {"$ref": "#/components/schemas/SendAt"}',
             ("tests/test_openapi.py::test_send_at_null_is_now_in_the_schema_as_on_the_server",)),
    Mutation("contract: a JSON string is taken for a keyword list", "shared/schemas.py",
             "        items = value\n", "        items = value.split(\",\") if isinstance(value, str) else value\n",
             ("tests/test_openapi.py::test_a_list_field_given_a_string_in_json_is_refused",)),
    Mutation("contract: a name of control characters is schema-valid", "webhook/openapi.py",
             "        return {\"pattern\": _KEPT}\n", "        return {}\n",
             ("tests/test_openapi.py::test_a_text_of_only_control_characters_is_refused_by_the_schema_and_the_server",)),
    Mutation("contract: an operator's media-url is not held to the schema's pattern", "webhook/operator.py",
             "allow_none=True, validate=validate.Regexp(\n        PUBLIC_HTTPS_URL,",
             "allow_none=True, validate=lambda _: True or validate.Regexp(\n        PUBLIC_HTTPS_URL,",
             ("tests/test_openapi.py::test_an_operators_media_url_is_held_to_the_schemas_pattern",)),
    Mutation("contract: shorten-urls null is schema-invalid without a service", "webhook/openapi.py",
             '{SHORTEN_URLS: {"enum": [False, None]}}', '{SHORTEN_URLS: {"enum": [False]}}',
             ("tests/test_openapi.py::test_shorten_urls_null_without_a_service_is_valid_by_the_schema_as_on_the_server",)),
    Mutation("slow clients: a second Content-Length is trusted", "webhook/slowclient.py",
             "            if length is not None or not value.isdigit():\n",
             "            if not value.isdigit():\n",
             ("tests/test_slow_clients.py::test_the_main_loop_reads_where_a_body_ends_from_three_headers",)),
    Mutation("slow clients: 100-continue is never sent", "webhook/slowclient.py",
             "            continue_expected = value.lower() == b\"100-continue\"\n",
             "            continue_expected = False\n",
             ("tests/test_slow_clients.py::test_a_client_that_expects_100_continue_is_told_to_go_on_then_answered",)),
    Mutation("operator: a send is checked against a number the bot no longer has", "webhook/operator.py",
             "    sender = texted if texted and (texted in bot.numbers or bot.messaging_service_sid) else bot.number",
             "    sender = texted or bot.number",
             ("tests/test_operator_send.py::test_a_number_the_bot_no_longer_has_is_not_what_the_send_is_checked_against",)),
    Mutation("pool numbers: a late callback gives a removed number back", "shared/poolnumbers.py",
             "if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then return 0 end\n", "",
             ("tests/test_messaging_services.py::TestRegistry::test_a_late_status_callback_does_not_give_a_removed_number_back",)),
    # Issue 28, Redis memory: a field per conversation per 6 hours holds when the person last wrote and
    # the digests of their texts' MessageSids and tokens; the previous releases' marks still count.
    Mutation("conversation marks: a second text replaces the first's digests", "shared/conversations.py",
             "  digests = string.sub(current, 5) .. digests\n", "",
             ("tests/test_inbound.py::TestDuplicates::test_a_second_text_in_the_same_bucket_is_not_a_duplicate_of_the_first",)),
    Mutation("conversation marks: any mark of the conversation is taken for the text's", "shared/conversations.py",
             "  return at ~= nil\n", "  return true\n",
             ("tests/test_inbound.py::TestDuplicates::test_a_second_text_in_the_same_bucket_is_not_a_duplicate_of_the_first",)),
    Mutation("conversation marks: a digest found astride two others counts", "shared/conversations.py",
             "while at and (at - 5) % __DIGEST__ ~= 0 do", "while false do",
             ("tests/test_conversation_marks.py::test_a_digest_is_found_only_at_a_digests_place",)),
    Mutation("conversation marks: one field for every conversation", "shared/conversations.py",
             "              keys.mark_field(conversation), keys.mark_digest(account, message[\"sid\"]),",
             "              keys.mark_field(''), keys.mark_digest(account, message[\"sid\"]),",
             ("tests/test_inbound.py::TestDuplicates::test_two_peoples_marks_in_one_bucket_are_never_taken_for_each_other",)),
    Mutation("conversation marks: the time is the last accept's, not the latest text's", "shared/conversations.py",
             "  now = math.max(now, time_of(current))\n", "",
             ("tests/test_conversation_marks.py::test_the_time_kept_is_the_latest_texts",)),
    Mutation("conversation marks: the previous release's 6-hour hashes ignored", "shared/conversations.py",
             "  return seen(ARGV[9]) or (ARGV[8] ~= ARGV[9] and seen(ARGV[8]))\n", "  return false\n",
             ("tests/test_inbound.py::TestDuplicates::test_a_mark_of_the_previous_releases_6_hour_hashes_is_still_a_duplicate",)),
    Mutation("conversation marks: a key per person again", "shared/conversations.py",
             "redis.call('EXPIREAT', marks, (bucket(hour) + __BUCKET__ + __HOURS__) * 3600)\n",
             "redis.call('EXPIREAT', marks, (bucket(hour) + __BUCKET__ + __HOURS__) * 3600)\n"
             "redis.call('SET', 'sms:conv:{' .. ARGV[2] .. '}:wrote', ARGV[3], 'EX', __DEDUPE_TTL__)\n",
             ("tests/test_inbound.py::TestDuplicates::test_accepted_texts_leave_only_the_bucket_hashes_behind",)),
    Mutation("conversation marks: the push window ignores the previous release's wrote keys", "shared/conversations.py",
             "latest[i] = math.floor(tonumber(wrote) or 0)", "latest[i] = 0",
             ("tests/test_tenant_bounds.py::"
              "test_a_wrote_mark_of_the_previous_release_still_opens_the_push_window_while_the_database_is_down",)),
    Mutation("conversation marks: the push window reads the previous release's wrote keys only", "shared/conversations.py",
             "    if value then latest[i] = math.max(latest[i], time_of(value)) end\n", "",
             ("tests/test_tenant_bounds.py::"
              "test_an_engine_answering_someone_who_just_wrote_is_served_while_the_database_is_down",
              "tests/test_tenant_bounds.py::test_a_push_window_of_one_day_refuses_a_person_whose_last_text_is_30_hours_old")),
    Mutation("conversation marks: the push window looks in this bucket only", "shared/conversations.py",
             "    hashes = keys.marks_looked_in(int((time.time() if now is None else now) // 3600), DEDUPE_TTL // 3600)\n",
             "    hashes = keys.marks_looked_in(int((time.time() if now is None else now) // 3600), 0)\n",
             ("tests/test_conversation_marks.py::test_a_text_47_hours_old_is_known_for_the_push_window",)),
    Mutation("conversation marks: an erased person still counts as having written", "shared/erasure.py",
             "    forget_wrote(redis, conversation)", "    pass",
             ("tests/test_tenant_bounds.py::test_an_erased_person_is_no_longer_known_to_have_written",)),
    Mutation("conversation marks: an erase forgets the digests too", "shared/conversations.py",
             "packed(0) .. string.sub(value, 5))", "packed(0))",
             ("tests/test_tenant_bounds.py::test_an_erased_person_is_no_longer_known_to_have_written",)),
    Mutation("fast inbound: texts go to Flask like everything else", "webhook/__init__.py",
             "ChunkedBodyLimit(FastInbound(app.wsgi_app, app, MAX_BODY_BYTES), MAX_BODY_BYTES)",
             "ChunkedBodyLimit(app.wsgi_app, MAX_BODY_BYTES)",
             ("tests/test_fast_inbound.py::TestSameAnswer::test_a_text_is_answered_without_the_route",)),
    Mutation("fast inbound: a refused text reaches the route with no body", "webhook/fastinbound.py",
             "            environ[\"wsgi.input\"] = io.BytesIO(body)  # the route reads it again, and answers\n", "",
             ("tests/test_fast_inbound.py::TestSameAnswer::test_a_refusal_is_the_routes_with_its_body_put_back",)),
    Mutation("fast inbound: the signature is not checked", "webhook/fastinbound.py",
             "                                    environ.get(SIGNATURE_SETTINGS)) is not None:",
             "                                    environ.get(SIGNATURE_SETTINGS)) is None and False:",
             ("tests/test_fast_inbound.py::TestSameAnswer::test_a_bad_signature_is_refused_by_the_route",
              "tests/test_signature.py")),
    Mutation("fast inbound: one signed URL for every host", "webhook/fastinbound.py",
             "key = (environ.get(\"wsgi.url_scheme\"), environ.get(\"HTTP_HOST\"),", "key = (environ.get(\"wsgi.url_scheme\"),",
             ("tests/test_fast_inbound.py::TestSignedUrl::test_each_host_is_checked_against_its_own_url",)),
    Mutation("fast inbound: the query string is not signed", "webhook/fastinbound.py",
             "            return public_url + environ[\"PATH_INFO\"] + (\"?\" + query if query else \"\")",
             "            return public_url + environ[\"PATH_INFO\"]",
             ("tests/test_fast_inbound.py::TestSignedUrl::test_public_url_wins_over_the_host",)),
    Mutation("fast inbound: the forwarded scheme is not signed", "webhook/fastinbound.py",
             "        key = (environ.get(\"wsgi.url_scheme\"),", "        key = (\"http\",",
             ("tests/test_fast_inbound.py::TestSignedUrl::test_forwarded_proto_and_host_make_the_url",)),
    Mutation("fast inbound: a sender that is not a phone is accepted", "webhook/fastinbound.py",
             "        if not is_sender(form[\"From\"]):\n            return False\n", "",
             ("tests/test_fast_inbound.py::TestSameAnswer::test_a_refusal_is_the_routes_with_its_body_put_back",)),
    Mutation("fast inbound: Redis failing is acknowledged", "webhook/fastinbound.py",
             "            return twilio_auth.refusal(503, twilio_auth.UNAVAILABLE)(environ, start_response)",
             "            return self.app(environ, start_response)",
             ("tests/test_fast_inbound.py::TestFailures", "tests/test_inbound.py::TestRedisDown")),
    Mutation("redis scripts: a connection failing as a script is sent fails the call", "shared/redis.py",
             "                return self._run(connection, keys, args)\n        finally:",
             "                raise\n        finally:",
             ("tests/test_redis_scripts.py",)),
    Mutation("redis scripts: a timeout is retried", "shared/redis.py",
             "            except redis_lib.ConnectionError:\n                # The connection",
             "            except (redis_lib.ConnectionError, redis_lib.TimeoutError):\n                # The connection",
             ("tests/test_redis_scripts.py",)),
    Mutation("redis scripts: a script Redis lost is not sent again", "shared/redis.py",
             "        except redis_lib.exceptions.NoScriptError:", "        except ZeroDivisionError:",
             ("tests/test_redis_scripts.py", "tests/test_inbound.py::test_a_message_is_still_accepted_after_redis_lost_its_scripts")),
    Mutation("redis pools: a forked child keeps the parent's connections", "shared/redis.py",
             "        if self._forks_seen != _forks:", "        if False:",
             ("tests/test_pools.py::test_a_forked_child_uses_connections_of_its_own",)),
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
