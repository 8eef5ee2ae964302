"""`python -m ldm_lite.teaching`: see ldm_lite.teaching.runner."""
import sys

from ldm_lite.teaching.runner import main

sys.exit(main())
