"""cxr-ray: distributed fine-tuning and batch scoring of pediatric chest X-rays on Ray.

The public surface is small; everything else is reachable through the CLI (``cxr-ray``)
and the job entrypoints in ``jobs/``. Importing this package has no side effects.
"""

from cxr_ray.labels import LABELS

__all__ = ["LABELS", "__version__"]
__version__ = "0.1.0"
