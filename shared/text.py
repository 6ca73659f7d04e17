"""Text that enters from outside (a person, an engine, an API client): control characters removed.

A NUL cannot be stored by PostgreSQL (in text or JSON), and an escape sequence in a text would
reach a terminal or a phone; tab and newline are kept, as people and engines use them.
"""

from __future__ import annotations

import re
from typing import Any

from marshmallow import fields

# C0 and C1 controls but \t and \n.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """`text` without control characters."""
    return _CONTROL.sub("", text)


class PlainText(fields.String):
    """A string field whose control characters are removed as it is read."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return plain(super()._deserialize(value, attr, data, **kwargs))
