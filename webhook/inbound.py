"""Placeholder: filled in by the webhook work (issue 3/4)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("inbound", __name__)
