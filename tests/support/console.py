"""A running service for the console's end-to-end tests: the Procfile's web and worker processes,
a Twilio stand-in that calls back with delivery statuses, and helpers to register bots, add
operators and text the bot as Twilio would (signed with twilio's own RequestValidator)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests
from twilio.request_validator import RequestValidator

from cli.twilio_standin import TwilioStandin
from shared import operators
from shared.db import make_engine, transaction
from tests.conftest import ADMIN_TOKEN, BOT_ACCOUNT_SID, BOT_AUTH_TOKEN, free_port
from tests.support.processes import Process, start_web, start_worker

API = "/app:mammut-1/graph/user"
PASSWORD = "a long enough password"


class Service:
    def __init__(self, base: str, database_url: str, twilio: TwilioStandin) -> None:
        self.base, self.database_url, self.twilio = base, database_url, twilio
        self._sent = 0

    def register(self, number: str, name: str) -> int:
        response = requests.post(self.base + API, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10, json={
            "user-type": "machine", "name": name, "twilio-account-sid": BOT_ACCOUNT_SID,
            "twilio-auth-token": BOT_AUTH_TOKEN, "main-phone-number": number, "messages-per-second": 50})
        assert 200 == response.status_code, response.text
        return int(response.json()["taskResult"][0]["affectedElementId"])

    def add_operator(self, email: str, role: str, bots: list[int]) -> None:
        engine = make_engine(self.database_url, size=1)
        try:
            with transaction(engine) as connection:
                operators.add(connection, email, role, bots, PASSWORD)
        finally:
            engine.dispose()

    def text(self, bot_number: str, person: str, body: str) -> requests.Response:
        """A signed inbound SMS, as Twilio posts it."""
        self._sent += 1
        url = self.base + "/channels/sms/"
        form = {"MessageSid": f"SM{time.time_ns():024x}{self._sent:08d}", "AccountSid": BOT_ACCOUNT_SID,
                "From": person, "To": bot_number, "Body": body, "NumMedia": "0"}
        signature = RequestValidator(BOT_AUTH_TOKEN).compute_signature(url, form)
        return requests.post(url, data=form, headers={"X-Twilio-Signature": signature}, timeout=30)

    def signed_in(self, email: str) -> requests.Session:
        """An HTTP session signed in to the console as `email`."""
        session = requests.Session()
        form = session.get(self.base + "/console/sign-in", timeout=10)
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]
        answer = session.post(self.base + "/console/sign-in", timeout=30, allow_redirects=False,
                              data={"email": email, "password": PASSWORD, "csrf": token})
        assert 302 == answer.status_code, answer.text
        return session


@contextmanager
def running_service(worker_env: dict[str, str], database_url: str, worker: bool = True,
                    **env: str) -> Iterator[Service]:
    """Web (and worker) processes over the test Redis and database; `env` overrides their environment."""
    port = free_port()
    with TwilioStandin(status_callbacks=True) as twilio:
        environment = {**worker_env, "TWILIO_API_BASE_URL": twilio.url, "ENGINE_URL": "",
                       "PUBLIC_URL": f"http://127.0.0.1:{port}", "LOG_LEVEL": "INFO", **env}
        processes: list[Process] = []
        try:
            processes.append(start_web(environment, port))
            if worker:
                processes.append(start_worker(environment, processes=1, threads=4))
            yield Service(f"http://127.0.0.1:{port}", database_url, twilio)
        finally:
            for process in processes:
                process.stop(10)


def wait_until(condition: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}")
