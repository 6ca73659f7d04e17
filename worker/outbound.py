"""Placeholder: filled in by the worker work (issue 4)."""

from __future__ import annotations
