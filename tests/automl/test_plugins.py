"""``automl._plugins``: the one place plugin modules are imported."""

from __future__ import annotations

import sys

import pytest

from automl._plugins import PluginError, import_plugins


def test_plugins_are_imported_in_order_and_a_failure_names_its_place_and_cause():
    sys.modules.pop("tests.fixtures.gate", None)
    import_plugins(["tests.fixtures.gate"])  # a module with no registration: importing leaks nothing
    assert "tests.fixtures.gate" in sys.modules
    with pytest.raises(PluginError) as raised:
        import_plugins(["json", "tests.fixtures.gate", "no_such_plugin_xyz"])
    assert str(raised.value) == "plugins[2]: module 'no_such_plugin_xyz' cannot be imported: ModuleNotFoundError: No module named 'no_such_plugin_xyz'"
    assert isinstance(raised.value.__cause__, ModuleNotFoundError), "the import error stays reachable as the cause"
    assert isinstance(raised.value, ValueError), "a config validator turns it into the config's one-line error"
