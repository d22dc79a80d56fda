"""Errors the command-line tool reports in one line, with the exit codes of spec §9."""


class RevanonError(Exception):
    """Base class: a problem the user can act on. The message names the file involved."""

    exit_code = 1


class UsageError(RevanonError):
    """Bad flags, an unusable model, engine or key: found before any input is processed."""

    exit_code = 2


class InputError(RevanonError):
    """One input could not be processed; the others carry on."""

    exit_code = 1


class MetadataError(InputError):
    """Missing, malformed or over-limit revanon metadata."""


class AuthError(InputError):
    """The auth MAC does not match."""


class StateError(InputError):
    """A refused double run (spec §6)."""


class ModelMismatchError(InputError):
    """The image was made with another model."""
