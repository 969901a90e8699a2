"""Zoo coverage: each gluoncv family (``zoo_cases.FAMILIES``) through the user's CLI path for ncnn, ONNX and
Tengine (``zoo_check``): no crash; where converted, fp32 parity with MXNet (ncnn, ONNX) and int8 agreement with
deployq's simulation (``deployq verify``'s thresholds). A refusal listed in :data:`KNOWN_REFUSALS` is an xfail,
but its message must name the node; any other refusal fails.

By default only :data:`zoo_cases.FAST` runs; ``DEPLOYQ_ZOO=all`` runs every family (tens of minutes on 2 cores;
``benchmarks/zoo_coverage.py`` prints the whole table).
"""

from __future__ import annotations

import os

import pytest

from .zoo_cases import FAMILIES, FAST
from .zoo_check import ENGINES, FamilyResult, check_family

FULL = os.environ.get("DEPLOYQ_ZOO") == "all"

#: (family, engine) -> a fragment of the refusal message expected today (the IR/exporters lack that op);
#: measured with benchmarks/zoo_coverage.py
KNOWN_REFUSALS: dict[tuple[str, str], str] = {
    **{(f, "tengine"): "(_contrib_BilinearResize2D)" for f in ("cifar_residualattentionnet56",
                                                               "residualattentionnet56")},
}


def _params():
    for f in FAMILIES:
        for e in ENGINES:
            marks = [] if f.name in FAST else [pytest.mark.slow, pytest.mark.skipif(
                not FULL, reason="full zoo sweep: DEPLOYQ_ZOO=all (or benchmarks/zoo_coverage.py)")]
            yield pytest.param(f, e, id=f"{f.name}-{e}", marks=marks)


@pytest.fixture(scope="module")
def zoo_result(tmp_path_factory):
    """family -> its :class:`FamilyResult` (every engine checked once per family)."""
    cache: dict[str, FamilyResult] = {}

    def get(family) -> FamilyResult:
        if family.name not in cache:
            cache[family.name] = check_family(family, tmp_path_factory.mktemp(family.name.replace(".", "_")))
        return cache[family.name]

    return get


@pytest.mark.parametrize(("family", "engine"), list(_params()))
def test_zoo_family(family, engine, zoo_result):
    fr = zoo_result(family)
    assert not fr.error, fr.error
    r = fr.engines[engine]
    if r.status == "unexportable":
        assert family.unexportable, r.message
        pytest.skip(r.message)
    assert not family.unexportable, f"{family.name}: MXNet exports it now; drop its unexportable reason"
    assert r.status != "crashed", f"{family.name} [{engine}] crashed: {r.message}"
    if r.status == "refused":
        assert r.names_node, f"{family.name} [{engine}]: the refusal names no node: {r.message}"
        known = KNOWN_REFUSALS.get((family.name, engine))
        if known is not None and known in r.message:
            pytest.xfail(r.message)
        pytest.fail(f"{family.name} [{engine}]: unexpected refusal: {r.message}")
    assert r.converted
    if engine != "tengine":  # Tengine's export is int8 only
        assert r.fp32_ok, f"{family.name} [{engine}]: fp32 relative error {r.fp32_error:.3g} > 1e-3"
    assert r.int8_ok, f"{family.name} [{engine}]: {r.message} (agreement {r.agreement})"
