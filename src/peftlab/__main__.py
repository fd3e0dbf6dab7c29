"""`python -m peftlab ...` (and `torchrun -m peftlab train ...`) run the command line."""
import sys

from .cli import main

sys.exit(main())
