"""The SAE architectures, one file each (ARCHITECTURE.md: `sae.py` + `architectures/`): the module
class (its activation) beside the `sae.Architecture` object that holds its training terms and
after-step update, optimiser groups, spec checks, saved form and folder suffix, registered once with
`sae.register_architecture`. Importing this package registers the built-in ones (the `gemmascope`
package does, so they are always there):

- `jumprelu`: Gemma Scope's JumpReLU SAE, the default (`JumpReLUSAE`, `JUMPRELU`);
- `topk`: TopK with AuxK (`TopKSAE`, `TOPK`);
- `batchtopk`: BatchTopK, saved as JumpReLU (`BatchTopKSAE`, `BATCHTOPK`);
- `relu`: ReLU with an L1 penalty (`ReLUSAE`, `RELU`).

Each file's own names (JumpReLU's straight-through `jumprelu` and `step`, its loss terms, TopK's
`auxk_loss`) are imported from it. A new architecture is one more file: a module class, an
`Architecture` subclass and one `register_architecture` call (tests/test_architectures.py adds one
inside a test).
"""

from gemmascope.architectures.batchtopk import BATCHTOPK, BatchTopKSAE
from gemmascope.architectures.jumprelu import JUMPRELU, JumpReLUSAE
from gemmascope.architectures.relu import RELU, ReLUSAE
from gemmascope.architectures.topk import TOPK, TopKSAE

__all__ = [
    "BATCHTOPK",
    "JUMPRELU",
    "RELU",
    "TOPK",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "TopKSAE",
]
