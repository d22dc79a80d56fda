"""Many inputs, one run: discovery, output names (spec §9), progress, atomic writes, a summary.

One bad input never stops the others, inputs are never modified, and an existing output
is never replaced without --overwrite.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .container import sidecar_path
from .errors import RevanonError, UsageError
from .images import write_atomic

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


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
    failures: list[str] = field(default_factory=list)
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
    except ValueError:
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


def discover(inputs: list[Path], out_dir: Path) -> list[Job]:
    """Files are taken as given; folders are searched recursively for images, skipping hidden
    files and anything under the output folder."""
    jobs: list[Job] = []
    seen: set[Path] = set()

    def add(source: Path, relative: Path) -> None:
        key = source.resolve()
        if key not in seen:
            seen.add(key)
            jobs.append(Job(source, relative))

    for given in inputs:
        given = Path(given)
        if given.is_dir():
            for dirpath, dirnames, filenames in os.walk(given):
                here = Path(dirpath)
                dirnames[:] = sorted(d for d in dirnames
                                     if not d.startswith(".") and not is_within(here / d, out_dir))
                for name in sorted(filenames):
                    path = here / name
                    if not name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                        add(path, path.relative_to(given))
        elif given.exists():
            add(given, Path(given.name))
        else:
            jobs.append(Job(given, Path(given.name), error=f"{given}: no such file or folder"))
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


def read_mapping(path: Path | None) -> dict[str, str]:
    """The input -> output names of earlier --rename runs into the same mapping file."""
    import json

    if path is None or not path.exists():
        return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the existing mapping ({exc}); it is kept as it is, give another "
                         "--mapping") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise UsageError(f"{path}: not a --mapping file (a JSON object of input -> output names); give another --mapping")
    return mapping


def assign_neutral_outputs(jobs: list[Job], out_dir: Path, previous: dict[str, str] | None = None) -> None:
    """--rename: 000001.png, 000002.png, ... in input order, flat, so no person's name survives
    in a file or folder name. Numbers continue after those already in out_dir or in the mapping,
    and an input the mapping already names keeps its output (so a rerun skips it)."""
    previous = previous or {}
    input_files = {file_identity(j.source) for j in jobs if j.error is None} - {None}
    used = [int(m.group(1)) for m in (NEUTRAL_NAME.match(p.name) for p in out_dir.glob("*.png")) if m] if out_dir.is_dir() else []
    used += [int(m.group(1)) for m in (NEUTRAL_NAME.match(Path(v).name) for v in previous.values()) if m]
    number = max(used, default=0)
    for job in (j for j in jobs if j.error is None):
        earlier = previous.get(str(job.source))
        if earlier is not None and Path(earlier).parent.resolve() == out_dir.resolve():
            job.output = Path(earlier)
            continue
        number += 1
        job.output = out_dir / f"{number:06d}.png"
        if file_identity(job.output) in input_files:
            job.error = f"{job.source}: the output {job.output} would replace an input; choose another --out"


def write_mapping(jobs: list[Job], path: Path, previous: dict[str, str] | None = None) -> None:
    """The input -> output names of a --rename run, added to the earlier runs' names and written only
    where the user asked."""
    import json

    mapping = dict(previous or {})
    mapping.update({str(j.source): str(j.output) for j in jobs if j.output is not None and j.output.exists()})
    # it ties people's file names to the neutral ones: readable by the user alone, as a key file is
    write_atomic(path, (json.dumps(mapping, indent=1, ensure_ascii=False) + "\n").encode("utf-8"), overwrite=True,
                 mode=0o600)


def run_jobs(jobs: list[Job], process: Callable, *, verb: str, overwrite: bool, sidecar: bool,
             console: Console, group_size: int = 1, alone: Callable[[Job], bool] | None = None) -> Summary:
    """process(group, step_callback) -> one pipeline.Output, or the exception that stopped it, per job
    of the group, in order. Jobs go to process in groups of up to group_size (an engine's batch), after
    those whose outputs exist are skipped; a job for which alone(job) is true (a whole photo) goes by
    itself, so a group never holds more than one large image. Writes each output atomically."""
    summary = Summary()
    show = console.is_terminal
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, disable=not show) as progress:
        images = progress.add_task(verb, total=len(jobs))
        steps = progress.add_task("steps", total=1, visible=False)

        def on_step(phase: str, index: int, count: int) -> None:
            progress.update(steps, description=f"  {phase}", completed=index + 1, total=count, visible=True)

        def process_group(group: list[Job]) -> None:
            more = f" and {len(group) - 1} more" if len(group) > 1 else ""
            progress.update(images, description=f"{verb} {group[0].relative}{more}")
            try:
                results = process(group, on_step)
            except Exception as exc:  # noqa: BLE001 - process failed as a whole: every job of the group failed
                results = [exc] * len(group)
            for job, result in zip(group, results):
                _finish_one(job, result, overwrite, sidecar, summary, console)
            progress.update(steps, visible=False)
            progress.advance(images, len(group))

        group: list[Job] = []
        for job in jobs:
            if not _ready(job, overwrite, sidecar, summary, console):
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
    if len(jobs) > 1:
        order = {id(job): n for n, job in enumerate(jobs)}
        summary.rows.sort(key=lambda row: order[id(row[0])])
        _print_table(summary, console)
    return summary


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


def _print_table(summary: Summary, console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False)
    for column in ("input", "result", "detail"):
        table.add_column(column)
    for job, status, detail in summary.rows:
        source = str(job.relative)
        style = {"failed": "red", "skipped": "yellow"}.get(status, "")
        table.add_row(Text(source), Text(status, style=style), Text(detail))
    console.print(table)


def _fail(job: Job, message: str, summary: Summary, console: Console) -> None:
    summary.failed += 1
    summary.failures.append(message)
    summary.rows.append((job, "failed", message.split(": ", 1)[-1]))
    console.print(f"[red]error[/red]: {escape(message)}", highlight=False, soft_wrap=True)


def _ready(job: Job, overwrite: bool, sidecar: bool, summary: Summary, console: Console) -> bool:
    """Whether the job is to be processed: not failed already, and its outputs free (or --overwrite)."""
    if job.error:
        _fail(job, job.error, summary, console)
        return False
    targets = [job.output] + ([sidecar_path(job.output)] if sidecar else [])
    if not overwrite and any(t.exists() for t in targets):
        summary.skipped += 1
        summary.rows.append((job, "skipped", f"{job.output} exists"))
        console.print(escape(f"skipped: {job.output} exists (use --overwrite)"), highlight=False, soft_wrap=True)
        return False
    if overwrite and same_file(job.output, job.source):
        _fail(job, f"{job.source}: the output {job.output} is the input itself; choose another --out", summary, console)
        return False
    return True


def _finish_one(job: Job, result, overwrite: bool, sidecar: bool, summary: Summary, console: Console) -> None:
    if isinstance(result, Exception):
        return _fail(job, _message(job, result), summary, console)
    try:
        for note in result.warnings:
            console.print(f"[yellow]warning[/yellow]: {escape(note)}", highlight=False, soft_wrap=True)
        mode = output_mode(result.header)
        if not write_atomic(job.output, result.png_bytes() if result.header else _plain_png(result), overwrite,
                            mode=mode):
            summary.skipped += 1
            summary.rows.append((job, "skipped", f"{job.output} appeared meanwhile"))
            return
        if sidecar:
            write_atomic(sidecar_path(job.output), result.header_text().encode("utf-8"), overwrite, mode=mode)
    except OSError as exc:
        return _fail(job, f"{job.output}: cannot write it ({exc.strerror or exc})", summary, console)
    except Exception as exc:  # noqa: BLE001 - as for the transform: this output failed, the others go on
        return _fail(job, _message(job, exc), summary, console)
    summary.done += 1
    summary.rows.append((job, "done", result.detail))


def output_mode(header: dict | None) -> int:
    """Recovered images show the real faces again, so only their owner may read them, as with --mapping."""
    return 0o600 if header and header.get("state") == "recovered" else 0o644


def _message(job: Job, exc: Exception) -> str:
    if isinstance(exc, RevanonError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return f"{job.source}: out of memory"
    if os.environ.get("REVANON_DEBUG"):  # a bug must not cost the user the rest of the batch
        traceback.print_exception(exc)
    return f"{job.source}: internal error ({type(exc).__name__}: {exc}); set REVANON_DEBUG=1 for a traceback"


def _plain_png(result) -> bytes:
    """Outputs without revanon metadata (the --dry-run drawings)."""
    from .images import encode_png

    return encode_png(result.image.rgb, result.image.alpha, None, {})


class ProgressLines:
    """Progress as plain lines: one when a phase starts or ends, and at most one a minute in between."""

    def __init__(self, write, every_seconds: float = 60.0):
        import time

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
