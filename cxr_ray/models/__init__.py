"""Networks, offline pretrained weights, model cards and artifacts."""
