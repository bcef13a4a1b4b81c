"""The class vocabulary and how labels and patient ids are read from Kermany file names.

Data card (Kermany, Zhang, Goldbaum et al., Cell 172(5), 2018, doi:10.1016/j.cell.2018.02.010;
Mendeley Data doi:10.17632/rscbjbr9sj.2, CC BY 4.0): pediatric (1-5 years) anterior-posterior
chest X-rays from Guangzhou Women and Children's Medical Center, graded by two physicians.
File names carry the label and the patient:

- ``PNEUMONIA/person1000_bacteria_2931.jpeg`` -> bacterial, patient ``person1000``
- ``PNEUMONIA/person1000_virus_1681.jpeg``    -> viral, patient ``person1000``
- ``NORMAL/IM-0115-0001.jpeg``               -> normal, patient ``IM-0115``
- ``NORMAL/NORMAL2-IM-0007-0001.jpeg``       -> normal, patient ``NORMAL2-IM-0007``

This module is the only place that knows the label names or their order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

#: Output order of every model, probability column and metric table.
LABELS: tuple[str, ...] = ("normal", "bacterial", "viral")
NORMAL, BACTERIAL, VIRAL = LABELS
#: Labels that count as "pneumonia" for the binary screen.
PNEUMONIA_LABELS: frozenset[str] = frozenset({BACTERIAL, VIRAL})

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)
_FOLDER_LABELS = {
    "normal": NORMAL,
    "bacteria": BACTERIAL,
    "bacterial": BACTERIAL,
    "virus": VIRAL,
    "viral": VIRAL,
}


@dataclass(frozen=True, slots=True)
class LabelInfo:
    label: str | None
    patient_id: str | None


def label_index(label: str) -> int:
    """Position of ``label`` in model outputs (raises ``ValueError`` for unknown labels)."""
    return LABELS.index(label)


def parse_kermany_path(path: str) -> LabelInfo:
    """Label and patient id from a Kermany-style path; ``None`` where they cannot be told.

    The file name wins; the parent folders are used when the name says nothing
    (``NORMAL/x.png`` -> normal; ``PNEUMONIA/x.png`` -> unknown subtype, so no label).

    >>> parse_kermany_path("train/PNEUMONIA/person12_virus_44.jpeg")
    LabelInfo(label='viral', patient_id='person12')
    """
    p = PurePosixPath(path.replace("\\", "/"))
    name = p.name
    m = _PERSON.match(name)
    if m:
        kind = m.group(2).lower()
        return LabelInfo(BACTERIAL if kind == "bacteria" else VIRAL, m.group(1).lower())
    m = _NORMAL.match(name)
    if m:
        return LabelInfo(NORMAL, m.group(1).upper())
    for folder in reversed(p.parts[:-1]):
        label = _FOLDER_LABELS.get(folder.lower())
        if label is not None:
            return LabelInfo(label, None)
    return LabelInfo(None, None)
