"""`python -m ptuning.data fetch [--dest DIR]`: the full LAMA (ptuning/data/fetch.py)."""
import sys

from ptuning.data.lama import main

sys.exit(main())
