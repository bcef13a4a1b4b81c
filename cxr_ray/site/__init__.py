"""Site calibration: a labelled sample from a new site turned into a derived model artifact.

A site labels 50-200 of its own images (a folder, a manifest, or a scoring run with the
report's review CSV); ``cxr-ray calibrate`` refits the card's calibration on their raw logits
and writes a derived artifact whose card records its lineage. The parent is never modified.

Rooms, in the order the command runs them:

- ``sample``: read, label, deduplicate and decode the sample (``load_sample``, ``Sample``);
- ``fit``: the MAP refit of temperature / per-class logit scale and offsets (``SiteFit``);
  ``head``: optionally the final linear layer on frozen features;
- ``crossfit``: patient-grouped, stratified folds; every image scored by a fit without it;
- ``guarantee``: the threshold whose one-sided Clopper-Pearson lower bound of sensitivity,
  on the out-of-fold scores, meets the target; otherwise the parent's calibration is kept and
  the number of further labelled positives needed is reported;
- ``bootstrap``: point metrics and patient-bootstrap intervals, parent vs calibrated;
- ``estimates``: ``fit_site``, all of the above on precomputed logits (``SiteResult``);
- ``artifact``: the derived card and artifact (``derived_card``, ``write_site_artifact``);
- ``run``: ``calibrate``, the command end to end, driven by ``Settings.calibrate``.

The text report and the figure are rendered by ``cxr_ray.reporting.site_report``. Measured
error rates of the guarantee: docs/SITE_CALIBRATION.md.
"""

from cxr_ray.site.artifact import FIGURE_FILE, REPORT_FILE, check_out, derived_card, write_site_artifact
from cxr_ray.site.estimates import SiteResult, fit_site
from cxr_ray.site.guarantee import SensitivityGuarantee
from cxr_ray.site.run import calibrate
from cxr_ray.site.sample import Sample, load_sample, read_labels_csv

__all__ = [
    "FIGURE_FILE",
    "REPORT_FILE",
    "Sample",
    "SensitivityGuarantee",
    "SiteResult",
    "calibrate",
    "check_out",
    "derived_card",
    "fit_site",
    "load_sample",
    "read_labels_csv",
    "write_site_artifact",
]
