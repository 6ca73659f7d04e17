"""Lease renewal: every lease a process holds is renewed in one round trip per pass, and a lease
that another holder took is reported lost and no longer renewed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib

from worker.locks import LEASE_SECONDS, Lease, Renewer

HELD = 1_000


def counted(client: redis_lib.Redis) -> list[str]:
    """The commands `client`'s connections send from this thread from now on (the renewer's own
    thread is not counted), whichever way they are sent: redis-py's commands and shared.redis's
    scripts both go through Connection.send_command."""
    sent: list[str] = []
    caller = threading.current_thread()
    pool = client.connection_pool
    hand_out: Callable[..., Any] = pool.get_connection

    def get_connection(*args: Any, **options: Any) -> Any:
        connection = hand_out(*args, **options)
        if not hasattr(connection, "counted_send"):
            connection.counted_send = connection.send_command

            def send_command(*command: Any, **command_options: Any) -> Any:
                if threading.current_thread() is caller:
                    sent.append(str(command[0]))
                return connection.counted_send(*command, **command_options)

            connection.send_command = send_command
        return connection

    pool.get_connection = get_connection  # type: ignore[method-assign]
    return sent


@pytest.fixture
def renewer() -> Renewer:
    return Renewer()


@pytest.fixture
def taken() -> Iterator[list[Lease]]:
    """The leases a test takes, released at its end: the process's renewer tracks them too."""
    leases: list[Lease] = []
    yield leases
    for lease in leases:
        lease.release()


def take(redis: redis_lib.Redis, count: int, renewer: Renewer, taken: list[Lease]) -> list[Lease]:
    """`count` leases taken in one pipeline and tracked by `renewer`."""
    leases = [Lease(redis, f"test:lease:{index}") for index in range(count)]
    pipe = redis.pipeline(transaction=False)
    for lease in leases:
        lease.request(pipe)
    for lease, granted in zip(leases, pipe.execute()):
        assert lease.granted(granted)
        renewer.track(lease)
    taken.extend(leases)
    return leases


def shorten(redis: redis_lib.Redis, leases: list[Lease], ms: int) -> None:
    pipe = redis.pipeline(transaction=False)
    for lease in leases:
        pipe.pexpire(lease.key, ms)
    pipe.execute()


def ttls(redis: redis_lib.Redis, leases: list[Lease]) -> list[int]:
    pipe = redis.pipeline(transaction=False)
    for lease in leases:
        pipe.pttl(lease.key)
    return pipe.execute()


def test_a_thousand_leases_are_renewed_by_one_pass_in_one_round_trip(
        redis: redis_lib.Redis, renewer: Renewer, taken: list[Lease]) -> None:
    """One pass over 1,000 held leases sends one command and gives each its full lifetime again."""
    # Given 1,000 leases held by this process, each close to lapsing
    leases = take(redis, HELD, renewer, taken)
    renewer.renew_all()  # Redis now knows the script, as it does after a process's first pass
    shorten(redis, leases, 2_000)

    # When the renewer makes one pass
    sent = counted(redis)
    lost = renewer.renew_all()

    # Then it took one round trip, lost nothing, and every lease lives LEASE_SECONDS again
    assert (["EVALSHA"], []) == (sent, lost)
    assert min(ttls(redis, leases)) > LEASE_SECONDS * 1000 - 2_000


def test_a_lease_taken_by_another_holder_is_reported_lost_and_dropped(
        redis: redis_lib.Redis, renewer: Renewer, taken: list[Lease], logs: list[dict[str, object]]) -> None:
    """A lease whose key now holds another token is reported once, marked lost, and not renewed again."""
    # Given three held leases, one of which lapsed and was taken by another worker
    first, stolen, third = take(redis, 3, renewer, taken)
    redis.set(stolen.key, "another-holders-token", px=60_000)

    # When the renewer makes two passes
    lost = renewer.renew_all()
    again = renewer.renew_all()

    # Then the taken lease is reported once, the others stay ours, and the new holder keeps its key
    assert ([stolen], [], True, False) == (lost, again, stolen.lost, first.lost or third.lost)
    assert [stolen.key] == [event["key"] for event in logs if event["event"] == "lease.lost"]
    assert "another-holders-token" == redis.get(stolen.key)
    assert min(ttls(redis, [first, third])) > LEASE_SECONDS * 1000 - 2_000


def test_a_released_lease_is_not_reported_lost(
        redis: redis_lib.Redis, renewer: Renewer, taken: list[Lease], logs: list[dict[str, object]]) -> None:
    """A lease let go normally is forgotten by the renewer, so its missing key is no loss."""
    # Given a held lease that its holder releases
    (lease,) = take(redis, 1, renewer, taken)
    renewer.forget(lease)  # what release() does before deleting the key
    lease.release()

    # When the renewer makes a pass
    lost = renewer.renew_all()

    # Then nothing is reported lost
    assert ([], []) == (lost, [event for event in logs if event["event"] == "lease.lost"])
