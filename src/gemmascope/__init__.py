"""gemmascope: an open, trainable, local Gemma Scope."""

__version__ = "0.1.0"

# The built-in SAE architectures register themselves on import (sae.register_architecture), so every
# module that looks one up by name (`sae.architecture`) finds them, as SAELens registers its own in
# its package's __init__. Nothing in gemmascope imports this package's names back, so no cycle.
from gemmascope import architectures as architectures  # noqa: E402
