"""`python -m model_parallel.memory`, the documented command: the report itself is ptuning/model/memory.py (it
sizes packs with the trainer's own arithmetic, so it lives with the packing). Imported by nothing."""
import sys

from ptuning.model.memory import main

if __name__ == "__main__":
    sys.exit(main())
