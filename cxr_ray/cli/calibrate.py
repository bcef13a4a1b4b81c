"""``cxr-ray calibrate``: fit a site's operating point on a small labelled sample."""
