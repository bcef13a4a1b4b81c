"""What a person reads: the HTML report, the review worklist and the model card text.

``report.write_report(run_dir)`` renders a scoring run's outputs into one self-contained
HTML file (figures and thumbnails inlined, works offline): counts, metrics and confusion when
labels exist, the drift section (``drift_section``), and the review worklist
(``review.worklist`` / ``review.review_html``: flagged studies plus a random sample, marked in
the browser by ``static/review.js`` and exported as the CSV ``cxr-ray calibrate`` reads).
``card_md.render`` writes ``model_card.md``; ``site_report`` is what ``cxr-ray calibrate``
prints and plots. It reads outputs and artifacts; it never runs Ray.
"""
