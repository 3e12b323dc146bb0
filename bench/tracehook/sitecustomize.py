"""Python imports this at start when bench/tracehook is on PYTHONPATH: see stagetrace."""

import stagetrace

stagetrace.install()
