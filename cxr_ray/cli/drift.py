"""``cxr-ray drift-reference``: add a drift reference to an artifact trained before they existed."""
