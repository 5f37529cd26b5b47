"""Group splitting and row expansion against plain numpy loops over rows."""

import numpy as np
import pytest

from jaxq.formats import groups


@pytest.mark.parametrize("rows,size", [(8, 4), (10, 4), (3, 8), (5, 1)])
def test_split_groups_pads_the_last_group_with_zeros(rows, size):
    a = np.arange(1, rows * 3 + 1, dtype=np.float32).reshape(rows, 3)
    out = np.asarray(groups.split_groups(a, size, axis=0))
    assert out.shape == (-(-rows // size), size, 3)
    for r in range(out.shape[0] * size):
        expected = a[r] if r < rows else 0.0
        np.testing.assert_array_equal(out[r // size, r % size], expected)
    # along a later axis: x [T, K] -> [T, G, g]
    np.testing.assert_array_equal(np.asarray(groups.split_groups(a.T, size, axis=1)),
                                  out.transpose(2, 0, 1))


@pytest.mark.parametrize("rows,size", [(8, 4), (10, 4), (3, 8)])
def test_group_mask_marks_real_rows(rows, size):
    mask = np.asarray(groups.group_mask(rows, size)).reshape(-1)
    np.testing.assert_array_equal(mask, np.arange(mask.size) < rows)


@pytest.mark.parametrize("rows,size", [(8, 4), (10, 4), (3, 8), (7, 7)])
def test_expand_rows_gives_each_row_its_group(rows, size):
    per_group = np.arange(1, -(-rows // size) * 2 + 1, dtype=np.float32).reshape(-1, 2)
    out = np.asarray(groups.expand_rows(per_group, size, rows))
    np.testing.assert_array_equal(out, per_group[np.arange(rows) // size])
