"""Ingestion: find the images of a source, read their bytes, describe and split them.

``sources.list_source`` turns a folder, tar/zip archive, Parquet table, object-store prefix
or manifest into read units; ``dicomweb`` lists a PACS with QIDO-RS (``list_units``) and
retrieves instances with WADO-RS (``read_instances``); ``readers.read_unit`` is a Ray read
task's work and ``datasource`` the Ray Data datasource over units. ``manifest`` identifies
each file (``image_id``, label, patient, geometry, status; ``write_manifest``,
``source_dataset``), ``splits.split_manifest`` makes the patient-grouped, class-stratified
train/validation split, ``synthetic`` writes the demo's and tests' generated images, and
``site_shift`` re-renders real images as another site would have acquired them.
"""
