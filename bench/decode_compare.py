"""The web tier's per-upload CPU, this checkout against an earlier commit, side by side in one process.

For JPEG photos of 451x300 to 4000x3000 px: `inferstack.imaging.decode_image` as of `--against`
(loaded from git) and as checked out, and the multipart parse of the upload by werkzeug and by
`inferstack_web.multipart`; CPU time, median of `--rounds` alternating rounds. With `--photos DIR`
also the mean decode CPU per JPEG and per PNG of that folder (e.g. bench/batch.py's photos).

Usage: python bench/decode_compare.py [--against 81ab628] [--rounds 5] [--photos DIR]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "images" / "web"))

from urllib3 import encode_multipart_formdata  # noqa: E402
from werkzeug.formparser import parse_form_data  # noqa: E402

from inferstack import imaging  # noqa: E402
from inferstack.contract.http import IMAGE_FIELD  # noqa: E402
from inferstack_web.multipart import Limits, form_files  # noqa: E402

SIZE = (224, 224)


def imaging_at(ref: str) -> Any:
    """inferstack/imaging.py as of git ref, imported under another name."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:inferstack/imaging.py"], check=True,
                            capture_output=True).stdout
    path = Path(tempfile.mkdtemp()) / "imaging_before.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("imaging_before", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def photos() -> dict[str, bytes]:
    import skimage.data
    from PIL import Image

    def jpeg(arr: Any, size: tuple[int, int] | None = None) -> bytes:
        im = Image.fromarray(arr)
        if size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    return {"451x300": jpeg(skimage.data.chelsea()), "1024x768": jpeg(skimage.data.coffee(), (1024, 768)),
            "1600x1200": jpeg(skimage.data.astronaut(), (1600, 1200)),
            "4000x3000": jpeg(skimage.data.astronaut(), (4000, 3000))}


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1000


def werkzeug_files(body: bytes, content_type: str) -> list[bytes]:
    environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body)}
    return [f.stream.read() for f in parse_form_data(environ)[2].getlist(IMAGE_FIELD)]


def compare_uploads(before: Any, rounds: int) -> None:
    print("upload      KB   decode before -> now (ms)   parse werkzeug -> ours (ms)   together")
    for name, data in photos().items():
        body, content_type = encode_multipart_formdata([(IMAGE_FIELD, ("photo.jpg", data, "image/jpeg"))])
        boundary = content_type.split("boundary=", 1)[1]
        n = max(5, int(300 / (1 + len(data) / 50_000)))
        calls: dict[str, Callable[[], object]] = {
            "old": functools.partial(before.decode_image, data, SIZE),
            "new": functools.partial(imaging.decode_image, data, SIZE),
            "werkzeug": functools.partial(werkzeug_files, body, content_type),
            "ours": functools.partial(form_files, body, boundary, IMAGE_FIELD, Limits(1000, None)),
        }
        runs: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(rounds):
            for key, call in calls.items():
                runs[key].append(cpu_ms(call, n))
        m = {k: statistics.median(v) for k, v in runs.items()}
        together = (m["new"] + m["ours"]) / (m["old"] + m["werkzeug"])
        print(f"{name:10s} {len(data) // 1024:4d}   {m['old']:7.2f} -> {m['new']:6.2f}           "
              f"{m['werkzeug']:6.2f} -> {m['ours']:5.2f}              {together:.2f}x")


def compare_folder(before: Any, folder: Path, rounds: int) -> None:
    for pattern in ("*.jpg", "*.png"):
        files = [p.read_bytes() for p in sorted(folder.glob(pattern))[:160]]
        if not files:
            continue
        runs: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for key, module in (("old", before), ("new", imaging)):
                t0 = time.process_time()
                for data in files:
                    module.decode_image(data, SIZE)
                runs[key].append((time.process_time() - t0) / len(files) * 1000)
        print(f"{folder}/{pattern} ({len(files)} files): decode {statistics.median(runs['old']):.2f} -> "
              f"{statistics.median(runs['new']):.2f} ms per image")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="81ab628", help="git ref of the decoding to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--photos", type=Path, help="a folder of .jpg/.png photos to average over")
    args = parser.parse_args()
    before = imaging_at(args.against)
    compare_uploads(before, args.rounds)
    if args.photos:
        compare_folder(before, args.photos, max(1, args.rounds // 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
