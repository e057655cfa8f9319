"""No token or secret value used anywhere in the suite appears in anything it produced."""

from __future__ import annotations

import pytest

from tests.conftest import SecretRegistry


@pytest.mark.secret_scan
def test_no_secret_appears_in_any_log_stderr_status_or_state_output(
    secret_registry: SecretRegistry,
) -> None:
    assert secret_registry.paths or secret_registry.texts, "nothing was registered to scan"
    assert secret_registry.findings() == []
