"""The `mammut-sms` console script: its help and argument errors, `bots` over a live registry API, and `dlq`."""

from __future__ import annotations

import json
import secrets
import time

import pytest
import redis as redis_lib

from cli.dev import PROJECT_ROOT, read_procfile
from cli.main import main
from shared import deadletters, keys
from shared.db import make_engine, transaction
from shared.settings import Settings
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, free_port

HELP_COMMANDS = [
    [], ["dev"], ["simulate"], ["bots"], ["bots", "list"], ["bots", "show"], ["bots", "create"], ["bots", "update"],
    ["bots", "delete"], ["dlq"], ["dlq", "list"], ["dlq", "replay"], ["worker"], ["send"], ["handoff"],
    ["handoff", "pause"], ["handoff", "resume"], ["operators"], ["operators", "add"], ["operators", "list"],
    ["operators", "remove"], ["operators", "reset-password"],
]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestArguments:
    """Every command explains itself, and wrong arguments fail with usage, not a traceback."""

    @pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "mammut-sms")
    def test_every_command_has_help(self, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """`--help` exits 0 and shows the command's usage and options."""
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert 0 == exited.value.code
        assert out.startswith("usage: mammut-sms " + " ".join(command))
        assert "--help" in out

    @pytest.mark.parametrize("argv, complaint", [
        ([], "the following arguments are required: COMMAND"),
        (["simulate", "hola"], "the following arguments are required: --to, --from"),
        (["simulate", "--to", "+15005550006", "--from", "+15551230000"], "the following arguments are required: text"),
        (["bots", "show"], "the following arguments are required: ID"),
        (["bots", "delete", "seven"], "invalid int value: 'seven'"),
        (["dlq", "replay"], "one of the arguments --all ID is required"),
        (["dlq", "replay", "--all", "some-id"], "not allowed with argument --all"),
        (["dev", "--port", "web"], "invalid int value: 'web'"),
        (["launch"], "invalid choice: 'launch'"),
    ])
    def test_wrong_arguments_exit_2_with_the_reason(self, argv: list[str], complaint: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
        """argparse's usage error, exit status 2."""
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert 2 == exited.value.code
        assert complaint in capsys.readouterr().err


class TestBots:
    """`mammut-sms bots` drives the registry API of a running service."""

    def test_create_list_show_update_and_delete_a_bot(self, live_server: str, redis: redis_lib.Redis,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
        """A bot's whole life through the CLI, checked against what the registry stored."""
        auth = ("--url", live_server, "--token", ADMIN_TOKEN)
        code, out, _ = _run(capsys, "bots", "create", *auth, "--name", "ventas", "--account-sid", BOT_ACCOUNT_SID,
                            "--auth-token", BOT_AUTH_TOKEN, "--number", "+1 (555) 010-2000", "--field", "language=es")
        assert 0 == code
        bot_id = json.loads(out)["taskResult"][0]["affectedElementId"]

        code, out, _ = _run(capsys, "bots", "list", *auth)
        assert 0 == code
        assert [str(bot_id), "+15550102000", "ventas", "(default)"] == out.splitlines()[1].split()

        code, _, _ = _run(capsys, "bots", "update", str(bot_id), *auth, "--messages-per-second", "3")
        assert 0 == code
        code, out, _ = _run(capsys, "bots", "show", str(bot_id), *auth)
        shown = json.loads(out)
        assert (0, 3.0, "es") == (code, shown["messages-per-second"], shown["language"])
        assert "twilio-auth-token" not in shown and f"\"{BOT_AUTH_TOKEN}\"" not in out

        code, _, _ = _run(capsys, "bots", "delete", str(bot_id), *auth)
        assert 0 == code
        assert [] == json.loads(_run(capsys, "bots", "list", *auth, "--json")[1])

    def test_the_token_and_app_default_to_the_environment(self, live_server: str, bot: object,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        """ADMIN_API_TOKEN and APP_ID are read when --token and --app are not given."""
        monkeypatch.setenv("ADMIN_API_TOKEN", ADMIN_TOKEN)
        monkeypatch.setenv("APP_ID", "mammut-1")
        code, out, _ = _run(capsys, "bots", "list", "--url", live_server, "--json")
        assert (0, ["test-bot"]) == (code, [entry["name"] for entry in json.loads(out)])

    def test_without_a_token_it_says_how_to_give_one(self, live_server: str, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
        """No request is made without the admin token; the message names --token and ADMIN_API_TOKEN."""
        monkeypatch.delenv("ADMIN_API_TOKEN", raising=False)
        code, _, err = _run(capsys, "bots", "list", "--url", live_server)
        assert 1 == code
        assert "pass --token or set ADMIN_API_TOKEN" in err

    def test_the_registrys_refusal_is_shown(self, live_server: str, capsys: pytest.CaptureFixture[str]) -> None:
        """A validation error comes back as the registry's own message, exit status 1."""
        code, _, err = _run(capsys, "bots", "create", "--url", live_server, "--token", ADMIN_TOKEN, "--name", "x",
                            "--account-sid", BOT_ACCOUNT_SID, "--auth-token", BOT_AUTH_TOKEN, "--number", "12")
        assert 1 == code
        assert "HTTP 400" in err and "main-phone-number" in err and "E.164" in err

    def test_create_lists_the_missing_required_options(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Nothing is sent when required fields are missing."""
        code, _, err = _run(capsys, "bots", "create", "--token", ADMIN_TOKEN, "--name", "x")
        assert 1 == code
        assert "missing --account-sid, --auth-token, --number" in err

    def test_create_reads_the_auth_token_from_the_environment(self, live_server: str, store: object,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
        """$TWILIO_AUTH_TOKEN instead of --auth-token: the token never appears on the command line."""
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", BOT_AUTH_TOKEN)
        code, out, err = _run(capsys, "bots", "create", "--url", live_server, "--token", ADMIN_TOKEN, "--name", "x",
                              "--account-sid", BOT_ACCOUNT_SID, "--number", "+15550102001")
        assert 0 == code, err
        bot_id = json.loads(out)["taskResult"][0]["affectedElementId"]
        assert BOT_AUTH_TOKEN == store.get(bot_id).auth_token  # type: ignore[attr-defined]

    def test_an_update_changes_the_auth_token_only_when_asked(self, live_server: str, bot: object, store: object,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
        """$TWILIO_AUTH_TOKEN is not sent with every update: only with --auth-token given alone."""
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", "n" * 32)
        auth = ("--url", live_server, "--token", ADMIN_TOKEN)
        assert 0 == _run(capsys, "bots", "update", "1", *auth, "--messages-per-second", "2")[0]
        assert BOT_AUTH_TOKEN == store.get(1).auth_token  # type: ignore[attr-defined]
        assert 0 == _run(capsys, "bots", "update", "1", *auth, "--auth-token")[0]
        assert "n" * 32 == store.get(1).auth_token  # type: ignore[attr-defined]

    def test_a_bearer_token_over_plain_http_to_another_host_is_warned_about(
            self, live_server: str, capsys: pytest.CaptureFixture[str]) -> None:
        """http:// to a host that is not loopback warns before the request; loopback does not."""
        _, _, err = _run(capsys, "bots", "list", "--url", f"http://0.0.0.0:{free_port()}", "--token", "t")
        assert "warning: sending the admin token over plain http:// to 0.0.0.0" in err
        _, _, err = _run(capsys, "bots", "list", "--url", live_server, "--token", ADMIN_TOKEN)
        assert "warning" not in err

    def test_an_unreachable_service_is_reported_plainly(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A connection refused becomes one line, not a traceback."""
        code, _, err = _run(capsys, "bots", "list", "--url", f"http://127.0.0.1:{free_port()}", "--token", "t")
        assert 1 == code
        assert "cannot reach" in err and "is the service running?" in err


def _dead_letter(database: str, conversation: str, text: str) -> str:
    """A reply that failed for good, kept as the outbound worker keeps it."""
    reply_id = f"reply-{text}"
    bot_id, person = keys.split_conversation_id(conversation)
    engine = make_engine(database, size=1)
    with transaction(engine) as connection:
        deadletters.record(connection, {
            "id": reply_id, "bot_id": bot_id, "person": person, "text": text, "media_url": None, "error_code": 21211,
            "http_status": 400, "error": "Invalid 'To' Phone Number", "reason": "permanent", "attempts": 1,
            "failed_at": time.time(),
        })
    engine.dispose()
    return reply_id


class TestDeadLetters:
    """`mammut-sms dlq` shows and replays what shared.dlq keeps, with the service's environment."""

    @pytest.fixture(autouse=True)
    def service_environment(self, redis_url: str, database: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REDIS_URL", redis_url)
        monkeypatch.setenv("DATABASE_URL", database)
        monkeypatch.setenv("MAMMUT_SMS_ENV", "development")

    def test_list_shows_each_dead_reply_with_its_reason_and_a_masked_number(
            self, redis: redis_lib.Redis, database: str, capsys: pytest.CaptureFixture[str]) -> None:
        """One line per dead letter: id, bot, masked recipient, reason, Twilio code and text."""
        reply_id = _dead_letter(database, "7:+15551230000", "hola")
        code, out, _ = _run(capsys, "dlq", "list")
        assert 0 == code
        assert reply_id in out and "bot 7 -> ********0000  permanent code 21211" in out and "'hola'" in out
        assert "+15551230000" not in out

    def test_replay_of_one_id_queues_that_reply_again_and_leaves_the_others(
            self, redis: redis_lib.Redis, database: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Only the named dead letter is replayed; its text joins the conversation's outbox, the other stays listed."""
        conversation = "7:+15551230000"
        replayed, kept = _dead_letter(database, conversation, "uno"), _dead_letter(database, conversation, "dos")
        code, out, _ = _run(capsys, "dlq", "replay", replayed)
        assert (0, f"replayed 1: {replayed}") == (code, out.strip().splitlines()[-1])
        code, out, _ = _run(capsys, "dlq", "list", "--json")
        assert [kept] == [entry["id"] for entry in json.loads(out)]
        outbox = redis.lrange(keys.outbox(conversation), 0, -1)
        assert ["uno"] == [json.loads(redis.hget(keys.replies(conversation), rid))["text"] for rid in outbox]

    def test_replay_of_an_unknown_id_says_nothing_was_replayed(self, redis: redis_lib.Redis,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
        """Exit status 1 tells a script that the id matched nothing."""
        code, out, _ = _run(capsys, "dlq", "replay", "no-such-id")
        assert (1, "nothing replayed (see: mammut-sms dlq list)") == (code, out.strip())


class TestHerokuDeploy:
    """app.json describes a deploy that starts: the Procfile's processes and settings it accepts."""

    def test_app_json_runs_the_procfiles_processes_with_postgres_and_redis(self) -> None:
        """One web and one worker dyno (the release phase is not a dyno), Postgres and Redis add-ons, the Python buildpack."""
        manifest = json.loads((PROJECT_ROOT / "app.json").read_text())
        assert set(read_procfile(PROJECT_ROOT / "Procfile")) - {"release"} == set(manifest["formation"])
        assert ["heroku-postgresql", "heroku-redis"] == [addon["plan"].split(":")[0] for addon in manifest["addons"]]
        assert [{"url": "heroku/python"}] == manifest["buildpacks"]

    def test_the_generated_secrets_are_settings_production_accepts(self) -> None:
        """Heroku's "secret" generator makes 64 hex digits; production starts with them as the two secrets."""
        env = json.loads((PROJECT_ROOT / "app.json").read_text())["env"]
        assert "secret" == env["ADMIN_API_TOKEN"]["generator"] == env["CREDENTIALS_KEY"]["generator"]
        generated = {"ADMIN_API_TOKEN": secrets.token_hex(32), "CREDENTIALS_KEY": secrets.token_hex(32),
                     "MAMMUT_SMS_ENV": env["MAMMUT_SMS_ENV"]["value"], "REDIS_URL": "rediss://:p@example.com:6380",
                     "DATABASE_URL": "postgres://u:p@example.com:5432/d"}
        settings = Settings.from_env(generated)
        assert (False, generated["ADMIN_API_TOKEN"]) == (settings.development, settings.admin_api_token)
        assert 1 == len(settings.credentials_keys)


class TestWorkerCommand:
    """`mammut-sms worker`, the Procfile's worker line: Dramatiq's command for WORKER_POOL."""

    @pytest.mark.parametrize(("env", "expected"), [
        ({}, "dramatiq worker.app --processes 2 --threads 40 --worker-shutdown-timeout 25000"),
        ({"WORKER_POOL": "threads", "WORKER_PROCESSES": "3", "WORKER_THREADS": "200"},
         "dramatiq worker.app --processes 3 --threads 200 --worker-shutdown-timeout 25000"),
        ({"WORKER_POOL": "GEVENT", "WORKER_THREADS": "1000"},
         "dramatiq-gevent worker.app --processes 2 --threads 1000 --worker-shutdown-timeout 25000"),
    ], ids=["defaults", "threads", "gevent"])
    def test_the_pool_and_sizes_come_from_the_environment(
            self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str],
            expected: str) -> None:
        for name in ("WORKER_POOL", "WORKER_PROCESSES", "WORKER_THREADS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert 0 == main(["worker", "--print"])
        assert expected == capsys.readouterr().out.strip()

    @pytest.mark.parametrize(("name", "value"), [
        ("WORKER_POOL", "eventlet"), ("WORKER_THREADS", "0"), ("WORKER_THREADS", "1001"), ("WORKER_PROCESSES", "two"),
    ])
    def test_a_bad_setting_stops_it_naming_the_variable(
            self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str) -> None:
        for variable in ("WORKER_POOL", "WORKER_PROCESSES", "WORKER_THREADS"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv(name, value)
        monkeypatch.setattr("os.execv", lambda *_: pytest.fail("a bad setting must not start the worker"))
        assert 2 == main(["worker"])
        assert f"{name}={value!r}" in capsys.readouterr().err

    def test_the_procfile_runs_it(self) -> None:
        assert "mammut-sms worker" == read_procfile(PROJECT_ROOT / "Procfile")["worker"]
