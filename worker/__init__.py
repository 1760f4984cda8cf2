"""lorafleet.worker: the GPU side (install with ``pip install 'lorafleet[worker]'``)."""

import os

# transformers announces on import that optional image backends are missing; workers
# never use them. LORAFLEET users can still raise the level with TRANSFORMERS_VERBOSITY.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
