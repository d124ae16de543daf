"""Each conformance check as one pytest test (collected by ``pytest --pyargs tokenmill.conformance``)."""
from __future__ import annotations

import pytest

from tokenmill.conformance.results import FAIL, SKIP


def test_conformance(conformance_check, conformance_report):
    result = conformance_check.run()
    conformance_report.results.append(result)
    if result.status == SKIP:
        pytest.skip(result.detail)
    if result.status == FAIL:
        pytest.fail(f"{conformance_check.title}\n{result.detail}", pytrace=False)
