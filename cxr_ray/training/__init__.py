"""The fine-tuning recipe as library code; ``trainers/`` assembles it into a Ray Train run.

``trainer.train(settings, source, out)`` is ``cxr-ray train``: ``data.prepare`` lists and
splits the source into decoded Ray Datasets, ``trainer.build_trainer`` makes the Ray Train
``TorchTrainer`` whose ``train_loop_per_worker`` runs the DDP workers (``recipe``:
optimiser, schedule, loss, freezing; ``loop``: one epoch, validation, precision; ``augment``;
``checkpoint`` for exact resumes; ``distributed`` collectives), and
``finalize.write_artifact`` turns the best checkpoint into a model artifact with its card,
calibration, drift reference and figures.
"""
