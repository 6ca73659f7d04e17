"""Live console streams are bounded per web process, so open console tabs never take the threads
Twilio's webhook needs."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis as redis_lib
import requests

from tests.conftest import BOT_NUMBER
from tests.support.console import Service, running_service

STREAMS = 50


@pytest.fixture
def service(worker_env: dict[str, str], redis: redis_lib.Redis, database: str) -> Iterator[Service]:
    """The web process as deployed (WEB_THREADS 4), with one live stream allowed."""
    with running_service(worker_env, database, worker=False, WEB_THREADS="4", CONSOLE_STREAMS="1",
                         WEB_CONCURRENCY="1") as running:
        yield running


def test_fifty_open_console_streams_leave_the_webhook_answering(service: Service) -> None:
    """With 50 tabs holding /console/live open, a signed webhook is still answered, and the tabs past
    the bound are told to poll (503) instead of holding a thread."""
    bot_id = service.register(BOT_NUMBER, "bot")
    service.add_operator("ana@example.com", "operator", [bot_id])
    session = service.signed_in("ana@example.com")
    cookies = session.cookies.get_dict()
    statuses: list[int] = []
    opened = threading.Barrier(STREAMS + 1, timeout=120)
    held: list[requests.Response] = []
    lock = threading.Lock()

    def tab() -> None:
        response = requests.get(service.base + "/console/live", cookies=cookies, stream=True, timeout=120)
        with lock:
            statuses.append(response.status_code)
            held.append(response)
        opened.wait()

    tabs = [threading.Thread(target=tab, daemon=True) for _ in range(STREAMS)]
    for thread in tabs:
        thread.start()
    opened.wait()
    try:
        # When Twilio posts while every tab is open
        answer = service.text(BOT_NUMBER, "+15551230001", "hola")
    finally:
        for response in held:
            response.close()
    # Then the webhook answered, one tab streams and the others were sent to polling
    assert 200 == answer.status_code
    assert (1, STREAMS - 1) == (statuses.count(200), statuses.count(503))
