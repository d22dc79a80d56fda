"""Errors the command-line tool reports in one line, with the exit codes of spec §9."""

import re

# C0 and C1 controls, DEL, and the bidi overrides that make a terminal show text in another order
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def one_line(text: str) -> str:
    """A message on one line, whatever the file names in it hold (a newline, a terminal escape)."""
    return _CONTROL.sub(_escaped, text)


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def quoted(value: object, limit: int = 60) -> str:
    """repr(value) for a message, cut to `limit` characters: values from metadata are the attacker's, and
    one of 15 MB would otherwise be echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def detached(exc: BaseException) -> BaseException:
    """exc, made fit to be kept in a list of results: without the tracebacks of it and its chain. A traceback
    holds every frame the error passed through, one of them the frame that holds the results, so a kept
    error would keep its whole request (images, masks, keys) in a cycle that only Python's occasional full
    collection frees. An unexpected error keeps its traceback as text, for REVANON_DEBUG."""
    import traceback

    if not isinstance(exc, RevanonError) and not hasattr(exc, "traceback_text"):
        exc.traceback_text = "".join(traceback.format_exception(exc))
    seen, pending = set(), [exc]
    while pending:
        link = pending.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        link.__traceback__ = None
        pending += [link.__cause__, link.__context__]
    return exc


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


def torch_extra_error(what: str, exc: ImportError, otherwise: str = "") -> UsageError:
    """Why `what` cannot import the PyTorch extra. A module missing from a package that is installed means a
    version that does not fit the others (an onnxscript older than its torch's exporter), which reinstalling
    the extra as it is would not change."""
    from importlib import metadata

    name = exc.name or ""
    distributions = metadata.packages_distributions().get(name.split(".")[0], []) if name else []
    if distributions:
        versions = []
        for distribution in distributions:
            try:
                versions.append(f"{distribution} {metadata.version(distribution)}")
            except metadata.PackageNotFoundError:
                continue
        if versions:
            return UsageError(f"{what} needs the PyTorch extra, and the installed {', '.join(versions)} does not fit "
                              f"it ({exc}): pip install -U 'revanon-rt[torch]' brings versions that do")
    return UsageError(f"{what} needs the PyTorch extra ({name or exc} is missing): pip install 'revanon-rt[torch]'"
                      + otherwise)
