"""Placeholder: filled in by the observability work (issue 5)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("openapi", __name__)
