"""`mammut-sms worker`: the Procfile's worker line. It becomes Dramatiq's own command (exec, so
Heroku's SIGTERM reaches Dramatiq's main process), threaded or under gevent as WORKER_POOL says.

- `threads` (the default): WORKER_THREADS OS threads per process. Best for engines that answer in
  well under a second: no monkey-patching, and CPU work in one thread does not hold up the others.
- `gevent`: WORKER_THREADS greenlets per process, under `dramatiq-gevent` (which monkey-patches the
  standard library first, so redis-py, requests, twilio-python and psycopg all yield while they
  wait). Best for engines that take seconds (an LLM-backed bot): a waiting greenlet costs a few KB,
  a waiting thread a stack and a share of the GIL's switching.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from shared.redis import DEFAULT_WORKER_THREADS
from shared.settings import SettingsError, env_choice, env_int

POOLS = ("threads", "gevent")
# Dramatiq's executable for each pool: dramatiq-gevent patches the standard library, then runs dramatiq.
EXECUTABLES = {"threads": "dramatiq", "gevent": "dramatiq-gevent"}
DEFAULT_PROCESSES = 2
DEFAULT_THREADS = DEFAULT_WORKER_THREADS
MAX_THREADS = {"threads": 1_000, "gevent": 10_000}
# Heroku gives a dyno 30 s between SIGTERM and SIGKILL; a message still running after 25 s is
# requeued by Dramatiq, so it is redelivered rather than lost with the dyno.
SHUTDOWN_TIMEOUT_MS = 25_000


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "worker", help="run the Dramatiq worker (the Procfile's worker line)",
        description="Run the worker processes that answer conversations and send replies: WORKER_PROCESSES "
                    f"processes (default {DEFAULT_PROCESSES}) of WORKER_THREADS threads or greenlets each (default "
                    f"{DEFAULT_THREADS}); WORKER_POOL=threads (default) or gevent.",
    )
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    parser.set_defaults(run=run)


def command(env: Mapping[str, str]) -> list[str]:
    """The Dramatiq command line the environment asks for; SettingsError for a bad variable."""
    pool = env_choice(env, "WORKER_POOL", POOLS, "threads")
    processes = env_int(env, "WORKER_PROCESSES", DEFAULT_PROCESSES, 1, 64)
    threads = env_int(env, "WORKER_THREADS", DEFAULT_THREADS, 1, MAX_THREADS[pool])
    return [EXECUTABLES[pool], "worker.app", "--processes", str(processes), "--threads", str(threads),
            "--worker-shutdown-timeout", str(SHUTDOWN_TIMEOUT_MS)]


def run(args: argparse.Namespace) -> int:
    argv = command(os.environ)
    if args.print:
        print(" ".join(argv))
        return 0
    # Dramatiq's scripts sit next to this interpreter, whether or not its venv is on PATH.
    here = os.path.join(os.path.dirname(sys.executable), argv[0])
    executable = here if os.access(here, os.X_OK) else shutil.which(argv[0])
    if executable is None:
        raise SettingsError(f"{argv[0]} is not installed (pip install the project again)")
    sys.stdout.flush()
    os.execv(executable, argv)
    return 1  # not reached: exec replaced this process
