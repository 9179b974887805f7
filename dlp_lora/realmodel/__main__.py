"""`python -m dlp_lora.realmodel` (what `make real-model` runs): see dlp_lora/realmodel/pipeline.py."""

import sys

from .pipeline import main

if __name__ == "__main__":
    sys.exit(main())
