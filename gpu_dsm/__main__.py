"""``python -m gpu_dsm`` is the ``gpu-dsm`` command (so ``torchrun -m gpu_dsm extract ...`` works)."""
import sys

from gpu_dsm.cli import main

sys.exit(main())
