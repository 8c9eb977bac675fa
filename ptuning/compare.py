"""`python -m ptuning.compare`, the documented command: the comparison itself is ptuning/output/compare.py."""
import sys

from ptuning.output.compare import main

if __name__ == "__main__":
    sys.exit(main())
