"""Shared pytest set-up: fixture modules are registered here as plugins."""

pytest_plugins: list[str] = [
    "tests.fixtures.image_corpus",
    "tests.fixtures.emulators",
    "tests.fixtures.warehouses",
    "tests.fixtures.datasets",
    "tests.fixtures.models",
    "tests.fixtures.portable_runners",
]
