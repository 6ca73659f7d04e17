"""The worker process's entry point: `dramatiq worker.app` loads the broker and every actor, and
wires the process: its middleware is added here and nowhere else."""

from __future__ import annotations

from shared.db import check_schema
from shared.logging import configure_logging
from shared.tasks import get_broker
from worker.deps import get_engine, get_settings
from worker.shutdown import take_repeated_sigterm_as_one

configure_logging(get_settings())
# A release whose migrations did not run stops here, saying what to run.
check_schema(get_engine())
# Heroku's SIGTERM and the one Dramatiq's main process forwards are one shutdown, not a kill.
take_repeated_sigterm_as_one()
broker = get_broker()

from worker import conversation, outbound  # noqa: E402,F401  (importing declares the actors)
from worker.middleware import SweeperMiddleware  # noqa: E402
from worker.pacing import PromptDelayedMessages  # noqa: E402

# Scheduled sends (pacing slots, retries) must reach a thread close to their time.
broker.add_middleware(PromptDelayedMessages())
broker.add_middleware(SweeperMiddleware())
