"""`python -m ptuning.inspect`, the documented command: the report itself is ptuning/output/inspect.py."""
import sys

from ptuning.output.inspect import main

if __name__ == "__main__":
    sys.exit(main())
