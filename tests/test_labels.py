import pytest

from cxr_ray.labels import LABELS, LabelInfo, label_index, parse_kermany_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("train/PNEUMONIA/person1000_bacteria_2931.jpeg", LabelInfo("bacterial", "person1000")),
        ("train/PNEUMONIA/person1000_virus_1681.jpeg", LabelInfo("viral", "person1000")),
        ("person447_virus_921_1.jpeg", LabelInfo("viral", "person447")),
        ("train/NORMAL/IM-0115-0001.jpeg", LabelInfo("normal", "IM-0115")),
        ("NORMAL/IM-0429-0001-0002.jpeg", LabelInfo("normal", "IM-0429")),
        ("NORMAL/NORMAL2-IM-0007-0001.jpeg", LabelInfo("normal", "NORMAL2-IM-0007")),
        # Folder layouts when the name says nothing.
        ("data/BACTERIA/scan1.png", LabelInfo("bacterial", None)),
        ("data/VIRUS/scan1.png", LabelInfo("viral", None)),
        ("data/NORMAL/scan1.png", LabelInfo("normal", None)),
        # PNEUMONIA alone does not say which kind: unknown label.
        ("data/PNEUMONIA/scan1.png", LabelInfo(None, None)),
        ("archive/unlabelled/scan1.dcm", LabelInfo(None, None)),
        ("C:\\exports\\NORMAL\\x.jpeg", LabelInfo("normal", None)),
    ],
)
def test_parse_kermany_path(path, expected):
    assert parse_kermany_path(path) == expected


def test_name_wins_over_folder():
    assert parse_kermany_path("NORMAL/person3_virus_9.jpeg").label == "viral"


def test_vocabulary_order_is_fixed():
    assert LABELS == ("normal", "bacterial", "viral")
    assert [label_index(x) for x in LABELS] == [0, 1, 2]
    with pytest.raises(ValueError):
        label_index("covid")
