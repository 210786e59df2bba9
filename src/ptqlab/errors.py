"""Exceptions raised by ptqlab: one type per kind of user error, each with a message naming the problem."""

from __future__ import annotations


class PtqlabError(Exception):
    """Base class of every error ptqlab raises on purpose."""


class ConfigError(PtqlabError, ValueError):
    """A configuration or specification is invalid (the message names the field)."""


class ModelLoadError(PtqlabError):
    """A model could not be found, read or adapted."""


class UnsupportedModelError(ModelLoadError):
    """The model's class has no family adapter."""


class DataError(PtqlabError):
    """A data set or text file is missing, empty or too short."""


class StoreError(PtqlabError):
    """A results store that cannot be used: not a ptqlab store, or written by a newer version."""


class ReportError(PtqlabError):
    """A report, recommendation or comparison has nothing to work from (the message says what is missing)."""
