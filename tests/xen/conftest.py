"""The real-Xen check is opt-in: it boots Xen under QEMU for about a minute."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "xenvm: boots real Xen under QEMU TCG (runs only with XS_XENVM=1; tests/xen/README.md)"
    )
