"""Only our defaults under load, /cls and (on the same server) ModelInfer over gRPC, at
each concurrency level of bench/run.py: a quick before/after check for a change to the
request path (about two minutes; the full `make bench` takes twenty).

    .venv/bin/python bench/cls_only.py
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run  # bench/run.py, importable once its folder is on the path
import servers


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        images = work / "images"
        images.mkdir()
        run.make_images(images)
        report = {"machine": run.machine()}
        report |= servers.run_levels(["ours (defaults)"], images, work, 8.0)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
