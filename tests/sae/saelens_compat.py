"""Import SAELens's SAE classes beside transformer-lens 4.

sae-lens pins transformer-lens<4 and is installed with --no-deps (see the Makefile). Its
package `__init__` pulls in training runners, evals and HookedTransformer tooling that need
transformer-lens 3; its SAE classes need only `HookedRootModule`, which transformer-lens 4
still ships at the top level. So the package is registered without running its `__init__`,
and the one moved module name is aliased; the SAE code itself runs unchanged.
"""

import importlib.util
import logging
import sys
import types


def saelens():
    """The `sae_lens.saes` package (SAE, TopKSAE, StandardSAE, TopKTrainingSAE, ...)."""
    if "transformer_lens.HookedTransformer" not in sys.modules:
        from transformer_lens import HookedRootModule

        alias = types.ModuleType("transformer_lens.HookedTransformer")
        alias.HookedRootModule = HookedRootModule
        sys.modules["transformer_lens.HookedTransformer"] = alias
    if "sae_lens" not in sys.modules:
        spec = importlib.util.find_spec("sae_lens")
        if spec is None:
            raise ImportError("sae-lens is not installed: pip install --no-deps sae-lens")
        package = types.ModuleType("sae_lens")
        package.__path__ = list(spec.submodule_search_locations)
        package.__version__ = _version()
        package.logger = logging.getLogger("sae_lens")
        sys.modules["sae_lens"] = package
    import sae_lens.saes as saes
    from sae_lens.registry import (
        SAE_CLASS_REGISTRY,
        register_sae_class,
        register_sae_training_class,
    )

    # what the skipped `__init__` does for the two architectures madlens reads and writes
    if "topk" not in SAE_CLASS_REGISTRY:
        register_sae_class("standard", saes.StandardSAE, saes.StandardSAEConfig)
        register_sae_training_class("standard", saes.StandardTrainingSAE,
                                    saes.StandardTrainingSAEConfig)  # fmt: skip
        register_sae_class("topk", saes.TopKSAE, saes.TopKSAEConfig)
        register_sae_training_class("topk", saes.TopKTrainingSAE, saes.TopKTrainingSAEConfig)
    return saes


def _version() -> str:
    from importlib.metadata import version

    return version("sae-lens")
