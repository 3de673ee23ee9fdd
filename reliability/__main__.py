"""`python3 -m reliability [--quick] [--only A,B] [--out DIR]`: the fault suite (see reliability.suite)."""

import sys

from reliability.suite import main

sys.exit(main())
