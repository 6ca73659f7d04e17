"""Text that enters from outside (a person, an engine, an API client): control characters removed.

A NUL cannot be stored by PostgreSQL (in text or JSON), and an escape sequence in a text would
reach a terminal or a phone; tab and newline are kept, as people and engines use them.
"""

from __future__ import annotations

import re
from typing import Any

from marshmallow import fields, validate

# C0 and C1 controls but \t and \n.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """`text` without control characters."""
    return _CONTROL.sub("", text)


class PlainText(fields.String):
    """A string field whose control characters are removed as it is read. Its length bound holds for
    the text as sent too: a client may not pass a longer one by padding it with what is removed."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        given = super()._deserialize(value, attr, data, **kwargs)
        for rule in self.validators:
            if isinstance(rule, validate.Length) and rule.max is not None and len(given) > rule.max:
                rule(given)  # raises its own message
        return plain(given)
