"""The fine-tuning recipe as library code; ``trainers/`` assembles it into a Ray Train run."""
