"""Pixels and headers: how one image's bytes become the network's input.

The one preprocessing contract shared by training, INT8/TensorRT calibration and scoring
(``preprocess.decode`` -> 8-bit grayscale resized to the card's input size, optional
histogram equalisation or CLAHE, then ``to_model_input``; ``PreprocessSpec`` describes it),
DICOM pixels as a viewer shows them (``dicom.decode_dicom``: modality/VOI LUT, MONOCHROME1,
bit depth) and the DICOM header read without pixels (``dicom_header.read_header`` ->
``DicomHeader``, the study identity and acquisition tags), batched GPU JPEG decoding with
the same contract (``gpu_decode.decode_batch``), and per-image input statistics for drift
(``stats.input_stats``). It imports only ``io`` and the leaf modules; it knows nothing of
Ray, models or outputs.
"""
