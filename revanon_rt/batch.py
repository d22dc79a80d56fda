"""Many inputs, one run: discovery, output names (spec §9), progress, atomic writes, a summary.

One bad input never stops the others, inputs are never modified, and an existing output
is never replaced without --overwrite.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .container import sidecar_path
from .errors import RevanonError, UsageError, one_line
from .images import EXTENSION_FORMATS, read_formats, write_atomic

IMAGE_EXTENSIONS = set(EXTENSION_FORMATS)
# pictures a user may expect to be read, which the tool does not read (no .pdf or .eps: not photos)
OTHER_PICTURE_EXTENSIONS = {".ico", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".psd", ".tga", ".ppm", ".pgm",
                            ".pbm", ".pcx", ".dds", ".svg", ".raw", ".cr2", ".cr3", ".nef", ".dng", ".arw", ".orf",
                            ".rw2", ".raf"}


def searched_extension(name: str) -> bool:
    """Named as a format this Pillow reads (AVIF only since Pillow 11.2)."""
    return EXTENSION_FORMATS.get(Path(name).suffix.lower()) in read_formats()


def other_image_extension(name: str) -> str | None:
    """The extension of a file named as a picture of a format the tool does not read (.ico, .psd, .heic)."""
    suffix = Path(name).suffix.lower()
    unread = suffix in OTHER_PICTURE_EXTENSIONS or (suffix in EXTENSION_FORMATS and not searched_extension(name))
    return suffix if unread else None


@dataclass
class Job:
    source: Path
    relative: Path
    output: Path | None = None
    error: str | None = None


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    rows: list[tuple[Job, str, str]] = field(default_factory=list)  # job, status, detail

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self, verb: str) -> str:
        return f"{verb}: {self.done} done, {self.skipped} skipped, {self.failed} failed"


def is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return False


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file: two paths to one file (a bind mount, a hard link, another
    letter case on a case-insensitive disk) have the same identity and different resolved paths."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: Path, b: Path) -> bool:
    identity = file_identity(a)
    return identity is not None and identity == file_identity(b)


def discover(inputs: list[Path], out_dir: Path, passed_over: list[Path] | None = None) -> list[Job]:
    """Files are taken as given; folders are searched recursively for images, skipping hidden files
    and anything under the output folder. Linked folders are followed once each, after the real ones,
    unless they lead back up to the input folder. An input that is not a regular file (a FIFO, a
    device, a link loop) fails alone, before anything blocks on it. Files in the folders named as
    images of formats the tool does not read go to `passed_over`, so the user can be told."""
    jobs: list[Job] = []
    seen: set[Path] = set()

    def add(source: Path, relative: Path) -> None:
        try:
            st = os.stat(source)
        except FileNotFoundError:
            jobs.append(Job(source, relative, error=f"{source}: no such file or folder"))
            return
        except OSError as exc:
            jobs.append(Job(source, relative, error=f"{source}: cannot read it ({exc.strerror or exc})"))
            return
        resolved = source.resolve()
        if not stat.S_ISREG(st.st_mode):
            jobs.append(Job(source, relative, error=f"{source}: not a regular file"))
        elif resolved not in seen:
            seen.add(resolved)
            jobs.append(Job(source, relative))

    for given in inputs:
        given = Path(given)
        if not given.is_dir():
            add(given, Path(given.name))
            continue
        if same_file(given, out_dir):
            raise UsageError(f"--out {out_dir} is the input folder {given}: its outputs would be inputs of the "
                             "next run; choose another --out")
        # outputs of earlier runs are not inputs when --out sits inside this folder; when --out holds the
        # folder instead, every subfolder is "within" it and must still be searched
        out_inside = is_within(out_dir, given)
        walked: set[tuple[int, int] | None] = set()
        for dirpath, dirnames, filenames in os.walk(given, followlinks=True):
            here = Path(dirpath)
            identity = file_identity(here)
            if identity in walked:  # a linked folder already searched
                dirnames[:] = []
                continue
            walked.add(identity)
            kept = []
            for name in sorted(dirnames, key=lambda d: (os.path.islink(here / d), d)):
                folder = here / name
                if name.startswith(".") or (out_inside and is_within(folder, out_dir)):
                    continue
                if os.path.islink(folder) and is_within(given, folder):
                    jobs.append(Job(folder, folder.relative_to(given), error=f"{folder}: a link to a folder that "
                                    f"holds {given}; give that folder itself to search it"))
                    continue
                kept.append(name)
            dirnames[:] = kept
            for name in sorted(filenames):
                path = here / name
                if name.startswith("."):
                    continue
                if searched_extension(name):
                    add(path, path.relative_to(given))
                elif passed_over is not None and other_image_extension(name):
                    passed_over.append(path)
    return jobs


def assign_outputs(jobs: list[Job], out_dir: Path, suffix: str = ".png") -> None:
    """<stem><suffix> under out_dir, mirroring the input tree. When two inputs would share a name
    (a.png beside a.jpg), the .png input keeps it and the other keeps its extension (a.jpg.png).
    No output ever lands on an input of the run, its own or another's."""
    input_files = {file_identity(j.source) for j in jobs if j.error is None} - {None}
    taken: dict[Path, Path] = {}
    order = sorted((j for j in jobs if j.error is None),
                   key=lambda j: (str(j.relative.parent), j.relative.stem, j.relative.suffix.lower() != ".png",
                                  str(j.relative)))
    for job in order:
        folder = out_dir / job.relative.parent
        candidates = [folder / (job.relative.stem + suffix), folder / (job.relative.name + suffix)]
        if same_file(candidates[0], job.source):
            job.error = f"{job.source}: the output would replace the input; choose another --out"
            continue
        free = [c for c in candidates
                if c not in taken and file_identity(c) not in input_files]
        if not free:
            holder = next((taken[c] for c in candidates if c in taken), None)
            job.error = (f"{job.source}: its output name is already taken by {holder}" if holder else
                         f"{job.source}: its output names are other inputs of this run; choose another --out")
            continue
        taken[free[0]] = job.source
        job.output = free[0]


NEUTRAL_NAME = re.compile(r"^(\d{6,})\.png$")


def mapping_key(path: Path) -> str:
    """Inputs and outputs are named by their resolved paths, so a rerun finds them however they are spelled."""
    return str(Path(path).resolve())


class NameMapping:
    """--mapping: the input -> output names of --rename runs, a JSON object readable by the user alone.

    Names are added as their outputs are written, and saved as the run goes: after a group, unless
    saves would take more than 5% of the run (a large mapping is rewritten whole), and always at its
    end or interruption. Each save merges with the file as it is then, under a lock, so that runs
    sharing the file keep each other's names."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.previous = self._read()
        self.added: dict[str, Path] = {}
        self.next_save = 0.0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--mapping {self.path}: cannot create its folder ({exc.strerror or exc})") from None
        if not os.access(self.path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"--mapping {self.path}: its folder is not writable")

    def _read(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            mapping = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{self.path}: cannot read the existing mapping ({exc}); it is kept as it is, give "
                             "another --mapping") from None
        if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in mapping.items()):
            raise UsageError(f"{self.path}: not a --mapping file (a JSON object of input -> output names); give "
                             "another --mapping")
        return mapping

    def earlier_output(self, source: Path) -> str | None:
        # mappings written before names were resolved hold the input as it was spelled
        return self.previous.get(mapping_key(source), self.previous.get(str(source)))

    def add(self, job: Job) -> None:
        self.added[mapping_key(job.source)] = job.output

    def save_in_time(self) -> None:
        if time.monotonic() >= self.next_save:
            self.save()

    def save(self) -> None:
        if not self.added:
            return
        started = time.monotonic()
        try:
            # a lock file of its own: the mapping is replaced by a rename, which a lock on it would not survive
            with locked(self.path.with_name(f".{self.path.name}.lock"), wait=True):
                mapping = {**self._read(), **{k: mapping_key(v) for k, v in self.added.items()}}
                text = json.dumps(mapping, indent=1, ensure_ascii=False) + "\n"
                try:
                    data = text.encode("utf-8")
                except UnicodeEncodeError:  # a file name that is not UTF-8: escaped, as JSON allows
                    data = (json.dumps(mapping, indent=1) + "\n").encode("ascii")
                # it ties people's file names to the neutral ones: readable by the user alone, as a key file is
                write_atomic(self.path, data, overwrite=True, mode=0o600)
        except (OSError, UsageError) as exc:
            # outputs that no mapping names would be orphans: removed, so that a rerun redoes them
            for output in self.added.values():
                for path in (output, sidecar_path(output)):
                    path.unlink(missing_ok=True)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise RevanonError(f"--mapping {self.path}: cannot write it ({why}); the "
                               f"{len(self.added)} outputs written since it was last saved were removed, so that a "
                               "rerun redoes them") from None
        self.previous, self.added = mapping, {}
        self.next_save = time.monotonic() + 20 * (time.monotonic() - started)


# Where flock is not supported (some network file systems), runs go on without the lock.
_NO_LOCKING = {errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@contextlib.contextmanager
def locked(path: Path, wait: bool):
    """An exclusive flock on path (a folder, or a lock file created 0600), held inside the block.
    BlockingIOError when another process holds it and wait is False."""
    import fcntl

    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:  # BlockingIOError (EAGAIN) is not in _NO_LOCKING: it reaches the caller
            if exc.errno not in _NO_LOCKING:
                raise
        yield
    finally:
        os.close(fd)


def claim_folder(out_dir: Path, stack: contextlib.ExitStack) -> None:
    """An exclusive lock on --out for a --rename run, held until the stack closes: two runs numbering
    the same folder would give out the same numbers."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(locked(out_dir, wait=False))
    except BlockingIOError:
        raise UsageError(f"--out {out_dir}: another --rename run is writing there, and the two would give out the "
                         "same numbers; wait for it to finish, or give another --out") from None
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot open it ({exc.strerror or exc})") from None


def assign_neutral_outputs(jobs: list[Job], out_dir: Path, mapping: NameMapping | None = None) -> None:
    """--rename: 000001.png, 000002.png, ... in input order, flat, so no person's name survives
    in a file or folder name. Numbers continue after those already in out_dir or in the mapping,
    and an input the mapping already names keeps its output (so a rerun skips it)."""
    previous = mapping.previous if mapping is not None else {}
    input_files = {file_identity(j.source) for j in jobs if j.error is None} - {None}
    used = [int(m.group(1)) for m in (NEUTRAL_NAME.match(p.name) for p in out_dir.glob("*.png")) if m] if out_dir.is_dir() else []
    used += [int(m.group(1)) for m in (NEUTRAL_NAME.match(Path(v).name) for v in previous.values()) if m]
    number = max(used, default=0)
    for job in (j for j in jobs if j.error is None):
        earlier = mapping.earlier_output(job.source) if mapping is not None else None
        if earlier is not None and Path(earlier).parent.resolve() == out_dir.resolve():
            job.output = Path(earlier)
        else:
            number += 1
            job.output = out_dir / f"{number:06d}.png"
        if file_identity(job.output) in input_files:
            job.error = f"{job.source}: the output {job.output} would replace an input; choose another --out"


def run_jobs(jobs: list[Job], process: Callable, *, verb: str, overwrite: bool, sidecar: bool,
             console: Console, group_size: int = 1, alone: Callable[[Job], bool] | None = None,
             mapping: NameMapping | None = None, output_state: str | None = None) -> Summary:
    """process(group, step_callback) -> one pipeline.Output, or the exception that stopped it, per job
    of the group, in order. Jobs go to process in groups of up to group_size (an engine's batch), after
    those whose outputs exist are skipped; a job for which alone(job) is true (a whole photo) goes by
    itself, so a group never holds more than one large image. Writes each output atomically, and
    records it in the mapping.

    Ctrl-C, SIGTERM and SIGHUP stop the run at the next step or output, never between an output and
    its mapping entry: the summary so far is printed, the mapping saved, and the process then ends as
    the signal would have ended it.

    With output_state ("anonymized", "recovered"), a file already at an output's place is skipped or
    replaced only when its metadata records that state: anything else there (a user's original, say)
    fails that input instead."""
    summary = Summary()
    with _Interrupts().installed() as interrupts:
        try:
            with progress_bars(console) as progress:
                images = progress.add_task(verb, total=len(jobs))
                steps = progress.add_task("steps", total=1, visible=False)

                def on_step(phase: str, index: int, count: int) -> None:
                    interrupts.check()
                    progress.update(steps, description=f"  {phase}", completed=index + 1, total=count,
                                    visible=True)

                def process_group(group: list[Job]) -> None:
                    more = f" and {len(group) - 1} more" if len(group) > 1 else ""
                    progress.update(images, description=escape(one_line(f"{verb} {group[0].relative}{more}")))
                    try:
                        results = process(group, on_step)
                    except Exception as exc:  # noqa: BLE001 - process failed as a whole: every job of it failed
                        results = [exc] * len(group)
                    for job, result in zip(group, results):
                        if _finish_one(job, result, overwrite, sidecar, summary, console) and mapping is not None:
                            mapping.add(job)
                    if mapping is not None:
                        mapping.save_in_time()
                    progress.update(steps, visible=False)
                    progress.advance(images, len(group))
                    interrupts.check()

                group: list[Job] = []
                for job in jobs:
                    if not _ready(job, overwrite, sidecar, summary, console, output_state):
                        progress.advance(images)
                    elif alone is not None and alone(job):
                        process_group([job])
                    else:
                        group.append(job)
                        if len(group) == group_size:
                            process_group(group)
                            group = []
                if group:
                    process_group(group)
        except _Interrupted:
            console.print(f"interrupted after {summary.done} done, {summary.skipped} skipped, {summary.failed} "
                          "failed; a rerun skips the outputs already written", highlight=False)
        finally:
            if mapping is not None:
                mapping.save()
        if len(jobs) > 1:  # before an interruption ends the process: what finished, input by input
            order = {id(job): n for n, job in enumerate(jobs)}
            summary.rows.sort(key=lambda row: order[id(row[0])])
            _print_table(summary, console)
        interrupts.end_as_received()
    return summary


class _Interrupted(BaseException):
    """Raised at a step or between groups once a stopping signal arrived; not an Exception, so that the
    handlers that fail one input alone let it through."""


class _Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) are noted when they arrive, and check() stops the
    run at the next step or group, where nothing is half written. A second Ctrl-C stops it at once."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.received: list[int] = []

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # only it may set handlers
            yield self
            return
        # a signal ignored on purpose (nohup, a background job) stays ignored
        before = {s: signal.signal(s, self._note) for s in self.SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)

    def _note(self, signum, frame) -> None:
        self.received.append(signum)
        if self.received.count(signal.SIGINT) > 1:  # Ctrl-C again: at once, whatever it is doing
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.received:
            raise _Interrupted

    def end_as_received(self) -> None:
        """End the process as the signal would have ended it, so that callers see how it stopped."""
        if self.received:
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(self.received[0], signal.SIG_DFL)
            os.kill(os.getpid(), self.received[0])
            raise KeyboardInterrupt  # where the signal does not end the process (pid 1 of a container)


def one_at_a_time(process_one: Callable) -> Callable:
    """A run_jobs process from a function of one job: process_one(job, step_callback) -> Output."""
    def process(group: list[Job], on_step) -> list:
        results = []
        for job in group:
            try:
                results.append(process_one(job, on_step))
            except Exception as exc:  # noqa: BLE001 - run_jobs reports it against this job
                results.append(exc)
        return results
    return process


def load_then_process(load: Callable, process_loaded: Callable) -> Callable:
    """A run_jobs process in two steps: load(job) -> item for each job of the group (an error there fails
    that job alone), then process_loaded(items, step_callback) -> one result per item, for the whole
    group at once."""
    def process(group: list[Job], on_step) -> list:
        results: list = [None] * len(group)
        loaded = []
        for i, job in enumerate(group):
            try:
                loaded.append((i, load(job)))
            except Exception as exc:  # noqa: BLE001 - run_jobs reports it against this job
                results[i] = exc
        if loaded:
            for (i, _), result in zip(loaded, process_loaded([item for _, item in loaded], on_step)):
                results[i] = result
        return results
    return process


# The end-of-run table lists every input up to this many; beyond, the inputs not done, up to as many again.
# rich builds a table whole: a million rows would take gigabytes and minutes to print.
TABLE_ROWS = 500


def _print_table(summary: Summary, console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    rows, left_out = summary.rows, []
    if len(rows) > TABLE_ROWS:
        not_done = [row for row in rows if row[1] != "done"]
        rows, done = not_done[:TABLE_ROWS], len(summary.rows) - len(not_done)
        left_out = [f"{done} done"] if done else []
        if len(not_done) > TABLE_ROWS:
            left_out.append(f"{len(not_done) - TABLE_ROWS} more skipped or failed (each reported above)")
    table = Table(show_edge=False)
    for column in ("input", "result", "detail"):
        table.add_column(column)
    for job, status, detail in rows:
        style = {"failed": "red", "skipped": "yellow"}.get(status, "")
        table.add_row(Text(one_line(str(job.relative))), Text(status, style=style), Text(one_line(detail)))
    if rows:
        console.print(table)
    if left_out:
        console.print(f"not listed one by one, as over {TABLE_ROWS} inputs: {', '.join(left_out)}", highlight=False)


def _fail(job: Job, message: str, summary: Summary, console: Console) -> None:
    message = one_line(message)
    summary.failed += 1
    summary.rows.append((job, "failed", message.split(": ", 1)[-1]))
    console.print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)


# Most file systems allow 255 bytes in one name.
NAME_MAX = 255


def recorded_state(path: Path) -> str | None:
    """The state an existing file's revanon metadata records, or None for any other file."""
    from .container import read_metadata, recorded

    try:
        return recorded(read_metadata(path), "state")
    except (OSError, RevanonError):
        return None


def _ready(job: Job, overwrite: bool, sidecar: bool, summary: Summary, console: Console,
           output_state: str | None = None) -> bool:
    """Whether the job is to be processed: not failed already, and its outputs free (or --overwrite)."""
    if job.error:
        _fail(job, job.error, summary, console)
        return False
    targets = [job.output] + ([sidecar_path(job.output)] if sidecar else [])
    long = next((t for t in targets if len(os.fsencode(t.name)) > NAME_MAX), None)
    if long is not None:
        _fail(job, f"{job.source}: the output name {long.name} is over the file system's {NAME_MAX} bytes; "
                   "rename the input or use --rename", summary, console)
        return False
    present = [os.path.lexists(t) for t in targets]  # a dangling link counts: writes never follow one
    if present[0] and output_state is not None and recorded_state(job.output) != output_state:
        article = "an" if output_state[0] in "aeiou" else "a"
        _fail(job, f"{job.source}: {job.output} exists and is not {article} {output_state} image made by revanon-rt, "
                   "so it is neither skipped nor replaced; choose another --out", summary, console)
        return False
    if not overwrite and all(present):
        summary.skipped += 1
        summary.rows.append((job, "skipped", f"{job.output} exists"))
        console.print(escape(one_line(f"skipped: {job.output} exists (use --overwrite)")), highlight=False,
                      soft_wrap=True)
        return False
    if not overwrite and any(present):
        there, missing = (targets[0], targets[1]) if present[0] else (targets[1], targets[0])
        why = ("an earlier run without --sidecar, or one that was interrupted" if present[0]
               else "the rest of an interrupted run")
        _fail(job, f"{job.source}: {there} exists without {missing.name} ({why}); remove it and run again, or "
                   "use --overwrite", summary, console)
        return False
    if overwrite and same_file(job.output, job.source):
        _fail(job, f"{job.source}: the output {job.output} is the input itself; choose another --out", summary, console)
        return False
    return True


def _finish_one(job: Job, result, overwrite: bool, sidecar: bool, summary: Summary, console: Console) -> bool:
    """Write one job's output (and sidecar); whether it was written."""
    if isinstance(result, Exception):
        _fail(job, _message(job, result), summary, console)
        return False
    try:
        for note in result.warnings:
            console.print(f"[yellow]warning[/yellow]: {escape(one_line(note))}", highlight=False, soft_wrap=True)
        mode = output_mode(result.header)
        if not write_atomic(job.output, result.png_bytes() if result.header else _plain_png(result), overwrite,
                            mode=mode):
            summary.skipped += 1
            summary.rows.append((job, "skipped", f"{job.output} appeared meanwhile"))
            return False
        problem = _write_sidecar(job, result, overwrite, mode) if sidecar else None
        if problem:
            _fail(job, problem, summary, console)
            return False
    except OSError as exc:
        _fail(job, f"{job.output}: cannot write it ({exc.strerror or exc})", summary, console)
        return False
    except Exception as exc:  # noqa: BLE001 - as for the transform: this output failed, the others go on
        _fail(job, _message(job, exc), summary, console)
        return False
    summary.done += 1
    summary.rows.append((job, "done", result.detail))
    return True


def _write_sidecar(job: Job, result, overwrite: bool, mode: int) -> str | None:
    """The sidecar of an output just written, or why not; the output is then removed, so that a rerun
    finds neither and redoes it."""
    path = sidecar_path(job.output)
    try:
        problem = None if write_atomic(path, result.header_text().encode("utf-8"), overwrite, mode=mode) else \
            "appeared meanwhile"
    except OSError as exc:
        problem = f"cannot write it ({exc.strerror or exc})"
    if problem is None:
        return None
    job.output.unlink(missing_ok=True)
    return f"{path}: {problem}; {job.output} was not kept"


def output_mode(header: dict | None) -> int:
    """Only anonymized images are meant to be shared. Recovered images, and --dry-run's drawings (the
    original photo with boxes), show the real faces, so only their owner may read them, as with --mapping."""
    return 0o644 if header and header.get("state") == "anonymized" else 0o600


def _message(job: Job, exc: Exception) -> str:
    if isinstance(exc, RevanonError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{job.source}: out of memory"
    if os.environ.get("REVANON_DEBUG"):  # a bug must not cost the user the rest of the batch
        if hasattr(exc, "traceback_text"):  # kept as text where a result list held the error (errors.detached)
            sys.stderr.write(exc.traceback_text)
        else:
            traceback.print_exception(exc)
    return f"{job.source}: internal error ({type(exc).__name__}: {exc}); set REVANON_DEBUG=1 for a traceback"


def _plain_png(result) -> bytes:
    """Outputs without revanon metadata (the --dry-run drawings)."""
    from .images import encode_png

    return encode_png(result.image.rgb, result.image.alpha, None, {})


def progress_bars(console: Console) -> Progress:
    """Bars on a terminal, gone when the run ends; nothing where the output is a file or a pipe."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


class ProgressLines:
    """Progress as plain lines: one when a phase starts or ends, and at most one a minute in between."""

    def __init__(self, write, every_seconds: float = 60.0):
        self._clock, self._write, self._every = time.monotonic, write, every_seconds
        self._started = self._last = self._clock()
        self._phase, self._done = None, 0

    def __call__(self, phase: str, n: int) -> None:
        if phase != self._phase:
            if self._phase is not None:
                self._line("done")
            self._phase, self._done = phase, 0
            self._line("started")
        self._done += n
        if self._clock() - self._last >= self._every:
            self._line("")

    def finish(self) -> None:
        if self._phase is not None:
            self._line("done")

    def _line(self, what: str) -> None:
        self._last = self._clock()
        self._write(f"[{self._last - self._started:7.0f} s] {self._phase}: {self._done} {what}".rstrip())
