"""Checked by mypy, never run: the public API's types as users see them."""

from __future__ import annotations

from typing import assert_type

import corral

assert_type(corral.__version__, str)
