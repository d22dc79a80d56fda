"""Runs that are stopped, raced or pointed at odd files: no output, name or mapping entry is lost or wrong."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import box_mask, cli, random_image, read_rgb, save_png


def _faces(folder, count, size=32):
    return [save_png(folder / f"face{i:03d}.png", random_image(size, seed=100 + i)) for i in range(count)]


def _start(*args, preexec_fn=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "revanon_rt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)


def _wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, "the run ended before the test could interrupt it"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_terminated_rename_run_keeps_its_mapping_and_a_rerun_finishes_it(zero_engines, keyfile, tmp_path):
    sources = _faces(tmp_path / "in", 100)
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    out, names = tmp_path / "anon", tmp_path / "names.json"
    args = ("run", "anonymize", tmp_path / "in", "--out", out, "--engine", zero_engines["zero"], "--mask", mask,
            "--key", keyfile, "--rename", "--mapping", names, "--sidecar", "--steps", "10")
    first = _start(*args)
    try:
        _wait_for(lambda: len(list(out.glob("*.png"))) >= 4, first)
        rival = cli(*args)  # a second --rename run into the same folder would give out the same numbers
        assert rival.returncode == 2 and "another --rename run is writing there" in rival.stderr, rival.stderr
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == -signal.SIGTERM, stderr
    assert "interrupted after" in stderr and "Traceback" not in stderr, stderr
    after = stderr.split("interrupted after")[1]
    assert "result" in after and "face000.png" in after, "what finished is listed before the process ends"

    written = json.loads(names.read_text())
    assert 4 <= len(written) < len(sources)
    assert sorted(written.values()) == sorted(str(p.resolve()) for p in out.glob("*.png")), \
        "every output written is in the mapping, and nothing else"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    rest = cli(*args)
    assert rest.returncode == 0, rest.stderr
    assert f"{len(sources) - len(written)} done, {len(written)} skipped" in rest.stderr
    mapping = json.loads(names.read_text())
    assert sorted(mapping) == sorted(str(p.resolve()) for p in sources)
    assert len(set(mapping.values())) == len(sources) == len(list(out.glob("*.png")))
    assert len(list(out.glob("*.revanon.json"))) == len(sources)

    recovered = cli("run", "deanonymize", out, "--out", tmp_path / "rec", "--engine", zero_engines["zero"],
                    "--key", keyfile)
    assert recovered.returncode == 0, recovered.stderr
    for source, output in mapping.items():
        assert np.array_equal(read_rgb(tmp_path / "rec" / os.path.basename(output)), read_rgb(source)), source


def test_a_signal_ignored_on_purpose_stays_ignored(zero_engines, keyfile, tmp_path):
    _faces(tmp_path / "in", 30)
    out = tmp_path / "anon"
    run = _start("run", "anonymize", tmp_path / "in", "--out", out, "--engine", zero_engines["zero"], "--mask",
                 save_png(tmp_path / "mask.png", box_mask(32)), "--key", keyfile, "--steps", "10",
                 preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup starts it
    try:
        _wait_for(lambda: any(out.glob("*.png")), run)
        run.send_signal(signal.SIGHUP)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0 and "30 done" in stderr, stderr


def test_mappings_are_kept_under_any_spelling_of_the_input_and_any_file_name(zero_engines, keyfile, tmp_path):
    folder = tmp_path / "in"
    save_png(folder / "a.png", random_image(32, seed=1))
    undecodable = os.fsencode(folder) + b"/b\xff\xfe.png"
    with open(undecodable, "wb") as fh:
        fh.write((folder / "a.png").read_bytes())
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    common = ("--out", tmp_path / "anon", "--engine", zero_engines["zero"], "--mask", mask, "--key", keyfile,
              "--rename", "--mapping", tmp_path / "names.json")
    first = cli("run", "anonymize", folder, *common)
    assert first.returncode == 0 and "2 done" in first.stderr, first.stderr
    mapping = json.loads((tmp_path / "names.json").read_text(encoding="ascii"))  # the odd name is escaped
    assert sorted(mapping) == sorted([str(folder / "a.png"), os.fsdecode(undecodable)])
    # the same input, spelled from elsewhere, is found in the mapping and skipped
    again = cli("run", "anonymize", "a.png", *common, cwd=folder)
    assert again.returncode == 0 and "0 done, 1 skipped" in again.stderr, again.stderr
    assert json.loads((tmp_path / "names.json").read_text()) == mapping


def test_files_that_are_not_images_fail_alone_and_linked_folders_are_followed(zero_engines, keyfile, tmp_path):
    folder = tmp_path / "in"
    save_png(folder / "a.png", random_image(32, seed=2))
    save_png(tmp_path / "elsewhere" / "b.png", random_image(32, seed=3))
    os.symlink(tmp_path / "elsewhere", folder / "linked")
    os.symlink(folder, folder / "linked" / "back")  # a loop through the linked folder
    os.symlink("..", folder / "up")  # would pull in everything beside the input folder
    os.mkfifo(folder / "fifo.png")  # opening it for reading would wait for a writer forever
    os.symlink("self.png", folder / "self.png")
    save_png(folder / ("e" * 245 + ".png"), random_image(32, seed=4))  # its sidecar's name is over 255 bytes
    save_png(folder / "new\nline.png", random_image(32, seed=5))
    save_png(folder / "evil\u202egnp.png", random_image(32, seed=6))  # shown as "evilpng.png" unescaped
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    run = cli("run", "anonymize", folder, "--out", tmp_path / "anon", "--engine", zero_engines["zero"], "--mask", mask,
              "--key", keyfile, "--sidecar")
    assert run.returncode == 1, run.stderr
    assert "4 done, 0 skipped, 5 failed" in run.stderr, run.stderr
    assert "up: a link to a folder that holds" in run.stderr and "back: a link to a folder that holds" in run.stderr
    assert "fifo.png: not a regular file" in run.stderr
    assert "self.png: cannot read it" in run.stderr
    assert "is over the file system's 255 bytes" in run.stderr
    assert "Traceback" not in run.stderr
    assert {p.relative_to(tmp_path / "anon").as_posix() for p in (tmp_path / "anon").rglob("*.png")} == \
        {"a.png", "linked/b.png", "new\nline.png", "evil\u202egnp.png"}
    errors = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 5, "one line per failure"
    assert any("new\\x0aline.png" in line for line in run.stderr.splitlines()), "control characters are escaped"
    assert "evil\\u202egnp.png" in run.stderr and "\u202e" not in run.stderr, "so is a bidi override"


def test_an_image_without_its_sidecar_is_reported_not_skipped(zero_engines, keyfile, tmp_path):
    source = save_png(tmp_path / "in" / "a.png", random_image(32, seed=6))
    mask = save_png(tmp_path / "mask.png", box_mask(32))
    args = ("run", "anonymize", source, "--out", tmp_path / "anon", "--engine", zero_engines["zero"], "--mask", mask,
            "--key", keyfile, "--sidecar")
    assert cli(*args).returncode == 0
    (tmp_path / "anon" / "a.png.revanon.json").unlink()  # as a run stopped between the two writes leaves it
    partial = cli(*args)
    assert partial.returncode == 1 and "exists without a.png.revanon.json" in partial.stderr, partial.stderr
    (tmp_path / "anon" / "a.png").unlink()
    (tmp_path / "anon" / "a.png.revanon.json").mkdir()  # a sidecar that cannot be written
    unwritable = cli(*args, "--overwrite")
    assert unwritable.returncode == 1 and "cannot write it" in unwritable.stderr, unwritable.stderr
    assert not (tmp_path / "anon" / "a.png").exists(), "an image is kept only with its sidecar"
    # asking for sidecars after a run that wrote none is not mistaken for an interruption alone
    plain = args[:-1]
    (tmp_path / "anon" / "a.png.revanon.json").rmdir()
    assert cli(*plain).returncode == 0
    later = cli(*args)
    assert later.returncode == 1 and "an earlier run without --sidecar" in later.stderr, later.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_out_is_refused_before_any_work(zero_engines, keyfile, tmp_path):
    source = save_png(tmp_path / "in" / "a.png", random_image(32, seed=7))
    (tmp_path / "locked").mkdir(mode=0o555)
    run = cli("run", "anonymize", source, "--out", tmp_path / "locked" / "anon", "--engine", zero_engines["zero"],
              "--mask", save_png(tmp_path / "mask.png", box_mask(32)), "--key", keyfile)
    assert run.returncode == 2 and "is not writable" in run.stderr, run.stderr


def test_outputs_whose_names_cannot_be_saved_are_removed_so_that_a_rerun_redoes_them(tmp_path):
    from revanon_rt.batch import Job, NameMapping
    from revanon_rt.errors import RevanonError

    names = tmp_path / "names.json"
    mapping = NameMapping(names)
    first = Job(tmp_path / "a.png", tmp_path / "a.png", output=save_png(tmp_path / "out" / "000001.png",
                                                                         random_image(8)))
    mapping.add(first)
    mapping.save()
    assert json.loads(names.read_text()) == {str(first.source): str(first.output)}
    second = Job(tmp_path / "b.png", tmp_path / "b.png", output=save_png(tmp_path / "out" / "000002.png",
                                                                          random_image(8)))
    (tmp_path / "out" / "000002.png.revanon.json").write_text("{}")
    mapping.add(second)
    names.unlink()
    names.mkdir()  # the mapping can no longer be written
    with pytest.raises(RevanonError, match="were removed, so that a rerun redoes them"):
        mapping.save()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000001.png"]


def test_the_end_of_run_table_of_a_large_folder_lists_what_was_not_done():
    """A folder of thousands: the table lists the inputs that were skipped or failed (up to TABLE_ROWS) and
    counts the rest, instead of building one row per input (a million rows took gigabytes)."""
    import io

    from rich.console import Console

    from revanon_rt.batch import TABLE_ROWS, Job, Summary, _print_table

    def summary_of(statuses):
        summary = Summary()
        for n, status in enumerate(statuses):
            summary.rows.append((Job(Path(f"in/{n}.png"), Path(f"{n}.png")), status, "why" if status != "done" else ""))
        return summary

    def printed(summary):
        out = io.StringIO()
        _print_table(summary, Console(file=out, width=200))
        return out.getvalue()

    small = printed(summary_of(["done", "failed", "done"]))
    assert "0.png" in small and "1.png" in small and "not listed" not in small
    many = ["done"] * (3 * TABLE_ROWS)
    many[7], many[2 * TABLE_ROWS] = "failed", "skipped"
    text = printed(summary_of(many))
    assert "7.png" in text and f"{2 * TABLE_ROWS}.png" in text
    assert sum(".png" in line for line in text.splitlines()) == 2
    assert f"not listed one by one, as over {TABLE_ROWS} inputs: {3 * TABLE_ROWS - 2} done" in text
    flood = printed(summary_of(["failed"] * (TABLE_ROWS + 3)))
    assert f"{TABLE_ROWS - 1}.png" in flood and f"{TABLE_ROWS}.png" not in flood
    assert "3 more skipped or failed (each reported above)" in flood
