"""HTTP sessions for the worker's calls out (the engine, Twilio), with the environment read once.

A requests Session that trusts the environment reads the proxy variables (HTTP(S)_PROXY,
NO_PROXY), the CA bundle variables and ~/.netrc again on every request: about a tenth of the
worker's CPU per message, measured with py-spy, for answers that cannot change while the process
runs. A session made here reads them once, for the one origin it talks to, and then stops looking.
"""

from __future__ import annotations

import os

import requests
from requests.utils import get_environ_proxies, get_netrc_auth


def read_environment_once(session: requests.Session, url: str) -> requests.Session:
    """Fix on `session` what the environment says for `url`'s origin, as requests would on each
    request (proxies unless NO_PROXY exempts the host, the CA bundle, .netrc credentials)."""
    session.proxies.update(get_environ_proxies(url))
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or session.verify
    if session.auth is None:
        session.auth = get_netrc_auth(url)
    session.trust_env = False
    return session
