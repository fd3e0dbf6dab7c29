"""`python -m peftlab.bench SUITE` runs a suite; `python -m peftlab.bench report SUITE` writes its report."""
import sys

from . import main

sys.exit(main())
