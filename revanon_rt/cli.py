"""The revanon-rt command line: thin Typer commands over the library.

Nothing here imports torch at module level: `run --engine` must work on a box without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .api import check_device_name, masker_for, open_backend, resolve_device
from .errors import RevanonError, UsageError, one_line, torch_extra_error
from .schedule import DEFAULT_STEPS, MAX_STEPS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Key-reversible face anonymization with latent diffusion models (revanon v1).")
run_app = typer.Typer(no_args_is_help=True, help="Anonymize or recover images.")
app.add_typer(run_app, name="run")
err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """Print a message that may hold file names or metadata values, which rich must not read as markup."""
    err.print(message, markup=False)


class MaskerName(str, Enum):
    bisenet = "bisenet"
    landmarks = "landmarks"
    file = "file"


class Mode(str, Enum):
    crop = "crop"
    photo = "photo"


class FacesChoice(str, Enum):
    all = "all"
    largest = "largest"


class OutputFormat(str, Enum):
    png = "png"
    jpeg = "jpeg"


def _fail(exc: RevanonError) -> None:
    err.print(f"[red]error[/red]: {escape(one_line(str(exc)))}")
    raise typer.Exit(exc.exit_code)


def _secret(key: Optional[Path], password_file: Optional[Path]):
    """The secret of --key or --password-file, or None where it is to be typed: _typed_secret asks for it
    once every other flag, the inputs and the model have been checked, so that a mistake there costs no typing."""
    from .keys import Secret, exposure_warning, read_key_file, read_password_file

    if key and password_file:
        raise UsageError("give either --key or --password-file, not both")
    for path in (key, password_file):
        if path is not None and (warning := exposure_warning(path)):
            err.print(f"[yellow]warning[/yellow]: {escape(warning)}")
    if key:
        return Secret.from_key(read_key_file(key))
    if password_file:
        return Secret.from_password(read_password_file(password_file))
    if not sys.stdin.isatty():
        raise UsageError("no key: give --key KEYFILE (make one with `revanon-rt keygen`) or --password-file FILE")
    return None


def _typed_secret(secret, confirm: bool):
    from .keys import Secret

    if secret is not None:
        return secret
    password = typer.prompt("Password", hide_input=True, confirmation_prompt=confirm)
    if not password:
        raise UsageError("the password is empty")
    return Secret.from_password(password)


def _masker_name(masker: Optional[MaskerName], mask: Optional[Path], parser: Optional[Path],
                 engine: Optional[Path], mode: "Mode" = None, landmarks: int = 5) -> MaskerName:
    """Checked before any model is loaded, so that a flag mistake costs nothing."""
    if masker is None:
        masker = MaskerName.file if mask else MaskerName.bisenet
    if landmarks != 5 and masker != MaskerName.landmarks:
        raise UsageError(f"--landmarks {landmarks} chooses the landmarks masker's model; it goes with "
                         f"--masker landmarks, not {masker.value}")
    if masker == MaskerName.file and mask is None:
        raise UsageError("--masker file needs --mask MASK_IMAGE_OR_DIR")
    if masker != MaskerName.file and mask is not None:
        raise UsageError(f"--mask gives masks from files; it does not go with --masker {masker.value}")
    if masker == MaskerName.file and mode == Mode.photo:
        raise UsageError("in photo mode masks come from --masker bisenet or --masker landmarks")
    if masker == MaskerName.bisenet and parser is None and engine is None:
        raise UsageError("the bisenet masker needs --parser BISENET.pth (facexlib's parsing_bisenet.pth); "
                         "without it use --masker landmarks, or give masks with --mask")
    return masker


def _landmarks_note(landmarks: int) -> None:
    from .faces import LICENSE_68

    if landmarks == 68:
        err.print(f"[yellow]note[/yellow]: {LICENSE_68}")


def _choose_masker(backend, masker: MaskerName, mask: Optional[Path], landmarks: int = 5):
    from .masks import FileMasker

    if masker == MaskerName.file:
        return FileMasker(mask)
    if masker == MaskerName.landmarks:
        _landmarks_note(landmarks)
    return masker_for(backend, masker.value, landmarks)


def _recompute_maskers(backend, mask: Optional[Path], landmarks: int) -> dict:
    from .masks import BiSeNetMasker, FileMasker

    maskers = {}
    if mask is not None:
        maskers["file"] = FileMasker(mask)
    if backend.can_parse:
        maskers["bisenet"] = BiSeNetMasker(backend)
    try:
        maskers["landmarks"] = masker_for(backend, "landmarks", landmarks)
        _landmarks_note(landmarks)
    except RevanonError:
        pass  # dlib not installed: only an image recorded with that masker will say so
    return maskers


def _prepare(inputs: List[Path], out: Path, rename: bool = False, mapping: Optional[Path] = None,
             suffix: str = ".png"):
    """The jobs with their outputs, and the --mapping file. --out is checked before any input is
    processed; a --rename run holds it until the process ends."""
    from .batch import IMAGE_EXTENSIONS, NameMapping, assign_neutral_outputs, assign_outputs, claim_folder, discover

    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: is a file; give the folder the outputs go to")
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc.strerror or exc}") from None
    passed_over: list[Path] = []
    jobs = discover(inputs, out, passed_over)
    if passed_over:
        kinds = ", ".join(sorted({p.suffix.lower() for p in passed_over}))
        err.print(f"[yellow]note[/yellow]: passed over {len(passed_over)} file(s) in the input folders of formats "
                  f"this tool does not read ({escape(kinds)}), such as {escape(one_line(str(passed_over[0])))}; "
                  "convert them to PNG to include them")
    if not jobs:
        raise UsageError("no input images found (folders are searched for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    if mapping is not None and not rename:
        raise UsageError("--mapping records the names --rename gives; it needs --rename")
    names = NameMapping(mapping) if mapping is not None else None
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # before any work that could not be written
        raise UsageError(f"--out {out}: {existing} is not writable")
    if rename:
        claim_folder(out, _held_folders)
        assign_neutral_outputs(jobs, out, names)
    else:
        assign_outputs(jobs, out, suffix=suffix)
    return jobs, names


_held_folders = contextlib.ExitStack()  # a --rename run's lock on --out, released when it finishes


def _finish(summary, verb: str) -> None:
    _held_folders.close()
    say(summary.line(verb))
    raise typer.Exit(summary.exit_code)


INPUTS = typer.Argument(..., help="Images or folders (searched recursively).", show_default=False)
OUT = typer.Option(..., "--out", help="Output folder; outputs mirror the input tree as <stem>.png.")
MODEL = typer.Option(None, "--model", help="A diffusers model folder (PyTorch reference backend).")
ENGINE = typer.Option(None, "--engine", help="A folder made by `revanon-rt build`.")
KEY = typer.Option(None, "--key", help="A key file made by `revanon-rt keygen`.")
PASSWORD_FILE = typer.Option(None, "--password-file", help="A file holding a password (one trailing newline is dropped).")
PARSER = typer.Option(None, "--parser", help="facexlib BiSeNet weights (parsing_bisenet.pth).")
MASK = typer.Option(None, "--mask", help="A mask image (white = face), or a folder of masks mirroring the inputs.")
MASKER = typer.Option(None, "--masker", help="bisenet (default), or file when --mask is given.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace outputs that already exist.")
FORCE = typer.Option(False, "--force", help="Allow a double run (anonymizing an anonymized image, and so on). An "
                     "image records one anonymization: a second one's record replaces the first's, so only the "
                     "second can be undone.")
MODE = typer.Option(Mode.crop, "--mode", help="crop: aligned face crops of the model's size; photo: any photo, "
                    "every face found, aligned and pasted back.")


def _landmark_count(value: int) -> int:
    if value not in (5, 68):
        raise typer.BadParameter(f"{value}: dlib's landmark models have 5 or 68 points")
    return value


LANDMARKS = typer.Option(5, "--landmarks", callback=_landmark_count,
                         help="landmarks masker: 5 (dlib, CC0) or 68 (iBUG 300-W: non-commercial).")
RENAME = typer.Option(False, "--rename", help="Write outputs under neutral names (000001.png, ...): file names often "
                      "carry people's names.")
MAPPING = typer.Option(None, "--mapping", help="With --rename: where to write the input -> output name mapping (JSON).")


@run_app.command("anonymize")
def anonymize_cmd(
    inputs: List[Path] = INPUTS, out: Path = OUT, model: Optional[Path] = MODEL, engine: Optional[Path] = ENGINE,
    masker: Optional[MaskerName] = MASKER, parser: Optional[Path] = PARSER, mask: Optional[Path] = MASK,
    key: Optional[Path] = KEY, password_file: Optional[Path] = PASSWORD_FILE,
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS, help="DDIM steps each way."),
    device: str = DEVICE, mode: Mode = MODE,
    insecure_key_reuse: bool = typer.Option(False, "--insecure-key-reuse",
                                            help="The paper's behaviour: one flip pattern for every face. Unsafe."),
    sidecar: bool = typer.Option(False, "--sidecar", help="Also write <output>.revanon.json."),
    overwrite: bool = OVERWRITE, force: bool = FORCE, landmarks: int = LANDMARKS,
    faces: FacesChoice = typer.Option(FacesChoice.all, "--faces", help="photo mode: every face, or the largest."),
    min_face: int = typer.Option(0, "--min-face", min=0, help="photo mode: ignore faces smaller than this (pixels)."),
    skip: str = typer.Option("", "--skip", help="photo mode: face numbers to leave alone, as --dry-run draws them, from 0 (0,2)."),
    detector: str = typer.Option("hog", "--detector", help="photo mode: dlib's hog (fast) or cnn (better) detector."),
    dry_run: bool = typer.Option(False, "--dry-run", help="photo mode: write <stem>.faces.png with the numbered faces "
                                 "and nothing else."),
    rename: bool = RENAME, mapping: Optional[Path] = MAPPING,
    output_format: OutputFormat = typer.Option(OutputFormat.png, "--output-format", help="png (the only lossless choice)."),
    allow_no_faces: bool = typer.Option(False, "--allow-no-faces",
                                        help="photo mode: write a photo with no face found or selected unchanged "
                                             "(with its record) instead of failing it."),
) -> None:
    """Anonymize faces with a secret key: aligned crops, or every face of a photo with --mode photo."""
    from . import container
    from .batch import load_then_process, one_at_a_time, run_jobs
    from .images import load_image
    from .pipeline import Crop, Options, anonymize_crops

    try:
        if output_format == OutputFormat.jpeg:
            raise UsageError("outputs are always PNG: recovery needs every pixel exactly as written, and JPEG's "
                             "lossy compression would destroy the keyed pattern and fail the auth check")
        selection = _selection(faces, min_face, skip, mode, dry_run, allow_no_faces, detector)
        if dry_run:
            if rename or mapping is not None:
                raise UsageError("--dry-run draws the numbered faces under the inputs' own names and records no "
                                 "mapping; --rename and --mapping go with the run that anonymizes")
            _finish(_dry_run(inputs, out, selection, detector, overwrite), "dry run")
        secret = _secret(key, password_file)
        jobs, names = _prepare(inputs, out, rename, mapping)
        masker_name = _masker_name(masker, mask, parser, engine, mode, landmarks)
        if mode == Mode.photo and masker_name == MaskerName.landmarks:
            from .photo import require_five_landmarks

            require_five_landmarks(landmarks)
        backend = open_backend(model, engine, device, parser)
        chosen = _choose_masker(backend, masker_name, mask, landmarks)
        face_finder = _detector(detector) if mode == Mode.photo else None
        secret = _typed_secret(secret, confirm=True)
        secret.for_anonymize()  # one salt for the whole run; pays for scrypt once, up front
    except RevanonError as exc:
        _fail(exc)
    if insecure_key_reuse:
        err.print("[bold red]WARNING: --insecure-key-reuse[/bold red]: every face is flipped with the same "
                  "pattern. Anyone holding one original/anonymized pair made with this key, or perhaps just many "
                  "anonymized images, can undo every image made with it.")
    opts = Options(steps=steps, insecure_key_reuse=insecure_key_reuse, force=force)

    if mode == Mode.photo:
        from .photo import anonymize_photo

        def anonymize_one(job, on_step):
            return anonymize_photo(load_image(job.source), container.read_metadata(job.source), backend, chosen,
                                   secret, opts, job.relative, detector=face_finder, selection=selection,
                                   callback=on_step, allow_no_faces=allow_no_faces)

        process, group_size = one_at_a_time(anonymize_one), 1
    else:
        def load(job):
            return Crop(load_image(job.source, crop_size=backend.image_size), container.read_metadata(job.source),
                        job.relative)

        def anonymize_group(crops, on_step):
            return anonymize_crops(crops, backend, chosen, secret, opts, callback=on_step)

        # an engine built for a batch of faces gets full batches: the crops of several inputs go together
        process, group_size = load_then_process(load, anonymize_group), backend.batch

    try:
        summary = run_jobs(jobs, process, verb="anonymize", overwrite=overwrite, sidecar=sidecar, console=err,
                           group_size=group_size, mapping=names, output_state="anonymized")
    except RevanonError as exc:
        _fail(exc)
    _finish(summary, "anonymize")


def _selection(faces: "FacesChoice", min_face: int, skip: str, mode: "Mode", dry_run: bool,
               allow_no_faces: bool = False, detector: str = "hog"):
    from .faces import DETECTORS
    from .photo import Selection

    photo_flags = faces != FacesChoice.all or min_face or skip or dry_run or allow_no_faces or detector != "hog"
    if photo_flags and mode != Mode.photo:
        raise UsageError("--faces, --min-face, --skip, --detector, --dry-run and --allow-no-faces work in photo mode: "
                         "add --mode photo")
    if detector not in DETECTORS:
        raise UsageError(f"--detector {detector}: choose {' or '.join(DETECTORS)}")
    try:
        numbers = tuple(int(v) for v in skip.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--skip takes face numbers separated by commas, not {skip!r}") from None
    if any(n < 0 for n in numbers):
        raise UsageError(f"--skip {skip}: faces are numbered from 0, as --dry-run draws them")
    return Selection(faces.value, min_face, numbers)


def _detector(kind: str):
    from .faces import DlibFaces

    return DlibFaces(detector=kind)


def _dry_run(inputs: List[Path], out: Path, selection, detector: str, overwrite: bool):
    """Detect and draw, nothing else: no key, no model."""
    from .batch import one_at_a_time, run_jobs
    from .images import LoadedImage, load_image
    from .photo import describe_faces, draw_faces
    from .pipeline import Output

    jobs, _ = _prepare(inputs, out, suffix=".faces.png")
    finder = _detector(detector)

    def process(job, on_step):
        image = load_image(job.source)
        found = finder.detect(image.rgb)
        drawn = draw_faces(image.rgb, found, selection)
        say(one_line(f"{job.source}: {describe_faces(found, selection)}"))  # the numbers --skip takes
        return Output(LoadedImage(job.source, drawn, None, None), {}, detail=f"{len(found)} face(s)")

    return run_jobs(jobs, one_at_a_time(process), verb="detect", overwrite=overwrite, sidecar=False, console=err)


@run_app.command("deanonymize")
def deanonymize_cmd(
    inputs: List[Path] = INPUTS, out: Path = OUT, model: Optional[Path] = MODEL, engine: Optional[Path] = ENGINE,
    key: Optional[Path] = KEY, password_file: Optional[Path] = PASSWORD_FILE,
    meta: Optional[Path] = typer.Option(None, "--meta", help="Metadata JSON for an image whose PNG chunk was stripped."),
    recompute_mask: bool = typer.Option(False, "--recompute-mask", help="Re-run the masker named in the metadata."),
    masker: Optional[MaskerName] = typer.Option(None, "--masker", help="With --recompute-mask: the masker you "
                                                "expect the metadata to name (it decides; this only checks)."),
    parser: Optional[Path] = PARSER, mask: Optional[Path] = MASK,
    skip_auth: bool = typer.Option(False, "--skip-auth", help="Run even when the auth check fails. Output is marked unverified."),
    ignore_model_mismatch: bool = typer.Option(False, "--ignore-model-mismatch", help="Run with a model other than the one recorded."),
    device: str = DEVICE,
    sidecar: bool = typer.Option(False, "--sidecar", help="Also write <output>.revanon.json."),
    overwrite: bool = OVERWRITE, force: bool = FORCE, landmarks: int = LANDMARKS,
    rename: bool = RENAME, mapping: Optional[Path] = MAPPING,
) -> None:
    """Recover the original faces with the key that anonymized them (crop or photo mode, as recorded)."""
    from . import container
    from .batch import load_then_process, run_jobs
    from .errors import MetadataError
    from .images import load_image
    from .pipeline import Crop, Options, deanonymize_crops, recovery_crop_size

    try:
        secret = _secret(key, password_file)
        jobs, names = _prepare(inputs, out, rename, mapping)
        if meta is not None and len(jobs) != 1:
            raise UsageError("--meta goes with exactly one input image")
        if meta is not None and not meta.is_file():
            raise UsageError(f"--meta {meta}: no such file")
        if (masker is not None or mask is not None or parser is not None or landmarks != 5) and not recompute_mask:
            raise UsageError("--masker, --mask, --parser and --landmarks only matter with --recompute-mask; the "
                             "stored mask is used otherwise")
        backend = open_backend(model, engine, device, parser)
        maskers = _recompute_maskers(backend, mask, landmarks) if recompute_mask else {}
        if masker is not None:
            # the metadata names the masker; --masker only says which one the user expects
            maskers = {name: m for name, m in maskers.items() if name == masker.value}
        secret = _typed_secret(secret, confirm=False)
    except RevanonError as exc:
        _fail(exc)
    if skip_auth:
        err.print("[bold yellow]WARNING: --skip-auth[/bold yellow]: a wrong key or an edited image will produce "
                  "a plausible face that is NOT the original. Outputs are marked unverified.")
    opts = Options(force=force, skip_auth=skip_auth, ignore_model_mismatch=ignore_model_mismatch,
                   recompute_mask=recompute_mask)

    def metadata_of(job):
        if meta is not None:
            return container.read_sidecar(meta), str(meta)
        text = container.read_metadata(job.source)
        if text is None:
            raise MetadataError(f"{job.source}: no revanon metadata (was the PNG chunk stripped? "
                                "give the sidecar with --meta)")
        return text, str(job.source)

    def load(job):
        text, source = metadata_of(job)
        # an image whose record is not a photo's must be a crop of the model's size: anything else is refused
        # from its PNG header, before decoding lets a few KB of crafted file cost GBs ahead of the auth check
        crop_size = recovery_crop_size(text, source, backend.image_size)
        return Crop(load_image(job.source, crop_size, recovering=True), text, job.relative, source)

    def is_photo(job) -> bool:
        try:
            return container.recorded(metadata_of(job)[0], "mode") == "photo"
        except RevanonError:
            return False  # the load step reports it, against this image

    def recover_group(crops, on_step):
        return deanonymize_crops(crops, backend, secret, opts, maskers, on_step)

    try:
        summary = run_jobs(jobs, load_then_process(load, recover_group), verb="deanonymize", overwrite=overwrite,
                           sidecar=sidecar, console=err, group_size=backend.batch, alone=is_photo, mapping=names,
                           output_state="recovered")
    except RevanonError as exc:
        _fail(exc)
    _finish(summary, "deanonymize")


@app.command("keygen")
def keygen_cmd(keyfile: Path = typer.Argument(..., help="Where to create the key (never overwritten).")) -> None:
    """Create a new random 256-bit key file, readable by you alone."""
    from .keys import keygen

    try:
        keygen(keyfile)
    except RevanonError as exc:
        _fail(exc)
    say(f"wrote a new key to {keyfile} (mode 0600). Keep it secret and keep a backup: "
              "without it the originals cannot be recovered.")


@app.command("info")
def info_cmd(
    image: Path = typer.Argument(..., help="A revanon PNG."),
    meta: Optional[Path] = typer.Option(None, "--meta", help="Read this metadata JSON instead of the PNG chunk."),
) -> None:
    """Print an image's revanon metadata. Never prints key material."""
    from . import container
    from .masks import unpack_mask

    try:
        text = container.read_sidecar(meta) if meta else container.read_metadata(image)
        if text is None:
            from .errors import MetadataError

            raise MetadataError(f"{image}: no revanon metadata (neither a PNG chunk nor a sidecar "
                                f"{container.sidecar_path(image).name} beside it)")
        header = container.parse_header(text, str(meta or image))
    except RevanonError as exc:
        _fail(exc)
    faces = header["faces"]
    coverage = [float(unpack_mask(f["mask"], "").mean()) for f in faces]
    say(one_line(f"{image}: {header['state']}, {header['mode']} mode, {len(faces)} face(s), masker {header['masker']}, "
              f"{header['steps']} steps, kdf {header['kdf']['name']}, "
              f"model {header['model']['fingerprint'][:16]}… at {header['model']['image_size']}px"
              + (", mask coverage " + ", ".join(f"{c:.0%}" for c in coverage) if coverage else "")
              + "".join(f", {flag}" for flag in _info_flags(header))))
    # escaped: an attacker's metadata could carry terminal controls (C1, DEL, bidi overrides) in unknown keys
    typer.echo(json.dumps(header, indent=2, ensure_ascii=True))


def _info_flags(header: dict) -> list[str]:
    """What a reader should know before trusting the record; info has no key, so it checks no tag."""
    flags = []
    if header.get("unverified"):
        flags.append("UNVERIFIED")
    if "auth" not in header:
        flags.append("no auth tag (nothing shows who made this record, or that an unverified mark was not removed)"
                     if header["state"] == "recovered" else "no auth tag")
    if any(face["nonce"] is None for face in header["faces"]):
        flags.append("key reused (--insecure-key-reuse: treat the key as exposed)")
    return flags


class EngineBackendName(str, Enum):
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"
    compiled = "compiled"


class Compiler(str, Enum):
    aot = "aot"
    jit = "jit"
    eager = "eager"


class Precision(str, Enum):
    fp32 = "fp32"
    tf32 = "tf32"
    fp16 = "fp16"
    bf16 = "bf16"


@app.command("build")
def build_cmd(
    model: Path = typer.Option(..., "--model", help="The diffusers model folder to export."),
    out: Path = typer.Option(..., "--out", help="The engine folder to create."),
    parser: Optional[Path] = PARSER,
    backend: EngineBackendName = typer.Option(EngineBackendName.onnxruntime, "--backend"),
    batch: int = typer.Option(1, "--batch", min=1, max=256, help="Faces per engine call (static shapes)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto: where parity is measured, and where a "
                               "compiled engine will run."),
    precision: Precision = typer.Option(Precision.fp32, "--precision",
                                        help="compiled only: fp32 (strict, default), or the fast tf32, fp16, bf16."),
    compiler: Optional[Compiler] = typer.Option(
        None, "--compiler", show_default=False,
        help="compiled only: eager (the default for fp32) runs the exported programs on PyTorch's own kernels, "
             "eager PyTorch's numbers bit for bit, in the fused loop and CUDA graph; aot (the default for "
             "tf32, fp16 and bf16) stores AOTInductor packages; jit stores exported programs and compiles them "
             "with Inductor whenever the engine loads, for a torch whose AOTInductor loader crashes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier engine in --out (never a "
                                   "folder that holds anything else)."),
) -> None:
    """Export the UNet, the autoencoder and BiSeNet to engines, and record their parity with PyTorch."""
    try:
        from .engines import default_compiler, engine_class
        from .export.build import build_engine

        check_device_name(device)
        device = resolve_device(device)
        if backend is not EngineBackendName.compiled:
            if compiler is not None:
                raise UsageError(f"--compiler {compiler.value} is for --backend compiled")
        compiler_name = compiler.value if compiler else default_compiler(precision.value)
        chosen = engine_class(backend.value, compiler=compiler_name)
        path = build_engine(chosen, model, out, parser=parser, batch=batch, overwrite=overwrite, device=device,
                            precision=precision.value, log=say)
    except ImportError as exc:
        _fail(torch_extra_error("build", exc))
    except RevanonError as exc:
        _fail(exc)
    say(f"engine ready: {path}")


@app.command("verify")
def verify_cmd(
    engine: Path = typer.Option(..., "--engine", help="An engine folder made by `revanon-rt build`."),
    model: Path = typer.Option(..., "--model", help="The model folder it was built from."),
    parser: Optional[Path] = PARSER,
    image: Optional[Path] = typer.Option(None, "--image", help="A face crop (default: a synthetic face)."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS),
    device: str = DEVICE,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
    max_latent_rel_err: float = typer.Option(1e-4, help="Final latent: max ||Δ|| / ||z||."),
    min_identical_pixels: float = typer.Option(0.995, help="Anonymized image: min fraction of identical 8-bit values."),
    max_mask_differences: int = typer.Option(0, help="Face map: max differing cells."),
    replays: int = typer.Option(20, "--replays", min=1, help="Fused engines: replays compared bit for bit."),
) -> None:
    """Prove an engine equal to the PyTorch reference, stage by stage, and recover across backends."""
    from rich.table import Table

    try:
        from .reference import TorchReference
        from .verify import Thresholds, run_verify

        dev = resolve_device(device)
        if json_out is not None:
            _check_report_path(json_out)
        from .engines import open_engine

        backend = open_engine(engine, device=dev)
        if backend.can_parse and parser is None:
            built_from = backend.engine.manifest.data["model"].get("parser")
            if not built_from or not Path(built_from).is_file():
                raise UsageError(f"--engine {engine} holds a parser; give the .pth it was built from with --parser, "
                                 "so that verify checks its face maps too")
            parser = Path(built_from)
            say(f"parser: {parser}, the file the engine was built from")
        if not backend.can_parse and parser is not None:
            raise UsageError(f"--parser {parser}: --engine {engine} was built without a parser, so there are no face "
                             "maps to compare; leave --parser out, or build the engine with it")
        reference = TorchReference(model, device=dev, parser=parser)
        report = run_verify(reference, backend, image, steps,
                            Thresholds(max_latent_rel_err, min_identical_pixels, max_mask_differences), log=say,
                            replays=replays)
    except ImportError as exc:
        _fail(torch_extra_error("verify", exc))
    except RevanonError as exc:
        _fail(exc)
    table = Table(title=f"{engine} vs PyTorch ({report['steps']} steps)")
    for column in ("stage", "max abs", "rel err (L2)", "other"):
        table.add_column(column)
    for stage, row in report["stages"].items():
        other = ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("max_abs", "rel_l2"))
        table.add_row(stage, _fmt(row.get("max_abs", "")), _fmt(row.get("rel_l2", "")), other)
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    out.print(table)
    for name, check in report["checks"].items():
        mark = "[green]pass[/green]" if check["passed"] else "[red]FAIL[/red]"
        out.print(f"{mark} {name}: {_fmt(check['value'])} (needs {check['threshold']})")
    precision = backend.precision
    if precision != "fp32":
        out.print(f"note: this engine computes in {precision}, which it was built to trade for speed; the thresholds "
                  f"are strict fp32's, and the figures above are what {precision} costs, recovery included")
    if json_out:
        from .images import write_atomic

        write_atomic(json_out, (json.dumps(report, indent=1) + "\n").encode(), overwrite=True)
    raise typer.Exit(0 if report["passed"] else 1)


def _check_report_path(path: Path) -> None:
    """--json may replace an earlier report, never any other file."""
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        is_report = isinstance(earlier, dict) and {"stages", "checks"} <= earlier.keys()
    except (OSError, UnicodeDecodeError, ValueError):
        is_report = False
    if not is_report:
        raise UsageError(f"--json {path}: exists and is not a verify report, which it would replace; "
                         "give another file")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., "--data", help="A zip of aligned face crops (for example train-128.zip)."),
    out: Path = typer.Option(..., "--out", help="The model folder to create (or to continue with --resume)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=16, max=512,
                                             help="Crop size in pixels (default 128)."),
    minutes: float = typer.Option(9.0, "--minutes", min=0.01, help="Train for this long, then checkpoint and save."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue from OUT/checkpoint, with its settings (--lr and --ema-decay may change)."),
    architecture: Optional[str] = typer.Option(None, "--architecture",
                                               help="small (6.9 M parameters, GPU; the default), compact (3.7 M, CPU "
                                                    "at 64 px), latent (6.7 M, for an 8 x 16 x 16 latent) or tiny."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Crops per step (default 64)."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0,
                                       help="Peak AdamW learning rate (default 2e-4); with --resume, the rate from here on."),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay", min=0.0, max=1.0,
                                              help="EMA decay (default 0.9995; short runs want 0.999); with --resume, "
                                                   "the decay from here on."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps in total."),
    samples: int = typer.Option(16, "--samples", min=0, help="Faces to sample for the model card."),
    device: str = DEVICE,
) -> None:
    """Train the demo face model's UNet in resumable pieces: in pixel space, or on the latents of the
    autoencoder that train-autoencoder put in OUT/vae/."""
    try:
        from .train import ARCHITECTURES, TrainConfig, train, write_model_card
    except ImportError as exc:
        _fail(torch_extra_error("train", exc))
    try:
        if architecture is not None and architecture not in ARCHITECTURES:
            raise UsageError(f"--architecture must be one of {', '.join(ARCHITECTURES)}")
        given = {k: v for k, v in (("resolution", resolution), ("architecture", architecture), ("batch", batch),
                                   ("lr", lr), ("ema_decay", ema_decay)) if v is not None}
        result = train(data, out, minutes, resume, TrainConfig(**given), device=device, max_steps=max_steps,
                       log=say, given=given)
        write_model_card(out, data, result, samples, resolve_device(device))
    except RevanonError as exc:
        _fail(exc)
    say(f"model ready: {out} (load it with --model {out})")


@app.command("train-autoencoder")
def train_autoencoder_cmd(
    data: Path = typer.Option(..., "--data", help="A zip of aligned face crops (for example train-128.zip)."),
    out: Path = typer.Option(..., "--out", help="The model folder to create (vae/ goes inside); then run train on it."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=16, max=512,
                                             help="Crop size in pixels (default 64)."),
    latent_channels: Optional[int] = typer.Option(None, "--latent-channels", min=1, max=64, help="Default 8."),
    channels: Optional[str] = typer.Option(None, "--channels",
                                           help="Width of each block, comma-separated, each a multiple of 16 "
                                                "(default 32,64,128); the latent is 2^(blocks-1) times smaller "
                                                "than the crop."),
    minutes: float = typer.Option(9.0, "--minutes", min=0.01, help="Train for this long, then checkpoint and save."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint, with its settings."),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Crops per step (default 16)."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0,
                                       help="Peak AdamW learning rate (default 5e-4); with --resume, the rate from here on."),
    linear_latent_weight: Optional[float] = typer.Option(
        None, "--linear-latent-weight", min=0.0,
        help="Weight pulling the encoder toward a linear latent, each patch's principal components (default 1; "
             "0 leaves it free, which recovers faces far worse)."),
    consistency_weight: Optional[float] = typer.Option(
        None, "--consistency-weight", min=0.0,
        help="Weight of the E(D(z)) = z term (default 1): the decoder's image must re-encode to its latent, as "
             "recovery needs. It may change with --resume: a few minutes at 10 after the default run helps."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many steps in total."),
    device: str = DEVICE,
) -> None:
    """Train the autoencoder of a latent demo model (AutoencoderKL, spec §1); `train` then learns its latents."""
    try:
        from .train_autoencoder import AutoencoderConfig, train_autoencoder
    except ImportError as exc:
        _fail(torch_extra_error("train-autoencoder", exc))
    try:
        try:
            widths = None if channels is None else tuple(int(w) for w in channels.split(","))
        except ValueError:
            raise UsageError(f"--channels {channels!r}: give positive multiples of 16, comma-separated (e.g. 32,64,128)") from None
        given = {k: v for k, v in (("resolution", resolution), ("latent_channels", latent_channels),
                                   ("block_out_channels", widths), ("batch", batch), ("lr", lr),
                                   ("linear_latent_weight", linear_latent_weight),
                                   ("consistency_weight", consistency_weight)) if v is not None}
        result = train_autoencoder(data, out, minutes, resume, AutoencoderConfig(**given), device=device,
                                   max_steps=max_steps, log=say, given=given)
    except RevanonError as exc:
        _fail(exc)
    say(f"autoencoder ready after {result['steps']} steps: now train the UNet on its latents with "
        f"revanon-rt train --data {data} --out {out} --resolution {result['resolution']} --architecture latent")


class EvalStage(str, Enum):
    all = "all"
    transform = "transform"
    score = "score"


@app.command("eval")
def eval_cmd(
    pairs: Path = typer.Option(..., "--pairs", help="LFW pairs file (dev_pairs.txt)."),
    images: Path = typer.Option(..., "--images", help="Zip of the aligned crops the pairs name (dev-128.zip)."),
    model: Optional[Path] = MODEL, engine: Optional[Path] = ENGINE,
    masker: MaskerName = typer.Option(MaskerName.landmarks, "--masker"), parser: Optional[Path] = PARSER,
    mask: Optional[Path] = typer.Option(None, "--mask", help="A folder of precomputed face maps named as the zip "
                                        "members (Name/Name_0001.jpg), or with .png in place of the extension."),
    landmarks: int = LANDMARKS,
    start: int = typer.Option(0, "--start", min=0, help="First pair of this chunk."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Pairs in this chunk (default: all)."),
    out: Path = typer.Option(Path("eval-out"), "--out", help="Folder for the chunk folders and the summary."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS), batch: int = typer.Option(16, "--batch", min=1),
    candidates: int = typer.Option(100, "--candidates", min=2, help="Linkage: candidate originals per image."),
    stage: EvalStage = typer.Option(EvalStage.all, "--stage", help="transform (model), score (dlib), or all."),
    genuine_only: bool = typer.Option(False, "--genuine-only",
                                      help="Transform only the second images of genuine pairs: TAR counts nothing "
                                           "else, and impostor pairs still give their clean images to the threshold."),
    device: str = DEVICE,
) -> None:
    """Identity evaluation on LFW pairs: TAR@FAR=0.1% for anonymized, recovered and wrong-key images, and attacks."""
    from .batch import ProgressLines, progress_bars
    from .engines.manifest import file_sha256
    from .evaluate import (ZipImages, chunk_folder, markdown, read_pairs, run_score, run_transform,
                           transformed_image_size, write_chunk_summary)

    try:
        all_pairs = read_pairs(pairs)
        chosen = all_pairs[start: start + limit if limit else None]
        if not chosen:
            raise UsageError(f"--start {start} is past the {len(all_pairs)} pairs of {pairs}")
        end = start + len(chosen)
        chunk = chunk_folder(out, start, end)
        for folder in (out, chunk):
            if folder.exists() and not folder.is_dir():
                raise UsageError(f"--out: {folder} is a file, and the evaluation writes a folder there")
        backend = None
        if stage != EvalStage.score:
            backend = open_backend(model, engine, device, parser)
            if mask is None:
                chosen_masker = _choose_masker(backend, _masker_name(masker, None, parser, engine, landmarks=landmarks),
                                               None, landmarks)
            else:
                chosen_masker = None
        zip_images = ZipImages(images, backend.image_size if backend else transformed_image_size(chunk))
        zip_images.check_pairs(chosen)
        recognizer = None
        if stage != EvalStage.transform:
            from .faces import Recognizer

            recognizer = Recognizer()
    except RevanonError as exc:
        _fail(exc)
    with progress_bars(err) as progress:
        tasks = {}
        # a long run logged to a file (nohup, a GPU job) gets lines instead of a bar
        log_lines = None if err.is_terminal else ProgressLines(say)

        def tick(phase: str, n: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=None)
            progress.advance(tasks[phase], n)
            if log_lines:
                log_lines(phase, n)

        try:
            if stage != EvalStage.score:
                run_transform(backend, chosen, zip_images, chunk, masker=chosen_masker, mask_dir=mask, steps=steps,
                              batch=batch, candidates=candidates, progress=tick, pool_cache=out / "linkage-pool.npz",
                              genuine_only=genuine_only, pairs_total=len(all_pairs), pairs_sha256=file_sha256(pairs))
            if stage != EvalStage.transform:
                run_score(chunk, zip_images, recognizer, progress=tick)
            if log_lines:
                log_lines.finish()
        except RevanonError as exc:
            _fail(exc)
        except OSError as exc:  # the disk filled, or --out became unwritable during the run
            _fail(UsageError(f"--out {out}: cannot write the evaluation there ({exc.strerror or exc})"))
    if stage == EvalStage.transform:
        say(f"transforms written to {chunk}; score them with --stage score")
        return
    title = f"LFW pairs {start}..{end - 1}"
    summary = write_chunk_summary(chunk, title)
    say(markdown(summary, title))
    typer.echo(json.dumps(summary))


@app.command("eval-merge")
def eval_merge_cmd(
    folder: Path = typer.Argument(..., help="An eval --out folder holding chunk-*/features.npz."),
    title: str = typer.Option("LFW identity evaluation", "--title"),
    extend: Optional[Path] = typer.Option(None, "--extend", help="A metrics.json whose chunks are gone: score these "
                                          "chunks at its threshold and add them to it."),
) -> None:
    """Combine the chunks of an evaluation into one summary (metrics.json, metrics.md)."""
    from .evaluate import markdown, merge_chunks, pair_ranges, uncovered_pairs

    try:
        summary = merge_chunks(folder, title, extend)
    except RevanonError as exc:
        _fail(exc)
    uncovered = uncovered_pairs(folder, summary["chunks"]) if extend is None else None
    if uncovered is not None:
        if uncovered[0]:
            err.print(f"[yellow]note[/yellow]: no chunk covers pairs {escape(uncovered[0])} of the {uncovered[1]}")
    else:
        covered = pair_ranges(summary["chunks"])
        if "," in covered or not covered.startswith("0-"):
            err.print(f"[yellow]note[/yellow]: the chunks cover pairs {escape(covered)} only")
    say(markdown(summary, title))
    typer.echo(json.dumps(summary))


class DemoFace(str, Enum):
    auto = "auto"
    sampled = "sampled"
    drawn = "drawn"


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Folder for the demo's files."),
    model: Optional[Path] = typer.Option(None, "--model", help="Default: the demo model, or a tiny one built here."),
    device: str = DEVICE, steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, max=MAX_STEPS),
    face: DemoFace = typer.Option(DemoFace.auto, "--face",
                                  help="sampled: a face sampled from the model; drawn: a drawn face. "
                                       "auto: sampled, except on the tiny model built when no demo model exists."),
    seed: int = typer.Option(0, "--seed", help="Which sampled or drawn face."),
) -> None:
    """The main job: anonymize and recover a synthetic face, and write a side-by-side PNG."""
    try:
        from .demo import run_demo
    except ImportError as exc:
        _fail(torch_extra_error("the demo", exc))
    try:
        report = run_demo(out, model, resolve_device(device), steps, seed=seed,
                          face=None if face is DemoFace.auto else face.value, log=say)
    except RevanonError as exc:
        _fail(exc)
    typer.echo(json.dumps(report))


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    typer.echo(__version__)


def _warning_on_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (Pillow on a corrupt EXIF block, torch while exporting) as the tool's own warnings:
    one line each, not a source location and the line of code that raised them."""
    err.print(f"[yellow]warning[/yellow]: {escape(one_line(f'{category.__name__}: {message}'))}")


def main() -> None:
    from .images import use_pixel_limit

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_pixel_limit()
    if not os.environ.get("REVANON_DEBUG"):
        import warnings

        warnings.showwarning = _warning_on_one_line
    app()
