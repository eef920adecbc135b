"""python -m client DIR_OR_FILES --url http://127.0.0.1:5001 [--mode jobs|cls] [--out F]"""

import argparse
import sys
from pathlib import Path

from client.bulk import IMAGE_SUFFIXES, classify_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client", description="Classify every image in folders or files."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--url", default="http://127.0.0.1:5001", help="server base URL")
    parser.add_argument(
        "--mode", choices=("jobs", "cls"), default="jobs", help="one job (SSE) or many /cls"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="/cls calls in flight")
    parser.add_argument("--job-size", type=int, default=500, help="images per job")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--out", type=Path, help="JSONL file (default: stdout)")
    parser.add_argument("--retries", type=int, default=10, help="per request, on 503")
    args = parser.parse_args(argv)

    files = collect(args.paths)
    if not files:
        parser.error(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {args.paths}")
    out = args.out.open("w") if args.out else sys.stdout
    try:
        failures = classify_all(files, args, out)
    finally:
        if args.out:
            out.close()
    if failures:
        print(f"\n{len(failures)} of {len(files)} images failed:", file=sys.stderr)
        for path, error in failures[:20]:
            print(f"  {path}: {error}", file=sys.stderr)
        if len(failures) > 20:
            print(f"  ... and {len(failures) - 20} more", file=sys.stderr)
        return 1
    print(f"\nall {len(files)} images classified", file=sys.stderr)
    return 0


def collect(paths: list[Path]) -> list[Path]:
    """Files as given, and the images under each folder, sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file())
            files.extend(sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(path)
    return files


if __name__ == "__main__":
    sys.exit(main())
