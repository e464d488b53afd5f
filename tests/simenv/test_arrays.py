import numpy as np

from simenv.arrays import first_occurrence, unique_rows


def test_first_occurrence_golden():
    a = np.array([[3, 1, 3, 2, 1], [5, 5, 5, 5, 5], [-1, 4, -1, 4, 0]])
    expected = np.array(
        [
            [True, True, False, True, False],
            [True, False, False, False, False],
            [True, True, False, False, True],
        ]
    )
    assert np.array_equal(first_occurrence(a), expected)


def test_unique_rows_keeps_order_and_pads():
    a = np.array([[3, 1, 3, 2, 1], [5, 5, 5, 5, 5], [-1, 4, -1, 4, 0]])
    expected = np.array([[3, 1, 2, -1, -1], [5, -1, -1, -1, -1], [4, 0, -1, -1, -1]])
    assert np.array_equal(unique_rows(a), expected)


def test_unique_rows_matches_python_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(-1, 6, size=(200, 9))
    got = unique_rows(a)
    for row, out in zip(a, got, strict=True):
        ref = list(dict.fromkeys(int(x) for x in row if x >= 0))
        assert out.tolist() == ref + [-1] * (len(row) - len(ref))
