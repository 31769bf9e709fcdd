"""tear_lora: QLoRA adapters that learn to respond and to predict consequences.

    Loss = ResponseLoss + lambda * ConsequenceLoss
"""

import logging

# bitsandbytes' CPU backend looks for optional hub-downloaded kernels and warns on every import without them;
# the built-in kernel it falls back to is the one we test against.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
