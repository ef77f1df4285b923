"""`python -m training --data DIR --out BUNDLES`: same as `recsvc-train`."""

from __future__ import annotations

import sys

from training.cli import main

sys.exit(main())
