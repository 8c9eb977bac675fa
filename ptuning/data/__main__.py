"""`python -m ptuning.data fetch [--dest DIR]`: the full LAMA, downloaded, unpacked, checked (ptuning/data/fetch.py)."""
import argparse
import sys
from pathlib import Path

from ptuning.data import fetch
from ptuning.data.lama import FETCHED
from ptuning.files import DataError


def main(argv: list[str] | None = None) -> int:
    """One subcommand, fetch: room for more (a check of an existing folder, say) without a new entry point."""
    parser = argparse.ArgumentParser(prog="python -m ptuning.data", description="LAMA data for ptuning-lama")
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help="download, unpack and check the P-tuning LAMA archive")
    get.add_argument("--dest", default=str(FETCHED), help="where the data set goes (default: data/lama, where the "
                                                          "runner looks by default)")
    get.add_argument("--url", default=fetch.ARCHIVE_URL)
    get.add_argument("--checksums", default=str(fetch.CHECKSUMS), help="each split file's git blob id and the "
                                                                        "vocabulary files' SHA-256 (JSON)")
    get.add_argument("--skip-checksums", action="store_true", help="check the record counts and the files' presence "
                                                                  "but no checksum")
    args = parser.parse_args(argv)
    try:
        dest = fetch.fetch(Path(args.dest), args.url, None if args.skip_checksums else Path(args.checksums))
        print(f"LAMA ready in {dest} (41 relations, 34,039 test facts): the runner finds it there by default, "
              f"or give --data-dir {dest}")
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":
    sys.exit(main())
