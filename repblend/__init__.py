"""repblend: multimodal dataset distillation (RepBlend) on Ray.

The library surface a user needs without the CLI; everything else lives in `repblend.stages` (the algorithm),
`repblend.pipeline` (config, CLI, run directory) and `repblend.distributed` (Ray glue).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DistilledSet", "load_distilled", "train_on", "__version__"]

if TYPE_CHECKING:
    from repblend.pipeline.evaluation import train_on
    from repblend.stages.export import DistilledSet, load_distilled


def __getattr__(name: str) -> Any:
    # lazy, so `import repblend` (and every `repblend.*` subpackage import) does not load torch and safetensors
    if name in ("DistilledSet", "load_distilled"):
        from repblend.stages import export

        return getattr(export, name)
    if name == "train_on":
        from repblend.pipeline.evaluation import train_on

        return train_on
    raise AttributeError(f"module 'repblend' has no attribute {name!r}")
