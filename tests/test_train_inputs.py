"""`sdltag train` on awkward inputs: file names that are not UTF-8, XMP keywords programs wrote."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdltag.cli import app
from sdltag.modelfolder import load_model_folder

TINY = ["--width", "8", "--image-size", "16", "--rows", "3", "--batch-size", "8", "--workers", "0", "--threads", "1"]
XMP = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/">
   <dc:subject><rdf:Seq><rdf:li>{colour}</rdf:li></rdf:Seq></dc:subject>
   <lr:hierarchicalSubject><rdf:Seq>
    <rdf:li>colours|{colour}</rdf:li><rdf:li>darktable|format|jpg</rdf:li><rdf:li>darktable|changed</rdf:li>
   </rdf:Seq></lr:hierarchicalSubject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def _library(root: Path, n: int = 12) -> Path:
    """``n`` photos as darktable leaves them (IMG.jpg + IMG.jpg.xmp), one with a name that is not UTF-8."""
    root.mkdir(parents=True)
    for i in range(n):
        colour = list(COLOURS)[i % 2]
        name = os.fsencode(root) + (b"/\xff%d.jpg" % i if i == 0 else b"/IMG_%03d.jpg" % i)
        with open(name, "wb") as handle:
            Image.fromarray(np.full((24, 24, 3), COLOURS[colour], np.uint8)).save(handle, "JPEG")
        with open(name + b".xmp", "w", encoding="utf-8") as handle:
            handle.write(XMP.format(colour=colour))
    return root


def _trained_images(stderr: str) -> int:
    found = re.search(r"(\d+) training and (\d+) validation images", stderr)
    assert found, stderr
    return int(found.group(1)) + int(found.group(2))


def test_train_on_a_library_with_a_name_that_is_not_utf8_and_darktable_tags(tmp_path: Path) -> None:
    data = _library(tmp_path / "photos")
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "m"), "--epochs", "1", *TINY])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert _trained_images(result.stderr) == 12  # the photo whose name is not UTF-8 is used
    manifest = load_model_folder(tmp_path / "m").manifest
    assert sorted(manifest.seen_labels) == ["blue", "red"]  # not darktable's "jpg" and "changed"
    # asked for, the machine-written keywords are labels too
    result = runner.invoke(
        app, ["train", str(data), "--out", str(tmp_path / "m2"), "--epochs", "1", "--machine-keywords", *TINY]
    )
    assert result.exit_code == 0, result.output
    assert sorted(load_model_folder(tmp_path / "m2").manifest.seen_labels) == ["blue", "changed", "jpg", "red"]
