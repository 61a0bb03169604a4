"""Kept for the scripts that still import it: `upsert_section` now lives in `common`."""

from common import upsert_section

__all__ = ["upsert_section"]
