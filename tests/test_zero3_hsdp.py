"""HSDP with stage 3 (``fnnet.distributed.HSDP(mesh, stage=3)``): its options. The 4-rank checks (a 2 x 2
mesh, float64, against one process at 1e-10 with Adam and with clip_by_global_norm + AdamW, and against
torch's ``fully_shard(mesh=...)`` after 10 Adam steps, with the collectives of a step; every step leaves
the state passed in unchanged) are
``tests/_zero3_hsdp_worker.py``, run inside the one 4-rank launch of ``tests/test_distributed.py``
(``test_strategies_on_four_ranks_...``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fnnet import distributed


def test_hsdp_says_which_stages_it_takes():
    mesh = SimpleNamespace(ndim=2, mesh_dim_names=("replicate", "shard"), shape=(2, 2))  # a mesh's description
    for bad in (1, True, 4):
        with pytest.raises(ValueError, match=r"HSDP\(mesh, stage=...\) takes 2 .* or 3 .*, got " + repr(bad)):
            distributed.HSDP(mesh, stage=bad)
    with pytest.raises(ValueError, match="units are stage 3's"):
        distributed.HSDP(mesh, units=["blocks.0"])
    assert repr(distributed.HSDP(mesh, stage=3)) == "HSDP(mesh shape (2, 2), stage=3)"
    with_units = distributed.HSDP(mesh, stage=3, units=["blocks"])
    assert repr(with_units) == "HSDP(mesh shape (2, 2), stage=3, units=['blocks'])"
    assert repr(distributed.HSDP(mesh)) == "HSDP(mesh shape (2, 2))"
    with pytest.raises(ValueError, match="2-D DeviceMesh"):
        distributed.HSDP(object(), stage=3)
