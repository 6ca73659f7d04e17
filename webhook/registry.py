"""Placeholder: the registry API (issue 2)."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("registry", __name__)
