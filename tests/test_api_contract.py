"""The API keeps its own contract: /openapi.json states what the service accepts and answers, and
schemathesis, a client written outside this project, finds nothing to contradict it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from shared.bots import MAX_BOT_ID, Bot
from tests.conftest import ADMIN_TOKEN, free_port
from tests.support.processes import Process, start_web

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
# A page cursor as the service hands them out (base64 of [at, key]): cursors are opaque, so the
# fuzzer is given a real one instead of inventing strings the service rightly refuses with 400.
CURSOR = "WzAsIiJd"
# Bounded so the run fits CI: seconds of fuzzing, and a fixed seed so a failure can be replayed.
# The spec changes each UTC day (send_at's pattern lists the days ahead), and so what a seed draws:
# SCHEMATHESIS_SEED, _EXAMPLES and _SECONDS hunt further by hand (e.g. for seed in $(seq 30); ...).
MAX_SECONDS = int(os.environ.get("SCHEMATHESIS_SECONDS", "45"))
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "22"))


@pytest.fixture
def web(worker_env: dict[str, str], redis: object, database: str) -> Iterator[str]:
    """The Procfile's web process over the test Redis (flushed: a registry copy another run left there
    holds tokens under another key) and a fresh database, in development mode."""
    port = free_port()
    process: Process = start_web({**worker_env, "WEB_CONCURRENCY": "1", "LOG_LEVEL": "WARNING"}, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop(10)
        assert "request.failed" not in process.log, process.log[-4000:]


def test_schemathesis_finds_no_contradiction_with_every_check_on(web: str, tmp_path: Path) -> None:
    """Every check (server errors, undocumented statuses, valid data refused, invalid data accepted,
    405 without Allow, missing signature accepted, ...) passes in every phase, stateful included."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"query.after" = "{CURSOR}"\n')
    result = subprocess.run(
        [SCHEMATHESIS, "--config-file", str(config), "run", f"{web}/openapi.json", "--checks", "all",
         "-H", f"Authorization: Bearer {ADMIN_TOKEN}", "--max-time", str(MAX_SECONDS),
         "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1", "--no-color",
         "--request-timeout", "20", "--suppress-health-check", "too_slow"],
        capture_output=True, text=True, timeout=MAX_SECONDS * 4, cwd=tmp_path,  # its cache goes there
    )
    assert 0 == result.returncode, result.stdout[-12000:] + result.stderr[-2000:]


def test_a_callback_to_an_id_past_a_database_integer_is_404_not_500(client: FlaskClient) -> None:
    """Unauthenticated, with an id no database integer holds: 404 from the route, no query made."""
    for bot_id in (MAX_BOT_ID + 1, 10**20):
        response = client.post(f"/channels/sms/callback/{bot_id}", json={"recipient_id": "+15551230000", "text": "x"})
        assert 404 == response.status_code


def test_registry_ids_past_a_database_integer_are_404(client: FlaskClient, admin_headers: dict[str, str]) -> None:
    """Every registry path with a bot id bounds it like the callback does."""
    for path in (f"/app:mammut-1/graph/user:{MAX_BOT_ID + 1}", f"/app:mammut-1/graph/user:{10**20}/conversations",
                 f"/app:mammut-1/graph:1/user:{10**20}"):
        assert 404 == client.get(path, headers=admin_headers).status_code


@pytest.mark.parametrize("path", ["/app:mammut-1/graph/user", "/channels/sms/", "/channels/sms/callback/1", "/healthz"])
def test_an_undeclared_method_is_405_with_the_allowed_ones(client: FlaskClient, path: str) -> None:
    """RFC 9110: a 405 says, in Allow, which methods the resource has."""
    response = client.open(path, method="PATCH")
    assert 405 == response.status_code
    assert "POST" in response.headers["Allow"] or "GET" in response.headers["Allow"]


@pytest.mark.parametrize("field", ["allow-cold-push", "smart-encoded"])
def test_a_flag_is_a_boolean_not_a_number(client: FlaskClient, admin_headers: dict[str, str], bot: Bot,
                                          field: str) -> None:
    """0 and 1 are refused where the description says boolean (Python would read 0 as False)."""
    response = client.post(f"/app:mammut-1/graph/user:{bot.id}", json={field: 0}, headers=admin_headers)
    assert (400, [field]) == (response.status_code, list(response.json["errors"]))


def test_an_unsigned_webhook_is_refused_before_its_number_is_looked_up(client: FlaskClient) -> None:
    """Without X-Twilio-Signature it is 403 whatever the To: an unsigned caller cannot probe numbers."""
    form = {"MessageSid": "SM" + "1" * 32, "AccountSid": "AC" + "1" * 32, "From": "+15551230000",
            "To": "+15009998877", "Body": "hola"}
    response = client.post("/channels/sms/", data=form)
    assert (403, "missing_signature") == (response.status_code, response.get_data(as_text=True))
