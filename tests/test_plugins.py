import re
import textwrap
from pathlib import Path

import pytest

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.plugins import (
    PluginError,
    build_route_table,
    make_plugin_manager,
)
from tornado_ollama_proxy.routes import Route
from tornado_ollama_proxy.settings import Settings


@pytest.fixture
def folder(tmp_path):
    def write(name, source):
        (tmp_path / name).write_text(textwrap.dedent(source))
        return str(tmp_path / name)

    write.path = str(tmp_path)
    return write


def test_builtins_then_folder_then_settings_with_later_winning(folder):
    folder(
        "b_more.py",
        """
        from tornado_ollama_proxy import hookimpl

        @hookimpl
        def register_routes():
            return [{"path": "/api/tags", "methods": ["POST"]}, {"path": "/api/x", "methods": ["GET"]}]
    """,
    )
    folder(
        "a_first.py",
        """
        from tornado_ollama_proxy import hookimpl

        @hookimpl
        def register_routes():
            return [{"path": "/api/x", "methods": ["DELETE"]}, {"path": "/api/y", "methods": ["PUT"]}]
    """,
    )
    folder("_notes.txt", "not python")
    settings = Settings(plugins_dir=folder.path, routes=(Route("/api/y", ("PATCH",)),))
    pm = make_plugin_manager(settings)
    names = [name for name, _ in pm.list_name_plugin()]
    assert names[0] == "tornado_ollama_proxy.default_plugins.ollama_routes"
    assert names[-3:] == [folder.path + "/a_first.py", folder.path + "/b_more.py", "settings"]
    table = build_route_table(pm)
    assert table.match("/api/tags")[0].methods == ("POST",)
    assert table.match("/api/x")[0].methods == ("GET",)  # b_more registers after a_first
    assert table.match("/api/y")[0].methods == ("PATCH",)  # settings win
    assert table.match("/api/chat")[0].methods == ("POST",)


def test_plugins_registered_and_unregistered_by_name(tmp_path):
    class Extra:
        @hookimpl
        def register_routes(self):
            return [{"path": "/extra", "methods": ["POST"]}]

    pm = make_plugin_manager(Settings(plugins_dir=str(tmp_path)))
    pm.register(Extra(), name="extra")
    assert build_route_table(pm).match("/extra") is not None
    pm.unregister(name="extra")
    assert build_route_table(pm).match("/extra") is None
    pm.unregister(name="tornado_ollama_proxy.default_plugins.ollama_routes")
    assert build_route_table(pm).match("/api/chat") is None


def test_a_plugin_returning_none_adds_nothing(tmp_path):
    class Quiet:
        @hookimpl
        def register_routes(self):
            return None

    pm = make_plugin_manager(Settings(plugins_dir=str(tmp_path)))
    pm.register(Quiet(), name="quiet")
    assert len(build_route_table(pm)) == len(
        build_route_table(make_plugin_manager(Settings(plugins_dir=str(tmp_path))))
    )


def test_the_shipped_plugins_folder_runs_nothing():
    assert [path.name for path in Path("plugins").iterdir()] == ["README.md"]
    assert build_route_table(make_plugin_manager(Settings(plugins_dir="plugins"))).match("/api/models") is None


def test_the_example_in_the_plugins_readme_works_when_dropped_in(folder):
    [example] = re.findall(r"```python\n(.+?)```", Path("plugins/README.md").read_text(), re.S)
    folder("models_alias.py", example)
    pm = make_plugin_manager(Settings(plugins_dir=folder.path))
    route, params = build_route_table(pm).match("/api/models")
    assert route.upstream_target(params) == "/api/tags"


@pytest.mark.parametrize(
    "source, message",
    [
        ("import no_such_module_here\n", "failed to load: ModuleNotFoundError: No module named 'no_such_module_here'"),
        ("def broken(:\n", "failed to load: SyntaxError"),
        (
            "from tornado_ollama_proxy import hookimpl\n@hookimpl\ndef register_routes(nonsense):\n    return []\n",
            "failed to load: PluginValidationError",
        ),
    ],
)
def test_a_plugin_file_that_fails_stops_start_up_with_its_name(folder, source, message):
    path = folder("broken.py", source)
    with pytest.raises(PluginError) as caught:
        make_plugin_manager(Settings(plugins_dir=folder.path))
    assert f"plugin {path} {message}" in str(caught.value)


def test_a_misspelled_hook_is_caught_at_start_up(folder):
    folder("typo.py", "from tornado_ollama_proxy import hookimpl\n@hookimpl\ndef register_rotues():\n    return []\n")
    with pytest.raises(PluginError) as caught:
        make_plugin_manager(Settings(plugins_dir=folder.path))
    assert "typo.py" in str(caught.value) and "register_rotues" in str(caught.value)


def test_bad_route_entry_from_a_plugin_names_the_plugin(folder):
    path = folder(
        "bad.py",
        """
        from tornado_ollama_proxy import hookimpl

        @hookimpl
        def register_routes():
            return [{"path": "/ok", "methods": ["GET"]}, {"path": "nope", "methods": ["GET"]}]
    """,
    )
    pm = make_plugin_manager(Settings(plugins_dir=folder.path))
    with pytest.raises(PluginError) as caught:
        build_route_table(pm)
    assert str(caught.value) == f"plugin {path}: route entry 1: path: must be a string starting with '/', got 'nope'"


def test_a_plugin_hook_that_raises_names_the_plugin(folder):
    path = folder(
        "raises.py",
        """
        from tornado_ollama_proxy import hookimpl

        @hookimpl
        def register_routes():
            raise RuntimeError("boom")
    """,
    )
    with pytest.raises(PluginError) as caught:
        build_route_table(make_plugin_manager(Settings(plugins_dir=folder.path)))
    assert str(caught.value) == f"plugin {path}: register_routes failed: RuntimeError: boom"


def test_a_configured_plugins_dir_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(PluginError) as caught:
        make_plugin_manager(Settings(plugins_dir=str(tmp_path / "nope")))
    assert "plugins_dir:" in str(caught.value) and "is not a folder" in str(caught.value)


def test_the_default_plugins_dir_may_be_absent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pm = make_plugin_manager(Settings())
    assert build_route_table(pm).match("/api/chat") is not None


def test_installed_packages_register_through_the_entry_point_group(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "demo_proxy_plugin.py").write_text(
        "from tornado_ollama_proxy import hookimpl\n"
        "@hookimpl\n"
        "def register_routes():\n"
        "    return [{'path': '/api/demo', 'methods': ['GET']}]\n"
    )
    dist = site / "demo_proxy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-proxy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tornado_ollama_proxy]\ndemo = demo_proxy_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    pm = make_plugin_manager(Settings(plugins_dir=str(tmp_path)))
    assert "demo" in [name for name, _ in pm.list_name_plugin()]
    assert build_route_table(pm).match("/api/demo") is not None
