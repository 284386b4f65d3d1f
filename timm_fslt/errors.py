"""Errors raised when a ticket cannot be saved, read or rebuilt.

Every one is a ``TicketError`` (a ``ValueError``), so ``except TicketError``
catches them all; the subclasses say which part of the ticket is at fault.
"""
from __future__ import annotations


class TicketError(ValueError):
    """A ticket cannot be saved, read or rebuilt; the message says why and what to do."""


class TicketVersionError(TicketError):
    """The ticket was written by a newer format, or with another random generator version."""


class TicketChecksumError(TicketError):
    """A ticket file is missing, truncated or corrupted (its sha256 does not match config.json)."""


class ArchitectureError(TicketError):
    """The ticket's architecture is missing, malformed, or cannot be built."""


class TicketMismatchError(TicketError):
    """The stored masks or state do not fit the model rebuilt from the architecture."""


class TicketIntegrityWarning(UserWarning):
    """A ticket loaded without the whole-ticket integrity record (written by timm_fslt 0.1)."""
